"""Stage 1: SpeechLM pre-training — next-frame cross-entropy on cached codec tokens.

Conditioned on the transcript (and, when a style encoder is given, on the voice description's
embedding); conditions are dropped at random inside the model so that classifier-free guidance and
audio-only reading work later. After each validation a few fixed sentences are spoken and written
next to the checkpoint so a person can hear progress.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ira.audio import save_audio
from ira.config import IRAConfig
from ira.data.dataset import LengthBucketBatchSampler, SpeechTokenDataset, pad_codes
from ira.data.prepare import PrepareResult, ensure_prepared
from ira.data.token_cache import TokenSplit, load_split
from ira.models.speech_lm import SpeechLM
from ira.text_tokenizer import build_text_tokenizer
from ira.training.components import CodecState, component_metadata
from ira.training.engine import FitResult, Trainer
from ira.training.task import TrainingTask

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
                "index": torch.tensor([item["index"] for item in items])}


class Stage1Task(TrainingTask):
    stage = "1"

    def __init__(self, cfg: IRAConfig, prepared: Optional[PrepareResult] = None):
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

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"speech_lm": self.model, "codec": self.codec_state}

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
        out = self.model.forward_batch(batch)
        metrics: dict[str, Any] = {"loss": out.loss, "frames": int(batch["codes_lengths"].sum())}
        for k, ce in enumerate(out.loss_per_codebook.detach()):
            metrics[f"ce_cb{k}"] = ce
        return metrics

    def validate(self, loader: Any) -> dict[str, float]:
        """Cross-entropy per codebook over all validation tokens, with every condition present."""
        ce_sum = torch.zeros(self.model.n_codebooks, dtype=torch.float64)
        tokens = torch.zeros(self.model.n_codebooks, dtype=torch.float64)
        for batch in loader:
            n = batch["codes"].shape[0]
            no_drop = torch.zeros(n, dtype=torch.bool, device=batch["codes"].device)
            out = self.model.forward_batch({**batch, "drop_text": no_drop, "drop_style": no_drop})
            counts = out.tokens_per_codebook.double().cpu()
            ce_sum += out.loss_per_codebook.double().cpu() * counts
            tokens += counts
        per_codebook = (ce_sum / tokens.clamp_min(1)).tolist()
        metrics = {"val_loss": sum(per_codebook) / len(per_codebook),
                   "val_unigram_ce": sum(self.unigram_ce) / len(self.unigram_ce)}
        for k, (ce, base) in enumerate(zip(per_codebook, self.unigram_ce)):
            metrics[f"val_ce_cb{k}"] = ce
            metrics[f"val_unigram_ce_cb{k}"] = base
        return metrics

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        """Speak the fixed sentences with the current weights and save them as WAV files."""
        sentences = list(SAMPLE_SENTENCES[: self.cfg.training.num_samples])
        if not sentences:
            return []
        longest = max(len(s) for s in sentences)
        max_frames = min(self.cfg.speech_lm.max_audio_frames,
                         int(math.ceil(1.5 * longest / CHARS_PER_SECOND * self.codec.frame_rate)) + 75)
        codes = self.model.generate(texts=sentences, tokenizer=self.tokenizer, max_frames=max_frames,
                                    temperature=0.8, top_k=50, seed=step)
        paths = []
        lines = []
        for i, (sentence, clip) in enumerate(zip(sentences, codes)):
            path = out_dir / f"sample{i}.wav"
            if clip.shape[1] == 0:
                lines.append(f"sample{i}.wav\t(empty: the model stopped at once)\t{sentence}")
                continue
            save_audio(path, self.codec.decode(clip), self.codec.sample_rate)
            paths.append(str(path))
            lines.append(f"sample{i}.wav\t{clip.shape[1] / self.codec.frame_rate:.2f}s\t{sentence}")
        (out_dir / "samples.txt").write_text("\n".join(lines) + "\n")
        return paths

    def checkpoint_metadata(self) -> dict[str, str]:
        return component_metadata(self.codec, self.tokenizer, self.model)


def run_stage1(cfg: IRAConfig, resume_from: Optional[str | Path] = None, cpu: bool = False) -> FitResult:
    """Prepare the data if needed, then train stage 1; returns the engine's FitResult."""
    task = Stage1Task(cfg)
    return Trainer(cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from)
