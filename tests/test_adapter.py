"""The Perceiver adapter: shapes, padding invariance, output norm, gradients, metadata round trip."""

import json

import pytest
import torch

from ira.config import AdapterConfig, ConfigError, SpeechLMConfig, load_config
from ira.models.adapter import PerceiverAdapter
from ira.models.speech_lm import SpeechLM

pytestmark = pytest.mark.usefixtures("one_thread")

IN_DIM, OUT_DIM, TARGET = 24, 40, 3.2


def make_adapter(**overrides) -> PerceiverAdapter:
    cfg = AdapterConfig(**{"n_latents": 6, "dim": 32, "n_layers": 2, "n_heads": 4, "max_audio_frames": 64,
                           **overrides})
    return PerceiverAdapter(cfg, IN_DIM, OUT_DIM, TARGET).eval()


def test_shapes_and_output_norm():
    adapter = make_adapter()
    features = torch.randn(3, 20, IN_DIM)
    mask = torch.arange(20)[None] < torch.tensor([[20], [7], [1]])
    out = adapter(features, mask)
    assert out.shape == (3, 6, OUT_DIM) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.full((3, 6), TARGET), rtol=1e-3)
    with torch.no_grad():
        adapter.gain.fill_(2.0)
    assert torch.allclose(adapter(features, mask).norm(dim=-1), torch.full((3, 6), 2 * TARGET), rtol=1e-3)


@pytest.mark.parametrize("options", [{}, {"frame_stack": 4, "encoder_layers": 1, "window": 2.0},
                                     {"window": 1.0, "reach": 2.0}])
def test_padding_does_not_change_a_sample(options):
    adapter = make_adapter(**options)
    short, long = torch.randn(1, 7, IN_DIM), torch.randn(1, 15, IN_DIM)
    alone = adapter(short, torch.ones(1, 7, dtype=torch.bool))
    padded = torch.cat([torch.cat([short, torch.full((1, 8, IN_DIM), float("nan"))], dim=1), long])
    mask = torch.arange(15)[None] < torch.tensor([[7], [15]])
    batched = adapter(padded, mask)
    assert torch.isfinite(batched).all()  # garbage in the padding never reaches the output
    assert (batched[0] - alone[0]).abs().max() < 1e-5
    assert (batched[1] - adapter(long, torch.ones(1, 15, dtype=torch.bool))[0]).abs().max() < 1e-5


def test_gradients_reach_latents_and_input_projection():
    adapter = make_adapter().train()
    features = torch.randn(2, 10, IN_DIM)
    mask = torch.arange(10)[None] < torch.tensor([[10], [4]])
    loss = (adapter(features, mask) * torch.randn(2, 6, OUT_DIM)).sum()  # the norm is fixed: use a direction
    loss.backward()
    for name in ("latents", "in_proj.weight", "out.weight", "gain", "layers.0.cross.q.weight"):
        grad = dict(adapter.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_config_round_trip():
    adapter = make_adapter(dropout=0.1)
    data = json.loads(json.dumps(adapter.config_dict()))
    rebuilt = PerceiverAdapter.from_config_dict(data).eval()
    assert rebuilt.cfg == adapter.cfg and (rebuilt.in_dim, rebuilt.out_dim) == (IN_DIM, OUT_DIM)
    assert rebuilt.target_norm == pytest.approx(TARGET)
    rebuilt.load_state_dict(adapter.state_dict())
    features, mask = torch.randn(2, 9, IN_DIM), torch.ones(2, 9, dtype=torch.bool)
    assert torch.equal(rebuilt(features, mask), adapter(features, mask))
    with pytest.raises(ValueError, match="in_dim"):
        PerceiverAdapter.from_config_dict({"adapter": data["adapter"]})


def vocabulary_adapter() -> tuple[PerceiverAdapter, torch.Tensor]:
    from ira.models.vocabulary_reader import VocabularyReader
    table = torch.randn(30, OUT_DIM, generator=torch.Generator().manual_seed(3))
    reader = VocabularyReader.from_llm_table(table, [2, 5, 11, 17], trainable=True)
    return PerceiverAdapter(
        AdapterConfig(n_latents=8, dim=32, n_layers=2, n_heads=4, max_audio_frames=64, output="vocabulary"),
        IN_DIM, OUT_DIM, TARGET, reader).eval(), table


def test_vocabulary_output_hands_the_llm_mixtures_of_its_rows_and_survives_a_round_trip():
    torch.manual_seed(0)
    adapter, table = vocabulary_adapter()
    features, mask = torch.randn(3, 20, IN_DIM), torch.arange(20)[None] < torch.tensor([[20], [9], [4]])
    heard = adapter(features, mask)
    assert isinstance(heard, list) and len(heard) == 3
    rows = table[[2, 5, 11, 17]]
    for clip in heard:
        assert 1 <= clip.shape[0] <= 8 and clip.shape[1] == OUT_DIM
        weights = torch.linalg.lstsq(rows.T, clip.T).solution            # each vector = weights @ rows
        assert torch.allclose(weights.sum(0), torch.ones(clip.shape[0]), atol=1e-4)
        assert (weights > -1e-4).all()                                    # a convex mixture
    data = json.loads(json.dumps(adapter.config_dict()))
    rebuilt = PerceiverAdapter.from_config_dict(data).eval()
    rebuilt.load_state_dict(adapter.state_dict())
    for a, b in zip(rebuilt(features, mask), heard):
        assert torch.equal(a, b)
    assert rebuilt.reader.vocab == [2, 5, 11, 17]
    with pytest.raises(ValueError, match="VocabularyReader"):
        make_adapter(output="vocabulary")


def test_the_cue_follows_every_clip_and_survives_a_round_trip():
    torch.manual_seed(0)
    adapter = make_adapter(cue_tokens=3)
    table = torch.randn(30, OUT_DIM)
    adapter.start_cue(table, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(v, r) for r in table) for v in adapter.cue)
    features, mask = torch.randn(2, 9, IN_DIM), torch.ones(2, 9, dtype=torch.bool)
    out = adapter(features, mask)
    assert out.shape == (2, adapter.cfg.n_latents + 3, OUT_DIM)
    assert torch.equal(out[:, -3:], adapter.cue.expand(2, -1, -1))
    assert torch.equal(out[:, :-3], adapter.spoken(adapter.read(*adapter.encode_frames(features, mask))))
    rebuilt = PerceiverAdapter.from_config_dict(json.loads(json.dumps(adapter.config_dict()))).eval()
    rebuilt.load_state_dict(adapter.state_dict())
    assert torch.equal(rebuilt(features, mask), out)


def test_bad_inputs_are_clear_errors():
    adapter = make_adapter()
    features = torch.randn(2, 5, IN_DIM)
    with pytest.raises(ValueError, match=r"samples \[1\].*no valid audio frame"):
        adapter(features, torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match=str(IN_DIM)):
        adapter(torch.randn(2, 5, IN_DIM + 1), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"adapter\.max_audio_frames"):
        adapter(torch.randn(1, 65, IN_DIM), torch.ones(1, 65, dtype=torch.bool))


def test_reads_speech_lm_audio_features():
    speech_lm = SpeechLM(SpeechLMConfig(d_model=IN_DIM, n_layers=1, n_heads=2, style_dim=8, max_audio_frames=64),
                         n_codebooks=2, codebook_size=16, text_vocab_size=10).eval()
    codes = torch.randint(0, 16, (2, 2, 12))
    hidden, mask = speech_lm.audio_features(codes, torch.tensor([12, 5]))
    assert make_adapter()(hidden, mask).shape == (2, 6, OUT_DIM)


@pytest.mark.parametrize("override, key", [
    ("adapter.n_latents=2", "adapter.n_latents"),
    ("adapter.n_latents=300", "adapter.n_latents"),
    ("adapter.n_heads=3", "adapter.n_heads"),
    ("adapter.dropout=1.0", "adapter.dropout"),
    ("adapter.max_audio_frames=512", "adapter.max_audio_frames"),  # < speech_lm.max_audio_frames
    ("adapter.output=words", "adapter.output"),
    ("adapter.reach=-1", "adapter.reach"),
    ("adapter.cue_tokens=-1", "adapter.cue_tokens"),
    ("align.cue_learning_rate=0", "align.cue_learning_rate"),
    ("align.ctc_steps=0", "align.distill_reading"),     # the cpu preset keeps the reading: the phase must learn it
])
def test_adapter_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("cpu", [override])


@pytest.mark.parametrize("preset", ["cpu", "laptop", "a100"])
def test_presets_adapter_fits_its_speech_lm_and_spells_long_sentences(preset):
    cfg = load_config(preset)
    assert 1 <= cfg.adapter.feature_layer <= cfg.speech_lm.n_layers     # a middle block of its own SpeechLM
    assert cfg.adapter.n_latents >= 64          # the pool's longest sentence is 31 LLM tokens: room for CTC blanks
    assert cfg.adapter.window > 0 and cfg.align.ctc_steps > 0


def test_window_prior_makes_latents_read_their_part_of_the_clip_in_order():
    from ira.models.adapter import window_bias
    valid = torch.arange(40)[None] < torch.tensor([[40], [20]])
    bias = window_bias(valid, n_latents=4, width=1.0)
    assert bias.shape == (2, 4, 40)
    peaks = bias[:, :, :].argmax(-1)
    # latent i peaks at the i-th quarter of each clip's own length
    assert peaks[0].tolist() == [4, 14, 24, 34]
    assert peaks[1].tolist() == [2, 7, 12, 17]


def test_a_latent_reads_only_the_frames_in_its_reach():
    """adapter.reach: a latent's output depends on the frames near its window and on nothing else (neither
    far frames nor the other latents), and it has no self-attention to lean on the sentence around it."""
    adapter = make_adapter(n_latents=4, window=0.5, reach=2.0)    # latent i: centre (i + 0.5) / 4, reach 0.25
    assert not any("self_attn" in name for name, _ in adapter.named_parameters())
    features, mask = torch.randn(1, 40, IN_DIM), torch.ones(1, 40, dtype=torch.bool)
    changed = features.clone()
    changed[:, 36:] = torch.randn(1, 4, IN_DIM)           # beyond 0.9 of the clip: only latent 3 reaches it
    before, after = adapter(features, mask), adapter(changed, mask)
    assert (before[0, :3] - after[0, :3]).abs().max() < 1e-6    # latents 0-2 do not reach frames 36-39
    assert (before[0, 3] - after[0, 3]).abs().max() > 1e-3
    global_reading = make_adapter(n_latents=4, window=0.5)   # reach 0: every latent reads the whole clip
    assert (global_reading(features, mask)[0, 0] - global_reading(changed, mask)[0, 0]).abs().max() > 1e-5
    short = adapter(torch.randn(1, 2, IN_DIM), torch.ones(1, 2, dtype=torch.bool))  # fewer frames than latents
    assert torch.isfinite(short).all()


def test_stacked_frames_keep_their_count_and_padding():
    from ira.models.adapter import stack_frames
    x = torch.arange(2 * 7 * 2, dtype=torch.float).reshape(2, 7, 2)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    stacked, valid = stack_frames(x.masked_fill(~mask[..., None], 0), mask, 4)
    assert stacked.shape == (2, 2, 8)
    assert valid.tolist() == [[True, True], [True, False]]
    assert stacked[0, 1, 6:].tolist() == [0.0, 0.0]          # the clip's tail is zero-filled
    assert stacked[0, 0].tolist() == x[0, :4].flatten().tolist()
