"""Stage 1: SpeechLM pre-training — next-frame cross-entropy on cached codec tokens.

Conditioned on the transcript (and, when a style encoder is given, on the voice description's
embedding); conditions are dropped at random inside the model so that classifier-free guidance and
audio-only reading work later. After each validation a few fixed sentences are spoken and written
next to the checkpoint so a person can hear progress.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ira.audio import save_audio
from ira.checkpoint import load_checkpoint, require_stage
from ira.config import IRAConfig
from ira.data.dataset import LengthBucketBatchSampler, SpeechTokenDataset, pad_codes
from ira.data.prepare import PrepareResult, ensure_prepared
from ira.data.token_cache import TokenSplit, load_split
from ira.eval import asr
from ira.eval.quality import SPEECH_EVAL_KEY
from ira.eval.speech import Heard, score_speaker
from ira.models.hub import CodecState, component_metadata, style_encoder_from_checkpoint
from ira.models.reading_rate import min_frames_for
from ira.models.speech_lm import SpeechLM
from ira.speaker import Speaker
from ira.text_tokenizer import build_text_tokenizer
from ira.training.engine import FitResult, Trainer
from ira.training.style_table import StyleTable
from ira.training.task import TrainingTask

SAMPLE_STYLES = (
    "a low-pitched male voice speaking slowly",
    "a high-pitched female voice speaking fast",
    None,
    "a Scottish man with a deep voice",
)
"""Descriptions the samples are spoken with when the model has a style encoder (None: no style)."""
SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, this is my new voice speaking to you.",
    "Good morning, how are you today?",
    "Please call Stella and ask her to bring these things with her from the store.",
)
CHARS_PER_SECOND = 12.0   # generous speaking-rate guess that bounds a sample's length


def unigram_cross_entropy(train: TokenSplit, val: TokenSplit, codebook_size: int) -> list[float]:
    """Per-codebook cross-entropy (nats) of val tokens under train's token frequencies (add-one).

    The baseline a model must beat: it knows how often each token occurs, but nothing about context.
    """
    out = []
    for k in range(train.n_codebooks):
        counts = torch.bincount(train.codes[k].long(), minlength=codebook_size).double() + 1.0
        log_p = (counts / counts.sum()).log()
        out.append(float(-log_p[val.codes[k].long()].mean()) if val.codes.numel() else float("nan"))
    return out


class SpeechCollator:
    """Clips -> the SpeechLM's batch dict: right-padded text ids + mask, padded codes + lengths."""

    def __init__(self, tokenizer: Any, max_text_tokens: int):
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        text_ids, text_mask = self.tokenizer.batch_encode([item["text"] for item in items])
        text_ids, text_mask = text_ids[:, : self.max_text_tokens], text_mask[:, : self.max_text_tokens]
        codes, lengths = pad_codes([item["codes"] for item in items])
        return {"text_ids": text_ids, "text_mask": text_mask, "codes": codes, "codes_lengths": lengths,
                "clip": torch.tensor([item["clip"] for item in items])}


class Stage1Task(TrainingTask):
    """Stage 1. With `style_encoder` (frozen, from a style checkpoint) the SpeechLM learns to follow voice
    descriptions; the encoder is saved in the checkpoint as module "style" so inference finds it."""

    stage = "1"

    def __init__(self, cfg: IRAConfig, prepared: Optional[PrepareResult] = None, style_encoder: Any = None):
        self.cfg = cfg
        prepared = prepared or ensure_prepared(cfg)
        self.codec = prepared.codec
        self.train_split = load_split(prepared.cache_files["train"], self.codec.fingerprint)
        self.val_split = load_split(prepared.cache_files["val"], self.codec.fingerprint)
        if len(self.train_split) == 0:
            raise ValueError(f"{cfg.data.dir}: the training split is empty; add clips or lower data.val_fraction")
        self.tokenizer = build_text_tokenizer(cfg.speech_lm.text_tokenizer)
        self.model = SpeechLM.from_parts(cfg.speech_lm, self.codec, self.tokenizer)
        self.codec_state = CodecState(self.codec)
        self.collate = SpeechCollator(self.tokenizer, cfg.speech_lm.max_text_tokens)
        self.unigram_ce = unigram_cross_entropy(self.train_split, self.val_split, self.codec.codebook_size)
        self.style_encoder = style_encoder
        # val_wer's sentences: the first `training.val_asr_sentences` distinct validation texts (held out
        # by sentence, so never trained on)
        self.asr_sentences = list(dict.fromkeys(self.val_split.texts))[: cfg.training.val_asr_sentences]
        # the best is the lowest val_loss, not val_wer: 16 sampled sentences move val_wer by +-0.1 between
        # near-identical models, and picked step 1,200 of a 2,812-step run (held-out 0.88 against its end's
        # 0.72); the validation CE over every validation token is exact, and within a run its lower checkpoints
        # spoke better held-out (docs/decisions.md, issue 35). val_wer stays in the log and the checkpoint's
        # speech note.
        self.best_metric = ("val_loss", "min")
        self.last_heard: list[Heard] = []
        self.speech_eval: Optional[dict[str, float]] = None   # the last validation's val_wer, for the header
        self.style_tables: dict[str, StyleTable] = {}
        if style_encoder is not None:
            if style_encoder.embed_dim != cfg.speech_lm.style_dim:
                raise ValueError(f"the style encoder embeds in {style_encoder.embed_dim} dimensions but "
                                 f"speech_lm.style_dim is {cfg.speech_lm.style_dim}; set them equal")
            data_dir = Path(cfg.data.dir)
            for name, split in (("train", self.train_split), ("val", self.val_split)):
                self.style_tables[name] = StyleTable.cached(style_encoder, split, name, data_dir, self.codec,
                                                            cfg.data.trim_silence_db)

    def modules(self) -> dict[str, torch.nn.Module]:
        parts: dict[str, torch.nn.Module] = {"speech_lm": self.model, "codec": self.codec_state}
        if self.style_encoder is not None:
            parts["style"] = self.style_encoder
        return parts

    def setup(self, device: torch.device) -> None:
        for table in self.style_tables.values():
            table.to(device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _loader(self, split: TokenSplit, shuffle: bool) -> DataLoader:
        dataset = SpeechTokenDataset(split, max_frames=self.cfg.speech_lm.max_audio_frames)
        tc = self.cfg.training
        sampler = LengthBucketBatchSampler(dataset.lengths(), tc.batch_size, tc.max_batch_frames,
                                           shuffle=shuffle, seed=tc.seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.cfg.data.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> Optional[DataLoader]:
        return self._loader(self.val_split, shuffle=False) if len(self.val_split) else None

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.style_tables:
            batch = {**batch, "style": self.style_tables["train"].sample(
                batch["clip"], self.cfg.speech_lm.style_from_audio_prob)}
        out = self.model.forward_batch(batch)
        loss = out.loss + self.cfg.speech_lm.length_loss_weight * out.length_loss
        metrics: dict[str, Any] = {"loss": loss, "length_loss": out.length_loss.detach(),
                                   "frames": int(batch["codes_lengths"].sum())}
        for k, ce in enumerate(out.loss_per_codebook.detach()):
            metrics[f"ce_cb{k}"] = ce
        return metrics

    def _intelligibility(self) -> dict[str, float]:
        """val_wer / val_cer: the validation sentences spoken as `ira generate` would (no style), heard by
        the offline ASR. Empty when the ASR is not installed or the setting is 0."""
        sentences = self.asr_sentences
        if not sentences or not asr.is_available():
            return {}
        speaker = Speaker(self.model, self.tokenizer, self.codec)
        score = score_speaker(speaker, sentences, asr.transcriber())
        self.last_heard = score.items
        # the header's note on its speech, and stage 2's (whose SpeechLM this is): ira/eval/quality.py
        self.speech_eval = {"wer": score.wer, "cer": score.cer, "sentences": len(sentences)}
        return {"val_wer": score.wer, "val_cer": score.cer}

    def validate(self, loader: Any) -> dict[str, float]:
        """Cross-entropy per codebook over all validation tokens, with every condition present, the
        length head's mean relative error on the clips' durations, and (with the ASR) val_wer / val_cer."""
        ce_sum = torch.zeros(self.model.n_codebooks, dtype=torch.float64)
        tokens = torch.zeros(self.model.n_codebooks, dtype=torch.float64)
        length_errors: list[torch.Tensor] = []
        for batch in loader:
            n = batch["codes"].shape[0]
            no_drop = torch.zeros(n, dtype=torch.bool, device=batch["codes"].device)
            style = self.style_tables["val"].text[batch["clip"], 0] if self.style_tables else None
            out = self.model.forward_batch({**batch, "style": style, "drop_text": no_drop, "drop_style": no_drop})
            counts = out.tokens_per_codebook.double().cpu()
            ce_sum += out.loss_per_codebook.double().cpu() * counts
            tokens += counts
            n_text = batch["text_mask"].sum(dim=1).clamp(min=1).to(out.log_frames_per_token.device)
            predicted = out.log_frames_per_token.exp() * n_text
            length_errors.append(((predicted - batch["codes_lengths"]).abs() / batch["codes_lengths"]).cpu())
        per_codebook = (ce_sum / tokens.clamp_min(1)).tolist()
        metrics = {"val_loss": sum(per_codebook) / len(per_codebook),
                   "val_unigram_ce": sum(self.unigram_ce) / len(self.unigram_ce),
                   "val_length_rel_error": float(torch.cat(length_errors).mean()) if length_errors else float("nan")}
        for k, (ce, base) in enumerate(zip(per_codebook, self.unigram_ce)):
            metrics[f"val_ce_cb{k}"] = ce
            metrics[f"val_unigram_ce_cb{k}"] = base
        metrics.update(self._intelligibility())
        return metrics

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        """Speak the fixed sentences with the current weights and save them as WAV files."""
        sentences = list(SAMPLE_SENTENCES[: self.cfg.training.num_samples])
        if not sentences:
            return []
        longest = max(len(s) for s in sentences)
        max_frames = min(self.cfg.speech_lm.max_audio_frames,
                         int(math.ceil(1.5 * longest / CHARS_PER_SECOND * self.codec.frame_rate)) + 75)
        styles = [SAMPLE_STYLES[i % len(SAMPLE_STYLES)] if self.style_encoder else None
                  for i in range(len(sentences))]
        paths, lines = [], []
        for i, (sentence, description) in enumerate(zip(sentences, styles)):
            style = self.style_encoder.embed_description(description) if description else None
            clip = self.model.generate(texts=[sentence], tokenizer=self.tokenizer, max_frames=max_frames,
                                       min_frames=min_frames_for(sentence, self.codec.frame_rate),
                                       style=None if style is None else style[None], temperature=0.8, top_k=50,
                                       seed=step + i, length_tolerance=0.2)[0]
            voice = description or "(no style)"
            if clip.shape[1] == 0:
                lines.append(f"sample{i}.wav\t(empty: the model stopped at once)\t{voice}\t{sentence}")
                continue
            path = out_dir / f"sample{i}.wav"
            save_audio(path, self.codec.decode(clip), self.codec.sample_rate)
            paths.append(str(path))
            lines.append(f"sample{i}.wav\t{clip.shape[1] / self.codec.frame_rate:.2f}s\t{voice}\t{sentence}")
        (out_dir / "samples.txt").write_text("\n".join(lines) + "\n")
        if self.last_heard:   # what the ASR heard of the validation sentences (val_wer)
            (out_dir / "heard.jsonl").write_text("".join(
                json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in self.last_heard))
        return paths

    def checkpoint_metadata(self) -> dict[str, str]:
        meta = component_metadata(self.codec, self.tokenizer, self.model)
        if self.style_encoder is not None:
            meta.update(self.style_encoder.metadata())
        if self.speech_eval is not None:
            meta[SPEECH_EVAL_KEY] = json.dumps(self.speech_eval)
        return meta


def run_stage1(cfg: IRAConfig, resume_from: Optional[str | Path] = None, cpu: bool = False) -> FitResult:
    """Prepare the data if needed, then train stage 1; returns the engine's FitResult.

    `resume_from` as in the seed's command line: a stage-1 checkpoint continues exactly; a style-encoder
    checkpoint (`ira train --stage style`) starts a new stage-1 run conditioned on that encoder.
    """
    style_encoder = None
    if resume_from is not None:
        ckpt = require_stage(load_checkpoint(resume_from), ("1", "style"), purpose="stage 1")
        if "style" in ckpt.modules:
            style_encoder = style_encoder_from_checkpoint(ckpt)
        if ckpt.stage == "style":
            resume_from = None
    task = Stage1Task(cfg, style_encoder=style_encoder)
    return Trainer(cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from)
