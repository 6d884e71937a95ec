"""speech_lm.text_attention (issue 35): the prefix read both ways or causally, the audio causal in both,
and every path that runs the model (training forward, prefill + cached steps, uncached generation)
building the same mask."""

import json

import pytest
import torch

from ira.config import ConfigError, IRAConfig, PRESETS, SpeechLMConfig, load_config, preset_config, section_from_dict
from ira.models.alignment import attention_bias
from ira.models.delay_pattern import apply_delay
from ira.models.speech_lm import SpeechLM, _positions, attention_mask
from test_cached_step import teacher_forced_cached_logits
from test_speech_lm import K, batch, cached_teacher_forced_logits, sample, tiny

MODES = pytest.mark.parametrize("mode", ["causal", "bidirectional"])


def everything(model: SpeechLM, data: dict) -> tuple[torch.Tensor, int]:
    """What `SpeechLM._run` computes, prefix positions kept: (final-norm hidden [B, P + S, d], P)."""
    rows = data["codes"].shape[0]
    no_drop = torch.zeros(rows, dtype=torch.bool)
    prefix, valid = model._prefix(data["text_ids"], data["text_mask"], data["style"], no_drop, no_drop)
    delayed = apply_delay(data["codes"], model.fill_id, data["codes_lengths"], eos_id=model.eos_id)
    inputs = torch.cat([model._bos(rows), delayed[:, :, :-1]], dim=2)
    steps, n_prefix = inputs.shape[2], prefix.shape[1]
    x = torch.cat([prefix, model._embed_audio(inputs)], dim=1)
    key_valid = torch.cat([valid, torch.ones(rows, steps, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        hidden = model._transformer(x, _positions(valid, steps), key_valid, n_prefix=n_prefix,
                                    align=model._align_bias(valid, data["codes_lengths"], steps))
    return hidden, n_prefix


# -- the mask ---------------------------------------------------------------------------------


def test_attention_mask_opens_the_prefix_block_and_nothing_else():
    # one left-padded row: [pad] [style] [t0] [t1] | BOS a1
    key_valid = torch.tensor([[False, True, True, True, True, True]])
    causal = attention_mask(key_valid, 0, 6)[0, 0]
    both = attention_mask(key_valid, 0, 6, n_bidirectional=4)[0, 0]
    real = key_valid[0]
    for q in range(6):
        for k in range(6):
            prefix_pair = q < 4 and k < 4
            expected = bool(real[k]) and (k <= q or prefix_pair)
            if q == k:
                expected = True   # every query sees itself (a padding query has one key)
            assert bool(both[q, k]) == expected, (q, k)
            assert bool(causal[q, k]) == (bool(real[k]) and k <= q or q == k), (q, k)
    assert not both[1:, 0].any()             # nobody reads the padding
    assert both[4, :5].tolist() == [False, True, True, True, True] and not both[4, 5]   # BOS: causal
    # one query after a filled cache: the same row as in the full mask
    assert torch.equal(attention_mask(key_valid, 5, 1, n_bidirectional=0)[0, 0, 0], both[5])


def test_alignment_heads_read_the_prefix_both_ways_when_asked():
    valid = torch.tensor([[False, True, True, True]])
    causal = attention_bias(valid, torch.tensor([4]), n_audio=2, sigma=1.0)[0, 0]
    both = attention_bias(valid, torch.tensor([4]), n_audio=2, sigma=1.0, bidirectional_prefix=True)[0, 0]
    assert torch.isinf(causal[1, 2]) and both[1, 2] == 0 and both[1, 3] == 0     # the style token reads the text
    assert torch.isinf(both[1:4, 0]).all()                                         # padding stays masked
    assert torch.equal(both[4:], causal[4:])                                       # audio rows: the same prior
    for mode, expected in (("causal", causal), ("bidirectional", both)):          # the model asks for its mode
        built = tiny(text_attention=mode)._align_bias(valid, torch.tensor([4]), 2)[0, 0]
        assert torch.equal(built[:4, :4], expected[:4, :4])


@MODES
@pytest.mark.parametrize("align_heads", [1, 0])
def test_a_text_token_sees_later_text_only_when_bidirectional(mode, align_heads):
    model, data = tiny(text_attention=mode, align_heads=align_heads), sample(batch(), 2)   # no padding at all
    hidden, n_prefix = everything(model, data)
    changed = {**data, "text_ids": data["text_ids"].clone()}
    last = int(changed["text_ids"][0, -1])
    changed["text_ids"][0, -1] = 5 if last != 5 else 6                             # the last text token
    moved, _ = everything(model, changed)
    before_last = slice(0, n_prefix - 1)                                          # style and text before it
    if mode == "bidirectional":
        assert not torch.allclose(moved[:, before_last], hidden[:, before_last], atol=1e-4)
        assert not torch.allclose(moved[:, 0], hidden[:, 0], atol=1e-4)          # even the style token
    else:
        assert torch.allclose(moved[:, before_last], hidden[:, before_last], atol=1e-6)
    assert not torch.allclose(moved[:, n_prefix:], hidden[:, n_prefix:], atol=1e-4)   # the audio reads it


@MODES
@pytest.mark.parametrize("align_heads", [1, 0])
def test_no_position_sees_a_later_audio_step(mode, align_heads):
    model, data = tiny(text_attention=mode, align_heads=align_heads), batch()
    hidden, n_prefix = everything(model, data)
    changed = {**data, "codes": data["codes"].clone()}
    changed["codes"][2, 0, 5] = (changed["codes"][2, 0, 5] + 1) % 16   # codebook 0, frame 5: input of step 6
    moved, _ = everything(model, changed)
    step = n_prefix + 6
    assert torch.allclose(moved[:, :step], hidden[:, :step], atol=1e-6)   # the prefix and steps 0..5 of all rows
    assert not torch.allclose(moved[2, step], hidden[2, step], atol=1e-4)


@MODES
def test_a_left_padded_sample_computes_what_it_computes_alone(mode):
    model, data = tiny(text_attention=mode), batch()
    out = model(**data)
    for b in range(3):
        alone = model(**sample(data, b))
        steps = int(data["codes_lengths"][b]) + K
        assert torch.allclose(out.logits[b, :, :steps], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.log_frames_per_token[b], alone.log_frames_per_token[0], atol=1e-5)


def test_bidirectional_changes_the_model_and_a_style_alone_prefix_does_not():
    causal, both, data = tiny(), tiny(text_attention="bidirectional"), batch()
    both.load_state_dict(causal.state_dict())
    assert not torch.allclose(both(**data).logits, causal(**data).logits, atol=1e-4)
    no_text = {**data, "text_ids": None, "text_mask": None}    # a one-token prefix: nothing to read ahead
    assert torch.equal(both(**no_text).logits, causal(**no_text).logits)


# -- every path, the same logits --------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"align_heads": 0}, {"norm": "layer", "mlp": "gelu"}],
                         ids=["align", "no align", "layer+gelu"])
@pytest.mark.parametrize("step", ["modules", "pytorch", "numba"])
def test_cached_steps_after_the_prefill_equal_the_teacher_forced_forward(overrides, step):
    """A padded batch: prefill (prefix both ways + BOS), then each later column through one cached step."""
    from ira.models.cached_step import CachedStep
    from ira.models.numba_step import NumbaCachedStep

    model, data = tiny(text_attention="bidirectional", **overrides), batch()
    with torch.no_grad():
        full = model(**data).logits
    if step == "modules":
        def module_step(cache, column, position, key_valid, prior):
            hidden = model._transformer(model._embed_audio(column[:, :, None]), position, key_valid, cache,
                                        align=None if prior is None else prior.mask(cache.length))
            return model._logits(hidden)[:, :, 0]
        cached = cached_teacher_forced_logits(model, data, module_step)
    else:
        cached = teacher_forced_cached_logits(model, data, {"pytorch": CachedStep, "numba": NumbaCachedStep}[step])
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()


@pytest.mark.parametrize("path", ["numba", "pytorch", "uncached"])
@pytest.mark.parametrize("rows", [3, 1], ids=["padded batch", "one sample, no mask"])
def test_generation_logits_equal_the_teacher_forced_forward_on_its_codes(path, rows, monkeypatch):
    """The logits `generate` samples each column from (fast cached step, PyTorch cached step, or the whole
    sequence again) are the forward pass's logits over the codes it generated."""
    model, data = tiny(text_attention="bidirectional"), batch()
    if rows == 1:
        data = sample(data, 2)
    monkeypatch.setenv("IRA_NUMBA", "0" if path == "pytorch" else "1")
    seen = []
    next_column = model._next_column

    def recording(logits, step, *args):
        seen.append(logits.clone())
        return next_column(logits, step, *args)
    monkeypatch.setattr(model, "_next_column", recording)
    codes = model.generate(data["text_ids"], data["text_mask"], style=data["style"], max_frames=10, seed=1,
                           use_cache=path != "uncached")
    lengths = torch.tensor([c.shape[1] for c in codes])
    padded = torch.zeros(rows, K, int(lengths.max()), dtype=torch.long)
    for b, c in enumerate(codes):
        padded[b, :, :c.shape[1]] = c
    # the alignment heads spread the text over the length head's prediction, as generate does
    frames = model.predicted_frames(data["text_ids"], data["text_mask"], style=data["style"])
    with torch.no_grad():
        full = model(data["text_ids"], data["text_mask"], data["style"], padded, lengths, align_frames=frames).logits
    generated = torch.stack(seen, dim=2)                             # [rows, K, steps run, V + 1]
    for b in range(rows):
        steps = int(lengths[b]) + K
        assert torch.allclose(generated[b, :, :steps], full[b, :, :steps], atol=1e-4), \
            (generated[b, :, :steps] - full[b, :, :steps]).abs().max()


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
def test_greedy_generate_with_and_without_cache_is_identical(cfg_scale):
    model, data = tiny(text_attention="bidirectional"), batch()
    kwargs = dict(style=data["style"], max_frames=10, temperature=0.0, cfg_scale=cfg_scale)
    cached = model.generate(data["text_ids"], data["text_mask"], **kwargs)
    naive = model.generate(data["text_ids"], data["text_mask"], use_cache=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(cached, naive))
    predicted = model.predicted_frames(data["text_ids"], data["text_mask"], style=data["style"])
    alone = model.predicted_frames(sample(data, 1)["text_ids"], style=data["style"][1:2])
    assert torch.allclose(predicted[1:2], alone, atol=1e-4)


# -- configuration and checkpoints ------------------------------------------------------------


def test_the_setting_travels_with_the_model_and_old_metadata_loads_as_causal(tmp_path):
    from ira.training.checkpoint import load_checkpoint, save_checkpoint

    both, data = tiny(text_attention="bidirectional"), batch()
    meta = json.loads(json.dumps(both.config_dict()))
    assert meta["speech_lm"]["text_attention"] == "bidirectional"
    rebuilt = SpeechLM.from_config_dict(meta).eval()
    rebuilt.load_state_dict(both.state_dict())
    assert rebuilt.cfg.text_attention == "bidirectional"
    assert torch.equal(rebuilt(**data).logits, both(**data).logits)

    causal = tiny()
    old_meta = json.loads(json.dumps(causal.config_dict()))
    del old_meta["speech_lm"]["text_attention"]                   # written before the setting existed
    path = save_checkpoint(tmp_path / "old.safetensors", {"speech_lm": causal}, stage="1", epoch=0, step=1,
                           config=IRAConfig(), metadata={"speech_lm": json.dumps(old_meta)})
    loaded = SpeechLM.from_checkpoint(load_checkpoint(path))
    assert loaded.cfg.text_attention == "causal"
    assert torch.equal(loaded(**data).logits, causal(**data).logits)


def test_other_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"speech_lm\.text_attention.*'sideways'"):
        section_from_dict("speech_lm", {"text_attention": "sideways"})
    with pytest.raises(ConfigError, match=r"speech_lm\.text_attention"):
        load_config("cpu", ["speech_lm.text_attention=prefix"])
    with pytest.raises(ConfigError, match=r"speech_lm\.text_attention.*'causal' or 'bidirectional'"):
        IRAConfig(speech_lm=SpeechLMConfig(text_attention="both")).validate()
    assert load_config("cpu", ["speech_lm.text_attention=bidirectional"]).speech_lm.text_attention == "bidirectional"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_stay_causal_until_a_run_says_otherwise(name):
    assert preset_config(name).speech_lm.text_attention == "causal"
    assert SpeechLMConfig().text_attention == "causal"
