"""The token cache: every clip encoded once, one safetensors file per split.

Layout (see docs/data_layout.md): ``codes`` int16 ``[K, total_frames]`` with all clips concatenated
along time, ``offsets`` int64 ``[n + 1]``; metadata holds ids, texts, descriptions, the codec
fingerprint, the hash of the data it was built from and the same hash without the wavs (`text_hash`,
what a corpus copied without its wavs is checked against: ira/data/cache_only.py). Files are written
under a temporary name and renamed, so a reader sees either the old complete file or the new complete
file, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = "1"
SPLITS = ("train", "val")


class CacheError(RuntimeError):
    """A cache file that is missing, stale or unreadable; the fix is `ira data prepare`."""


@dataclass
class TokenSplit:
    """All clips of one split, in memory (compact int16 codes)."""

    codes: torch.Tensor            # int16 [K, total_frames]
    offsets: torch.Tensor          # int64 [n + 1]
    ids: list[str]
    texts: list[str]
    descriptions: list[list[str]]
    fingerprint: str
    data_hash: str

    def __len__(self) -> int:
        return len(self.ids)

    def clip_codes(self, index: int) -> torch.Tensor:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.codes[:, start:end].long()

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[0])


def cache_dir(data_dir: str | Path, fingerprint: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in fingerprint)
    return Path(data_dir) / "cache" / safe


def split_path(data_dir: str | Path, fingerprint: str, split: str) -> Path:
    return cache_dir(data_dir, fingerprint) / f"{split}.safetensors"


def write_split(path: Path, clip_codes: list[torch.Tensor], ids: list[str], texts: list[str],
                descriptions: list[list[str]], fingerprint: str, data_hash: str, split: str,
                text_hash: str = "") -> Path:
    """Write one split atomically. `clip_codes` are LongTensor[K, T_i] with values < 32768."""
    if not clip_codes:
        n_codebooks = 0
        codes = torch.zeros((0, 0), dtype=torch.int16)
    else:
        n_codebooks = clip_codes[0].shape[0]
        for clip_id, c in zip(ids, clip_codes):
            if c.dim() != 2 or c.shape[0] != n_codebooks:
                raise CacheError(f"clip {clip_id}: codes of shape {tuple(c.shape)}, expected [{n_codebooks}, T]")
            if c.numel() and (int(c.max()) > 32767 or int(c.min()) < 0):
                raise CacheError(f"clip {clip_id}: token values outside 0..32767 cannot be cached as int16")
        codes = torch.cat([c.to(torch.int16) for c in clip_codes], dim=1).contiguous()
    lengths = torch.tensor([0] + [c.shape[1] for c in clip_codes], dtype=torch.int64)
    offsets = torch.cumsum(lengths, dim=0)
    meta = {
        "format_version": FORMAT_VERSION, "split": split, "fingerprint": fingerprint,
        "data_hash": data_hash, "text_hash": text_hash, "ids": json.dumps(ids), "texts": json.dumps(texts),
        "descriptions": json.dumps(descriptions), "n_codebooks": str(n_codebooks),
    }
    _save_atomic(path, {"codes": codes, "offsets": offsets}, meta)
    return path


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def record_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add `extra` to the metadata of an existing cache file (rewritten atomically, codes unchanged): a cache
    built before a metadata key existed gets it without encoding the corpus again."""
    meta = read_split_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    _save_atomic(path, tensors, {**meta, **extra})


def read_split_metadata(path: Path) -> dict[str, str]:
    """The metadata of a cache file; CacheError when missing or unreadable (e.g. truncated)."""
    if not path.is_file():
        raise CacheError(f"{path}: no token cache; run `ira data prepare --dir {path.parents[2]}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise CacheError(f"{path}: unreadable token cache ({exc}); it will be rebuilt by `ira data prepare`") from exc


def is_fresh(path: Path, fingerprint: str, data_hash: str) -> bool:
    try:
        meta = read_split_metadata(path)
    except CacheError:
        return False
    return (meta.get("format_version") == FORMAT_VERSION and meta.get("fingerprint") == fingerprint
            and meta.get("data_hash") == data_hash)


def load_split(path: str | Path, expected_fingerprint: str | None = None) -> TokenSplit:
    """Load a split into memory; a fingerprint mismatch is a clear error (tokens of another codec)."""
    path = Path(path)
    meta = read_split_metadata(path)
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise CacheError(f"{path}: tokens made by codec {meta.get('fingerprint')!r}, but the model uses "
                         f"{expected_fingerprint!r}; run `ira data prepare` with the same codec settings")
    try:
        with safe_open(str(path), framework="pt") as handle:
            codes = handle.get_tensor("codes")
            offsets = handle.get_tensor("offsets")
    except Exception as exc:
        raise CacheError(f"{path}: unreadable token cache ({exc}); run `ira data prepare` to rebuild it") from exc
    ids = json.loads(meta["ids"])
    if offsets.numel() != len(ids) + 1:
        raise CacheError(f"{path}: corrupt cache ({len(ids)} ids but {offsets.numel()} offsets); rebuild it")
    return TokenSplit(codes=codes, offsets=offsets, ids=ids, texts=json.loads(meta["texts"]),
                      descriptions=json.loads(meta["descriptions"]), fingerprint=meta["fingerprint"],
                      data_hash=meta["data_hash"])
