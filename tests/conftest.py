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
