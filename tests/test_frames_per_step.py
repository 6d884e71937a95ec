"""speech_lm.frames_per_step (issue 35): F codec frames per step as K x F streams, through the delay pattern,
the training forward, every generation path and the checkpoint, with frames in and frames out."""

import json

import pytest
import torch

from ira.config import ConfigError, IRAConfig, PRESETS, SpeechLMConfig, load_config, preset_config, section_from_dict
from ira.models.delay_pattern import apply_delay, undo_delay
from ira.models.frame_stacking import stack_frames, steps_for, unstack_frames
from ira.models.speech_lm import SpeechLM
from test_speech_lm import K, V, batch, sample, tiny

F = 2


def padded(codes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([c.shape[1] for c in codes])
    out = torch.zeros(len(codes), K, int(lengths.max()), dtype=torch.long)
    for b, c in enumerate(codes):
        out[b, :, :c.shape[1]] = c
    return out, lengths


# -- the grouping -----------------------------------------------------------------------------


@pytest.mark.parametrize("per_step", [2, 3])
def test_streams_round_trip_through_the_delay_pattern(per_step):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (3, K, 11), generator=gen)
    lengths = torch.tensor([11, 7, 4])
    streams, steps = stack_frames(codes, lengths, per_step)
    assert streams.shape == (3, K * per_step, -(-11 // per_step))
    assert steps.tolist() == [-(-n // per_step) for n in lengths.tolist()]
    # stream j = k * F + f holds codebook k of frame t * F + f
    assert torch.equal(streams[0, 1 * per_step + 1, :3], codes[0, 1, 1:3 * per_step:per_step])
    delayed = apply_delay(streams, fill_id=V + 1, lengths=steps, eos_id=V)
    back = unstack_frames(undo_delay(delayed, streams.shape[2]), per_step)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(back[b, :, :n], codes[b, :, :n])
        # the last group is completed with the sample's last frame, never with padding
        tail = back[b, :, n:int(steps[b]) * per_step]
        assert torch.equal(tail, codes[b, :, n - 1:n].expand_as(tail))


def test_one_frame_per_step_is_the_identity():
    codes, lengths = torch.randint(0, V, (2, K, 5)), torch.tensor([5, 3])
    streams, steps = stack_frames(codes, lengths, 1)
    assert streams is codes and steps is lengths and unstack_frames(codes, 1) is codes
    assert steps_for(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0, 1, 1, 2]


# -- the model --------------------------------------------------------------------------------


def test_the_sequence_halves_and_each_codebook_counts_its_streams():
    one, two, data = tiny(), tiny(frames_per_step=F), batch()
    out1, out2 = one(**data), two(**data)
    steps = steps_for(data["codes_lengths"], F)
    assert out1.logits.shape[1:3] == (K, 12 + K)
    assert out2.logits.shape[1:3] == (K * F, 6 + K * F)             # [B, K x F, T' + K x F, V + 1]
    assert two.heads.out_features == K * F * (V + 1) and len(two.audio_emb) == K * F
    # targets: every real value and each stream's EOS, counted per codebook over its F streams
    assert out2.tokens_per_codebook.tolist() == [F * int((steps + 1).sum())] * K
    ce = torch.nn.functional.cross_entropy(out2.logits.flatten(0, 2).float(), out2.targets.masked_fill(~out2.target_mask, 0).flatten(),
                                           reduction="none").view_as(out2.targets) * out2.target_mask
    per_codebook = ce.sum(dim=(0, 2)).view(K, F).sum(1) / out2.tokens_per_codebook
    assert torch.allclose(out2.loss_per_codebook, per_codebook, atol=1e-5)
    assert torch.isfinite(out2.length_loss)


def test_audio_features_give_one_row_per_frame_shared_within_a_step():
    model, data = tiny(frames_per_step=F), batch()
    features, mask = model.audio_features(data["codes"], data["codes_lengths"], layer=1)
    assert features.shape[:2] == (3, 12) and mask.sum(1).tolist() == data["codes_lengths"].tolist()
    assert torch.equal(features[:, 0::2], features[:, 1::2])


@pytest.mark.parametrize("path", ["numba", "pytorch", "uncached"])
@pytest.mark.parametrize("text_attention", ["causal", "bidirectional"])
def test_generation_logits_equal_the_teacher_forced_forward_on_its_codes(path, text_attention, monkeypatch):
    """Each column `generate` samples comes from the forward pass's logits over the frames it returned."""
    model, data = tiny(frames_per_step=F, text_attention=text_attention), batch()
    monkeypatch.setenv("IRA_NUMBA", "0" if path == "pytorch" else "1")
    seen = []
    next_column = model._next_column

    def recording(logits, step, *args):
        seen.append(logits.clone())
        return next_column(logits, step, *args)
    monkeypatch.setattr(model, "_next_column", recording)
    codes = model.generate(data["text_ids"], data["text_mask"], style=data["style"], max_frames=10, seed=1,
                           top_k=8, use_cache=path != "uncached")
    assert all(c.shape[0] == K and c.shape[1] % F == 0 and c.shape[1] <= 10 for c in codes)
    frames, lengths = padded(codes)
    align = model.predicted_frames(data["text_ids"], data["text_mask"], style=data["style"])
    with torch.no_grad():
        full = model(data["text_ids"], data["text_mask"], data["style"], frames, lengths, align_frames=align).logits
    generated = torch.stack(seen, dim=2)                             # [rows, K x F, steps run, V + 1]
    for b in range(3):
        steps = int(lengths[b]) // F + K * F
        assert torch.allclose(generated[b, :, :steps], full[b, :, :steps], atol=1e-4), \
            (generated[b, :, :steps] - full[b, :, :steps]).abs().max()


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_cached_uncached_streamed_and_single_sample_generation_agree(cfg_scale):
    model, data = tiny(frames_per_step=F, text_attention="bidirectional"), batch()
    kwargs = dict(style=data["style"], max_frames=14, temperature=0.0, cfg_scale=cfg_scale)
    cached = model.generate(data["text_ids"], data["text_mask"], **kwargs)
    naive = model.generate(data["text_ids"], data["text_mask"], use_cache=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(cached, naive))
    one = sample(data, 2)
    alone = model.generate(one["text_ids"], style=one["style"], max_frames=14, temperature=0.0, cfg_scale=cfg_scale)
    chunks = list(model.stream(one["text_ids"], style=one["style"], chunk_frames=3, max_frames=14,
                               temperature=0.0, cfg_scale=cfg_scale))
    assert all(c.shape[1] == 4 for c in chunks[:-1])                # 3 frames rounded up to whole steps
    assert torch.equal(torch.cat(chunks, dim=1), alone[0])


def test_length_bounds_hold_in_frames():
    model, data = tiny(frames_per_step=F), batch()
    codes = model.generate(data["text_ids"], data["text_mask"], style=data["style"], min_frames=7, max_frames=9,
                           seed=0)
    assert all(c.shape[1] in (8, 10) for c in codes)                 # ceil(7 / 2) .. ceil(9 / 2) steps


# -- configuration and checkpoints ------------------------------------------------------------


def test_the_setting_travels_with_the_model_and_old_metadata_loads_one_frame_per_step(tmp_path):
    from ira.training.checkpoint import load_checkpoint, save_checkpoint

    two, data = tiny(frames_per_step=F), batch()
    rebuilt = SpeechLM.from_config_dict(json.loads(json.dumps(two.config_dict()))).eval()
    rebuilt.load_state_dict(two.state_dict())
    assert rebuilt.frames_per_step == F and torch.equal(rebuilt(**data).logits, two(**data).logits)

    one = tiny()
    old_meta = json.loads(json.dumps(one.config_dict()))
    del old_meta["speech_lm"]["frames_per_step"]                  # written before the setting existed
    path = save_checkpoint(tmp_path / "old.safetensors", {"speech_lm": one}, stage="1", epoch=0, step=1,
                           config=IRAConfig(), metadata={"speech_lm": json.dumps(old_meta)})
    loaded = SpeechLM.from_checkpoint(load_checkpoint(path))
    assert loaded.frames_per_step == 1 and torch.equal(loaded(**data).logits, one(**data).logits)


def test_bad_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"speech_lm\.frames_per_step.*1 to 8"):
        section_from_dict("speech_lm", {"frames_per_step": 0})
    with pytest.raises(ConfigError, match=r"speech_lm\.max_audio_frames.*multiple of speech_lm\.frames_per_step"):
        load_config("cpu", ["speech_lm.frames_per_step=3"])           # 1024 frames are not whole steps of 3
    assert load_config("cpu", ["speech_lm.frames_per_step=2"]).speech_lm.frames_per_step == 2
    assert SpeechLMConfig().frames_per_step == 1


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_says_its_frames_per_step(name):
    assert preset_config(name).speech_lm.frames_per_step in (1, 2)
