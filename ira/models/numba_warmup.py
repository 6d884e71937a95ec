"""Compile the numba CPU generation kernels once, so that no user's first generation waits for them.

numba caches compiled code on disk beside the sources (about 10 s to compile here, 0.5 s to load). This
runs each kernel once for every argument type that generation uses -- fp32 and int8 weights, with and
without an attention mask, top-k sampling, and each preset's layer count (the step takes the layers'
weights as tuples, whose length is part of the type) -- on tiny randomly initialised models.
scripts/setup.sh runs it after installing; `python -m ira.models.numba_warmup` does it by hand. A
model with another layer count compiles once, at its first generation.
"""

from __future__ import annotations

import time

import torch

from ira.config import PRESETS, SpeechLMConfig, preset_config
from ira.models.quantize import quantize_int8
from ira.models.speech_lm import SpeechLM
from ira.text_tokenizer import CharTokenizer


def warm_up() -> float:
    """Generate a few frames with each compiled path; returns the seconds it took."""
    start = time.perf_counter()
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    for n_layers in sorted({preset_config(name).speech_lm.n_layers for name in PRESETS}):
        cfg = SpeechLMConfig(d_model=64, n_layers=n_layers, n_heads=2, dropout=0.0, max_text_tokens=32,
                             max_audio_frames=8)
        model = SpeechLM(cfg, 2, 16, tokenizer.vocab_size).eval()
        with torch.inference_mode():
            for m in (model, quantize_int8(model)):
                # two texts of different lengths: a left-padded prefix, so the masked attention runs too
                for texts in (["warm up"], ["warm up", "the kernels"]):
                    m.generate(texts=texts, tokenizer=tokenizer, max_frames=3, top_k=4, seed=0)
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"[setup] CPU generation kernels compiled (or loaded from numba's cache) in {warm_up():.1f} s")
