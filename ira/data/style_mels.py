"""The style stage's log-mels, computed once per corpus split and kept in DIR/cache/style-mels/.

Reading, resampling, trimming and turning 20,000 clips into log-mels takes ~12 minutes on a 2-core CPU;
without this cache the style stage (and every resume of it, and every retrieval evaluation) paid that
each time it started. A file holds one split: ``mels`` float16 ``[n_mels, total_frames]`` with the clips
concatenated along time, ``offsets`` int64 ``[n + 1]``, and the ids in its metadata. Its name carries a key
of everything the mels depend on (the token cache's data hash, which covers every wav's size and mtime and
the trimming setting, and the mel settings), so a changed corpus or setting makes a new file, never a
stale read. Written under a temporary name and renamed: a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"
FOLDER = "style-mels"

ComputeMel = Callable[[str], torch.Tensor]
"""clip id -> its log-mel [n_mels, frames] (float16)."""


def cache_path(data_dir: str | Path, split: str, data_hash: str, settings: dict) -> Path:
    """Where the mels of `split` live for this corpus (`data_hash`) and these mel `settings`."""
    key = hashlib.sha1(json.dumps([FORMAT_VERSION, data_hash, settings], sort_keys=True).encode())
    return Path(data_dir) / "cache" / FOLDER / f"{split}-{key.hexdigest()[:16]}.safetensors"


def _read(path: Path, ids: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The cached mels of `ids`, or None when the file is missing, unreadable or holds other clips."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            cached_ids = json.loads((handle.metadata() or {}).get("ids", "null"))
            if cached_ids != list(ids):
                return None
            mels, offsets = handle.get_tensor("mels"), handle.get_tensor("offsets").tolist()
    except Exception as exc:   # a truncated or foreign file: computed again and rewritten
        log.warning("%s: unreadable style-mel cache (%s); computing the mels again", path, exc)
        return None
    return {clip_id: mels[:, offsets[i]:offsets[i + 1]] for i, clip_id in enumerate(cached_ids)}


def _write(path: Path, ids: Sequence[str], mels: Sequence[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [m.shape[1] for m in mels]
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    joined = torch.cat(list(mels), dim=1).to(torch.float16) if mels else torch.zeros(0, 0, dtype=torch.float16)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"mels": joined.contiguous(), "offsets": offsets},
              str(tmp), metadata={"format_version": FORMAT_VERSION, "ids": json.dumps(list(ids))})
    os.replace(tmp, path)


def cached_mels(path: Path, ids: Sequence[str], compute: ComputeMel) -> dict[str, torch.Tensor]:
    """The log-mel of every clip in `ids`: read from `path` when it holds exactly these clips, else
    computed with `compute` and written there for the next time (a write that fails is logged, not raised:
    the cache saves time, it is never needed)."""
    found = _read(path, ids)
    if found is not None:
        return found
    mels = [compute(clip_id).to(torch.float16) for clip_id in ids]
    try:
        _write(path, ids, mels)
    except OSError as exc:
        log.warning("%s: could not write the style-mel cache (%s); the next run computes them again", path, exc)
    return dict(zip(ids, mels))
