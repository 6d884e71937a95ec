"""Files of tensors computed once and kept for later runs, named and checked by a key of what they were
computed from.

A cache only saves time, it is never needed: a file that is missing, cut short, foreign or made under another
key reads as None (and is computed again by the caller), and a write that fails is logged, never raised. A
write goes to a temporary file that is renamed into place, so a reader sees a whole file or none; once it is
in place, the files it supersedes (the same `family` under other keys, e.g. the mels of a corpus since
changed) are deleted, so that a changing corpus or model does not fill the disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
STALE_TEMPORARY_S = 24 * 3600   # a temporary file this old was left by a write that crashed


def cache_file(folder: Path, family: str, key: str) -> Path:
    """`folder/<family>-<digest of key>.safetensors`: one file per key; `family` groups those that supersede
    each other (one split's cache under successive keys)."""
    return Path(folder) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{SUFFIX}"


def read(path: Path, key: str) -> Optional[dict[str, torch.Tensor]]:
    """Every tensor of `path` when it was written under `key`, else None (logged when the file is unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:   # noqa: BLE001 - cut short or not safetensors: computed again
        log.warning("%s: unreadable cache (%s); computing it again", path, exc)
        return None


def holds(path: Path, key: str) -> bool:
    """Whether `path` is a file written under `key` (its header only; `read` may still find it cut short)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key") == key
    except Exception:   # noqa: BLE001 - unreadable: as good as absent
        return False


def write(path: Path, tensors: Mapping[str, torch.Tensor], key: str, family: str) -> None:
    """Keep `tensors` in `path` under `key`, then delete the other files of `family` in its folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    except Exception as exc:   # noqa: BLE001 - a full disk or a read-only folder must not stop a training
        log.warning("%s: could not keep the cache (%s); the next run computes it again", path, exc)
        tmp.unlink(missing_ok=True)
        return
    prune(path, family)


def prune(kept: Path, family: str) -> None:
    """Delete the files of `family` beside `kept` (made under other keys) and temporaries of crashed writes."""
    now = time.time()
    for other in kept.parent.glob(f"{family}-*{SUFFIX}"):
        if other != kept:
            other.unlink(missing_ok=True)
    for tmp in kept.parent.glob(f".{family}-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
