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
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ira.config import IRAConfig
from ira.data.dataset import LengthBucketBatchSampler, pad_codes
from ira.data.prepare import ensure_prepared
from ira.data.token_cache import TokenSplit, load_split
from ira.hardware import resolve_device
from ira.models.adapter import PerceiverAdapter
from ira.models.llm import LoadedLLM, load_llm
from ira.models.splice import SplicedBatch, build_student_inputs, build_teacher_inputs, generate_reply
from ira.text_metrics import character_error_rate, corpus_cer
from ira.training.checkpoint import Checkpoint, load_checkpoint, require_stage
from ira.training.components import (CodecState, codec_from_checkpoint, speech_lm_from_checkpoint,
                                     style_encoder_from_checkpoint, tokenizer_from_checkpoint)
from ira.training.engine import FitResult, Trainer
from ira.training.task import TrainingTask
from ira.training.teacher_responses import TASK_INSTRUCTIONS, cache_path, load_or_build, parse_tasks, reply_for

log = logging.getLogger(__name__)
SPEECH_LM_STAGES = ("1", "2", "3")
REPEAT = "repeat"


class ClipTaskDataset(Dataset):
    """Every (clip, task) pair of a split: item i is clip i // n_tasks with task i % n_tasks."""

    def __init__(self, split: TokenSplit, tasks: list[str], replies: dict[tuple[str, str], str],
                 max_frames: int):
        self.split, self.tasks, self.replies, self.max_frames = split, tasks, replies, max_frames

    def __len__(self) -> int:
        return len(self.split) * len(self.tasks)

    def lengths(self) -> list[int]:
        return [min(n, self.max_frames) for n in self.split.lengths() for _ in self.tasks]

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip, task = divmod(i, len(self.tasks))
        task_name = self.tasks[task]
        text = self.split.texts[clip]
        return {"codes": self.split.clip_codes(clip)[:, : self.max_frames], "clip": clip,
                "instruction": TASK_INSTRUCTIONS[task_name], "transcript": text,
                "response": reply_for(self.replies, self.split.ids[clip], task_name, text),
                "is_repeat": task_name == REPEAT}


def collate_clip_tasks(items: list[dict[str, Any]]) -> dict[str, Any]:
    codes, lengths = pad_codes([item["codes"] for item in items])
    return {"codes": codes, "codes_lengths": lengths, "clip": torch.tensor([item["clip"] for item in items]),
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
        self.adapter = PerceiverAdapter(cfg.adapter, in_dim=self.speech_lm.cfg.d_model,
                                        out_dim=self.llm.hidden_size, target_norm=self.llm.embed_norm)
        self.tasks = parse_tasks(cfg.align.tasks)
        self._last_replies: list[dict[str, Any]] = []

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

    # -- the engine's interface -------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        parts: dict[str, torch.nn.Module] = {"speech_lm": self.speech_lm, "codec": self.codec_state,
                                             "adapter": self.adapter}
        if self.style_encoder is not None:
            parts["style"] = self.style_encoder
        return parts

    def setup(self, device: torch.device) -> None:
        if self.llm.quantized:          # bitsandbytes places 4-bit weights itself
            return
        self.llm.model.to(device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.adapter.parameters())

    def _loader(self, split: TokenSplit, shuffle: bool) -> DataLoader:
        dataset = ClipTaskDataset(split, self.tasks, self.replies, self.speech_lm.cfg.max_audio_frames)
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

    def audio_tokens(self, codes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Codes -> the adapter's LLM-space vectors [B, n_latents, H] (SpeechLM frozen, audio alone)."""
        with torch.no_grad():
            features, mask = self.speech_lm.audio_features(codes, lengths)
        return self.adapter(features, mask)

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        audio = self.audio_tokens(batch["codes"], batch["codes_lengths"])
        student_in = build_student_inputs(self.llm, batch["instructions"], audio, batch["responses"])
        with torch.no_grad():
            teacher_in = build_teacher_inputs(self.llm, batch["instructions"], batch["transcripts"], batch["responses"])
            teacher = response_logits(self._forward_llm(teacher_in), teacher_in.labels)[0]
        student, targets, rows = response_logits(self._forward_llm(student_in), student_in.labels)
        if student.shape != teacher.shape:
            raise RuntimeError(f"teacher and student replies differ in length ({teacher.shape[0]} vs "
                               f"{student.shape[0]} tokens): the splice layout is inconsistent")
        ce_rows = batch["is_repeat"].to(rows.device)[rows]
        return distillation_losses(student, teacher, targets, ce_rows, self.cfg.align.kd_temperature)

    def _forward_llm(self, inputs: SplicedBatch) -> torch.Tensor:
        return self.llm.model(**inputs.model_inputs(), use_cache=False).logits

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self._losses(batch)
        a = self.cfg.align
        loss = a.kd_weight * out["kd_loss"] + a.ce_weight * out["ce_loss"]
        return {"loss": loss, "kd_loss": out["kd_loss"].detach(), "ce_loss": out["ce_loss"].detach(),
                "agreement": out["agreement"].detach(), "frames": int(batch["codes_lengths"].sum())}

    def validate(self, loader: Any) -> dict[str, float]:
        """KD loss and agreement over the validation pairs, and the CER of "repeat" from audio alone
        on the first `align.eval_clips` validation clips."""
        sums, count = {"kd_loss": 0.0, "ce_loss": 0.0, "agreement": 0.0}, 0
        for batch in loader:
            out = self._losses(batch)
            n = len(batch["instructions"])
            for key in sums:
                sums[key] += float(out[key]) * n
            count += n
        metrics = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
        self._last_replies = []
        if self.cfg.align.eval_clips and REPEAT in self.tasks:
            metrics["val_repeat_cer"], self._last_replies = self.repeat_cer(self.cfg.align.eval_clips)
        return metrics

    @torch.no_grad()
    def repeat_cer(self, n_clips: int, batch_size: int = 8) -> tuple[float, list[dict[str, Any]]]:
        """CER of the LLM's "repeat" reply from audio alone vs the transcript, on validation clips."""
        device = next(self.adapter.parameters()).device
        rows: list[dict[str, Any]] = []
        indices = list(range(min(n_clips, len(self.val_split))))
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            codes, lengths = pad_codes([self.val_split.clip_codes(i)[:, : self.speech_lm.cfg.max_audio_frames]
                                        for i in chunk])
            audio = self.audio_tokens(codes.to(device), lengths.to(device))
            inputs = build_student_inputs(self.llm, [TASK_INSTRUCTIONS[REPEAT]] * len(chunk), audio, None)
            replies = generate_reply(self.llm, inputs, max_new_tokens=self.cfg.llm.max_new_tokens)
            for i, reply in zip(chunk, replies):
                text = self.val_split.texts[i]
                rows.append({"id": self.val_split.ids[i], "transcript": text, "reply": reply,
                             "cer": character_error_rate(text, reply)})
        cer = corpus_cer([r["transcript"] for r in rows], [r["reply"] for r in rows]) if rows else float("nan")
        return cer, rows

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        """Write what the LLM heard in the validation clips just scored (transcript vs reply)."""
        if not self._last_replies:
            return []
        path = out_dir / "replies.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in self._last_replies))
        return [str(path)]

    def checkpoint_metadata(self) -> dict[str, str]:
        meta = {key: self.source.metadata[key] for key in ("codec_fingerprint", "codec_meta", "tokenizer",
                                                            "speech_lm") if key in self.source.metadata}
        if self.style_encoder is not None:
            meta.update(self.style_encoder.metadata())
        meta["adapter"] = json.dumps(self.adapter.config_dict())
        meta["llm"] = json.dumps({"name": self.llm.name, "source": self.llm.source, "bundled": self.llm.bundled,
                                  "hidden_size": self.llm.hidden_size})
        meta["align_tasks"] = ",".join(self.tasks)
        return meta


def process_device(cpu: bool = False) -> torch.device:
    """The device the engine will train this process on (under DDP each rank has its LOCAL_RANK GPU),
    so the LLM is loaded there once, before the teacher generates its replies."""
    if cpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return resolve_device("auto")


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
    cfg = cfg.with_training_from("align")
    task = Stage2Task(cfg, source, llm=llm, cpu=cpu)
    return Trainer(cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from if source.stage == "2" else None)
