"""The numba-compiled CPU step (ira/models/numba_step.py) and next-column choice (numba_sampling.py)
against the PyTorch paths; tests/test_cached_step.py checks both steps against the modules."""

import numpy as np
import pytest
import torch

from ira.models.cached_step import CachedStep, cached_step_for
from ira.models.kv_cache import StaticKVCache
from ira.models.numba_sampling import _kth_largest, draw_top_k
from ira.models.numba_step import NumbaCachedStep, supports
from test_speech_lm import K, V, tiny


def test_compiled_step_without_a_mask_equals_the_flat_pytorch_step():
    model = tiny(align_heads=0)
    logits, caches = [], []
    for make in (CachedStep, NumbaCachedStep):
        cache = StaticKVCache(2, 1, 4, 16, 8)
        with torch.no_grad():
            cache.update(0, torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(0)),
                         torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(1)))
            cache.update(1, torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(2)),
                         torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(3)))
            cache.advance(3)
            step = make(model)
            logits.append(torch.stack([step(torch.tensor([[5, 1, 7, 2]]), torch.tensor([[3 + i]]), cache, None)
                                       for i in range(4)]))
        caches.append(cache)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert caches[1].length == 7
    assert torch.allclose(caches[0].keys[1][:, :, :7], caches[1].keys[1][:, :, :7], atol=1e-5)
    assert torch.allclose(caches[0].values[0][:, :, :7], caches[1].values[0][:, :, :7], atol=1e-6)


def test_compiled_step_refuses_a_full_cache_and_an_unfilled_one():
    model = tiny(align_heads=0)
    step = NumbaCachedStep(model)
    column, position = torch.full((1, K), model.fill_id), torch.tensor([[0]])
    with pytest.raises(ValueError, match="prefilled fp32 KV cache"):
        step(column, position, StaticKVCache(2, 1, 4, 16, 4), None)
    cache = StaticKVCache(2, 1, 4, 16, 1)
    with torch.no_grad():
        for layer in range(2):
            cache.update(layer, torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16))
    cache.advance(1)
    with pytest.raises(RuntimeError, match="KV cache full"):
        step(column, position, cache, None)
    assert cache.length == 1


def test_the_step_is_chosen_by_device_dtype_and_switch(monkeypatch):
    model = tiny(align_heads=0)
    fp32_cache, bf16_cache = StaticKVCache(2, 1, 4, 16, 4), StaticKVCache(2, 1, 4, 16, 4)
    fp32_cache.keys[0], bf16_cache.keys[0] = torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 4, 16, dtype=torch.bfloat16)
    assert supports(model, fp32_cache) and isinstance(cached_step_for(model, fp32_cache), NumbaCachedStep)
    assert not supports(model, bf16_cache)                        # prefilled under autocast
    assert isinstance(cached_step_for(model, bf16_cache), CachedStep)
    monkeypatch.setenv("IRA_NUMBA", "0")
    assert isinstance(cached_step_for(model, fp32_cache), CachedStep)


def test_kth_largest_agrees_with_a_sort_with_and_without_ties():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 200))
        k = int(rng.integers(1, n + 1))
        values = (rng.integers(-3, 3, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
        assert _kth_largest(values, k) == np.sort(values)[::-1][k - 1]


def test_draw_top_k_samples_the_renormalised_top_k_and_survives_nan():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 0.5], dtype=np.float32)
    uniform = np.random.default_rng(0).random((20_000, 3), dtype=np.float32)
    counts = np.bincount([draw_top_k(row, 3, u) for u in uniform], minlength=7) / len(uniform)
    expected = np.zeros(7)
    expected[[5, 0, 1]] = np.exp([3.0, 2.0, 1.0]) / np.exp([3.0, 2.0, 1.0]).sum()
    assert np.abs(counts - expected).max() < 0.015
    # a tie at the k-th value: exactly k ids take part (the lower id), never a -inf one
    tied = np.array([0.5, -np.inf, 2.0, 0.5], dtype=np.float32)
    drawn = {draw_top_k(tied, 2, np.array([u, 1 - u], dtype=np.float32)) for u in (0.01, 0.5, 0.99)}
    assert drawn <= {0, 2} and 2 in drawn
    # a diverged model's NaN logits: an id in range, no endless loop
    broken = np.array([np.nan, 1.0, np.nan, 0.0, 2.0], dtype=np.float32)
    assert 0 <= draw_top_k(broken, 2, np.array([0.3, 0.6], dtype=np.float32)) < 5


@pytest.mark.parametrize("seed", range(4))
def test_compiled_next_column_equals_the_pytorch_one(seed, monkeypatch):
    """top_k 1 makes both deterministic: the same column, ends and ended over every phase of the delay
    pattern (start, middle, EOS sampled, forced end at max_frames, flush after it, min_frames ban)."""
    from ira.models.speech_lm import Sampler

    model = tiny()
    gen = torch.Generator().manual_seed(seed)
    batch, sample = 3, Sampler(1.0, 1, 1.0, None)
    for step in range(3 * K):
        logits = torch.randn(batch, K, V + 1, generator=gen)
        logits[:, 0, model.eos_id] += torch.randn(batch, generator=gen) * 3     # EOS sometimes on top
        ended = torch.rand(batch, generator=gen) < 0.3
        ends = torch.where(ended, torch.randint(0, step + 1, (batch,), generator=gen), torch.full((batch,), 99))
        first = torch.randint(0, 2 * K, (batch,), generator=gen)
        last = torch.randint(K, 3 * K, (batch,), generator=gen)
        assert sample.compiled_top_k(logits)
        compiled = model._next_column(logits, step, ends, ended, first, last, sample)
        monkeypatch.setenv("IRA_NUMBA", "0")
        assert not sample.compiled_top_k(logits)
        reference = model._next_column(logits, step, ends, ended, first, last, sample)
        monkeypatch.delenv("IRA_NUMBA")
        for got, want in zip(compiled, reference):
            assert torch.equal(got, want), (step, got, want)


def test_warm_up_generates_with_every_compiled_path():
    from ira.models.numba_warmup import warm_up

    assert warm_up() > 0
