"""Alignment heads (ira/models/alignment.py): the location prior on hand-made cases, and in the model."""

import math

import pytest
import torch
import torch.nn.functional as F

from ira.models.alignment import PADDING, STYLE, StepPrior, attention_bias, centres, prior, text_index
from ira.models.speech_lm import apply_rotary
from test_speech_lm import batch, tiny


def test_text_index_numbers_text_tokens_after_the_style_token_and_marks_padding():
    valid = torch.tensor([[False, False, True, True, True],     # padding, padding, style, t0, t1
                          [True, True, True, True, True]])      # style, t0..t3
    assert text_index(valid).tolist() == [[PADDING, PADDING, STYLE, 0, 1], [STYLE, 0, 1, 2, 3]]


def test_centres_move_through_the_text_uniformly_and_stop_at_its_end():
    got = centres(torch.arange(0, 12, 2), n_text=torch.tensor([4, 10]), n_frames=torch.tensor([8, 5]))
    assert torch.allclose(got[0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 4.0]))   # 4 tokens over 8 frames
    assert torch.allclose(got[1], torch.tensor([0.0, 4.0, 8.0, 10.0, 10.0, 10.0]))  # capped at N = 10


def test_prior_peaks_on_the_token_under_the_centre_with_the_set_width():
    index = torch.tensor([[PADDING, STYLE, 0, 1, 2, 3, 4]])
    bias = prior(index, torch.tensor([[2.5]]), sigma=1.0)[0, 0]
    assert bias[0] == float("-inf") and bias[1] == 0.0
    text = bias[2:]
    assert int(text.argmax()) == 2 and text[2] == 0.0                  # token 2 spans [2, 3): its centre
    assert torch.allclose(text[[1, 3]], torch.full((2,), -0.5))       # one token away: -1 / (2 sigma^2)
    assert torch.allclose(prior(index, torch.tensor([[2.5]]), sigma=2.0)[0, 0, 2:],
                          text / 4)                                    # twice as wide: a quarter the penalty


def test_a_hand_made_attention_map_is_the_diagonal():
    """With no content in the scores (q . k = 0), an alignment head's attention over a 6-token text while
    12 frames are spoken is the diagonal: frame s reads around token s * 6 / 12. On odd frames the centre is
    a token's middle (that token peaks); on even frames it is the border of two (they share the peak)."""
    n_text, n_frames = 6, 12
    valid = torch.ones(1, 1 + n_text, dtype=torch.bool)
    mask = attention_bias(valid, torch.tensor([n_frames]), n_audio=n_frames, sigma=0.5)[0, 0]
    weights = mask[1 + n_text:].softmax(dim=-1)                       # audio queries over all keys
    assert torch.all(weights[:, 1 + n_text:] == 0)                    # never an audio key
    text = weights[:, 1:1 + n_text]
    for s in range(1, n_frames, 2):
        assert int(text[s].argmax()) == min(s // 2, n_text - 1) and text[s].max() > 0.4
    for s in range(2, n_frames, 2):
        left, right = s // 2 - 1, min(s // 2, n_text - 1)
        assert torch.isclose(text[s, left], text[s, right]) and text[s, left] == text[s].max()


def test_prefix_queries_are_causal_over_real_keys_and_padding_sees_itself():
    valid = torch.tensor([[False, True, True, True]])
    mask = attention_bias(valid, torch.tensor([3]), n_audio=2, sigma=1.0)[0, 0]
    prefix = mask[:4, :4]
    assert prefix[0, 0] == 0 and math.isinf(prefix[0, 1])             # padding query: itself only
    assert prefix[3, 1:].eq(0).all() and math.isinf(prefix[1, 2])     # causal over the real prefix
    assert torch.isinf(mask[:, 0][1:]).all()                          # nobody reads the padding key


def test_alignment_heads_read_the_text_and_never_the_audio():
    """In the model, replacing every audio step's keys and values changes nothing an alignment head
    outputs (its queries are the same); replacing a text token's does."""
    model = tiny(align_heads=2)
    data = batch()
    captured = []
    attn = model.blocks[1].attn
    hook = attn.register_forward_hook(lambda module, args, out: captured.append(args))
    with torch.no_grad():
        model(**data)
    hook.remove()
    x, rope, _, _, _, _, align = captured[0]
    qkv = attn.qkv(x).view(x.shape[0], x.shape[1], 3, attn.n_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = apply_rotary(qkv[:2], *rope)
    v = qkv[2]
    n_prefix = int(data["text_mask"].shape[1]) + 1

    def heads(k, v):
        return F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=align)[:, :, n_prefix:]

    noise = torch.randn_like(k)
    audio_changed_k, audio_changed_v = k.clone(), v.clone()
    audio_changed_k[:, :, n_prefix:] = noise[:, :, n_prefix:]
    audio_changed_v[:, :, n_prefix:] = noise[:, :, n_prefix:]
    assert torch.equal(heads(k, v), heads(audio_changed_k, audio_changed_v))
    text_changed_v = v.clone()
    text_changed_v[:, :, n_prefix - 1] += 1.0                           # the last text token of each row
    assert not torch.allclose(heads(k, v), heads(k, text_changed_v))


def test_generation_uses_the_length_heads_frames_unless_given():
    model = tiny()
    data = batch()
    with torch.no_grad():
        predicted = model.predicted_frames(data["text_ids"], data["text_mask"], style=data["style"])
    assert predicted.shape == (3,) and bool((predicted >= 1).all())
    kwargs = dict(style=data["style"], max_frames=8, temperature=0.0)
    default = model.generate(data["text_ids"], data["text_mask"], **kwargs)
    same = model.generate(data["text_ids"], data["text_mask"], align_frames=predicted, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(default, same))
    with pytest.raises(ValueError, match="align_frames"):
        model.generate(data["text_ids"], data["text_mask"], align_frames=torch.tensor([1.0, 0.0, 2.0]), **kwargs)


def test_step_prior_is_the_full_passes_bias_one_step_at_a_time():
    valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    frames = torch.tensor([6.0, 9.0])
    full = attention_bias(valid, frames, n_audio=7, sigma=1.5)[:, 0]
    step_prior = StepPrior(valid, frames, 1.5)
    for s in range(7):
        mask = step_prior.mask(5 + s)[:, 0, 0]                        # the query written after 5 + s keys
        assert torch.equal(mask, full[:, 5 + s, :6 + s])


def test_models_saved_before_alignment_heads_load_without_them():
    model = tiny(align_heads=0)
    data = model.config_dict()
    del data["speech_lm"]["align_heads"]
    rebuilt = type(model).from_config_dict(data)
    assert rebuilt.cfg.align_heads == 0
    rebuilt.load_state_dict(model.state_dict())
