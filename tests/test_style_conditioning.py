"""Stage 1 started from a style checkpoint: the SpeechLM reads descriptions and reference clips."""

import pytest
import torch

from ira.config import load_config
from ira.data.dummy import create_dummy_corpus
from ira.speaker import SamplingSettings, Speaker
from ira.training.checkpoint import load_checkpoint
from ira.training.stage1 import run_stage1
from ira.training.stage_style import run_style_training

TINY = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=3",
        "codec.mel_griffin_lim_iters=4", "speech_lm.d_model=64", "speech_lm.n_layers=2", "speech_lm.n_heads=2",
        "speech_lm.style_dim=16", "style.embed_dim=16", "style.audio_dim=32", "style.audio_layers=1",
        "style.batch_size=8", "style.max_steps=3", "style.warmup_steps=1", "training.batch_size=4",
        "training.warmup_steps=1", "data.val_fraction=0.2", "training.num_samples=1", "training.mixed_precision=no"]


@pytest.fixture(scope="module")
def styled_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("styled")
    create_dummy_corpus(root / "data", num_clips=12, seed=0)
    base = [f"data.dir={root / 'data'}", "training.max_steps=4", "training.eval_every=4"]
    style = run_style_training(load_config("cpu", TINY + base + [f"training.output_dir={root / 'style'}"]), cpu=True)
    assert style.ok and style.last_checkpoint
    stage1 = run_stage1(load_config("cpu", TINY + base + [f"training.output_dir={root / 's1'}"]),
                        resume_from=style.last_checkpoint, cpu=True)
    assert stage1.ok
    return stage1.last_checkpoint, root


def test_checkpoint_holds_the_frozen_style_encoder(styled_checkpoint):
    path, root = styled_checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt.stage == "1" and {"speech_lm", "codec", "style"} <= set(ckpt.modules)
    style_ckpt = load_checkpoint(next((root / "style").glob("stagestyle_latest.safetensors")))
    for key, tensor in style_ckpt.state_dict("style").items():        # frozen: bit-identical
        assert torch.equal(tensor, ckpt.state_dict("style")[key]), key


def test_descriptions_unseen_empty_and_reference(styled_checkpoint):
    path, root = styled_checkpoint
    speaker = Speaker.from_checkpoint(path, device="cpu")
    settings = SamplingSettings(seed=0, max_seconds=0.5)
    high = speaker.style_vector("a high-pitched voice")
    low = speaker.style_vector("a low, deep voice")
    assert high.shape == (1, 16) and not torch.allclose(high, low)
    assert speaker.style_vector("a whispery old man") is not None        # never seen in training
    assert speaker.style_vector("   ") is None                            # empty -> no style, no error
    for style in ("a whispery old man", "", None):
        result = speaker.speak("hello there", style=style, settings=settings)
        assert result.codes.shape[0] == 2 and result.sample_rate == 24000
    reference = next((root / "data" / "wavs").glob("*.wav"))
    assert speaker.speak("hello there", reference=reference, settings=settings).codes.shape[0] == 2
    with pytest.raises(ValueError, match="empty"):
        speaker.speak("  ", settings=settings)


def test_the_style_table_is_computed_once_per_encoder_and_corpus(styled_checkpoint, monkeypatch, tmp_path):
    """The run of the fixture kept its tables; a second start reads them back instead of embedding every
    description and clip again, and another encoder's weights never read them."""
    from ira.data.prepare import ensure_prepared
    from ira.data.style_mels import MelSettings, split_mels
    from ira.data.token_cache import load_split
    from ira.models.hub import style_encoder_from_checkpoint
    from ira.training.style_table import StyleTable

    path, root = styled_checkpoint
    kept = sorted((root / "data" / "cache" / "style-table").glob("*.safetensors"))
    assert [p.name.split("-")[0] for p in kept] == ["train", "val"]
    encoder = style_encoder_from_checkpoint(load_checkpoint(path))
    cfg = load_checkpoint(path).ira_config()
    prepared = ensure_prepared(cfg)
    split = load_split(prepared.cache_files["train"], prepared.codec.fingerprint)
    trim_db = cfg.data.trim_silence_db
    mels = split_mels(root / "data", "train", split, prepared.codec, MelSettings.of(encoder.cfg, trim_db)).mels
    fresh = StyleTable.compute(encoder, split, mels)
    calls: list = []
    monkeypatch.setattr(StyleTable, "compute", classmethod(lambda cls, *a: calls.append(a) or fresh))
    read = StyleTable.cached(encoder, split, "train", root / "data", prepared.codec, trim_db)
    assert not calls and torch.equal(read.text, fresh.text) and torch.equal(read.audio, fresh.audio)
    with torch.no_grad():
        next(encoder.parameters()).add_(0.1)       # another encoder: not the kept table (kept elsewhere: the
    StyleTable.cached(encoder, split, "train", tmp_path, prepared.codec, trim_db)   # fixture's stays)
    assert len(calls) == 1
