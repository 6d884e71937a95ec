"""Log-mel features at EnCodec's frame rate, and `MelCodec`: the offline codec fitted on the corpus.

Features: 24 kHz audio, 1024-point Hann STFT, hop 320 samples (75 frames/s, exactly EnCodec's
rate: a clip of N samples has ceil(N / 320) frames), mel bands from 0 to 11 kHz, each band the
weighted *mean* of the bin powers under it (so bands are comparable), natural log of the power with
a floor at -80 dB (magnitudes are scaled so that a full-scale sine reads 0.5, i.e. about -6 dB).

MelCodec: the log-mel frames are normalised per band (statistics of the fitting data), then
quantised by a residual VQ: K k-means codebooks, each fitted on what the previous ones left.
Decoding sums the chosen centroids, undoes the normalisation, maps mel power back to linear
magnitude (pseudo-inverse of the filterbank, clamped at 0) and recovers phase with Griffin-Lim.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torchaudio.functional as AF
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ira.audio import AudioError, prepare_waveform
from ira.codec.base import Codec, CodecError
from ira.codec.kmeans import kmeans, nearest
from ira.config import CodecConfig

SAMPLE_RATE = 24_000
HOP_LENGTH = 320
N_FFT = 1024
F_MIN = 0.0
F_MAX = 11_000.0
POWER_FLOOR = 1e-8
GRIFFIN_LIM_MOMENTUM = 0.99
FORMAT_VERSION = 1

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------
# Features


def n_frames(n_samples: int) -> int:
    """Frames for a clip of `n_samples` at 24 kHz: ceil(n / 320), as EnCodec."""
    return max(1, math.ceil(n_samples / HOP_LENGTH))


@functools.lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


@functools.lru_cache(maxsize=8)
def _mel_basis(n_mels: int, device: str) -> torch.Tensor:
    """[n_freqs, n_mels] triangular filters, each column summing to 1 (a band = mean bin power)."""
    fb = AF.melscale_fbanks(N_FFT // 2 + 1, F_MIN, F_MAX, n_mels, SAMPLE_RATE, norm=None, mel_scale="slaney")
    if bool((fb.sum(dim=0) == 0).any()):
        raise CodecError(f"n_mels={n_mels} is too many mel bands for a {N_FFT}-point FFT up to {F_MAX:g} Hz "
                         f"(some bands are empty); use fewer mel bands")
    return (fb / fb.sum(dim=0, keepdim=True)).to(device)


@functools.lru_cache(maxsize=8)
def _mel_inverse(n_mels: int, device: str) -> torch.Tensor:
    """[n_freqs, n_mels] least-squares (minimum-norm) inverse of the filterbank."""
    return torch.linalg.pinv(_mel_basis(n_mels, "cpu").T.double()).float().to(device)


def _magnitude(wav: torch.Tensor) -> torch.Tensor:
    """|STFT| of [..., T] scaled so a full-scale sine peaks at 0.5; [..., n_freqs, frames]."""
    window = _window(str(wav.device))
    shape = wav.shape
    spec = torch.stft(wav.reshape(-1, shape[-1]), N_FFT, HOP_LENGTH, window=window, center=True,
                      pad_mode="reflect" if shape[-1] > N_FFT // 2 else "constant", return_complex=True)
    mag = spec.abs()[..., : n_frames(shape[-1])] / window.sum()
    return mag.reshape(*shape[:-1], *mag.shape[-2:])


def log_mel_batch(wav: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[..., T] float waveforms at 24 kHz -> natural-log mel power [..., n_mels, ceil(T / 320)]."""
    power = _magnitude(wav.float()).pow(2)
    mel = torch.matmul(power.transpose(-1, -2), _mel_basis(n_mels, str(wav.device))).transpose(-1, -2)
    return mel.clamp_min(POWER_FLOOR).log()


def log_mel(wav: torch.Tensor | np.ndarray, sr: int = SAMPLE_RATE, n_mels: int = 80) -> torch.Tensor:
    """One clip (mono [T] or [C, T], any rate) -> log-mel [n_mels, frames] at 75 frames/s."""
    return log_mel_batch(prepare_waveform(wav, sr, SAMPLE_RATE), n_mels)


def mel_to_audio(log_mel_frames: torch.Tensor, griffin_lim_iters: int = 32,
                 momentum: float = GRIFFIN_LIM_MOMENTUM) -> torch.Tensor:
    """Log-mel [n_mels, T] -> 24 kHz waveform [T * 320] (pseudo-inverse + Griffin-Lim, deterministic)."""
    n_mels = log_mel_frames.shape[0]
    device = str(log_mel_frames.device)
    power = (_mel_inverse(n_mels, device) @ log_mel_frames.float().exp()).clamp_min(0.0)
    magnitude = power.sqrt() * _window(device).sum()
    # A centred STFT of T * 320 samples has T + 1 frames (we drop the last in analysis): repeat it.
    magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=1)
    length = log_mel_frames.shape[1] * HOP_LENGTH
    wav = AF.griffinlim(magnitude, _window(device), N_FFT, HOP_LENGTH, N_FFT, power=1.0,
                        n_iter=griffin_lim_iters, momentum=momentum, length=length, rand_init=False)
    return wav.clamp(-1.0, 1.0)


def log_mel_distance_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in dB between two log-mel [n_mels, T] (cut to the shorter)."""
    t = min(a.shape[-1], b.shape[-1])
    return float((a[..., :t] - b[..., :t]).abs().mean()) * 10.0 / math.log(10.0)


def mean_frame_baseline(log_mel_frames: torch.Tensor) -> torch.Tensor:
    """The trivial 'codec': every frame replaced by the utterance's mean frame."""
    return log_mel_frames.mean(dim=-1, keepdim=True).expand_as(log_mel_frames)


# ---------------------------------------------------------------------------------------------
# Residual VQ


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual quantisation of rows of x [T, D] with codebooks [K, C, D] -> codes [K, T]."""
    residual = x.clone()
    codes = torch.empty(codebooks.shape[0], x.shape[0], dtype=torch.long)
    for k, codebook in enumerate(codebooks):
        index, _ = nearest(residual, codebook)
        codes[k] = index
        residual -= codebook[index]
    return codes


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes [K, T] -> sum of the chosen centroids [T, D]."""
    return sum(codebooks[k][codes[k]] for k in range(codebooks.shape[0]))


class _FrameReservoir:
    """A seeded uniform sample of at most `capacity` frames from a stream (reservoir sampling)."""

    def __init__(self, capacity: int, dim: int, seed: int):
        self.capacity = capacity
        self.buffer = np.empty((capacity, dim), dtype=np.float32)  # pages are touched only when filled
        self.filled = 0
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, frames: np.ndarray) -> None:
        take = min(self.capacity - self.filled, len(frames))
        self.buffer[self.filled:self.filled + take] = frames[:take]
        self.filled += take
        rest = frames[take:]
        if len(rest):
            position = self.seen + take + np.arange(len(rest))  # index of each frame in the stream
            slot = self.rng.integers(0, position + 1)
            keep = slot < self.capacity
            slot, rows = slot[keep], rest[keep]
            # a slot drawn twice in this batch keeps the later frame, as one-by-one sampling would
            _, last = np.unique(slot[::-1], return_index=True)
            chosen = len(slot) - 1 - last
            self.buffer[slot[chosen]] = rows[chosen]
        self.seen += len(frames)

    def frames(self) -> torch.Tensor:
        return torch.from_numpy(self.buffer[: self.filled].copy())


# ---------------------------------------------------------------------------------------------
# The codec


class MelCodec(Codec):
    """Log-mel frames quantised by a residual k-means VQ; Griffin-Lim decoding. CPU only."""

    name = "mel"
    SAMPLE_RATE = SAMPLE_RATE
    sample_rate = SAMPLE_RATE
    frame_rate = SAMPLE_RATE / HOP_LENGTH

    def __init__(self, codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 griffin_lim_iters: int = 32):
        if codebooks.dim() != 3 or mean.shape != (codebooks.shape[2],) or std.shape != mean.shape:
            raise CodecError(f"MelCodec needs codebooks [K, C, n_mels] and mean/std [n_mels]; got "
                             f"{tuple(codebooks.shape)}, {tuple(mean.shape)}, {tuple(std.shape)}")
        if not (torch.isfinite(codebooks).all() and torch.isfinite(mean).all() and (std > 0).all()):
            raise CodecError("MelCodec parameters contain NaN/inf values or a non-positive std")
        self.codebooks = codebooks.float().contiguous()
        self.mean = mean.float().contiguous()
        self.std = std.float().contiguous()
        self.n_codebooks, self.codebook_size, self.n_mels = (int(s) for s in codebooks.shape)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self._fingerprint: str | None = None

    # -- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(cls, wavs: Iterable[torch.Tensor], cfg: CodecConfig, seed: int = 0,
            progress: Progress | None = None) -> "MelCodec":
        """Fit normalisation and K residual k-means codebooks on 24 kHz mono clips.

        At most `cfg.mel_max_fit_frames` frames are used (a seeded uniform sample of the stream).
        """
        report = progress or (lambda fraction, message: None)
        n_mels, k_stages, size = cfg.mel_n_mels, cfg.mel_n_codebooks, cfg.mel_codebook_size
        reservoir = _FrameReservoir(cfg.mel_max_fit_frames, n_mels, seed)
        for i, wav in enumerate(wavs):
            try:
                wav = prepare_waveform(wav, SAMPLE_RATE, SAMPLE_RATE, name=f"fitting clip {i}")
            except AudioError as exc:
                raise CodecError(f"cannot fit MelCodec: {exc}") from exc
            reservoir.add(log_mel_batch(wav, n_mels).T.cpu().numpy())
            if i % 50 == 0:
                report(0.0, f"analysed {i + 1} clips ({reservoir.seen} frames)")
        if reservoir.filled == 0:
            raise CodecError("cannot fit MelCodec: no audio was given (the corpus has no usable clip)")
        frames = reservoir.frames()
        mean = frames.mean(dim=0)
        std = frames.std(dim=0, unbiased=False).clamp_min(1e-3)
        residual = (frames - mean) / std
        report(0.05, f"fitting {k_stages} codebooks x {size} on {len(frames)} of {reservoir.seen} frames")

        generator = torch.Generator().manual_seed(seed)
        codebooks = torch.empty(k_stages, size, n_mels)
        for k in range(k_stages):
            def on_iter(it: int, k: int = k) -> None:
                report(0.05 + 0.95 * (k + it / cfg.mel_kmeans_iters) / k_stages,
                       f"codebook {k + 1}/{k_stages}, iteration {it}/{cfg.mel_kmeans_iters}")
            codebooks[k] = kmeans(residual, size, cfg.mel_kmeans_iters, generator, on_iter)
            index, _ = nearest(residual, codebooks[k])
            residual -= codebooks[k][index]
            report(0.05 + 0.95 * (k + 1) / k_stages,
                   f"codebook {k + 1}/{k_stages} done, residual RMS {float(residual.pow(2).mean().sqrt()):.3f}")
        return cls(codebooks, mean, std, griffin_lim_iters=cfg.mel_griffin_lim_iters)

    def matches(self, cfg: CodecConfig) -> bool:
        """True when this codec has the shape `cfg` asks for (else the corpus needs a re-fit)."""
        return (self.n_codebooks, self.codebook_size, self.n_mels) == (
            cfg.mel_n_codebooks, cfg.mel_codebook_size, cfg.mel_n_mels)

    # -- the Codec interface --------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            sha = hashlib.sha1(json.dumps(self._token_params(), sort_keys=True).encode())
            for t in (self.codebooks, self.mean, self.std):
                sha.update(t.numpy().tobytes())
            self._fingerprint = f"mel-{self.n_codebooks}x{self.codebook_size}-{sha.hexdigest()[:10]}"
        return self._fingerprint

    def encode(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        return self.encode_mel(log_mel(wav, sr, self.n_mels))

    def encode_mel(self, log_mel_frames: torch.Tensor) -> torch.Tensor:
        """Log-mel [n_mels, T] (from `log_mel`) -> codes LongTensor[K, T]."""
        if log_mel_frames.dim() != 2 or log_mel_frames.shape[0] != self.n_mels:
            raise CodecError(f"expected log-mel frames [{self.n_mels}, T], got {tuple(log_mel_frames.shape)}")
        z = (log_mel_frames.float().cpu().T - self.mean) / self.std
        return rvq_encode(z, self.codebooks)

    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [K, T] -> the quantised log-mel [n_mels, T] (no phase recovery)."""
        codes = self._check_codes(codes)
        return (rvq_decode(codes, self.codebooks) * self.std + self.mean).T.contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return mel_to_audio(self.decode_mel(codes), self.griffin_lim_iters)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[0] != self.n_codebooks or codes.shape[1] == 0:
            raise CodecError(f"{self.fingerprint} decodes codes of shape [{self.n_codebooks}, T>0], "
                             f"got {tuple(codes.shape)}")
        codes = codes.long().cpu()
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise CodecError(f"{self.fingerprint}: token values must be in [0, {self.codebook_size}), "
                             f"got values from {low} to {high}")
        return codes

    # -- storage --------------------------------------------------------------------------------

    def _token_params(self) -> dict:
        """Everything besides the tensors that decides which tokens a waveform gets."""
        return {"format_version": FORMAT_VERSION, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT,
                "hop_length": HOP_LENGTH, "f_min": F_MIN, "f_max": F_MAX, "power_floor": POWER_FLOOR,
                "n_mels": self.n_mels, "n_codebooks": self.n_codebooks, "codebook_size": self.codebook_size}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, string metadata) that `from_tensors` rebuilds this codec from."""
        params = {**self._token_params(), "griffin_lim_iters": self.griffin_lim_iters}
        tensors = {"codebooks": self.codebooks, "mean": self.mean, "std": self.std}
        return tensors, {"codec": self.name, "params": json.dumps(params), "fingerprint": self.fingerprint}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                     source: str = "the given tensors") -> "MelCodec":
        """Inverse of `to_tensors`; `source` names the file in error messages."""
        if meta.get("codec") != cls.name:
            raise CodecError(f"{source}: not a MelCodec (metadata codec={meta.get('codec')!r})")
        try:
            params = json.loads(meta["params"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CodecError(f"{source}: missing or malformed MelCodec 'params' metadata ({exc})") from exc
        missing = [key for key in ("codebooks", "mean", "std") if key not in tensors]
        if missing:
            raise CodecError(f"{source}: missing MelCodec tensors {missing}")
        try:
            codec = cls(tensors["codebooks"], tensors["mean"], tensors["std"],
                        griffin_lim_iters=int(params.get("griffin_lim_iters", 32)))
        except CodecError as exc:
            raise CodecError(f"{source}: {exc}") from exc
        expected = codec._token_params()
        stored = {key: params.get(key) for key in expected}
        if stored != expected:
            diff = {key: (stored[key], expected[key]) for key in expected if stored[key] != expected[key]}
            raise CodecError(f"{source}: MelCodec made with other settings {diff} (stored, expected); "
                             f"re-fit it with `ira data prepare --dir DIR --force`")
        if "fingerprint" in meta and meta["fingerprint"] != codec.fingerprint:
            raise CodecError(f"{source}: MelCodec tensors do not match their recorded fingerprint "
                             f"{meta['fingerprint']!r} (got {codec.fingerprint!r}); the file is damaged")
        return codec

    def save(self, path: str | Path) -> Path:
        """Write the codec as safetensors (atomically: temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.to_tensors()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path, griffin_lim_iters: int | None = None) -> "MelCodec":
        """Read a codec written by `save`; `griffin_lim_iters` overrides the stored decode setting."""
        path = Path(path)
        if not path.is_file():
            raise CodecError(f"{path}: no such MelCodec file")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CodecError(f"{path}: not a readable safetensors file ({exc}); delete it and run "
                             f"`ira data prepare` again") from exc
        codec = cls.from_tensors(tensors, meta, source=str(path))
        if griffin_lim_iters is not None:
            codec.griffin_lim_iters = int(griffin_lim_iters)
        return codec
