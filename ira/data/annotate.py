"""Measure a clip's voice: F0 track (YIN), pitch level and spread, speaking rate, loudness.

`annotate_clip` turns one utterance into numbers; `fit_annotation_stats` turns a corpus of those
numbers into quantiles, so that `ira.data.descriptions` can say "high-pitched" for the top of *this*
corpus (per gender where the gender is known) rather than against a fixed, culture-bound scale.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, TypedDict

import numpy as np
import torch

from ira.audio import prepare_waveform, resample, rms_db, to_mono, trim_silence

HOP_S = 0.010
"""One F0 value per 10 ms."""
PITCH_MIN_SR = 8_000
"""High input rates are decimated by an integer factor to no less than this: 50-500 Hz needs no more
(a 500 Hz period is still 16 samples, refined by parabolic interpolation), and an integer ratio keeps
the resampling kernel tiny. 24 kHz runs at 8 kHz: the YIN's FFTs are 4x shorter than at 24 kHz, which
made pitch the slowest part of preparing a corpus."""
FMIN, FMAX = 50.0, 500.0
QUANTILES = (20, 40, 60, 80)
"""Level boundaries: below q20 'very low', ..., at or above q80 'very high'."""
MIN_COUNT = 20
"""Fewer values than this in a group and its quantiles fall back (gender -> global -> defaults)."""

MEASURED_KEYS = ("text", "duration", "active_duration", "pitch_mean_hz", "pitch_std_hz",
                 "pitch_std_semitones", "voiced_fraction", "speaking_rate_cps", "loudness_db")


# ---------------------------------------------------------------------------------------- pitch

def _frames(x: np.ndarray, sr: int, length: int, offset: int) -> np.ndarray:
    """[1 + duration // HOP_S, length] frames; frame i starts `offset` samples before i * HOP_S s."""
    n = 1 + int(len(x) / sr / HOP_S + 1e-9)
    starts = np.round(np.arange(n) * HOP_S * sr).astype(np.int64)  # exact 10 ms grid at any rate
    padded = np.pad(x, (offset, length + int(HOP_S * sr) + 1))
    return np.lib.stride_tricks.sliding_window_view(padded, length)[starts]


def estimate_pitch(wav: torch.Tensor | np.ndarray, sr: int, fmin: float = FMIN, fmax: float = FMAX,
                   threshold: float = 0.15, voicing_threshold: float = 0.3,
                   silence_db: float = 45.0) -> np.ndarray:
    """F0 in Hz for each 10 ms frame (frame i is centred at i * 10 ms), 0 where unvoiced.

    YIN (de Cheveigné & Kawahara, 2002), vectorised over frames: the difference function comes from
    one FFT cross-correlation per frame, the period is the first dip of the cumulative-mean-normalised
    difference below `threshold` (which avoids sub-octave errors), refined by parabolic interpolation.
    A frame is voiced when that dip is below `voicing_threshold` and its energy is within `silence_db`
    of the loudest frame; isolated voiced frames (< 30 ms runs) are dropped.
    """
    sr = int(sr)
    factor = max(f for f in range(1, max(sr // PITCH_MIN_SR, 1) + 1) if sr % f == 0)
    work_sr = sr // factor
    mono = to_mono(wav)
    if mono.numel() == 0:
        return np.zeros(0, dtype=np.float32)
    x = resample(mono, sr, work_sr).numpy().astype(np.float64)
    if len(x) == 0:
        return np.zeros(0, dtype=np.float32)
    tau_min = max(int(work_sr / fmax), 2)
    tau_max = int(math.ceil(work_sr / fmin))
    win = tau_max  # integration window: one period of the lowest F0
    frames = _frames(x, work_sr, win + tau_max + 1, offset=win // 2)  # integration window centred on the frame time
    frames = frames - frames.mean(axis=1, keepdims=True)

    # d(tau) = sum_j (x_j - x_{j+tau})^2 over j < win = E(0) + E(tau) - 2 r(tau)
    n_fft = 1 << int(math.ceil(math.log2(frames.shape[1] + win)))
    spec = np.fft.rfft(frames, n_fft, axis=1)
    head = np.fft.rfft(frames[:, :win], n_fft, axis=1)
    corr = np.fft.irfft(spec * np.conj(head), n_fft, axis=1)[:, : tau_max + 1]
    sq = np.cumsum(np.pad(frames ** 2, ((0, 0), (1, 0))), axis=1)
    energy = sq[:, win: win + tau_max + 1] - sq[:, : tau_max + 1]  # E(tau) = sum x_{tau..tau+win-1}^2
    diff = np.maximum(energy[:, :1] + energy - 2.0 * corr, 0.0)

    # cumulative mean normalised difference d'(tau) = d(tau) * tau / sum_{k<=tau} d(k); d'(0) = 1
    cum = np.cumsum(diff[:, 1:], axis=1)
    taus = np.arange(1, tau_max + 1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * taus / np.maximum(cum, 1e-12)

    # first tau >= tau_min below threshold, then walk down to the bottom of that dip
    search = cmnd[:, tau_min: tau_max]
    below = search < threshold
    has_dip = below.any(axis=1)
    first = np.where(has_dip, below.argmax(axis=1), search.argmin(axis=1))
    # descend while the next lag is lower (bounded walk, vectorised)
    idx = first.copy()
    for _ in range(tau_max):
        nxt = np.minimum(idx + 1, search.shape[1] - 1)
        step = search[np.arange(len(idx)), nxt] < search[np.arange(len(idx)), idx]
        if not step.any():
            break
        idx = np.where(step, nxt, idx)
    tau = idx + tau_min
    rows = np.arange(len(tau))
    best = cmnd[rows, tau]

    # parabolic interpolation around the dip
    left = cmnd[rows, np.maximum(tau - 1, 1)]
    right = cmnd[rows, np.minimum(tau + 1, tau_max)]
    denom = left - 2.0 * best + right
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    period = tau + np.clip(shift, -1.0, 1.0)

    frame_db = 10.0 * np.log10(np.maximum(energy[:, 0] / win, 1e-12))
    loud = frame_db > max(frame_db.max() - silence_db, -80.0)
    voiced = (best < voicing_threshold) & loud & (period > 0)
    voiced = _drop_short_runs(voiced, min_len=3)
    f0 = np.where(voiced, work_sr / np.maximum(period, 1e-6), 0.0)
    f0[(f0 < fmin * 0.95) | (f0 > fmax * 1.05)] = 0.0
    return f0.astype(np.float32)


def _drop_short_runs(mask: np.ndarray, min_len: int) -> np.ndarray:
    """Clear runs of True shorter than `min_len` (isolated 'voiced' blips in noise or transients)."""
    if not mask.any():
        return mask
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    out = mask.copy()
    for s, e in zip(starts, ends):
        if e - s < min_len:
            out[s:e] = False
    return out


# ---------------------------------------------------------------------------------- annotation

def count_spoken_chars(text: str) -> int:
    """Letters and digits (any script): what a speaking rate in characters/s counts."""
    return sum(ch.isalnum() for ch in text)


def _active_frames(wav: torch.Tensor, sr: int, top_db: float) -> torch.Tensor:
    """The 20 ms frames within `top_db` of the loudest one, concatenated (pauses left out)."""
    frame = max(int(sr * 0.02), 1)
    n = wav.numel() // frame
    if n == 0:
        return wav
    frames = wav[: n * frame].reshape(n, frame)
    db = 10.0 * torch.log10(frames.pow(2).mean(dim=1).clamp_min(1e-12))
    return frames[db > db.max() - top_db].flatten()


def annotate_clip(wav: torch.Tensor | np.ndarray, sr: int, text: str, labels: dict[str, Any] | None = None,
                  top_db: float = 40.0) -> dict[str, Any]:
    """Measure one utterance; the labels (accent, gender, voice...) are copied in unchanged.

    - duration: the whole clip; active_duration: after trimming leading/trailing silence (`top_db`).
    - pitch_mean_hz / pitch_std_hz / pitch_std_semitones: over voiced 10 ms frames of the active part;
      None when no frame is voiced (whispered or silent audio).
    - voiced_fraction: voiced frames / frames of the active part.
    - speaking_rate_cps: letters+digits of `text` per second of active duration (pauses inside the
      utterance count: they are part of how fast someone speaks).
    - loudness_db: RMS dBFS over the frames within `top_db` of the loudest.
    A label whose name is one of these measurements is kept as `label_<name>`.
    """
    mono = prepare_waveform(wav, sr, sr, name="annotate_clip")
    active = trim_silence(mono, sr, top_db=top_db, pad_ms=0.0)
    duration = mono.numel() / sr
    active_duration = active.numel() / sr
    f0 = estimate_pitch(active, sr) if active.numel() else np.zeros(0, dtype=np.float32)
    voiced = f0[f0 > 0].astype(np.float64)
    n_chars = count_spoken_chars(text)

    out: dict[str, Any] = {
        "text": text,
        "duration": round(duration, 4),
        "active_duration": round(active_duration, 4),
        "pitch_mean_hz": None,
        "pitch_std_hz": None,
        "pitch_std_semitones": None,
        "voiced_fraction": round(float(len(voiced) / len(f0)), 4) if len(f0) else 0.0,
        "speaking_rate_cps": round(n_chars / active_duration, 3) if active_duration > 0 else 0.0,
        "loudness_db": round(rms_db(_active_frames(active, sr, top_db)), 2) if active.numel() else -120.0,
    }
    if len(voiced):  # octave-error guard: frames more than an octave from the median are not trusted
        voiced = voiced[np.abs(np.log2(voiced / np.median(voiced))) <= 1.0]
    if len(voiced) >= 3:
        semitones = 12.0 * np.log2(voiced / np.median(voiced))
        out["pitch_mean_hz"] = round(float(voiced.mean()), 2)
        out["pitch_std_hz"] = round(float(voiced.std()), 2)
        out["pitch_std_semitones"] = round(float(semitones.std()), 3)
    for key, value in (labels or {}).items():
        out[f"label_{key}" if key in MEASURED_KEYS else key] = value  # a measurement is never overwritten
    return out


# --------------------------------------------------------------------------------- corpus stats

class AnnotationStats(TypedDict):
    """Corpus quantiles (`QUANTILES` percentiles, ascending) that place a clip on a level scale.

    `pitch` has a "all" entry plus "male" / "female" where the corpus has enough of them; each of
    "pitch_variation" (semitone std), "rate" (chars/s) and "loudness" (dBFS) has "all". `count` is
    the number of annotations fitted; `source` says, per entry, "corpus" or "default".
    """

    quantiles: list[int]
    pitch: dict[str, list[float]]
    pitch_variation: dict[str, list[float]]
    rate: dict[str, list[float]]
    loudness: dict[str, list[float]]
    count: int
    source: dict[str, str]


DEFAULT_STATS: dict[str, dict[str, list[float]]] = {
    # Typical adult read speech, used only where a corpus is too small to speak for itself.
    "pitch": {"all": [105.0, 125.0, 165.0, 200.0], "male": [95.0, 108.0, 120.0, 135.0],
              "female": [170.0, 190.0, 208.0, 228.0]},
    "pitch_variation": {"all": [1.6, 2.2, 2.8, 3.5]},
    "rate": {"all": [10.5, 12.5, 14.0, 16.0]},
    "loudness": {"all": [-30.0, -26.0, -22.0, -18.0]},
}


def normalize_gender(value: Any) -> str | None:
    """'male' / 'female' from the usual spellings (m, man, Male, F, woman...), else None."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    if v in ("m", "male", "man", "masculine", "boy"):
        return "male"
    if v in ("f", "female", "woman", "feminine", "girl"):
        return "female"
    return None


def _values(annotations: Iterable[dict[str, Any]], key: str) -> np.ndarray:
    vals = [a.get(key) for a in annotations]
    return np.array([float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)])


def _quantiles(values: np.ndarray) -> list[float]:
    return [round(float(q), 4) for q in np.percentile(values, QUANTILES)]


def fit_annotation_stats(annotations: list[dict[str, Any]], min_count: int = MIN_COUNT) -> AnnotationStats:
    """Quantiles of pitch (global and per known gender), pitch variation, rate and loudness.

    A group with fewer than `min_count` values falls back: a gender to the corpus-wide pitch
    quantiles (when those are from the corpus) else to the defaults; a global entry to `DEFAULT_STATS`.
    The result is plain JSON (save it next to annotations.jsonl to describe new clips the same way).
    """
    stats: dict[str, Any] = {"quantiles": list(QUANTILES), "count": len(annotations), "source": {}}
    keys = {"pitch": "pitch_mean_hz", "pitch_variation": "pitch_std_semitones",
            "rate": "speaking_rate_cps", "loudness": "loudness_db"}
    for name, key in keys.items():
        values = _values(annotations, key)
        if name == "loudness":
            values = values[values > -100.0]  # silent clips say nothing about loudness
        if name == "rate":
            values = values[values > 0]
        if len(values) >= min_count:
            stats[name] = {"all": _quantiles(values)}
            stats["source"][name] = "corpus"
        else:
            stats[name] = {"all": list(DEFAULT_STATS[name]["all"])}
            stats["source"][name] = "default"
    for gender in ("male", "female"):
        group = [a for a in annotations if normalize_gender(a.get("gender")) == gender]
        values = _values(group, "pitch_mean_hz")
        if len(values) >= min_count:
            stats["pitch"][gender] = _quantiles(values)
            stats["source"][f"pitch.{gender}"] = "corpus"
        elif stats["source"]["pitch"] == "default":
            stats["pitch"][gender] = list(DEFAULT_STATS["pitch"][gender])
            stats["source"][f"pitch.{gender}"] = "default"
    return stats  # type: ignore[return-value]


def quantile_bin(value: float, boundaries: list[float]) -> int:
    """0..len(boundaries): how many boundaries `value` is at or above."""
    return int(np.searchsorted(np.asarray(boundaries, dtype=np.float64), float(value), side="right"))
