"""Speak with a trained checkpoint: text (+ a voice description or a reference clip) -> waveform.

Everything comes from the checkpoint (shapes, tokenizer, codec, the style encoder when it holds one),
so `Speaker.from_checkpoint(path)` is all `ira generate`, the pipeline and the UI need.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ira.audio import load_audio, prepare_waveform
from ira.checkpoint import load_checkpoint, require_stage
from ira.codec.base import Codec
from ira.hardware import resolve_device
from ira.models.hub import (codec_from_checkpoint, speech_lm_from_checkpoint, style_encoder_from_checkpoint,
                            tokenizer_from_checkpoint)
from ira.models.reading_rate import min_frames_for
from ira.models.speech_lm import SpeechLM

SPEECH_STAGES = ("1", "2", "3")
CHARS_PER_SECOND = 10.0       # a slow speaking rate: bounds the length of generated speech
MIN_SECONDS = 2.0


@dataclass
class SamplingSettings:
    temperature: float = 0.6
    """0 = greedy; 0.6 gave the `cpu` model the lowest held-out WER (docs/decisions.md)."""
    top_k: int = 50
    top_p: float = 1.0
    cfg_scale: Optional[float] = 1.5
    """Classifier-free guidance: None or 1 = off; 1.5-3 follows text and style more closely."""
    length_tolerance: Optional[float] = 0.2
    """The speech ends within +-this fraction of the length the model predicts from the text and the
    voice (which is how "speaking slowly" lengthens it); None leaves the end to the sampled EOS."""
    max_seconds: Optional[float] = None
    """None: enough for the text at a slow speaking rate."""
    seed: Optional[int] = 0


@dataclass
class SpeechResult:
    waveform: torch.Tensor        # mono float [T] in [-1, 1]
    sample_rate: int
    codes: torch.Tensor           # LongTensor[K, frames]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.waveform.numel() / self.sample_rate


class Speaker:
    def __init__(self, model: SpeechLM, tokenizer: Any, codec: Codec, style_encoder: Any = None,
                 checkpoint: Optional[Path] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.codec = codec
        self.style_encoder = style_encoder
        self.checkpoint = checkpoint

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", int8: bool = False) -> "Speaker":
        """A stage 1, 2 or 3 checkpoint; a missing file or another kind of checkpoint is a clear error.

        int8: the SpeechLM's linear layers with int8 weights (CPU only; faster generation,
        see `ira bench generate` for its speed and its agreement with fp32)."""
        ckpt = require_stage(load_checkpoint(path), SPEECH_STAGES, purpose="speaking")
        dev = resolve_device(device)
        style = None
        if "style" in ckpt.modules:
            style = style_encoder_from_checkpoint(ckpt, dev)
        model = speech_lm_from_checkpoint(ckpt, dev)
        if int8:
            from ira.models.quantize import quantize_int8
            model = quantize_int8(model)
        return cls(model, tokenizer_from_checkpoint(ckpt),
                   codec_from_checkpoint(ckpt, ckpt.ira_config()), style, Path(path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ conditions

    def check_text(self, text: str) -> list[int]:
        """The text's token ids; empty or over-long text is a clear error (nothing is cut silently)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text to speak is empty; type a sentence")
        ids = self.tokenizer.encode(text)
        limit = self.model.cfg.max_text_tokens
        if len(ids) > limit:
            raise ValueError(f"the text is {len(ids)} tokens long; this model reads at most {limit} "
                             f"(speech_lm.max_text_tokens): split it into sentences")
        return ids

    def style_vector(self, style: Optional[str] = None, reference: Any = None) -> Optional[torch.Tensor]:
        """[1, style_dim] from a description or a reference clip (path or waveform at 24 kHz); None: no style."""
        has_description = isinstance(style, str) and style.strip()
        if not has_description and reference is None:
            return None
        if self.style_encoder is None:
            raise ValueError(f"{self.checkpoint or 'this model'} has no style encoder, so it cannot follow a "
                             f"voice description or reference; train stage 1 from a style checkpoint")
        with torch.inference_mode():
            if reference is not None:
                if isinstance(reference, (str, Path)):
                    wav = load_audio(reference, self.codec.sample_rate)
                else:
                    wav = prepare_waveform(reference, self.codec.sample_rate, self.codec.sample_rate, "reference")
                if wav.numel() < self.codec.sample_rate // 4:
                    raise ValueError(f"the reference clip {reference if isinstance(reference, (str, Path)) else ''} "
                                     f"is shorter than 0.25 s; give a few seconds of speech")
                vector = self.style_encoder.embed_audio([wav], sr=self.codec.sample_rate)[0]
            else:
                vector = self.style_encoder.embed_description(style)
        return vector.reshape(1, -1).to(self.device)

    def _frames(self, text: str, settings: SamplingSettings) -> int:
        seconds = settings.max_seconds or max(MIN_SECONDS, len(text) / CHARS_PER_SECOND + 1.0)
        return min(self.model.cfg.max_audio_frames, int(math.ceil(seconds * self.codec.frame_rate)))

    def _generation_args(self, text: str, style: Optional[str], reference: Any,
                         settings: SamplingSettings) -> dict[str, Any]:
        ids = self.check_text(text)
        text_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return dict(text_ids=text_ids, text_mask=torch.ones_like(text_ids, dtype=torch.bool),
                    style=self.style_vector(style, reference), max_frames=self._frames(text, settings),
                    min_frames=min(min_frames_for(text, self.codec.frame_rate), self._frames(text, settings)),
                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                    cfg_scale=settings.cfg_scale if settings.cfg_scale not in (None, 1.0) else None,
                    seed=settings.seed, length_tolerance=settings.length_tolerance)

    # ------------------------------------------------------------------ speaking

    def speak(self, text: str, style: Optional[str] = None, reference: Any = None,
              settings: Optional[SamplingSettings] = None) -> SpeechResult:
        settings = settings or SamplingSettings()
        start = time.perf_counter()
        with torch.inference_mode():
            args = self._generation_args(text, style, reference, settings)
            codes = self.model.generate(**args)[0]
            generated = time.perf_counter()
            wav = self.codec.decode(codes) if codes.shape[1] else torch.zeros(0)
        done = time.perf_counter()
        return SpeechResult(wav.float().cpu(), self.codec.sample_rate, codes,
                            {"generate_s": generated - start, "decode_s": done - generated})

    def stream(self, text: str, style: Optional[str] = None, reference: Any = None,
               settings: Optional[SamplingSettings] = None, chunk_frames: int = 25) -> Iterator[torch.Tensor]:
        """Decoded audio chunks as frames arrive (each chunk decoded on its own)."""
        for _, wav in self.stream_with_codes(text, style, reference, settings, chunk_frames):
            yield wav

    @torch.inference_mode()
    def stream_with_codes(self, text: str, style: Optional[str] = None, reference: Any = None,
                          settings: Optional[SamplingSettings] = None, chunk_frames: int = 25
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(codes [K, t], waveform) per chunk: the UI plays the audio and keeps the tokens for the LLM.

        Inference mode as a decorator, not a `with` block: torch re-enters it at every resume of the
        generator, and the UI resumes it from whichever worker thread is free (the mode is per thread;
        a `with` block held across `yield` left later steps writing to the KV cache outside it)."""
        settings = settings or SamplingSettings()
        args = self._generation_args(text, style, reference, settings)
        for codes in self.model.stream(**args, chunk_frames=chunk_frames):
            yield codes, self.codec.decode(codes).float().cpu()
