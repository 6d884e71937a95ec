"""The frozen SpeechLM's features of every clip, computed once and read back clip by clip.

Stage 2 keeps the SpeechLM frozen, so its hidden states over a clip never change during a run; computing
them at every step would cost more than the adapter's own step. They are written once per split next to
the token cache (`speech_features_{split}.safetensors`: one float16 [total_frames, d] tensor and the clip
offsets, like the token cache) and read back by slices from the memory-mapped file, so a large corpus
does not have to fit in memory.

The file's metadata names what it was computed from (a digest of the SpeechLM's weights, the layer, the
split's data hash, the frame limit). Anything else - another checkpoint, a re-prepared corpus, a file cut
short - is stale: it is rebuilt, never half-read. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ira.data.dataset import pad_codes
from ira.data.token_cache import TokenSplit
from ira.models.speech_lm import SpeechLM

FORMAT_VERSION = "1"
Progress = Callable[[float, str], None]


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(speech_lm: SpeechLM, layer: int, split: TokenSplit, max_frames: int) -> str:
    return f"{weights_digest(speech_lm)}:layer{layer}:{split.data_hash}:{len(split)}:{max_frames}"


class FeatureSplit:
    """Features of one split: `clip_features(i)` -> float16 [T_i, d], read from the file on demand."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self.offsets = handle.get_tensor("offsets")
        self._handle = None

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def clip_features(self, index: int) -> torch.Tensor:
        if self._handle is None:  # opened lazily: each DataLoader worker gets its own handle
            self._handle = safe_open(str(self.path), framework="pt")
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._handle.get_slice("features")[start:end]

    def __getstate__(self) -> dict:
        return {"path": self.path, "offsets": self.offsets, "_handle": None}


def is_fresh(path: Path, key: str) -> bool:
    """Whether `path` holds complete features made under `key` (a missing or cut file is not)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            return (meta.get("format_version") == FORMAT_VERSION and meta.get("key") == key
                    and handle.get_slice("offsets").get_shape()[0] == int(meta.get("n_clips", -1)) + 1)
    except Exception:
        return False


@torch.no_grad()
def build(path: Path, speech_lm: SpeechLM, split: TokenSplit, layer: int, max_frames: int, key: str,
          batch_size: int = 32, progress: Optional[Progress] = None) -> Path:
    """Compute every clip's features (shortest clips batched together) and write them atomically."""
    speech_lm.eval()
    device = speech_lm.device
    n = len(split)
    lengths = split.lengths()
    order = sorted(range(n), key=lambda i: lengths[i])
    per_clip: list[Optional[torch.Tensor]] = [None] * n
    for start in range(0, n, batch_size):
        chunk = order[start:start + batch_size]
        codes, chunk_lengths = pad_codes([split.clip_codes(i)[:, :max_frames] for i in chunk])
        features, _ = speech_lm.audio_features(codes.to(device), chunk_lengths.to(device), layer=layer)
        for row, i in enumerate(chunk):
            per_clip[i] = features[row, : int(chunk_lengths[row])].to("cpu", torch.float16)
        if progress is not None:
            done = min(start + batch_size, n)
            progress(done / n, f"SpeechLM features (computed once): {done}/{n} clips")
    dim = speech_lm.cfg.d_model
    tensors = [t for t in per_clip if t is not None]
    features = torch.cat(tensors) if tensors else torch.zeros(0, dim, dtype=torch.float16)
    offsets = torch.cumsum(torch.tensor([0] + [t.shape[0] for t in tensors], dtype=torch.int64), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"features": features.contiguous(), "offsets": offsets}, str(tmp),
                  metadata={"format_version": FORMAT_VERSION, "key": key, "n_clips": str(n), "dim": str(dim)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_or_build(path: Path, speech_lm: SpeechLM, split: TokenSplit, layer: int, max_frames: int,
                  progress: Optional[Progress] = None) -> FeatureSplit:
    """The split's features from `path` when they are fresh; otherwise computed and written there first."""
    key = cache_key(speech_lm, layer, split, max_frames)
    if not is_fresh(path, key):
        build(path, speech_lm, split, layer, max_frames, key, progress=progress)
    return FeatureSplit(path)
