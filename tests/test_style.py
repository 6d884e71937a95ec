"""The CLIP-style voice encoder: loss, towers, embedding API, training stage and retrieval."""

from __future__ import annotations

import math

import pytest
import torch

from ira.audio import AudioError
from ira.checkpoint import checkpoint_figure
from ira.codec.mel import log_mel
from ira.config import ConfigError, load_config
from ira.data.dummy import create_dummy_corpus
from ira.data.prepare import prepare_corpus
from ira.models.style import (INIT_TEMPERATURE, MAX_LOGIT_SCALE, StyleEncoder, contrastive_loss,
                              description_targets, load_style_encoder)
from ira.models.text_encoder import (SentenceEncoder, TextEncoderError, bundled_model_dir,
                                      load_sentence_encoder)
from ira.training.checkpoint import load_checkpoint
from ira.training.stage_style import (StyleTask, embed_clips, evaluate_retrieval, load_style_clips,
                                      run_style_training, style_run_config)
from ira.training.stop import request_stop


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention (module scope,
    so the module fixtures that prepare the corpus and train run with it too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_overrides(data_dir, out_dir) -> list[str]:
    return [f"data.dir={data_dir}", f"training.output_dir={out_dir}",
            "codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16",
            "codec.mel_kmeans_iters=3",
            "speech_lm.style_dim=32", "style.embed_dim=32", "style.audio_dim=32", "style.audio_layers=1",
            "style.audio_heads=2", "style.text_hidden=0", "style.dropout=0.0", "style.batch_size=16",
            "style.learning_rate=3e-3", "style.warmup_steps=5", "style.max_steps=60",
            "training.eval_every=1000", "training.save_every=1000", "training.log_every=10",
            "training.mixed_precision=no",
            "training.max_minutes=null"]   # the preset's time budget bends the learning rate by the clock: exact
                                          # resume needs a schedule of steps alone


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    return load_config("cpu", tiny_overrides(tmp_path_factory.mktemp("unused"), tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def encoder(tiny_cfg) -> StyleEncoder:
    torch.manual_seed(0)
    return StyleEncoder(tiny_cfg.style).eval()


# ---------------------------------------------------------------- loss

def test_aligned_embeddings_give_a_low_loss_and_shuffled_ones_a_high_loss():
    n = 8
    emb = torch.eye(n, 16)                                     # orthogonal unit vectors
    scale = torch.tensor(MAX_LOGIT_SCALE)
    assert contrastive_loss(emb, emb, scale) < 1e-3
    shuffled = emb[torch.roll(torch.arange(n), 1)]
    assert contrastive_loss(emb, shuffled, scale) > 50.0       # every positive scores 100 below a negative
    # At scale 1 a positive (cosine 1) beats a negative (cosine 0) by only one logit.
    expected = math.log(1 + (n - 1) / math.e)
    assert contrastive_loss(emb, emb, torch.tensor(1.0)).item() == pytest.approx(expected, rel=1e-5)


def test_soft_targets_stop_punishing_clips_that_fit_the_description():
    # Descriptions 0 and 1 both fit clips 0 and 1 (same voice settings: a false negative for InfoNCE).
    fits = torch.eye(4, dtype=torch.bool)
    fits[0, 1] = fits[1, 0] = True
    scale = torch.tensor(50.0)
    separated = torch.eye(4, 8)                                 # the model tells clips 0 and 1 apart
    tied = separated.clone()
    tied[1] = tied[0]                                           # the model hears them as one voice
    # Plain InfoNCE prefers to separate them; with soft targets the tie is the better answer.
    assert contrastive_loss(separated, separated, scale) < contrastive_loss(tied, tied, scale) - 0.3
    assert contrastive_loss(tied, tied, scale, fits) < contrastive_loss(separated, separated, scale, fits) - 5
    # The tie reaches the soft loss's floor: the entropy of the targets (ln 2 on rows 0 and 1).
    floor = 2 * 2 * math.log(2) / (2 * 4)
    assert contrastive_loss(tied, tied, scale, fits).item() == pytest.approx(floor, rel=1e-4)
    # Identity targets are exactly plain InfoNCE.
    assert torch.isclose(contrastive_loss(tied, tied, scale, torch.eye(4, dtype=torch.bool)),
                         contrastive_loss(tied, tied, scale))


def test_description_targets_match_the_mentioned_levels_only():
    levels = [{"pitch": "low", "gender": "male", "rate": "fast"},
              {"pitch": "low", "gender": "male", "rate": "slow"},
              {"pitch": "high", "gender": "female", "rate": "fast"},
              {"gender": "male", "rate": "fast"}]              # pitch unknown (a whisper)
    mentioned = [{"pitch": "low", "gender": "male"}, {"rate": "slow"}, {"gender": "female"}, {}]
    fits = description_targets(mentioned, levels)
    assert fits.tolist() == [[True, True, False, False],       # an unknown pitch does not fit "low"
                             [False, True, False, False],
                             [False, False, True, False],
                             [True, True, True, True]]          # "A voice." fits everyone
    # Several queries per clip: owners say which clip each was written for.
    rect = description_targets([{"rate": "fast"}, {"rate": "slow"}], levels, owners=[0, 1])
    assert rect.tolist() == [[True, False, True, True], [False, True, False, False]]
    with pytest.raises(ValueError, match="owners"):
        description_targets(mentioned[:2], levels)


def test_logit_scale_starts_at_clip_temperature_and_is_clamped(encoder):
    model = StyleEncoder(encoder.cfg, encoder.sentence_encoder)
    assert model.logit_scale().item() == pytest.approx(1 / INIT_TEMPERATURE, rel=1e-5)
    with torch.no_grad():
        model.log_scale.fill_(10.0)                           # exp(10) = 22026
    scale = model.logit_scale()
    assert scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    scale.backward()
    assert model.log_scale.grad.item() == 0.0                  # no push past the clamp


def test_config_requires_the_speech_lm_to_read_the_same_space():
    with pytest.raises(ConfigError, match="style.embed_dim"):
        load_config("cpu", ["style.embed_dim=64"])
    assert load_config("cpu", ["style.embed_dim=64", "speech_lm.style_dim=64"]).style.embed_dim == 64
    with pytest.raises(ConfigError, match="style.audio_heads"):
        load_config("cpu", ["style.audio_heads=3"])


# ---------------------------------------------------------------- towers and the embedding API

def test_text_tower_stays_frozen_while_projection_and_audio_tower_train(encoder):
    model = StyleEncoder(encoder.cfg, encoder.sentence_encoder).train()
    tower = model.sentence_encoder.model
    before_tower = {k: v.clone() for k, v in tower.state_dict().items()}
    before_proj = [p.detach().clone() for p in model.text_proj.parameters()]
    assert not any(k.startswith("_sentences") or "embeddings.word" in k for k in model.state_dict())
    assert all(not p.requires_grad for p in tower.parameters())
    assert {id(p) for p in model.parameters()}.isdisjoint({id(p) for p in tower.parameters()})

    texts = ["A slow, deep male voice.", "A fast, high-pitched female voice.", "A whispered voice."]
    mels = torch.randn(3, model.cfg.n_mels, 90)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(model.sentence_embeddings(texts), mels, torch.tensor([90, 60, 75]))
    out["loss"].backward()
    opt.step()

    for key, value in tower.state_dict().items():
        assert torch.equal(value, before_tower[key]), key      # bit-identical
    assert any(not torch.equal(p, q) for p, q in zip(model.text_proj.parameters(), before_proj))
    assert all(p.grad is not None for p in model.audio.parameters() if p.requires_grad)


def test_text_encoder_matches_sentence_transformers_pooling():
    enc = load_sentence_encoder("bundled")
    texts = ["a slow deep voice", "A fast high-pitched woman speaking loudly, with a Scottish accent."]
    out = enc.encode(texts)
    assert out.shape == (2, 384) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    # Mean pooling over real tokens only: batching with a longer sentence changes nothing.
    assert torch.allclose(enc._embed(texts[:1])[0], out[0], atol=1e-5)
    # Repeated sentences are served from the cache (same tensor values, no growth).
    size = enc.cache_size()
    assert torch.equal(enc.encode(texts[::-1]), out.flip(0)) and enc.cache_size() == size
    # Similar wordings are closer than different ones (the frozen model means something).
    a, b, c = enc.encode(["a very deep voice", "a low-pitched voice", "a squeaky high voice"])
    assert a @ b > a @ c
    # A local folder works the same way; a missing one is a clear error naming the setting.
    folder = SentenceEncoder(str(bundled_model_dir()))
    assert torch.allclose(folder.encode(texts), out, atol=1e-6)
    with pytest.raises(TextEncoderError, match="style.text_encoder"):
        SentenceEncoder("/no/such/folder")


def test_embed_text_unseen_and_empty_descriptions(encoder):
    emb = encoder.embed_text(["a whispery old man", "A slow, deep male voice with a Scottish accent."])
    assert emb.shape == (2, encoder.embed_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    one = encoder.embed_description("  a whispery   old man ")
    assert one.shape == (encoder.embed_dim,) and torch.allclose(one, emb[0], atol=1e-6)
    assert encoder.embed_description("") is None
    assert encoder.embed_description("   \n") is None
    assert encoder.embed_description(None) is None
    with pytest.raises(ValueError, match="empty"):
        encoder.embed_text(["a voice", " "])
    with pytest.raises(TypeError, match="embed_description"):
        encoder.embed_text("a voice")


def test_embed_audio_accepts_waveforms_and_log_mels_and_ignores_padding(encoder):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16_000) / 16_000
    voiced = (0.3 * torch.sin(2 * math.pi * 140 * t) + 0.01 * torch.randn(16_000, generator=g))
    short = voiced[:8_000].clone()
    from_wav = encoder.embed_audio([voiced, short], sr=16_000)
    assert from_wav.shape == (2, encoder.embed_dim)
    assert torch.allclose(from_wav.norm(dim=1), torch.ones(2), atol=1e-5)
    single = encoder.embed_audio(voiced, sr=16_000)
    assert torch.allclose(single[0], from_wav[0], atol=1e-5)
    # Alone or padded next to a longer clip: the same vector (padding is masked everywhere).
    mel_short = log_mel(short, 16_000, encoder.cfg.n_mels)
    alone = encoder.embed_audio([mel_short])
    assert torch.allclose(alone[0], from_wav[1], atol=1e-4)
    with pytest.raises(ValueError, match="mono waveform"):
        encoder.embed_audio([torch.zeros(3, 4, 5)])
    with pytest.raises(AudioError, match="silent"):
        encoder.embed_audio([torch.zeros(16_000)], sr=16_000)


# ---------------------------------------------------------------- training on a tiny corpus

@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """40 eSpeak clips in three voices, prepared with a tiny MelCodec."""
    root = tmp_path_factory.mktemp("style_corpus")
    data_dir = create_dummy_corpus(root / "corpus", num_clips=40, seed=0)
    prepare_corpus(load_config("cpu", tiny_overrides(data_dir, root / "unused")))
    return data_dir


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    # 120 steps: at 60 the encoder had not yet told "low-pitched" from "high-pitched" on this corpus
    # (the same five clips nearest both, since the split by sentence changed its 37 training clips)
    cfg = load_config("cpu", tiny_overrides(tiny_corpus, tmp_path_factory.mktemp("run")) + ["style.max_steps=120"])
    task = StyleTask(style_run_config(cfg))
    probe = load_style_clips(cfg, "train", query_family="train", n_queries=2)
    before = evaluate_retrieval(task.model, probe)
    result = run_style_training(cfg, cpu=True, task=task)
    return cfg, task, result, probe, before


def test_short_training_retrieves_training_clips_above_chance(trained):
    cfg, task, result, probe, before = trained
    assert result.status == "done" and result.step == cfg.style.max_steps
    after = evaluate_retrieval(task.model, probe)
    assert after["n_clips"] == len(task.train_clips) >= 30
    assert after["desc_match"] > 2 * after["desc_match_chance"]
    assert after["top5"] > 1.5 * after["chance_top5"]
    assert after["loss"] < before["loss"]
    assert after["desc_match"] > before["desc_match"]


def test_pitch_descriptions_rank_clips_in_the_described_direction(trained, tiny_corpus):
    """Control on the encoder alone: the clips nearest "high-pitched" are measured higher than those
    nearest "low-pitched" (pitch measured by YIN at preparation, not the labels)."""
    import json

    cfg, task, result, probe, before = trained
    pitch = {row["id"]: row["pitch_mean_hz"] for row in
             map(json.loads, (tiny_corpus / "annotations.jsonl").read_text().splitlines())}
    clips = [c for c in task.train_clips if pitch.get(c.id)]
    task.model.eval()
    with torch.no_grad():
        audio = embed_clips(task.model, clips)
        queries = task.model.embed_text(["a very high-pitched voice", "a very low-pitched, deep voice"])
    top = (queries @ audio.T).topk(5, dim=1).indices
    high, low = [sum(pitch[clips[i].id] for i in row) / 5 for row in top.tolist()]
    print(f"top-5 mean pitch: high {high:.0f} Hz, low {low:.0f} Hz")
    assert high > low * 1.15, (high, low)


def test_checkpoint_holds_the_style_module_and_reloads(trained):
    cfg, task, result, probe, _ = trained
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.stage == "style" and ckpt.modules == ["style"]
    assert checkpoint_figure(ckpt.metadata).startswith("top5 ")   # what the recipe's progress shows
    assert ckpt.extra["embed_dim"] == "32" and "MiniLM" in ckpt.extra["text_encoder"]
    # The frozen sentence encoder is not saved: only the trained parts and the mel statistics.
    assert {k.split(".")[0] for k in ckpt.tensors["style"]} == {"text_proj", "audio", "log_scale"}
    assert len(ckpt.tensors["style"]) < 40
    model = load_style_encoder(result.last_checkpoint)
    texts = [c.queries[0] for c in probe[:4]]
    task.model.eval()
    assert torch.allclose(model.embed_text(texts), task.model.embed_text(texts), atol=1e-6)
    mels = [c.mel.float() for c in probe[:4]]
    assert torch.allclose(model.embed_audio(mels), task.model.embed_audio(mels), atol=1e-5)


def test_resume_continues_exactly(tiny_corpus, tmp_path, trained):
    class StopAfterThree(StyleTask):
        def training_step(self, batch):
            out = super().training_step(batch)
            if self.micro_step == 3:
                request_stop(self.cfg.training.output_dir)
            return out

    _, reference_task, _, _, _ = trained
    clips = (reference_task.train_clips, reference_task.val_clips)
    steps = ["style.max_steps=6", "training.save_every=3", "style.dropout=0.2"]   # dropout: RNG matters
    cfg_a = load_config("cpu", tiny_overrides(tiny_corpus, tmp_path / "a") + steps)
    task_a = StyleTask(style_run_config(cfg_a), *clips)
    assert run_style_training(cfg_a, cpu=True, task=task_a).step == 6

    cfg_b = load_config("cpu", tiny_overrides(tiny_corpus, tmp_path / "b") + steps)
    first = run_style_training(cfg_b, cpu=True, task=StopAfterThree(style_run_config(cfg_b), *clips))
    assert first.status == "stopped" and first.step == 3
    task_c = StyleTask(style_run_config(cfg_b), *clips)      # fresh weights: the resume loads them
    second = run_style_training(cfg_b, resume_from=first.last_checkpoint, cpu=True, task=task_c)
    assert second.status == "done" and second.step == 6
    for (name, a), (_, c) in zip(task_a.model.state_dict().items(), task_c.model.state_dict().items()):
        assert torch.equal(a, c), name


def test_style_clips_are_cached_and_read_back_the_same(trained, tiny_corpus, monkeypatch):
    cfg, task, *_ = trained
    cache_files = list((tiny_corpus / "cache" / "style-mels").glob("train-*.safetensors"))
    assert len(cache_files) == 1     # written by the StyleTask the fixture built
    import ira.data.style_mels as style_mels

    def no_audio(*args, **kwargs):
        raise AssertionError("the audio was read again instead of the cached mels")
    monkeypatch.setattr(style_mels, "load_audio", no_audio)
    again = load_style_clips(cfg, "train")
    assert [c.id for c in again] == [c.id for c in task.train_clips]
    assert all(torch.equal(a.mel, b.mel) for a, b in zip(again, task.train_clips))
