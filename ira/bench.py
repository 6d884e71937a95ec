"""Benchmarks that print figures (never timed tests): `ira bench generate [--json FILE]`.

Real-time factor (RTF) = seconds of compute per second of audio produced; below 1 is faster than
real time. Models are randomly initialised at the preset's size: speed does not depend on the
weights, and EOS is disabled (min_frames) so every run produces exactly the same number of frames.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from ira.config import preset_config
from ira.models.speech_lm import SpeechLM
from ira.text_tokenizer import CharTokenizer

FRAME_RATE = 75.0
TEN_WORDS = "The quick brown fox jumps over the lazy dog again today."


def codec_shape(preset: str) -> tuple[int, int]:
    """(n_codebooks, codebook_size) the preset trains with: MelCodec for cpu, EnCodec 6 kbps otherwise."""
    cfg = preset_config(preset)
    if cfg.codec.name == "mel":
        return cfg.codec.mel_n_codebooks, cfg.codec.mel_codebook_size
    return {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}[cfg.codec.bandwidth], 1024


def build_model(preset: str, seed: int = 0) -> tuple[SpeechLM, CharTokenizer]:
    torch.manual_seed(seed)
    cfg = preset_config(preset)
    tokenizer = CharTokenizer()
    n_codebooks, codebook_size = codec_shape(preset)
    model = SpeechLM(cfg.speech_lm, n_codebooks, codebook_size, tokenizer.vocab_size).eval()
    return model, tokenizer


def time_generation(model: SpeechLM, tokenizer: CharTokenizer, frames: int, use_cache: bool,
                    batch: int = 1, repeats: int = 1) -> float:
    """Best-of-`repeats` wall time to generate `frames` frames for `batch` texts."""
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(texts=[TEN_WORDS] * batch, tokenizer=tokenizer, max_frames=frames, min_frames=frames,
                           temperature=1.0, top_k=50, seed=r, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return best


def bench_generate(presets: list[str], frames: int = 150, repeats: int = 2) -> dict[str, float | str]:
    """RTF with and without the KV cache for each preset's model size; keys like `laptop.rtf_kv_cache`."""
    results: dict[str, float | str] = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                       "torch_threads": torch.get_num_threads(), "frames": frames}
    audio_s = frames / FRAME_RATE
    for preset in presets:
        model, tokenizer = build_model(preset)
        time_generation(model, tokenizer, 8, use_cache=True)        # warm-up (allocations, kernels)
        cached = time_generation(model, tokenizer, frames, use_cache=True, repeats=repeats)
        naive = time_generation(model, tokenizer, frames, use_cache=False, repeats=1)
        results[f"{preset}.params_m"] = round(model.num_parameters() / 1e6, 2)
        results[f"{preset}.rtf_kv_cache"] = round(cached / audio_s, 4)
        results[f"{preset}.rtf_no_cache"] = round(naive / audio_s, 4)
        results[f"{preset}.kv_cache_speedup"] = round(naive / cached, 2)
    return results


def print_and_save(results: dict, json_path: str | Path | None) -> None:
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {path}")
