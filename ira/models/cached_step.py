"""One KV-cached generation step of a SpeechLM, written flat: one column of the delayed grid in, logits out.

The modules' forward serves training, the prefill and the uncached path. At one new token per step on a
CPU, a step is ~30 matrix-vector products plus ~15 small operations per layer, each a few microseconds,
and in the module path module calls, dropout no-ops, [B, T, d] views, dtype round trips and a 7-operation
RMSNorm add to that: an int8 `laptop`-size step took 3.06 ms through the modules and takes 2.55 ms here.
This class computes the same thing as `SpeechLM._embed_audio` -> `_transformer` -> `_logits` for one
new column, on the model's own parameters (copied are only the embedding tables, stacked into one so the
K lookups are one, and the norm weights, doubled), and writes the same `StaticKVCache`.
A step is one audio query over the cache, causal in either `speech_lm.text_attention` mode: the prefix's
keys and values were computed by the prefill (`SpeechLM._decode`), which applies that mode's mask.
tests/test_cached_step.py checks it against the module path.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ira.models.alignment import StepPrior
from ira.models.kv_cache import StaticKVCache
from ira.models.quantize import Int8Linear
from ira.models.speech_lm import MLP, SpeechLM, apply_rotary, attention_mask

Op = Callable[[torch.Tensor], torch.Tensor]


def _rms_norm_fused(x: torch.Tensor, weight_twice: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through PyTorch's fused LayerNorm kernel: [x, -x] has mean 0 and variance mean(x^2), so
    the first half of its layer norm is exactly x / sqrt(mean(x^2) + eps). On a CPU `F.rms_norm` is a
    chain of ~7 small operations; this is 3 (about 15 us less per norm inside a generation step)."""
    width = x.shape[-1]
    both = torch.cat([x, x.neg()], dim=-1)
    return F.layer_norm(both, (2 * width,), weight_twice, None, eps)[..., :width]


def _direct(module: nn.Module) -> Op:
    """The module's computation as a plain function call where its type is known, else the module."""
    if type(module) is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    if isinstance(module, Int8Linear):
        return module.forward_bf16       # bf16 out: the residual add or the next product takes it as is
    if type(module) is nn.RMSNorm:
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps
        return functools.partial(_rms_norm_fused, weight_twice=module.weight.repeat(2), eps=eps)
    if type(module) is nn.LayerNorm:
        return functools.partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                                 bias=module.bias, eps=module.eps)
    return module


def stacked_audio_embedding(model: SpeechLM) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream tables (K codebooks x F frames per step) stacked into one [K F (V + 2), d] (a copy) and
    each stream's row offset [K F]: one lookup of column + offsets embeds a whole grid column."""
    tables = [emb.weight for emb in model.audio_emb]                      # K F x [V + 2, d] (EOS, fill)
    embedding = torch.cat(tables)
    return embedding, torch.arange(len(tables), device=embedding.device) * tables[0].shape[0]


class CachedStep:
    """Bound to one model for one generation: `step(column, positions, cache, key_valid)` -> logits."""

    def __init__(self, model: SpeechLM, prior: StepPrior | None = None):
        cfg = model.cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.align_heads, self.prior = cfg.align_heads, prior
        if self.align_heads and prior is None:
            raise ValueError("this SpeechLM has alignment heads: its cached step needs their StepPrior")
        self.n_streams, self.n_classes = model.n_streams, model.codebook_size + 1
        self.rope = model.rope
        self.embedding, self.offsets = stacked_audio_embedding(model)
        self.layers = []
        for block in model.blocks:
            mlp: MLP = block.mlp
            self.layers.append((_direct(block.norm1), _direct(block.attn.qkv), _direct(block.attn.proj),
                                _direct(block.norm2), _direct(mlp.up), _direct(mlp.down), mlp.swiglu))
        self.norm, self.heads = _direct(model.norm), _direct(model.heads)

    def __call__(self, column: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                 key_valid: torch.Tensor | None) -> torch.Tensor:
        """column [rows, K] (the grid column just chosen), positions [rows, 1] (its RoPE position);
        key_valid [rows, cache.length + 1] or None (no key is padding). Returns float logits
        [rows, K, V + 1] for the next column and advances the cache by one."""
        rows = column.shape[0]
        x = F.embedding(column + self.offsets, self.embedding).sum(dim=1)          # [rows, d]
        cos, sin = self.rope(positions)                                            # [rows, 1, 1, D]
        mask = None if key_valid is None else attention_mask(key_valid, cache.length, 1)
        if self.align_heads:
            mask = self._mask_with_prior(mask, rows, cache.length)
        shape = (rows, 3, self.n_heads, 1, self.head_dim)
        for layer, (norm1, qkv, proj, norm2, up, down, swiglu) in enumerate(self.layers):
            q_k_v = qkv(norm1(x)).float().view(shape).transpose(0, 1)              # [3, rows, H, 1, D]
            q, k = apply_rotary(q_k_v[:2], cos, sin)
            k, v = cache.update(layer, k, q_k_v[2])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)           # [rows, H, 1, D]
            x = x + proj(y.reshape(rows, -1))
            h = up(norm2(x))
            if swiglu:
                gate, value = h.chunk(2, dim=-1)
                x = x + down(F.silu(gate) * value)
            else:
                x = x + down(F.gelu(h))
        cache.advance(1)
        return self.heads(self.norm(x)).view(rows, self.n_streams, self.n_classes).float()

    def _mask_with_prior(self, mask: torch.Tensor | None, rows: int, length: int) -> torch.Tensor:
        """Per-head additive mask [rows, H, 1, length + 1]: the alignment heads see the prefix with the
        prior and no audio key; the other heads see what `mask` allows."""
        align = self.prior.mask(length)
        free = torch.zeros(rows, 1, 1, length + 1, device=align.device)
        if mask is not None:
            free = free.masked_fill(~mask, float("-inf"))
        return torch.cat([align.expand(-1, self.align_heads, -1, -1),
                          free.expand(-1, self.n_heads - self.align_heads, -1, -1)], dim=1)


def cached_step_for(model: SpeechLM, cache: StaticKVCache, prior: StepPrior | None = None) -> Callable:
    """The fastest one-column step for this model after its prefill into `cache`: the compiled CPU step
    (`numba_step.NumbaCachedStep`) where it applies (CPU, fp32 parameters and cache), else `CachedStep`.
    `prior`: the alignment heads' prior for this generation (models with alignment heads)."""
    from ira.models import numba_step   # numba loads in ~0.5 s: only when generating
    if numba_step.supports(model, cache):
        return numba_step.NumbaCachedStep(model, prior)
    return CachedStep(model, prior)
