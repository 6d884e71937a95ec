"""The KV-cached generation step compiled for the CPU with numba: one call per step.

At one token per step a CPU spends more time between the matrix-vector products than in them: the flat
PyTorch step (`cached_step.CachedStep`) still issues ~300 small operations per step, each a few
microseconds of dispatch, and they evict each other's code and data from the caches. Here the whole
step -- embedding, norms, products, rotary, attention over the cache, MLP, heads -- is one compiled
function over the model's own weights (numpy views, no copy), with the products spread over the CPU
cores. It computes what `CachedStep` computes: fp32 throughout, int8 weights (`Int8Linear`) multiplied
in fp32 against their bf16 row scales. tests/test_numba_step.py checks it against the module path. Like
`CachedStep` it needs nothing for `speech_lm.text_attention`: the prefill wrote the prefix's keys.

Compilation takes a few seconds the first time and is cached on disk by numba afterwards. Calls are
serialized by a lock: where numba has no OpenMP or TBB (its `workqueue` threading layer, e.g. on a Mac
without libomp) two threads in one parallel region abort the process, and the app serves requests on
several threads. `IRA_NUMBA=0` turns this path off (`hardware.compiled_cpu_kernels_enabled`).
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import nn

from ira.hardware import compiled_cpu_kernels_enabled
from ira.models.alignment import StepPrior
from ira.models.cached_step import stacked_audio_embedding
from ira.models.kv_cache import StaticKVCache
from ira.models.quantize import Int8Linear
from ira.models.speech_lm import SpeechLM

_FAST = {"reassoc", "contract", "arcp"}   # reorder sums (vectorize them), but keep inf/NaN semantics
_ONE_AT_A_TIME = threading.Lock()


@njit(fastmath=_FAST, cache=True, inline="always")
def _norm(x, weight, bias, rms, eps):
    """RMSNorm (bias unused) or LayerNorm of each row of x [rows, d]."""
    out = np.empty_like(x)
    rows, d = x.shape
    for r in range(rows):
        mean = np.float32(0.0)
        if not rms:
            for j in range(d):
                mean += x[r, j]
            mean /= d
        var = np.float32(0.0)
        for j in range(d):
            c = x[r, j] - mean
            var += c * c
        inv = np.float32(1.0) / np.sqrt(var / d + eps)
        for j in range(d):
            value = (x[r, j] - mean) * inv * weight[j]
            out[r, j] = value if rms else value + bias[j]
    return out


@njit(fastmath=_FAST, cache=True, parallel=True)
def _matvec(weight, scale, x):
    """x [rows, k] @ weight[:, :k]^T, each output column times its scale: [rows, n] in fp32. The weight
    may be int8 or fp32 and wider than k (int8 weights are zero-padded)."""
    rows, k = x.shape
    n = weight.shape[0]
    out = np.empty((rows, n), dtype=np.float32)
    for i in prange(n):
        for r in range(rows):
            acc = np.float32(0.0)
            for j in range(k):
                acc += np.float32(weight[i, j]) * x[r, j]
            out[r, i] = acc * scale[i]
    return out


@njit(fastmath=_FAST, cache=True, parallel=True)
def _attend(qkv, cos, sin, keys, values, length, key_valid, masked, n_heads, align_heads, prior_index,
            prior_n_text, prior_frames, prior_scale):
    """Rotate q and k of qkv [rows, 3 * H * D] (RoPE, cos/sin [rows, D/2]), write k and v at `length` of
    the cache [rows, H, max_len, D], attend over keys 0..length (those where key_valid [rows, >= length
    + 1] is True when `masked`, else all) and return [rows, H * D].

    The first `align_heads` heads attend only to the prefix (prior_index [rows, P]: text index, -1 style,
    -2 padding), each text key's score plus the Gaussian log-prior of alignment.py around
    min(step * N / T, N) (N = prior_n_text[r], T = prior_frames[r], step = length - P; prior_scale =
    1 / (2 sigma^2))."""
    rows = qkv.shape[0]
    head_dim = keys.shape[3]
    half = head_dim // 2
    width = n_heads * head_dim
    scale = np.float32(1.0 / math.sqrt(head_dim))
    out = np.empty((rows, width), dtype=np.float32)
    for task in prange(rows * n_heads):
        r, h = task // n_heads, task % n_heads
        q = np.empty(head_dim, dtype=np.float32)
        base_q, base_k, base_v = h * head_dim, width + h * head_dim, 2 * width + h * head_dim
        for i in range(half):
            c, s = cos[r, i], sin[r, i]
            q1, q2 = qkv[r, base_q + i], qkv[r, base_q + half + i]
            q[i], q[half + i] = q1 * c - q2 * s, q2 * c + q1 * s
            k1, k2 = qkv[r, base_k + i], qkv[r, base_k + half + i]
            keys[r, h, length, i], keys[r, h, length, half + i] = k1 * c - k2 * s, k2 * c + k1 * s
        for i in range(head_dim):
            values[r, h, length, i] = qkv[r, base_v + i]
        aligned = h < align_heads
        n_keys = prior_index.shape[1] if aligned else length + 1
        centre = np.float32(0.0)
        if aligned:
            n_text = prior_n_text[r]
            centre = min(np.float32(length - n_keys) * n_text / max(prior_frames[r], np.float32(1.0)), n_text)
        scores = np.zeros(n_keys, dtype=np.float32)
        use = np.zeros(n_keys, dtype=np.bool_)
        best = np.float32(-np.inf)
        for t in range(n_keys):
            bias = np.float32(0.0)
            if aligned:
                index = prior_index[r, t]
                if index == -2:
                    continue
                if index >= 0:
                    distance = centre - np.float32(index) - np.float32(0.5)
                    bias = -distance * distance * prior_scale
            elif masked and not key_valid[r, t]:
                continue
            acc = np.float32(0.0)
            for i in range(head_dim):
                acc += q[i] * keys[r, h, t, i]
            scores[t] = acc * scale + bias
            use[t] = True
            best = max(best, scores[t])
        total = np.float32(0.0)
        for t in range(n_keys):
            if use[t]:
                scores[t] = np.exp(scores[t] - best)
                total += scores[t]
            else:
                scores[t] = 0.0
        y = np.zeros(head_dim, dtype=np.float32)
        for t in range(n_keys):
            p = scores[t]
            if p != 0.0:
                for i in range(head_dim):
                    y[i] += p * values[r, h, t, i]
        for i in range(head_dim):
            out[r, h * head_dim + i] = y[i] / total
    return out


@njit(fastmath=_FAST, cache=True, inline="always")
def _activate(h, swiglu):
    """SwiGLU (silu(first half) * second half) or exact GELU of each row of h."""
    rows, n = h.shape
    width = n // 2 if swiglu else n
    out = np.empty((rows, width), dtype=np.float32)
    for r in range(rows):
        for j in range(width):
            if swiglu:
                g = h[r, j]
                out[r, j] = g / (np.float32(1.0) + np.exp(-g)) * h[r, width + j]
            else:
                v = h[r, j]
                out[r, j] = np.float32(0.5) * v * (np.float32(1.0) + math.erf(v * np.float32(0.7071067811865476)))
    return out


@njit(fastmath=_FAST, cache=True)
def _rope(positions, inv_freq):
    """cos and sin [rows, D/2] of each row's position times each frequency (as `Rotary` computes them)."""
    rows = positions.shape[0]
    cos = np.empty((rows, inv_freq.shape[0]), dtype=np.float32)
    sin = np.empty_like(cos)
    for r in range(rows):
        for i in range(inv_freq.shape[0]):
            angle = np.float32(positions[r, 0]) * inv_freq[i]
            cos[r, i], sin[r, i] = np.cos(angle), np.sin(angle)
    return cos, sin


@njit(fastmath=_FAST, cache=True)
def _step(column, offsets, positions, inv_freq, embedding, norm_w, norm_b, qkv_w, qkv_s, proj_w, proj_s,
          up_w, up_s, down_w, down_s, heads_w, heads_s, keys, values, length, key_valid, masked, n_heads,
          rms, eps, swiglu, align_heads, prior_index, prior_n_text, prior_frames, prior_scale):
    """column [rows, K] (ids into each codebook's table; `offsets` place them in the stacked `embedding`),
    positions [rows, 1]; norm_w/norm_b [2 * layers + 1, d] (norm1, norm2 per layer, then the final norm);
    per-layer weights and the cache's keys/values as tuples. Returns logits [rows, heads_w rows] (fp32)."""
    rows, n_codebooks = column.shape
    d = embedding.shape[1]
    x = np.zeros((rows, d), dtype=np.float32)
    for r in range(rows):
        for k in range(n_codebooks):
            for j in range(d):
                x[r, j] += embedding[column[r, k] + offsets[k], j]
    cos, sin = _rope(positions, inv_freq)
    for layer in range(len(qkv_w)):
        h = _norm(x, norm_w[2 * layer], norm_b[2 * layer], rms, eps)
        qkv = _matvec(qkv_w[layer], qkv_s[layer], h)
        y = _attend(qkv, cos, sin, keys[layer], values[layer], length, key_valid, masked, n_heads, align_heads,
                    prior_index, prior_n_text, prior_frames, prior_scale)
        x += _matvec(proj_w[layer], proj_s[layer], y)
        h = _norm(x, norm_w[2 * layer + 1], norm_b[2 * layer + 1], rms, eps)
        a = _activate(_matvec(up_w[layer], up_s[layer], h), swiglu)
        x += _matvec(down_w[layer], down_s[layer], a)
    h = _norm(x, norm_w[-1], norm_b[-1], rms, eps)
    return _matvec(heads_w, heads_s, h)


def _is_supported_linear(module: nn.Module) -> bool:
    return isinstance(module, Int8Linear) or (type(module) is nn.Linear and module.bias is None
                                              and module.weight.dtype == torch.float32)


def _weight_and_scale(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The numpy view of a linear layer's weight and its per-row scale (ones for fp32 weights)."""
    if isinstance(module, Int8Linear):
        return module.weight_int8.numpy(), module.scale.float().numpy()
    if _is_supported_linear(module):
        return module.weight.detach().numpy(), np.ones(module.out_features, dtype=np.float32)
    raise TypeError(f"no compiled CPU step for {module!r} (bias-free fp32 nn.Linear or Int8Linear only)")


def _norm_params(module: nn.Module) -> tuple[np.ndarray, np.ndarray, bool, float]:
    if type(module) is nn.RMSNorm:
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps
        weight = module.weight.detach().float().numpy()
        return weight, np.zeros_like(weight), True, eps
    if type(module) is nn.LayerNorm:
        return (module.weight.detach().float().numpy(), module.bias.detach().float().numpy(), False,
                module.eps)
    raise TypeError(f"no compiled CPU step for {module!r} (nn.RMSNorm or nn.LayerNorm only)")


def supports(model: SpeechLM, cache: StaticKVCache) -> bool:
    """Whether `NumbaCachedStep` can run this model after its prefill into `cache`: on the CPU, with fp32
    parameters and cache (not under autocast), int8 or fp32 linear weights, and `IRA_NUMBA` is not 0."""
    if not compiled_cpu_kernels_enabled() or model.device.type != "cpu":
        return False
    if model.audio_emb[0].weight.dtype != torch.float32 or cache.keys[0] is None \
            or cache.keys[0].dtype != torch.float32:
        return False
    linears = [model.heads] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    return all(map(_is_supported_linear, linears)) and all(type(n) in (nn.RMSNorm, nn.LayerNorm) for n in norms)


class NumbaCachedStep:
    """Same contract as `CachedStep`: `step(column, positions, cache, key_valid)` -> logits [rows, K, V + 1]."""

    def __init__(self, model: SpeechLM, prior: StepPrior | None = None):
        cfg = model.cfg
        self.n_heads = cfg.n_heads
        self.align_heads = cfg.align_heads
        if self.align_heads and prior is None:
            raise ValueError("this SpeechLM has alignment heads: its cached step needs their StepPrior")
        rows = 1
        self.prior = prior.numpy_parts() if self.align_heads else (
            np.full((rows, 1), -2, dtype=np.int64), np.zeros(rows, np.float32), np.ones(rows, np.float32),
            np.float32(0.0))
        self.n_streams, self.n_classes = model.n_streams, model.codebook_size + 1
        self.inv_freq = model.rope.inv_freq.float().numpy()
        embedding, offsets = stacked_audio_embedding(model)
        self.embedding, self.offsets = embedding.detach().numpy(), offsets.numpy()
        self._cache: StaticKVCache | None = None
        self._keys: tuple[np.ndarray, ...] = ()
        self._values: tuple[np.ndarray, ...] = ()
        self._no_mask = np.ones((1, 1), dtype=np.bool_)
        norms = [_norm_params(n) for block in model.blocks for n in (block.norm1, block.norm2)]
        norms.append(_norm_params(model.norm))
        self.norm_w = np.stack([n[0] for n in norms])
        self.norm_b = np.stack([n[1] for n in norms])
        self.rms, self.eps = norms[0][2], np.float32(norms[0][3])
        self.swiglu = model.blocks[0].mlp.swiglu
        pairs = {name: [_weight_and_scale(module) for module in modules] for name, modules in (
            ("qkv", [b.attn.qkv for b in model.blocks]), ("proj", [b.attn.proj for b in model.blocks]),
            ("up", [b.mlp.up for b in model.blocks]), ("down", [b.mlp.down for b in model.blocks]))}
        self.weights = {name: (tuple(w for w, _ in p), tuple(s for _, s in p)) for name, p in pairs.items()}
        self.heads = _weight_and_scale(model.heads)

    def __call__(self, column: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                 key_valid: torch.Tensor | None) -> torch.Tensor:
        rows = column.shape[0]
        if cache.length + 1 > cache.max_len:
            raise RuntimeError(f"KV cache full: {cache.length + 1} positions needed, {cache.max_len} allocated")
        if cache is not self._cache:   # numpy views of its buffers, made once per cache
            if cache.keys[0] is None or cache.keys[0].dtype != torch.float32:
                raise ValueError("the compiled CPU step needs a prefilled fp32 KV cache")
            self._cache = cache
            self._keys = tuple(k.numpy() for k in cache.keys)
            self._values = tuple(v.numpy() for v in cache.values)
        masked = key_valid is not None
        key_valid = np.ascontiguousarray(key_valid.numpy()) if masked else self._no_mask   # one compiled layout
        with _ONE_AT_A_TIME:
            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # per thread
            logits = _step(column.numpy(), self.offsets, positions.numpy(), self.inv_freq, self.embedding,
                           self.norm_w, self.norm_b, *self.weights["qkv"], *self.weights["proj"],
                           *self.weights["up"], *self.weights["down"], *self.heads, self._keys, self._values,
                           cache.length, key_valid, masked, self.n_heads, self.rms, self.eps, self.swiglu,
                           self.align_heads, *self.prior)
        cache.advance(1)
        return torch.from_numpy(logits).view(rows, self.n_streams, self.n_classes)
