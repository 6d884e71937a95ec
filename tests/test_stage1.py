"""Stage 1 end to end on a tiny corpus: training, samples, checkpoints that rebuild every part, resume."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ira.config import load_config
from ira.data.dummy import create_dummy_corpus
from ira.data.token_cache import TokenSplit
from ira.eval import asr
from ira.training.checkpoint import (CheckpointError, check_compatible, load_checkpoint, read_metadata,
                                     train_state_path)
from ira.models.hub import codec_from_checkpoint, speech_lm_from_checkpoint, tokenizer_from_checkpoint
from ira.training.metrics_log import read_metrics
from ira.training.stage1 import run_stage1, unigram_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
TINY = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=3",
        "codec.mel_griffin_lim_iters=4", "speech_lm.d_model=64", "speech_lm.n_layers=2", "speech_lm.n_heads=2",
        "speech_lm.style_dim=16", "training.batch_size=4", "training.learning_rate=3e-3", "training.warmup_steps=2",
        "data.val_fraction=0.2", "training.num_samples=2", "training.mixed_precision=no",
        "training.val_asr_sentences=0",
        "training.max_minutes=null"]   # no clock in the learning rate: exact resume compares bit for bit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    create_dummy_corpus(root / "data", num_clips=12, seed=0)
    return root / "data"


def _cfg(corpus, out, *extra):
    style = ["style.embed_dim=16"] if "style" in load_config("cpu").to_dict() else []
    return load_config("cpu", TINY + style + [f"data.dir={corpus}", f"training.output_dir={out}", *extra])


def test_trains_writes_samples_and_a_self_describing_checkpoint(tmp_path, corpus):
    cfg = _cfg(corpus, tmp_path / "run", "training.max_steps=24", "training.eval_every=12",
               *(["training.val_asr_sentences=2"] if asr.is_available() else []))
    result = run_stage1(cfg, cpu=True)
    assert result.status == "done" and result.step == 24
    rows = read_metrics(result.metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3            # it learns
    val = [r for r in rows if r.get("split") == "val"]
    assert {"val_loss", "val_unigram_ce", "val_ce_cb0", "val_ce_cb1"} <= set(val[-1])
    samples = [r for r in rows if r.get("event") == "samples"]
    assert samples and all(Path(p).is_file() for p in samples[-1]["paths"])
    if asr.is_available():   # the validation sentences spoken and heard by the offline ASR, logged
        assert all(0.0 <= r["val_wer"] for r in val)
        heard = Path(samples[-1]["dir"]) / "heard.jsonl"
        assert len(heard.read_text().splitlines()) == 2
    best = min(val, key=lambda r: r["val_loss"])["step"]   # the exact val CE picks the best, never val_wer
    assert "best_val_loss" in val[-1] and "best_val_wer" not in val[-1]
    assert load_checkpoint(tmp_path / "run" / "stage1_best.safetensors").step == best

    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.stage == "1" and set(ckpt.modules) == {"speech_lm", "codec"}
    model = speech_lm_from_checkpoint(ckpt)                      # shapes from metadata alone
    codec = codec_from_checkpoint(ckpt)                          # the fitted MelCodec travels with it
    tokenizer = tokenizer_from_checkpoint(ckpt)
    codes = model.generate(texts=["hello there"], tokenizer=tokenizer, max_frames=40, seed=0)[0]
    assert codes.shape[0] == 2 and codes.max() < 16
    if codes.shape[1]:
        assert codec.decode(codes).abs().max() > 0


@pytest.mark.parametrize("text_attention,frames_per_step", [("causal", 1), ("bidirectional", 1),
                                                             ("bidirectional", 2)])
def test_resume_equals_uninterrupted(tmp_path, corpus, text_attention, frames_per_step):
    """A run resumed from its step-4 checkpoint (as after a crash) ends exactly where the full run ends."""
    args = ("training.max_steps=8", "training.eval_every=100", "training.save_every=4", "training.num_samples=0",
            f"speech_lm.text_attention={text_attention}", f"speech_lm.frames_per_step={frames_per_step}")
    full = run_stage1(_cfg(corpus, tmp_path / "full", *args), cpu=True)
    step4 = next(p for p in sorted((tmp_path / "full").glob("stage1_*.safetensors"))
                 if read_metadata(p)["step"] == "4")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for path in (step4, train_state_path(step4)):
        shutil.copy(path, crashed / path.name)
    resumed = run_stage1(_cfg(corpus, crashed, *args), resume_from=crashed / step4.name, cpu=True)
    assert resumed.step == 8
    a = load_checkpoint(full.last_checkpoint).state_dict("speech_lm")
    b = load_checkpoint(resumed.last_checkpoint).state_dict("speech_lm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_model = speech_lm_from_checkpoint(resumed.last_checkpoint)
    assert (resumed_model.cfg.text_attention, resumed_model.frames_per_step) == (text_attention, frames_per_step)


def test_other_codec_or_stage_is_refused(tmp_path, corpus):
    result = run_stage1(_cfg(corpus, tmp_path / "run", "training.max_steps=2", "training.num_samples=0"), cpu=True)
    ckpt = load_checkpoint(result.last_checkpoint)
    with pytest.raises(CheckpointError, match="codec"):
        check_compatible(ckpt, codec_fingerprint="encodec-24khz-6kbps-d7cc33bc")
    other = _cfg(corpus, tmp_path / "run", "training.max_steps=4", "speech_lm.d_model=32")
    with pytest.raises(CheckpointError, match="shape"):
        run_stage1(other, resume_from=result.last_checkpoint, cpu=True)


def test_unigram_baseline_matches_entropy():
    codes = torch.tensor([[0, 1, 2, 3] * 50], dtype=torch.int16)
    split = TokenSplit(codes, torch.tensor([0, 200]), ["a"], ["t"], [[]], "f", "h")
    ce = unigram_cross_entropy(split, split, codebook_size=4)[0]
    assert ce == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-3)


def test_main_py_reports_config_typos(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--stage", "1", "--config", "cpu",
                           "--set", "training.lerning_rate=0.1"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "training.lerning_rate" in proc.stderr and "learning_rate" in proc.stderr
