"""The style stage's log-mels, computed once per corpus split and kept in DIR/cache/style-mels/.

Reading, resampling, trimming and turning 20,000 clips into log-mels takes ~12 minutes on a 2-core CPU;
without this cache the style stage (and every resume of it, and every retrieval evaluation) paid that
each time it started. A file holds one split: ``mels`` float16 ``[n_mels, total_frames]`` with the clips
concatenated along time and ``offsets`` int64 ``[n + 1]``. Its key names everything the mels depend on:
the token cache's data hash (which covers every wav's size and mtime and the trimming setting), the clips,
the mel settings and the constants of `ira.codec.mel.log_mel`; a changed corpus or setting makes a new
file (`ira.tensor_cache`), never a stale read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ira import tensor_cache
from ira.codec import mel

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


def cached_mels(data_dir: str | Path, split: str, data_hash: str, ids: Sequence[str], settings: dict,
                compute: ComputeMel) -> dict[str, torch.Tensor]:
    """The log-mel of every clip in `ids`: read from DIR/cache/style-mels/ when kept there under the same
    key, else computed with `compute` and kept for the next time."""
    key = cache_key(split, data_hash, ids, settings)
    path = tensor_cache.cache_file(Path(data_dir) / "cache" / FOLDER, split, key)
    found = tensor_cache.read(path, key)
    clips = _split_up(found, ids) if found is not None else None
    if clips is not None:
        return clips
    mels = [compute(clip_id).to(torch.float16) for clip_id in ids]
    offsets = torch.tensor([0, *(m.shape[1] for m in mels)], dtype=torch.int64).cumsum(0)
    joined = torch.cat(mels, dim=1) if mels else torch.zeros(0, 0, dtype=torch.float16)
    tensor_cache.write(path, {"mels": joined, "offsets": offsets}, key, family=split)
    return dict(zip(ids, mels))
