"""The one interface every audio codec implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CodecError(RuntimeError):
    """A codec that cannot be built or used; the message says what to do."""


class Codec(ABC):
    """Waveform <-> discrete tokens ``LongTensor[K, T]`` (K codebooks, T frames).

    Attributes every implementation sets: ``name``, ``sample_rate`` (Hz), ``frame_rate``
    (frames per second), ``n_codebooks`` (K), ``codebook_size`` (token values per codebook).
    """

    name: str
    sample_rate: int
    frame_rate: float
    n_codebooks: int
    codebook_size: int

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes whenever the tokens this codec produces would change."""

    @abstractmethod
    def encode(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        """Mono or [C, T] float waveform at rate `sr` -> LongTensor[K, T_frames] (on CPU)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor[K, T_frames] -> mono float waveform [T_samples] at `sample_rate` (on CPU)."""

    def frames_for(self, seconds: float) -> int:
        return int(round(seconds * self.frame_rate))

    def describe(self) -> str:
        return (f"{self.name} ({self.n_codebooks} codebooks x {self.codebook_size}, "
                f"{self.sample_rate} Hz, {self.frame_rate:g} frames/s, fingerprint {self.fingerprint})")
