"""Audio I/O in one place: read any file soundfile can read, mix to mono, resample, trim, save.

Every other module gets audio through here, so there is exactly one definition of "mono at the
codec's sample rate" in the code base.
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as AT


class AudioError(ValueError):
    """An audio file or waveform that cannot be used; the message names the file and the fix."""


def to_mono(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mix to a 1-D float32 tensor. 2-D input is [channels, samples] (the torch convention)."""
    wav = torch.as_tensor(wav)
    if wav.dim() == 1:
        return wav.float()
    if wav.dim() == 2:
        return wav.float().mean(dim=0)
    raise AudioError(f"expected a waveform of shape [samples] or [channels, samples], got {tuple(wav.shape)}")


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D (or [..., T]) waveform; a no-op when the rates match."""
    if sr <= 0:
        raise AudioError(f"sample rate must be positive, got {sr}")
    if sr == target_sr:
        return wav
    with torch.no_grad():
        return _resampler(int(sr), int(target_sr))(wav.float())


@lru_cache(maxsize=16)
def _resampler(sr: int, target_sr: int) -> AT.Resample:
    """One windowed-sinc kernel per rate pair (building it costs more than applying it)."""
    return AT.Resample(orig_freq=sr, new_freq=target_sr)


def prepare_waveform(wav: torch.Tensor | np.ndarray, sr: int, target_sr: int, name: str = "waveform") -> torch.Tensor:
    """Mono, float32, resampled to `target_sr`, checked for emptiness and non-finite values."""
    mono = to_mono(wav)
    if mono.numel() == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    if not torch.isfinite(mono).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    return resample(mono, sr, target_sr).contiguous()


def load_audio(path: str | Path, target_sr: int) -> torch.Tensor:
    """Read an audio file as a mono float32 tensor at `target_sr`.

    Raises AudioError naming the file when it is missing, unreadable or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"{path}: cannot read audio ({exc}); is it a valid WAV/FLAC/OGG file?") from exc
    return prepare_waveform(torch.from_numpy(data.T.copy()), sr, target_sr, name=str(path))


def audio_info(path: str | Path) -> tuple[int, float]:
    """(sample rate, duration in seconds) of a file, without decoding it."""
    try:
        info = sf.info(str(path))
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio header ({exc})") from exc
    return int(info.samplerate), float(info.frames) / max(int(info.samplerate), 1)


def rms_db(wav: torch.Tensor) -> float:
    """Loudness of a waveform as RMS in dBFS (-inf-safe: silence gives -120)."""
    rms = wav.float().pow(2).mean().sqrt().item() if wav.numel() else 0.0
    return 20.0 * float(np.log10(max(rms, 1e-6)))


def trim_silence(wav: torch.Tensor, sr: int, top_db: float = 40.0, pad_ms: float = 30.0) -> torch.Tensor:
    """Cut leading and trailing frames quieter than (peak frame energy - top_db)."""
    if wav.numel() == 0:
        return wav
    frame = max(int(sr * 0.02), 1)
    n = wav.numel() // frame
    if n == 0:
        return wav
    energy = wav[: n * frame].reshape(n, frame).pow(2).mean(dim=1)
    db = 10.0 * torch.log10(energy.clamp_min(1e-12))
    loud = torch.nonzero(db > db.max() - top_db).flatten()
    if loud.numel() == 0:
        return wav[:0]
    pad = int(sr * pad_ms / 1000)
    start = max(int(loud[0]) * frame - pad, 0)
    end = min((int(loud[-1]) + 1) * frame + pad, wav.numel())
    return wav[start:end]


def check_output_file(path: str | Path) -> Path:
    """A path audio may be written to: a new name, or a regular file that the write replaces (checked before
    minutes of generation, and again when writing).

    Anything else is refused. The write renames a finished temporary file over the path, so it would replace
    the path itself: a symbolic link (not what it points to), a named pipe, a device node (as root, `-o
    /dev/full` replaced the device) or a socket.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise AudioError(f"{path} is a folder; give the file to write, e.g. {path / 'speech.wav'}")
    if stat.S_ISLNK(mode):
        raise AudioError(f"{path} is a symbolic link (to {os.readlink(path)}); audio is written only to a regular "
                         f"file or a new name: give the file it points to, or another name")
    raise AudioError(f"{path} is {_file_kind(mode)}, not a regular file; audio is written only to a regular file or "
                     f"a new name (the write replaces what is there): give another name, e.g. "
                     f"{Path.cwd() / 'speech.wav'}")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def save_audio(path: str | Path, wav: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write a mono 16-bit WAV atomically; samples are clipped to [-1, 1] (never wrapped)."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_mono(torch.as_tensor(wav).detach().cpu()).numpy()
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: refusing to write audio with NaN or infinite samples")
    data = np.clip(data, -1.0, 1.0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), data, int(sample_rate), subtype="PCM_16", format="WAV")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
