"""A static key/value cache: one preallocated buffer per layer, filled left to right.

Generation feeds the prompt once (prefill), then one step per audio frame. Each attention layer
writes its new keys and values at positions [length, length + n) and attends over [0, length + n).
The buffers are allocated once for the whole generation (no `torch.cat` per step), on the first
write, so that they take the dtype the layer actually computes in (e.g. bf16 under autocast).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: int):
        self.shape = (batch_size, n_heads, max_len, head_dim)
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, n, D] at [length, length + n); return all keys/values so far (views)."""
        n = k.shape[2]
        end = self.length + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once after all layers have written the same n positions."""
        self.length += n
