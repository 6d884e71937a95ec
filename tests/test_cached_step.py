"""The cached generation steps -- flat PyTorch (ira/models/cached_step.py) and numba-compiled
(ira/models/numba_step.py) -- against the module path they replace."""

import pytest
import torch

from ira.models.cached_step import CachedStep, _rms_norm_fused
from ira.models.kv_cache import StaticKVCache
from ira.models.numba_step import NumbaCachedStep
from ira.models.quantize import quantize_int8
from test_speech_lm import K, V, batch, cached_teacher_forced_logits, tiny

STEPS = pytest.mark.parametrize("make_step", [CachedStep, NumbaCachedStep], ids=["pytorch", "numba"])


def teacher_forced_cached_logits(model, data, make_step=CachedStep) -> torch.Tensor:
    """Prefill through the modules, then every later column through the step: [B, K, S, V + 1]."""
    steps = {}

    def next_logits(cache, column, position, key_valid, prior):
        if "step" not in steps:
            steps["step"] = make_step(model, prior)
        return steps["step"](column, position, cache, key_valid)
    return cached_teacher_forced_logits(model, data, next_logits)


@STEPS
@pytest.mark.parametrize("overrides", [{}, {"norm": "layer", "mlp": "gelu"}], ids=["rms+swiglu", "layer+gelu"])
def test_cached_step_matches_the_full_forward(overrides, make_step):
    """A padded batch (so the key mask is used), every column after the prefill through the step."""
    model, data = tiny(**overrides), batch()
    with torch.no_grad():
        full = model(**data).logits
    cached = teacher_forced_cached_logits(model, data, make_step)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()


@STEPS
def test_cached_step_of_an_int8_model_matches_its_module_path(make_step):
    model = quantize_int8(tiny(seed=1))
    data = batch()
    with torch.no_grad():
        full = model(**data).logits
    cached = teacher_forced_cached_logits(model, data, make_step)
    # the flat step keeps bf16 where the modules return fp32 between layers, the compiled one multiplies
    # in fp32 where the modules use bf16: equal up to bf16 rounding
    assert (cached - full).abs().max() < 0.02 * full.abs().max()
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.98


def test_cached_step_leaves_the_cache_one_longer_and_the_model_untouched():
    model = tiny(align_heads=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = StaticKVCache(2, 1, 4, 16, 8)
    with torch.no_grad():
        logits = CachedStep(model)(torch.full((1, K), model.fill_id), torch.tensor([[0]]), cache, None)
    assert logits.shape == (1, K, V + 1) and logits.dtype == torch.float32
    assert cache.length == 1 and cache.keys[0][:, :, 0].abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_through_layer_norm_is_rms_norm(eps):
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(48, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48) * 3
    used_eps = eps if eps is not None else torch.finfo(x.dtype).eps
    fused = _rms_norm_fused(x, norm.weight.repeat(2), used_eps)
    assert torch.allclose(fused, norm(x), atol=1e-5)
    tiny_x = torch.full((1, 48), 1e-4)   # where eps matters: the same eps inside the root
    assert torch.allclose(_rms_norm_fused(tiny_x, norm.weight.repeat(2), 1e-6),
                          torch.nn.functional.rms_norm(tiny_x, (48,), norm.weight, 1e-6), atol=1e-6)
