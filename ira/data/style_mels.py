"""The log-mels the voice style encoder hears, computed once per corpus split and kept in DIR/cache/style-mels/.

Both the style stage and stage 1's style table (the audio vector of every clip) read them from here.
Reading, resampling, trimming and turning 20,000 clips into log-mels takes ~12 minutes on a 2-core CPU;
without this cache the style stage (and every resume of it, and every retrieval evaluation) paid that
each time it started. A file holds one split: ``mels`` float16 ``[n_mels, total_frames]`` with the clips
concatenated along time and ``offsets`` int64 ``[n + 1]``. Its key names everything the mels depend on:
the token cache's data hash (which covers every wav's size and mtime and the trimming setting), the clips,
the mel settings and the constants of `ira.codec.mel.log_mel`; a changed corpus or setting makes a new
file (`ira.tensor_cache`), never a stale read.

A corpus that travelled without its wavs (ira/data/cache_only.py) uses this file when it travelled too;
otherwise its mels are decoded from its codec tokens: the MelCodec's tokens are quantised log-mels of the
same trimmed audio (its `decode_mel`, no Griffin-Lim), any other codec's are decoded to audio and analysed.
At 36 KB a clip (80 bands, float16) the wav-made file of the 20,000-clip corpus is ~690 MB, far over the
64 MiB a device machine receives, while its tokens are ~2 KB a clip. Decoded mels carry the codec's
quantisation error, so they are kept under their own key (they never pass for the wavs' mels).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ira import tensor_cache
from ira.audio import load_audio, trim_silence
from ira.codec import mel
from ira.codec.base import Codec
from ira.config import StyleConfig
from ira.data.cache_only import has_wavs
from ira.data.corpus import wav_path
from ira.data.token_cache import TokenSplit

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
FOLDER = "style-mels"

ComputeMel = Callable[[str], torch.Tensor]
"""clip id -> its log-mel [n_mels, frames] (float16)."""


def cache_key(split: str, data_hash: str, ids: Sequence[str], settings: dict) -> str:
    """What the mels of `ids` depend on (the caller's `settings`: n_mels, frame limit, trimming)."""
    constants = {"n_fft": mel.N_FFT, "hop": mel.HOP_LENGTH, "f_min": mel.F_MIN, "f_max": mel.F_MAX,
                 "floor": mel.POWER_FLOOR, "sample_rate": mel.SAMPLE_RATE}
    clips = hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]
    return json.dumps([FORMAT_VERSION, split, data_hash, clips, settings, constants], sort_keys=True)


def _split_up(tensors: dict[str, torch.Tensor], ids: Sequence[str]) -> Optional[dict[str, torch.Tensor]]:
    """The file's tensors as one mel per clip, or None when their shapes do not fit `ids`."""
    mels, offsets = tensors.get("mels"), tensors.get("offsets")
    if mels is None or offsets is None or mels.dim() != 2 or offsets.numel() != len(ids) + 1:
        return None
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != mels.shape[1] or any(a > b for a, b in zip(bounds, bounds[1:])):
        return None
    return {clip_id: mels[:, bounds[i]:bounds[i + 1]] for i, clip_id in enumerate(ids)}


def cache_path(data_dir: str | Path, split: str, key: str) -> Path:
    """The file that keeps the mels of `split` made under `key`."""
    return tensor_cache.cache_file(Path(data_dir) / "cache" / FOLDER, split, key)


def kept_mels(data_dir: str | Path, split: str, key: str, ids: Sequence[str]) -> Optional[dict[str, torch.Tensor]]:
    """The mels of `ids` kept under `key`, or None when there is no such whole file."""
    found = tensor_cache.read(cache_path(data_dir, split, key), key)
    return _split_up(found, ids) if found is not None else None


def cached_mels(data_dir: str | Path, split: str, data_hash: str, ids: Sequence[str], settings: dict,
                compute: ComputeMel) -> dict[str, torch.Tensor]:
    """The log-mel of every clip in `ids`: read from DIR/cache/style-mels/ when kept there under the same
    key, else computed with `compute` and kept for the next time."""
    key = cache_key(split, data_hash, ids, settings)
    path = cache_path(data_dir, split, key)
    clips = kept_mels(data_dir, split, key, ids)
    if clips is not None:
        return clips
    mels = [compute(clip_id).to(torch.float16) for clip_id in ids]
    offsets = torch.tensor([0, *(m.shape[1] for m in mels)], dtype=torch.int64).cumsum(0)
    joined = torch.cat(mels, dim=1) if mels else torch.zeros(0, 0, dtype=torch.float16)
    tensor_cache.write(path, {"mels": joined, "offsets": offsets}, key, family=split)
    return dict(zip(ids, mels))


@dataclass(frozen=True)
class MelSettings:
    """How the style encoder's log-mels are made: bands, the frame limit (`style.max_audio_seconds` at 75 frames
    a second) and the silence trimming of the wavs (`data.trim_silence_db`, as in preparation)."""

    n_mels: int
    max_frames: int
    trim_db: float

    @classmethod
    def of(cls, style_cfg: StyleConfig, trim_db: float) -> "MelSettings":
        """From a style config (the run's, or a trained encoder's own) and `data.trim_silence_db`."""
        frame_rate = mel.SAMPLE_RATE // mel.HOP_LENGTH
        return cls(style_cfg.n_mels, int(style_cfg.max_audio_seconds * frame_rate), float(trim_db))

    def key(self) -> dict:
        return {"n_mels": self.n_mels, "max_frames": self.max_frames, "trim_db": self.trim_db}


@dataclass
class SplitMels:
    """The mels of a split, the file that keeps them, and what they were made from ("wavs" or
    "tokens:<codec fingerprint>")."""

    mels: dict[str, torch.Tensor]
    path: Path
    source: str


def wav_mel(data_dir: Path, clip_id: str, settings: MelSettings) -> torch.Tensor:
    """One clip's log-mel from its wav: 24 kHz, trimmed of silence as in preparation, at most max_frames."""
    path = wav_path(data_dir, clip_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the style encoder's log-mel of clip {clip_id} is made from "
                                f"it (and is not in {Path(data_dir) / 'cache' / FOLDER}); restore the wav or run "
                                f"`ira data prepare --dir {data_dir}` again")
    wav = trim_silence(load_audio(path, mel.SAMPLE_RATE), mel.SAMPLE_RATE, top_db=settings.trim_db)
    return mel.log_mel(wav, mel.SAMPLE_RATE, settings.n_mels)[:, :settings.max_frames].to(torch.float16)


def token_mel(codec: Codec, codes: torch.Tensor, settings: MelSettings) -> torch.Tensor:
    """One clip's log-mel decoded from its codec tokens [K, T] (made from the trimmed audio in preparation)."""
    with torch.inference_mode():
        if isinstance(codec, mel.MelCodec) and codec.n_mels == settings.n_mels:
            frames = codec.decode_mel(codes)
        else:
            frames = mel.log_mel(codec.decode(codes), codec.sample_rate, settings.n_mels)
    return frames[:, :settings.max_frames].to(torch.float16)


def mel_source(data_dir: str | Path, split: str, tokens: TokenSplit, codec: Codec, settings: MelSettings) -> str:
    """What `split_mels` makes the split's mels from: "wavs" when the corpus has them or the file made from them
    is here, else "tokens:<codec fingerprint>". Reads no mels."""
    wav_key = cache_key(split, tokens.data_hash, list(tokens.ids), settings.key())
    if has_wavs(Path(data_dir)) or tensor_cache.holds(cache_path(data_dir, split, wav_key), wav_key):
        return "wavs"
    return f"tokens:{codec.fingerprint}"


def split_mels(data_dir: str | Path, split: str, tokens: TokenSplit, codec: Codec,
               settings: MelSettings) -> SplitMels:
    """The style log-mel of every clip of a token-cache split (`split`: "train" / "val"), kept in
    DIR/cache/style-mels/: from the wavs when the corpus has them (or from the file made from them when it
    travelled with the corpus), else decoded from the tokens (and kept under their own key)."""
    data_dir = Path(data_dir)
    ids = list(tokens.ids)
    source = mel_source(data_dir, split, tokens, codec, settings)
    if source == "wavs":
        key = cache_key(split, tokens.data_hash, ids, settings.key())
        mels = cached_mels(data_dir, split, tokens.data_hash, ids, settings.key(),
                           lambda clip_id: wav_mel(data_dir, clip_id, settings))
        return SplitMels(mels, cache_path(data_dir, split, key), source)
    token_settings = {**settings.key(), "decoded_from": codec.fingerprint}
    key = cache_key(split, tokens.data_hash, ids, token_settings)
    if not tensor_cache.holds(cache_path(data_dir, split, key), key):
        log.warning("%s has no wavs and no style log-mels made from them: decoding the %s split's from its codec "
                    "tokens (%s; quantised, as the codec hears them)", data_dir, split, codec.fingerprint)
    index = {clip_id: i for i, clip_id in enumerate(ids)}
    mels = cached_mels(data_dir, split, tokens.data_hash, ids, token_settings,
                       lambda clip_id: token_mel(codec, tokens.clip_codes(index[clip_id]), settings))
    return SplitMels(mels, cache_path(data_dir, split, key), source)
