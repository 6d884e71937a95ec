"""Stage 2: the adapter learns to speak to the LLM — knowledge distillation in the way of Ultravox.

The SpeechLM (from stage 1) and the LLM are frozen; only the Perceiver adapter trains. For a clip and
an instruction ("repeat what was said", "summarise it", ...):

    teacher: the LLM reading   <audio>{transcript}</audio>\\n{instruction}   (no gradient)
    student: the LLM reading   <audio>{adapter(SpeechLM features of the audio)}</audio>\\n{instruction}

and both are teacher-forced on the same reply (the transcript for "repeat", otherwise the teacher's own
cached greedy answer). The loss is the KL divergence from the teacher's to the student's next-token
distribution at every reply position (temperature `align.kd_temperature`, scaled by T^2), plus the
cross-entropy of the transcript for "repeat". One LLM serves both passes: there is no second copy.

The SpeechLM features come from audio alone (text and style dropped), so the transcript never leaks
into the student. The checkpoint holds the SpeechLM, codec, style encoder (when stage 1 had one) and
the adapter; the LLM is recorded by name and loaded again, frozen, wherever the checkpoint is used.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ira.checkpoint import Checkpoint, load_checkpoint, require_stage
from ira.config import IRAConfig
from ira.data.dataset import LengthBucketBatchSampler
from ira.data.prepare import ensure_prepared
from ira.data.token_cache import TokenSplit, cache_dir, load_split
from ira.eval.quality import SPEECH_EVAL_KEY
from ira.eval.understanding import score_understanding
from ira.hardware import resolve_device
from ira.models.adapter import PerceiverAdapter
from ira.models.hub import (CodecState, codec_from_checkpoint, speech_lm_from_checkpoint,
                            style_encoder_from_checkpoint, tokenizer_from_checkpoint)
from ira.models.llm import LoadedLLM, load_llm, recomputing_activations
from ira.models.phoneme_speller import PhonemeSpeller, spell
from ira.models.splice import build_student_inputs, build_teacher_inputs, reply_logits
from ira.models.vocabulary_reader import VocabularyReader
from ira.text_metrics import corpus_cer
from ira.training.engine import FitResult, Trainer, process_device
from ira.training.feature_cache import FeatureSplit
from ira.training.feature_cache import load_or_build as load_or_build_features
from ira.training.task import TrainingTask, inherit_frozen_sections
from ira.training.teacher_responses import TASK_INSTRUCTIONS, cache_path, load_or_build, parse_tasks, reply_for

log = logging.getLogger(__name__)
SPEECH_LM_STAGES = ("1", "2", "3")
REPEAT = "repeat"


class ClipTaskDataset(Dataset):
    """Every (clip, task) pair of a split: item i is clip i // n_tasks with task i % n_tasks. Items carry
    the clip's cached SpeechLM features and its transcript's LLM token ids."""

    def __init__(self, split: TokenSplit, tasks: list[str], replies: dict[tuple[str, str], str],
                 max_frames: int, features: FeatureSplit, llm_ids: list[list[int]], phonemes: list[list[int]]):
        self.split, self.tasks, self.replies, self.max_frames = split, tasks, replies, max_frames
        self.features, self.llm_ids, self.phonemes = features, llm_ids, phonemes

    def __len__(self) -> int:
        return len(self.split) * len(self.tasks)

    def lengths(self) -> list[int]:
        return [min(n, self.max_frames) for n in self.split.lengths() for _ in self.tasks]

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip, task = divmod(i, len(self.tasks))
        task_name = self.tasks[task]
        text = self.split.texts[clip]
        return {"features": self.features.clip_features(clip), "clip": clip, "llm_ids": self.llm_ids[clip],
                "phonemes": self.phonemes[clip], "instruction": TASK_INSTRUCTIONS[task_name], "transcript": text,
                "response": reply_for(self.replies, self.split.ids[clip], task_name, text),
                "is_repeat": task_name == REPEAT}


def collate_clip_tasks(items: list[dict[str, Any]]) -> dict[str, Any]:
    features = torch.nn.utils.rnn.pad_sequence([item["features"] for item in items], batch_first=True)
    lengths = torch.tensor([item["features"].shape[0] for item in items])
    return {"features": features, "features_lengths": lengths,
            "clip": torch.tensor([item["clip"] for item in items]),
            "llm_ids": [item["llm_ids"] for item in items], "phonemes": [item["phonemes"] for item in items],
            "is_repeat": torch.tensor([item["is_repeat"] for item in items]),
            "instructions": [item["instruction"] for item in items],
            "transcripts": [item["transcript"] for item in items],
            "responses": [item["response"] for item in items]}


def response_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each reply token: (logits [M, V], targets [M], sample of each row [M]).

    Position t predicts token t + 1. Rows come in reading order, so a teacher and a student batch with
    the same replies give row-by-row aligned results whatever their prompts' lengths.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
    return logits[:, :-1][keep], targets[keep], rows[keep]


def distillation_losses(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                        ce_rows: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """KL(teacher || student) at temperature T (times T^2, per reply token), CE on the rows in
    `ce_rows` (bool [M]), and top-1 agreement between the two."""
    student, teacher = student.float(), teacher.float()
    t = temperature
    kd = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  log_target=True, reduction="none").sum(-1).mean() * t * t
    if bool(ce_rows.any()):
        ce = F.cross_entropy(student[ce_rows], targets[ce_rows])
    else:
        ce = student.sum() * 0.0
    agreement = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return {"kd_loss": kd, "ce_loss": ce, "agreement": agreement}


class Stage2Task(TrainingTask):
    """Adapter alignment. Built from a stage-1 (or later) checkpoint, whose parts stay frozen."""

    stage = "2"
    best_metric = ("val_choice_accuracy", "max")
    find_unused_parameters = True  # the phoneme head rests when its weight is 0, the CTC head after the phase

    def __init__(self, cfg: IRAConfig, source: Checkpoint, llm: Optional[LoadedLLM] = None, cpu: bool = False):
        self.cfg = cfg
        self.source = source
        self.codec = codec_from_checkpoint(source, cfg)
        self.tokenizer = tokenizer_from_checkpoint(source)
        self.speech_lm = speech_lm_from_checkpoint(source)
        for p in self.speech_lm.parameters():
            p.requires_grad_(False)
        self.style_encoder = style_encoder_from_checkpoint(source) if "style" in source.modules else None
        self.codec_state = CodecState(self.codec)
        self.llm = llm or load_llm(cfg.llm, device=process_device(cpu))
        n_blocks = self.speech_lm.cfg.n_layers
        if cfg.adapter.feature_layer > n_blocks:
            raise ValueError(f"adapter.feature_layer is {cfg.adapter.feature_layer} but the SpeechLM of {source.path} "
                             f"has {n_blocks} blocks; use 0 (its output) or 1..{n_blocks}")
        self.tasks = parse_tasks(cfg.align.tasks)
        self._last_replies: list[dict[str, Any]] = []
        self._steps_done = 0  # training_step calls so far: the alignment phase is the first align.ctc_steps
        self._phase_timed_out = False   # the alignment phase ended by its share of the time budget (align.ctc_share)
        self._understanding: Optional[dict[str, Any]] = None  # the last validation's figures, for the checkpoint

        prepared = ensure_prepared(cfg)
        if prepared.codec.fingerprint != self.codec.fingerprint:
            raise ValueError(f"{source.path} was trained with the codec {self.codec.fingerprint}, but "
                             f"{cfg.data.dir} is tokenised with {prepared.codec.fingerprint}; use the data "
                             f"and codec settings of stage 1")
        self.train_split = load_split(prepared.cache_files["train"], self.codec.fingerprint)
        self.val_split = load_split(prepared.cache_files["val"], self.codec.fingerprint)
        if len(self.train_split) == 0:
            raise ValueError(f"{cfg.data.dir}: the training split is empty; add clips or lower data.val_fraction")
        clips = [(i, t) for split in (self.train_split, self.val_split) for i, t in zip(split.ids, split.texts)]
        self.replies_path = cache_path(cfg.data.dir, self.llm.name, self.tasks, cfg.align.teacher_max_new_tokens)
        self.replies = load_or_build(self.llm, clips, self.tasks, self.replies_path,
                                     cfg.align.teacher_max_new_tokens, cfg.align.teacher_batch_size,
                                     progress=_ThrottledLog())
        max_frames = self.speech_lm.cfg.max_audio_frames
        self.features = {name: load_or_build_features(
            cache_dir(cfg.data.dir, self.codec.fingerprint) / f"speech_features_{name}.safetensors",
            self.speech_lm, split, cfg.adapter.feature_layer, max_frames, progress=_ThrottledLog())
            for name, split in (("train", self.train_split), ("val", self.val_split))}
        self.llm_ids = {name: [self.llm.encode(t) for t in split.texts]
                        for name, split in (("train", self.train_split), ("val", self.val_split))}
        self.phonemes = {name: [self.tokenizer.encode(t) for t in split.texts]
                         for name, split in (("train", self.train_split), ("val", self.val_split))}
        too_long = sum(len(row) > cfg.adapter.n_latents for row in self.llm_ids["train"])
        if too_long and cfg.align.ctc_steps:
            log.warning("%d of %d training transcripts have more LLM tokens than the adapter's %d soft tokens: "
                        "the alignment phase cannot spell them (raise adapter.n_latents)", too_long,
                        len(self.train_split), cfg.adapter.n_latents)
        vocab = sorted({t for ids in self.llm_ids.values() for row in ids for t in row})
        # the reader of the soft tokens: the adapter's own in "vocabulary" mode (it decides what the LLM
        # hears, its directions train), a frozen training aid over the LLM's rows in "free" mode
        vocabulary_output = cfg.adapter.output == "vocabulary"
        speller = None
        if cfg.adapter.spelled:
            pieces = [self.llm.tokenizer.decode([t]) for t in vocab]
            speller = PhonemeSpeller(spell(pieces, self.tokenizer.encode), self.tokenizer.vocab_size,
                                     self.llm.hidden_size)
        reader = VocabularyReader.from_llm_table(self.llm.model.get_input_embeddings().weight, vocab,
                                                 trainable=vocabulary_output, speller=speller)
        self.adapter = PerceiverAdapter(cfg.adapter, in_dim=self.speech_lm.cfg.d_model,
                                        out_dim=self.llm.hidden_size, target_norm=self.llm.embed_norm,
                                        reader=reader if vocabulary_output else None)
        self.reader = reader
        self.adapter.start_cue(self.llm.model.get_input_embeddings().weight.detach()[vocab].float(),
                               torch.Generator().manual_seed(cfg.training.seed))
        self.phoneme_head = torch.nn.Linear(cfg.adapter.dim, self.tokenizer.vocab_size + 1)

    # -- the engine's interface -------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        parts: dict[str, torch.nn.Module] = {"speech_lm": self.speech_lm, "codec": self.codec_state,
                                             "adapter": self.adapter, "align_phonemes": self.phoneme_head}
        if self.adapter.reader is None:
            parts["align_ctc"] = self.reader
        if self.style_encoder is not None:
            parts["style"] = self.style_encoder
        return parts

    def setup(self, device: torch.device) -> None:
        if self.llm.quantized:          # bitsandbytes places 4-bit weights itself
            return
        self.llm.model.to(device)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        parts = [self.adapter, self.phoneme_head] + ([self.reader] if self.adapter.reader is None else [])
        cue = self.adapter.cue
        # in "vocabulary" mode the reader is the adapter's
        groups: list[dict[str, Any]] = [{"params": [p for part in parts for p in part.parameters() if p is not cue]}]
        if cue is not None:
            groups.append({"params": [cue], "lr": self.cfg.align.cue_learning_rate, "weight_decay": 0.0})
        return groups

    def may_be_best(self) -> bool:
        """Not during the alignment phase when only the distillation trains the cue: an untrained cue (LLM
        embeddings of random word pieces) can score the choice well while the LLM rambles on every clip."""
        return not (self.in_alignment_phase and self.adapter.cue is not None and not self.cfg.align.distill_reading)

    @property
    def reading_frozen(self) -> bool:
        """After the alignment phase with align.distill_reading false: only the cue learns."""
        return not self.in_alignment_phase and not self.cfg.align.distill_reading

    def _loader(self, split: TokenSplit, shuffle: bool) -> DataLoader:
        name = "train" if split is self.train_split else "val"
        dataset = ClipTaskDataset(split, self.tasks, self.replies, self.speech_lm.cfg.max_audio_frames,
                                  self.features[name], self.llm_ids[name], self.phonemes[name])
        tc = self.cfg.training
        sampler = LengthBucketBatchSampler(dataset.lengths(), tc.batch_size, tc.max_batch_frames,
                                           shuffle=shuffle, seed=tc.seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_clip_tasks,
                          num_workers=self.cfg.data.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> Optional[DataLoader]:
        return self._loader(self.val_split, shuffle=False) if len(self.val_split) else None

    # -- one step ---------------------------------------------------------------------------------

    @property
    def in_alignment_phase(self) -> bool:
        return self._steps_done < self.cfg.align.ctc_steps and not self._phase_timed_out

    def on_budget_used(self, share: float) -> None:
        """End the alignment phase once it has had its share of the time budget (`align.ctc_share`), even
        before `align.ctc_steps`: on a slower or busier machine the distillation that trains the cue (what
        makes the LLM repeat, then stop) still gets its minutes."""
        limit = self.cfg.align.ctc_share
        if limit is None or share < limit or not self.in_alignment_phase:
            return
        self._phase_timed_out = True
        log.warning("stage 2: the alignment phase ends at step %d of its %d (align.ctc_steps): it has had its %.0f%% "
                    "of the time budget (align.ctc_share); give stage 2 more minutes for the whole phase",
                    self._steps_done, self.cfg.align.ctc_steps, 100 * limit)

    def _ctc_losses(self, batch: dict[str, Any], soft: torch.Tensor, frames: torch.Tensor,
                    frames_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"ctc_loss": self.reader.ctc_loss(soft, batch["llm_ids"])}
        if self.cfg.align.phoneme_ctc_weight > 0:
            targets = [torch.tensor(p, dtype=torch.long) + 1 for p in batch["phonemes"]]  # 0 = blank
            log_probs = self.phoneme_head(frames).float().log_softmax(-1)
            out["phoneme_ctc_loss"] = F.ctc_loss(
                log_probs.transpose(0, 1), torch.cat(targets).to(log_probs.device), frames_valid.sum(1).cpu(),
                torch.tensor([len(t) for t in targets]), reduction="mean", zero_infinity=True)
        return out

    def batch_soft_tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's cached features -> (soft tokens [B, N, H] before the reader, encoded frames, their mask)."""
        features = batch["features"]
        mask = torch.arange(features.shape[1], device=features.device)[None] \
            < batch["features_lengths"][:, None].to(features.device)
        frames, frames_valid = self.adapter.encode_frames(features.float(), mask)
        return self.adapter.read(frames, frames_valid), frames, frames_valid

    def _losses(self, batch: dict[str, Any], alignment_phase: bool) -> dict[str, torch.Tensor]:
        k = self.cfg.align.llm_batch_size or len(batch["instructions"])
        out: dict[str, torch.Tensor] = {}
        if not alignment_phase and self.reading_frozen:   # the LLM's clips only; no CTC: nothing it trains
            with torch.no_grad():
                spoken = self.adapter.spoken(self.batch_soft_tokens(
                    {"features": batch["features"][:k], "features_lengths": batch["features_lengths"][:k]})[0])
        else:
            soft, frames, frames_valid = self.batch_soft_tokens(batch)
            out.update(self._ctc_losses(batch, soft, frames, frames_valid))
            if alignment_phase:
                return out
            spoken = self.adapter.spoken(soft[:k])
        instructions, transcripts, responses = (batch[key][:k] for key in ("instructions", "transcripts", "responses"))
        student_in = build_student_inputs(self.llm, instructions, self.adapter.cued(spoken), responses)
        with torch.no_grad():
            teacher_in = build_teacher_inputs(self.llm, instructions, transcripts, responses)
            teacher = response_logits(*reply_logits(self.llm, teacher_in))[0]
        with recomputing_activations(self.llm, self.cfg.align.llm_recompute):
            student, targets, rows = response_logits(*reply_logits(self.llm, student_in))
        if student.shape != teacher.shape:
            raise RuntimeError(f"teacher and student replies differ in length ({teacher.shape[0]} vs "
                               f"{student.shape[0]} tokens): the splice layout is inconsistent")
        ce_rows = batch["is_repeat"][:k].to(rows.device)[rows]
        out.update(distillation_losses(student, teacher, targets, ce_rows, self.cfg.align.kd_temperature))
        return out

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        alignment_phase = self.in_alignment_phase
        self._steps_done += 1
        out = self._losses(batch, alignment_phase)
        a = self.cfg.align
        phoneme = a.phoneme_ctc_weight * out["phoneme_ctc_loss"] if "phoneme_ctc_loss" in out else 0.0
        if alignment_phase:
            loss = out["ctc_loss"] + phoneme
        else:
            loss = a.kd_weight * out["kd_loss"] + a.ce_weight * out["ce_loss"]
            if "ctc_loss" in out:
                loss = loss + a.ctc_weight * out["ctc_loss"]
        logged = {key: value.detach() for key, value in out.items()}
        return {"loss": loss, **logged, "alignment_phase": float(alignment_phase),
                "frames": int(batch["features_lengths"].sum())}

    def validate(self, loader: Any) -> dict[str, float]:
        """The alignment losses over the validation clips, and what the LLM hears in the first
        `align.eval_clips` of them: 4-way choice accuracy (the best checkpoint's figure), judge margin,
        "repeat" CER and adapter cosine (`ira eval understanding`'s figures), and what the soft tokens
        spell when each is read as its nearest LLM token (CTC CER)."""
        sums: dict[str, float] = {}
        count = 0
        for batch in loader:
            out = self._losses(batch, alignment_phase=True)
            n = len(batch["instructions"])
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            count += n
        metrics = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
        self._last_replies = []
        n_clips = min(self.cfg.align.eval_clips, len(self.val_split))
        if n_clips >= 4:
            tokens = self._val_soft_tokens(n_clips)
            heard = list(self.adapter.heard(tokens))
            score = score_understanding(self.llm, lambda indices: [heard[i] for i in indices],
                                        self.val_split.texts[:n_clips], max_new_tokens=self.cfg.llm.max_new_tokens)
            metrics.update(score.metrics(prefix="val_"))
            self._understanding = {**score.metrics(), "clips": n_clips, "on": "validation clips"}
            spelled = self.reader.decode(tokens)
            metrics["val_ctc_cer"] = corpus_cer(self.val_split.texts[:n_clips],
                                                [self.llm.tokenizer.decode(ids) for ids in spelled])
            self._last_replies = [{"id": self.val_split.ids[i], **row} for i, row in enumerate(score.rows)]
        return metrics

    def _val_soft_tokens(self, n_clips: int) -> torch.Tensor:
        """The adapter's soft tokens [n_clips, N, H] of the first validation clips (from the feature cache),
        before its reader."""
        device = next(self.adapter.parameters()).device
        features = [self.features["val"].clip_features(i) for i in range(n_clips)]
        batch = {"features": torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(device),
                 "features_lengths": torch.tensor([f.shape[0] for f in features])}
        return self.batch_soft_tokens(batch)[0]

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        """Write what the LLM heard in the validation clips just scored (transcript vs reply)."""
        if not self._last_replies:
            return []
        path = out_dir / "replies.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in self._last_replies))
        return [str(path)]

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self._steps_done, "phase_timed_out": self._phase_timed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps_done = int(state.get("steps_done", 0))
        self._phase_timed_out = bool(state.get("phase_timed_out", False))

    def checkpoint_metadata(self) -> dict[str, str]:
        # stage 1's speech_eval too: the SpeechLM is stage 1's, frozen, so its measured speech is this one's
        meta = {key: self.source.metadata[key] for key in ("codec_fingerprint", "codec_meta", "tokenizer",
                                                            "speech_lm", SPEECH_EVAL_KEY)
                if key in self.source.metadata}
        if self.style_encoder is not None:
            meta.update(self.style_encoder.metadata())
        meta["adapter"] = json.dumps(self.adapter.config_dict())
        meta["llm"] = json.dumps({"name": self.llm.name, "source": self.llm.source, "bundled": self.llm.bundled,
                                  "hidden_size": self.llm.hidden_size})
        meta["align_tasks"] = ",".join(self.tasks)
        if self._understanding is not None:  # what the app shows next to "the LLM can answer about its audio"
            meta["understanding"] = json.dumps(self._understanding)
        return meta


class _ThrottledLog:
    """Progress lines for a long loop, at most one every `every_s` seconds (and the last one)."""

    def __init__(self, every_s: float = 15.0):
        self.every_s, self.last = every_s, -float("inf")

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or fraction >= 1.0:
            self.last = now
            log.info("%3.0f%% %s", 100 * fraction, message)


def run_stage2(cfg: IRAConfig, resume_from: str | Path, cpu: bool = False,
               llm: Optional[LoadedLLM] = None) -> FitResult:
    """`resume_from`: a stage-1 (or stage-3) checkpoint starts stage 2 from its SpeechLM; a stage-2
    checkpoint continues exactly (with its .train_state.pt)."""
    if resume_from is None:
        raise ValueError("stage 2 needs --resume_checkpoint: a stage-1 checkpoint (the SpeechLM it aligns), "
                         "or a stage-2 checkpoint to continue")
    source = require_stage(load_checkpoint(resume_from), SPEECH_LM_STAGES, purpose="stage 2")
    cfg = inherit_frozen_sections(cfg, source, ("speech_lm", "style")).with_training_from("align")
    task = Stage2Task(cfg, source, llm=llm, cpu=cpu)
    return Trainer(cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from if source.stage == "2" else None)
