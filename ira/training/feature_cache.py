"""The frozen SpeechLM's features of every clip, computed once and read back clip by clip.

Stage 2 keeps the SpeechLM frozen, so its hidden states over a clip never change during a run; computing
them at every step would cost more than the adapter's own step. They are written once per split next to
the token cache (`speech_features_{split}.safetensors`: one float16 [total_frames, d] tensor and the clip
offsets, like the token cache). Neither writing nor reading holds the split in memory: a batch of clips is
written at its place in the file as soon as it is computed, and a clip is read back with one positioned read
(not through a memory map, whose touched pages would count as the process's own memory: 2.2 GB for the
recipe's corpus, issue 36).

The file's metadata names what it was computed from (a digest of the SpeechLM's weights, the layer, the
split's data hash, the frame limit). Anything else - another checkpoint, a re-prepared corpus, a file cut
short - is stale: it is rebuilt, never half-read. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

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
        self._data_start, self._dim = _features_layout(path)
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def clip_features(self, index: int) -> torch.Tensor:
        if self._fd is None:  # opened lazily: each DataLoader worker gets its own descriptor
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        row = self._dim * 2
        data = bytearray(os.pread(self._fd, (end - start) * row, self._data_start + start * row))
        if len(data) != (end - start) * row:
            raise OSError(f"{self.path}: cut short (clip {index} reads {len(data)} of {(end - start) * row} bytes); "
                          "delete the file and it is computed again")
        return torch.frombuffer(data, dtype=torch.float16).view(end - start, self._dim)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _features_layout(path: Path) -> tuple[int, int]:
    """Where the features tensor's bytes start in a safetensors file, and its row width."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))["features"]
    if entry["dtype"] != "F16" or len(entry["shape"]) != 2:
        raise ValueError(f"{path}: 'features' is {entry['dtype']} {entry['shape']}, not float16 [frames, d]")
    return 8 + header_size + int(entry["data_offsets"][0]), int(entry["shape"][1])


def is_fresh(path: Path, key: str) -> bool:
    """Whether `path` holds complete features made under `key` (a missing or cut file is not)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            return (meta.get("format_version") == FORMAT_VERSION and meta.get("key") == key
                    and handle.get_slice("offsets").get_shape()[0] == int(meta.get("n_clips", -1)) + 1)
    except Exception:
        return False


def _safetensors_header(n_frames: int, dim: int, n_clips: int, metadata: dict[str, str]) -> bytes:
    """The header of a file with 'offsets' (int64 [n_clips + 1]) then 'features' (float16 [n_frames, dim]),
    padded to 8 bytes as the safetensors format asks."""
    offsets_bytes = (n_clips + 1) * 8
    header = {"__metadata__": metadata,
              "offsets": {"dtype": "I64", "shape": [n_clips + 1], "data_offsets": [0, offsets_bytes]},
              "features": {"dtype": "F16", "shape": [n_frames, dim],
                           "data_offsets": [offsets_bytes, offsets_bytes + n_frames * dim * 2]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@torch.no_grad()
def build(path: Path, speech_lm: SpeechLM, split: TokenSplit, layer: int, max_frames: int, key: str,
          batch_size: int = 32, progress: Optional[Progress] = None) -> Path:
    """Compute every clip's features (shortest clips batched together) and write each batch at its place in
    the file (a temporary one, renamed into place once whole): memory holds one batch, not the split."""
    speech_lm.eval()
    device = speech_lm.device
    n = len(split)
    frames = [min(length, max_frames) for length in split.lengths()]
    offsets = torch.cumsum(torch.tensor([0] + frames, dtype=torch.int64), 0)
    dim = speech_lm.cfg.d_model
    header = _safetensors_header(int(offsets[-1]), dim, n, {"format_version": FORMAT_VERSION, "key": key,
                                                            "n_clips": str(n), "dim": str(dim)})
    data_start = len(header) + (n + 1) * 8
    order = sorted(range(n), key=lambda i: frames[i])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(offsets.numpy().tobytes())
            f.truncate(data_start + int(offsets[-1]) * dim * 2)
            for start in range(0, n, batch_size):
                chunk = order[start:start + batch_size]
                codes, chunk_lengths = pad_codes([split.clip_codes(i)[:, :max_frames] for i in chunk])
                features, _ = speech_lm.audio_features(codes.to(device), chunk_lengths.to(device), layer=layer)
                for row, i in enumerate(chunk):
                    clip = features[row, : frames[i]].to("cpu", torch.float16).contiguous()
                    if clip.shape != (frames[i], dim):
                        raise RuntimeError(f"clip {i}: features {tuple(clip.shape)}, expected ({frames[i]}, {dim})")
                    f.seek(data_start + int(offsets[i]) * dim * 2)
                    f.write(clip.numpy().tobytes())
                if progress is not None:
                    done = min(start + batch_size, n)
                    progress(done / n, f"SpeechLM features (computed once): {done}/{n} clips")
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
