"""Shared test setup: offline, seeded, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention (several times faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bundled_llm():
    """The bundled SmolLM2-135M-Instruct GGUF, loaded once per test session (~20 s on 2 CPU cores)."""
    from ira.config import LLMConfig
    from ira.models.llm import load_llm

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_llm(LLMConfig(name="bundled", quantization="none", dtype="fp32"), device="cpu")
    finally:
        torch.set_num_threads(before)


TINY_STAGES = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=3",
               "codec.mel_griffin_lim_iters=4", "speech_lm.d_model=32", "speech_lm.n_layers=1", "speech_lm.n_heads=2",
               "speech_lm.style_dim=16", "style.embed_dim=16", "training.batch_size=4", "training.warmup_steps=1",
               "data.val_fraction=0.25", "training.num_samples=1", "training.mixed_precision=no",
               "adapter.dim=32", "adapter.n_latents=24", "adapter.n_layers=1", "adapter.n_heads=2",
               "adapter.feature_layer=1", "adapter.frame_stack=2", "adapter.encoder_layers=1", "adapter.window=1.5",
               "align.ctc_steps=1", "align.ctc_weight=0.5", "align.phoneme_ctc_weight=1.0", "align.llm_batch_size=2",
               "align.tasks=repeat,summarise,question",
               "align.batch_size=3", "align.max_steps=2", "align.warmup_steps=1", "align.teacher_max_new_tokens=6",
               "align.eval_clips=2", "llm.max_new_tokens=6", "llm.dtype=fp32", "llm.quantization=none",
               "training.eval_every=2", "training.val_asr_sentences=0"]
"""A tiny model of every stage (seconds per run on a CPU) with the real bundled LLM."""


@pytest.fixture(scope="session")
def tiny_stage2(tmp_path_factory, bundled_llm):
    """(root, config of the stage-2 run, stage-1 FitResult, stage-2 FitResult, LLM parameter sums before
    stage 2) for a tiny corpus of 8 clips: shared by the stage 2, stage 3 and inference tests."""
    from ira.config import load_config
    from ira.data.dummy import create_dummy_corpus
    from ira.training.stage1 import run_stage1
    from ira.training.stage2 import run_stage2

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("stages")
        create_dummy_corpus(root / "data", num_clips=8, seed=0)
        base = TINY_STAGES + [f"data.dir={root / 'data'}"]
        stage1 = run_stage1(load_config("cpu", base + ["training.max_steps=2", f"training.output_dir={root / 's1'}"]),
                            cpu=True)
        assert stage1.ok, stage1.message
        llm_before = {name: p.detach().double().sum().item() for name, p in bundled_llm.model.named_parameters()}
        cfg2 = load_config("cpu", base + [f"training.output_dir={root / 's2'}"])
        stage2 = run_stage2(cfg2, resume_from=stage1.last_checkpoint, cpu=True, llm=bundled_llm)
        assert stage2.ok, stage2.message
        return root, cfg2, stage1, stage2, llm_before
    finally:
        torch.set_num_threads(before)


TINY_PPO = ["ppo.batch_size=2", "ppo.minibatch_size=1", "ppo.ppo_epochs=2", "ppo.learning_rate=1e-3", "ppo.eval_texts=2",
            "ppo.warmup_steps=0", "training.log_every=1", "training.save_every=2", "training.eval_every=4",
            "ppo.eval_every=4", "llm.max_new_tokens=4",
            "ppo.advantage=gae"]   # the value head's path; the group advantage (the cpu preset's) has its own tests


def tiny_stage3_config(tiny_stage2, out, *extra):
    """The tiny stage-2 run's config with PPO settings for a few-second stage 3, writing to `out`."""
    from ira.config import load_config

    cfg2 = tiny_stage2[1]
    flat = [f"{section}.{key}={value}" for section, values in cfg2.to_dict().items() if isinstance(values, dict)
            for key, value in values.items() if value is not None]
    return load_config("cpu", flat + TINY_PPO + [f"training.output_dir={out}", *extra])


@pytest.fixture(scope="session")
def tiny_stage3(tiny_stage2, bundled_llm, tmp_path_factory):
    """FitResult of 4 PPO steps from the tiny stage-2 checkpoint: shared by the stage 3 and inference tests."""
    from ira.training.stage3 import run_stage3

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("s3") / "full"
        result = run_stage3(tiny_stage3_config(tiny_stage2, out, "ppo.max_steps=4"), tiny_stage2[3].last_checkpoint,
                            cpu=True, llm=bundled_llm)
        assert result.ok, result.message
        return result
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for an app launched in a test."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_APP = ["codec.mel_codebook_size=16", "codec.mel_kmeans_iters=2", "codec.mel_n_codebooks=2",
            "speech_lm.d_model=32", "speech_lm.n_layers=1", "speech_lm.n_heads=2", "training.log_every=1",
            "training.warmup_steps=1", "training.val_asr_sentences=0"]
"""App overrides: a tiny codec and model, so that the app builds a corpus and trains stage 1 in seconds."""


TINY_STYLE = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=2",
              "speech_lm.style_dim=16", "style.embed_dim=16", "style.audio_dim=16", "style.audio_layers=1",
              "style.audio_heads=2", "style.text_hidden=0", "style.batch_size=4", "style.max_steps=2",
              "style.warmup_steps=1", "training.eval_every=1000", "training.save_every=1000",
              "training.mixed_precision=no"]
"""A style encoder trained for two steps: seconds on a CPU."""
