"""SpeechLM: sequence layout, masks, batching, caching, generation, and that it learns."""

import json

import pytest
import torch

from ira.config import SpeechLMConfig
from ira.models.alignment import StepPrior
from ira.models.delay_pattern import apply_delay
from ira.models.kv_cache import StaticKVCache
from ira.models.speech_lm import Rotary, SpeechLM, _positions, apply_rotary, sample_logits
from ira.text_tokenizer import CharTokenizer

K, V, STYLE = 4, 16, 8
TOK = CharTokenizer()


def tiny(seed: int = 0, **overrides) -> SpeechLM:
    torch.manual_seed(seed)
    cfg = SpeechLMConfig(d_model=64, n_layers=2, n_heads=4, dropout=0.0, style_dim=STYLE,
                         max_text_tokens=32, max_audio_frames=64, **overrides)
    return SpeechLM(cfg, K, V, TOK.vocab_size).eval()


def batch(seed: int = 0):
    """Three samples with different text and audio lengths, text right-padded, audio padded with junk."""
    gen = torch.Generator().manual_seed(seed)
    text_ids, text_mask = TOK.batch_encode(["a short one", "hi", "a much longer sentence"])
    lengths = torch.tensor([9, 5, 12])
    codes = torch.randint(0, V, (3, K, 12), generator=gen)
    for b, n in enumerate(lengths.tolist()):
        codes[b, :, n:] = 3
    style = torch.randn(3, STYLE, generator=gen)
    return dict(text_ids=text_ids, text_mask=text_mask, style=style, codes=codes, codes_lengths=lengths)


def sample(data: dict, b: int) -> dict:
    """Sample b alone, with its own padding removed."""
    n_text, n_frames = int(data["text_mask"][b].sum()), int(data["codes_lengths"][b])
    return dict(text_ids=data["text_ids"][b:b + 1, :n_text], text_mask=data["text_mask"][b:b + 1, :n_text],
                style=data["style"][b:b + 1], codes=data["codes"][b:b + 1, :, :n_frames],
                codes_lengths=data["codes_lengths"][b:b + 1])


# -- forward and loss -------------------------------------------------------------------------


def test_forward_shapes_and_token_counts():
    model, data = tiny(), batch()
    out = model.forward_batch({**data, "ids": ["x", "y", "z"]}, return_hidden=True)
    steps = 12 + K
    assert out.logits.shape == (3, K, steps, V + 1)
    assert out.hidden.shape == (3, steps, 64)
    assert out.targets.shape == out.target_mask.shape == (3, K, steps)
    # every codebook: one target per real frame plus its EOS
    assert out.tokens_per_codebook.tolist() == [9 + 5 + 12 + 3] * K
    assert torch.isfinite(out.loss) and out.loss_per_codebook.shape == (K,)
    assert abs(out.loss.item() - torch.log(torch.tensor(V + 1.0)).item()) < 0.5  # near uniform at init


def test_loss_counts_only_real_values_and_eos():
    model, data = tiny(), batch()
    out = model(**data)
    assert not (out.targets[out.target_mask] == model.fill_id).any()
    assert (out.targets[~out.target_mask] == model.fill_id).all()
    # recompute by hand from the logits over the masked positions only
    logp = out.logits.float().log_softmax(-1)
    per = []
    for k in range(K):
        m = out.target_mask[:, k]
        picked = logp[:, k].gather(-1, out.targets[:, k].clamp(max=V)[..., None])[..., 0]
        per.append(-(picked[m]).mean())
    assert torch.allclose(torch.stack(per), out.loss_per_codebook, atol=1e-5)

    changed = {k: v.clone() for k, v in data.items()}
    changed["codes"][1, :, 5:] = 11                     # audio padding of a short sample
    changed["text_ids"][1, 2:] = 7                      # text padding
    assert torch.allclose(model(**changed).loss, out.loss, atol=0, rtol=0)
    changed["codes"][1, 2, 4] = (changed["codes"][1, 2, 4] + 1) % V   # a real value: the loss moves
    assert not torch.allclose(model(**changed).loss, out.loss)


def test_batch_equals_single():
    model, data = tiny(), batch()
    out = model(**data, return_hidden=True)
    for b in range(3):
        alone = model(**sample(data, b), return_hidden=True)
        steps = int(data["codes_lengths"][b]) + K
        assert torch.allclose(out.logits[b, :, :steps], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.loss_per_codebook.new_tensor(0) + alone.loss,
                              model(**sample(data, b)).loss, atol=0)


def test_dropped_condition_is_absent_condition():
    model, data = tiny(), batch()
    drop = torch.tensor([True, False, True])
    out = model(**data, drop_text=drop)
    no_text = model(**{**data, "text_ids": None, "text_mask": None})
    with_text = model(**data)
    for b in range(3):
        ref = no_text if drop[b] else with_text
        assert torch.allclose(out.logits[b], ref.logits[b], atol=1e-5)
    assert not torch.allclose(no_text.logits[1], with_text.logits[1], atol=1e-3)  # text matters
    out = model(**data, drop_style=torch.tensor([False, True, False]))
    no_style = model(**{**data, "style": None})
    assert torch.allclose(out.logits[1], no_style.logits[1], atol=1e-5)
    assert not torch.allclose(out.logits[0], no_style.logits[0], atol=1e-3)


def test_training_mode_drops_conditions_at_the_configured_rates():
    model = tiny(cond_drop_prob=0.2, text_drop_prob=0.1, style_drop_prob=0.05).train()
    torch.manual_seed(0)
    text, style = model._drops(20_000, None, None, no_text=False, no_style=False)
    assert abs((text & style).float().mean().item() - 0.2) < 0.015
    assert abs((text & ~style).float().mean().item() - 0.1) < 0.015
    assert abs((~text & style).float().mean().item() - 0.05) < 0.015
    text, style = model._drops(100, torch.zeros(100, dtype=torch.bool), None, no_text=False, no_style=False)
    assert not text.any() and not style.any()  # an explicit mask turns the randomness off
    model.eval()
    text, style = model._drops(100, None, None, no_text=False, no_style=True)
    assert not text.any() and style.all()


def test_audio_features_do_not_see_text_or_style():
    model, data = tiny(), batch()
    feats, mask = model.audio_features(data["codes"], data["codes_lengths"])
    assert feats.shape == (3, 12, 64) and mask.sum(1).tolist() == [9, 5, 12]
    other = {**data, "text_ids": TOK.batch_encode(["xyz", "completely different", "q"])[0],
             "text_mask": TOK.batch_encode(["xyz", "completely different", "q"])[1],
             "style": torch.randn(3, STYLE)}
    for d in (data, other):  # any transcript, dropped, gives exactly these features
        hidden = model(**d, drop_text=torch.ones(3, dtype=torch.bool), drop_style=torch.ones(3, dtype=torch.bool),
                       return_hidden=True).hidden
        assert torch.allclose(hidden[:, K:K + 12][mask], feats[mask], atol=1e-5)
    conditioned = model(**data, return_hidden=True).hidden[:, K:K + 12]
    assert not torch.allclose(conditioned[mask], feats[mask], atol=1e-3)  # the transcript would leak
    alone, _ = model.audio_features(data["codes"][1:2, :, :5], data["codes_lengths"][1:2])
    assert torch.allclose(alone[0], feats[1, :5], atol=1e-5)
    changed = data["codes"].clone()
    changed[0, K - 1, 3] = (changed[0, K - 1, 3] + 1) % V   # the last codebook of frame 3: seen from feature 3 on
    moved, _ = model.audio_features(changed, data["codes_lengths"])
    assert torch.allclose(moved[0, :3], feats[0, :3], atol=1e-5)      # causal: earlier features unchanged
    assert not torch.allclose(moved[0, 3:9], feats[0, 3:9], atol=1e-4)


def test_bad_inputs_are_clear_errors():
    model, data = tiny(), batch()
    with pytest.raises(ValueError, match="outside \\[0, 16\\)"):
        model(**{**data, "codes": data["codes"] + V})
    with pytest.raises(ValueError, match="4 codebooks"):
        model(**{**data, "codes": data["codes"][:, :3]})
    with pytest.raises(ValueError, match="max_text_tokens"):
        model(**{**data, "text_ids": torch.ones(3, 40, dtype=torch.long), "text_mask": None})
    with pytest.raises(ValueError, match="style_dim"):
        model(**{**data, "style": torch.randn(3, STYLE + 1)})
    with pytest.raises(ValueError, match="max_audio_frames"):
        model(**{**data, "codes": torch.zeros(3, K, 65, dtype=torch.long), "codes_lengths": None})


def test_config_dict_round_trip():
    model = tiny()
    meta = json.loads(json.dumps(model.config_dict()))
    rebuilt = SpeechLM.from_config_dict(meta).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.num_parameters() == model.num_parameters() > 0
    data = batch()
    assert torch.equal(rebuilt(**data).logits, model(**data).logits)
    with pytest.raises(ValueError, match="lacks"):
        SpeechLM.from_config_dict({"speech_lm": {}})
    with pytest.raises(ValueError, match="speech_lm.d_modle"):
        SpeechLM.from_config_dict({**meta, "speech_lm": {"d_modle": 3}})


# -- caching and generation -------------------------------------------------------------------


def cached_teacher_forced_logits(model, data, next_logits) -> torch.Tensor:
    """Prefill (prefix + BOS) through the modules, then each later grid column of the teacher-forced
    input through `next_logits(cache, column [B, K], position [B, 1], key_valid)` -> [B, K, V + 1].
    Returns [B, K, S, V + 1], comparable with one forward pass's logits."""
    rows = data["codes"].shape[0]
    no_drop = torch.zeros(rows, dtype=torch.bool)
    prefix, valid = model._prefix(data["text_ids"], data["text_mask"], data["style"], no_drop, no_drop)
    delayed = apply_delay(data["codes"], model.fill_id, data["codes_lengths"], eos_id=model.eos_id)
    inputs = torch.cat([model._bos(rows), delayed[:, :, :-1]], dim=2)
    steps, n_prefix, cfg = inputs.shape[2], prefix.shape[1], model.cfg
    cache = StaticKVCache(cfg.n_layers, rows, cfg.n_heads, cfg.d_model // cfg.n_heads, n_prefix + steps)
    key_valid = torch.cat([valid, torch.ones(rows, steps, dtype=torch.bool)], dim=1)
    positions = _positions(valid, steps)
    prior = StepPrior(valid, data["codes_lengths"], cfg.align_sigma) if cfg.align_heads else None
    with torch.no_grad():
        x = torch.cat([prefix, model._embed_audio(inputs[:, :, :1])], dim=1)
        hidden = model._transformer(x, positions[:, :n_prefix + 1], key_valid[:, :n_prefix + 1], cache,
                                    align=model._align_bias(valid, None, 1), n_prefix=n_prefix)
        logits = [model._logits(hidden[:, -1:])[:, :, 0]]
        for s in range(1, steps):
            logits.append(next_logits(cache, inputs[:, :, s], positions[:, n_prefix + s:n_prefix + s + 1],
                                      key_valid[:, :cache.length + 1], prior))
    return torch.stack(logits, dim=2)


def test_cached_steps_match_full_recomputation():
    """Prefill + one cached step per column gives the logits of one teacher-forced forward pass."""
    model, data = tiny(), batch()
    full = model(**data).logits                                           # [B, K, S, V + 1]

    def module_step(cache, column, position, key_valid, prior):
        hidden = model._transformer(model._embed_audio(column[:, :, None]), position, key_valid, cache,
                                    align=prior.mask(cache.length))
        return model._logits(hidden)[:, :, 0]

    cached = cached_teacher_forced_logits(model, data, module_step)
    assert torch.allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
@pytest.mark.parametrize("rows", [3, 1], ids=["padded batch", "one sample, no mask"])
def test_greedy_generate_with_and_without_cache_is_identical(cfg_scale, rows):
    model, data = tiny(), batch()
    if rows == 1:   # no padding anywhere: the cached steps run without any attention mask
        data = sample(data, 2)
    kwargs = dict(style=data["style"], max_frames=10, temperature=0.0, cfg_scale=cfg_scale)
    cached = model.generate(data["text_ids"], data["text_mask"], **kwargs)
    naive = model.generate(data["text_ids"], data["text_mask"], use_cache=False, **kwargs)
    assert len(cached) == rows
    for a, b in zip(cached, naive):
        assert a.dtype == torch.long and a.shape[0] == K and a.shape[1] <= 10
        assert torch.equal(a, b)


def test_cfg_scale_one_is_the_conditional_model():
    model, data = tiny(), batch()
    args = (data["text_ids"], data["text_mask"])
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        plain = model.generate(*args, style=data["style"], max_frames=12, **kwargs)
        guided = model.generate(*args, style=data["style"], max_frames=12, cfg_scale=1.0, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(plain, guided))
    strong = model.generate(*args, style=data["style"], max_frames=12, cfg_scale=4.0, temperature=1.0, seed=3)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(plain, strong))


def test_frame_limits_and_unconditional_generation():
    model = tiny()
    out = model.generate(batch_size=2, max_frames=6, seed=0)             # no text, no style
    assert len(out) == 2 and all(o.shape[1] <= 6 and ((o >= 0) & (o < V)).all() for o in out)
    out = model.generate(texts=["abc"], tokenizer=TOK, min_frames=7, max_frames=7, seed=0)
    assert out[0].shape == (K, 7)
    assert model.generate(texts=["abc"], tokenizer=TOK, max_frames=0)[0].shape == (K, 0)
    with pytest.raises(ValueError, match="batch size"):
        model.generate(texts=["a", "b"], tokenizer=TOK, style=torch.randn(3, STYLE))
    with pytest.raises(ValueError, match="one sample"):
        next(model.stream(texts=["a", "b"], tokenizer=TOK))


def test_rotary_rotates_each_half_pair_by_its_angle():
    head_dim, positions = 8, torch.tensor([[0, 3, 7]])
    x = torch.randn(1, 2, 3, head_dim)
    out = apply_rotary(x, *Rotary(head_dim, 10_000.0)(positions))
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angle = positions[0, :, None].float() * inv_freq                     # [T, head_dim / 2]
    x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)   # a rotation keeps lengths


def test_checkpoint_with_one_head_per_codebook_loads_into_the_fused_heads(tmp_path):
    """Checkpoints written before the heads were fused hold heads.{k}.weight; both ways of loading
    (Checkpoint.load_into, with the module nested as in stage 3, and plain load_state_dict) take them."""
    from ira.config import IRAConfig
    from ira.training.checkpoint import load_checkpoint, save_checkpoint

    model, data = tiny(), batch()
    old = tiny()
    old.heads = torch.nn.ModuleList(torch.nn.Linear(64, V + 1, bias=False) for _ in range(K))
    for head, rows in zip(old.heads, model.heads.weight.detach().split(V + 1)):
        head.weight.data.copy_(rows)
    assert "heads.0.weight" in old.state_dict()
    path = save_checkpoint(tmp_path / "old.safetensors", {"policy": torch.nn.ModuleDict({"lm": old})}, stage="3",
                           epoch=0, step=1, config=IRAConfig(), metadata={})
    fresh = torch.nn.ModuleDict({"lm": tiny(seed=1)})
    load_checkpoint(path).load_into("policy", fresh)
    assert torch.equal(fresh["lm"](**data).logits, model(**data).logits)
    plain = tiny(seed=2)
    plain.load_state_dict(old.state_dict())
    assert torch.equal(plain(**data).logits, model(**data).logits)


def test_top_k_and_top_p_sample_from_the_renormalised_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).expand(20_000, -1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_logits(logits, generator=gen), minlength=6).float()   # no filter
    assert torch.allclose(counts / counts.sum(), logits[0].softmax(0), atol=0.015)
    counts = torch.bincount(sample_logits(logits, top_k=3, generator=gen), minlength=6).float()
    expected = torch.zeros(6)
    expected[[5, 0, 1]] = torch.tensor([3.0, 2.0, 1.0]).softmax(0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.015)
    # top_p 0.8 inside the top 3: 0.665 + 0.245 crosses 0.8, so ids 5 and 0 stay, renormalised
    counts = torch.bincount(sample_logits(logits, top_k=3, top_p=0.8, generator=gen), minlength=6).float()
    kept = torch.tensor([3.0, 2.0]).softmax(0)
    assert torch.allclose(counts[[5, 0]] / counts.sum(), kept, atol=0.015) and counts[[1, 2, 3, 4]].sum() == 0


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 20, generator=gen)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, temperature=0.0), best)
    assert torch.equal(sample_logits(logits, top_k=1, generator=gen), best)
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=gen), best)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        ids = sample_logits(logits, temperature=2.0, top_k=3, generator=gen)
        assert (top3 == ids[:, None]).any(-1).all()
    model = tiny()
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.generate(max_frames=2, **bad)


# -- a model that has learned something -------------------------------------------------------

TEXTS = ["one", "two words", "and a third"]
LENGTHS = [7, 11, 15]


@pytest.fixture(scope="module")
def trained():
    """Overfit a tiny model (d=64, 2 layers) on three fixed utterances with Adam."""
    model = tiny(seed=1).train()
    gen = torch.Generator().manual_seed(5)
    text_ids, text_mask = TOK.batch_encode(TEXTS)
    codes = torch.randint(0, V, (3, K, max(LENGTHS)), generator=gen)
    data = dict(text_ids=text_ids, text_mask=text_mask, style=None, codes=codes,
                codes_lengths=torch.tensor(LENGTHS))
    no_drop = torch.zeros(3, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model(**data, drop_text=no_drop, drop_style=no_drop).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), data, losses


def test_loss_drops_when_overfitting(trained):
    _, _, losses = trained
    assert losses[0] > 2.5                                   # about log(V + 1) at init
    assert losses[-1] < 0.05 * losses[0], losses[::10]


def test_greedy_generation_reproduces_training_audio_and_stops_at_eos(trained):
    model, data, _ = trained
    out = model.generate(texts=TEXTS, tokenizer=TOK, temperature=0.0, max_frames=40)
    for b, n in enumerate(LENGTHS):
        assert out[b].shape == (K, n)                                   # stopped at its own EOS
        assert torch.equal(out[b], data["codes"][b, :, :n])             # every delayed codebook flushed
    for b, text in enumerate(TEXTS):                                    # batch == one at a time
        assert torch.equal(model.generate(texts=[text], tokenizer=TOK, temperature=0.0, max_frames=40)[0], out[b])
    # min_frames forbids the EOS at step 7: codebook 0 goes on, its first 7 frames unchanged
    longer = model.generate(texts=TEXTS[:1], tokenizer=TOK, temperature=0.0, min_frames=10, max_frames=40)[0]
    assert longer.shape[1] >= 10 and torch.equal(longer[0, :LENGTHS[0]], out[0][0])


def test_stream_concatenated_equals_generate(trained):
    model, _, _ = trained
    kwargs = dict(texts=["two words"], tokenizer=TOK, temperature=1.5, top_k=8, top_p=0.95, max_frames=40)
    for seed in range(3):
        whole = model.generate(seed=seed, **kwargs)[0]
        chunks = list(model.stream(seed=seed, chunk_frames=4, **kwargs))
        assert all(c.shape[0] == K for c in chunks)
        assert all(c.shape[1] == 4 for c in chunks[:-1]) and 0 < chunks[-1].shape[1] <= 4
        assert torch.equal(torch.cat(chunks, dim=1), whole)


# -- the length head: how a described speaking rate reaches the output -----------------------


def test_length_head_learns_the_rate_a_style_asks_for():
    """Two styles, the same texts: 'fast' clips last 2 frames per character, 'slow' ones 5."""
    model = tiny(seed=2).train()
    texts = ["one", "two words", "and a third", "four"]
    text_ids, text_mask = TOK.batch_encode(texts * 2)
    n_chars = text_mask.sum(dim=1)
    fast, slow = torch.zeros(STYLE), torch.zeros(STYLE)
    fast[0], slow[1] = 1.0, 1.0
    style = torch.stack([fast] * 4 + [slow] * 4)
    lengths = torch.cat([2 * n_chars[:4], 5 * n_chars[4:]])
    codes = torch.randint(0, V, (8, K, int(lengths.max())), generator=torch.Generator().manual_seed(0))
    no_drop = torch.zeros(8, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(text_ids, text_mask, style, codes, lengths, drop_text=no_drop, drop_style=no_drop)
        optimizer.zero_grad()
        (out.loss + out.length_loss).backward()
        optimizer.step()
    assert out.length_loss.item() < 0.05
    model.eval()
    gen = dict(texts=["two words"], tokenizer=TOK, seed=0, length_tolerance=0.1, max_frames=64)
    short = model.generate(style=fast[None], **gen)[0].shape[1]
    long = model.generate(style=slow[None], **gen)[0].shape[1]
    n = len("two words")
    assert 0.8 * 2 * n <= short <= 1.2 * 2 * n, short
    assert 0.8 * 5 * n <= long <= 1.2 * 5 * n, long


def test_length_tolerance_bounds_every_sample():
    model = tiny()
    with torch.no_grad():                        # a length head that always says 3 frames per token
        model.length_head.weight.zero_()
        model.length_head.bias.fill_(torch.log(torch.tensor(3.0)))
    texts = ["abcd", "abcdefghij"]
    for seed in range(3):
        out = model.generate(texts=texts, tokenizer=TOK, seed=seed, length_tolerance=0.25, max_frames=64)
        for text, codes in zip(texts, out):
            expected = 3 * len(text)
            assert 0.75 * expected - 1 <= codes.shape[1] <= 1.25 * expected + 1, (text, codes.shape)
    exact = model.generate(texts=texts, tokenizer=TOK, seed=0, length_tolerance=0.0, max_frames=64)
    assert [c.shape[1] for c in exact] == [12, 30]
    # no text: nothing to predict from, so the limits stay those given
    assert model.generate(batch_size=1, seed=0, length_tolerance=0.0, min_frames=5, max_frames=5)[0].shape[1] == 5
    with pytest.raises(ValueError, match="length_tolerance"):
        model.generate(texts=texts, tokenizer=TOK, length_tolerance=1.5)


def test_recomputing_gives_the_same_gradient_and_keeps_less_for_the_backward_pass():
    """Stage 3's PPO updates recompute the policy's blocks in the backward pass on the cpu preset (issue 36,
    item 8): the gradient must not change, and the activations kept for the backward pass must shrink."""
    data = batch()

    def run(recompute: bool):
        model = tiny(seed=1)
        saved: list[int] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), model.recomputing(recompute):
            out = model(**data, return_hidden=True)
        assert model.recompute is False                    # as before, after
        (out.loss + out.hidden.square().mean()).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    loss, grads, kept = run(False)
    loss_r, grads_r, kept_r = run(True)
    assert torch.equal(loss, loss_r) and grads.keys() == grads_r.keys()
    assert all(torch.allclose(grads[n], grads_r[n], atol=1e-6, rtol=1e-5) for n in grads)
    assert kept_r < 0.6 * kept
