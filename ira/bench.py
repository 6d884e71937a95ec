"""Benchmarks that print figures (never timed tests): `ira bench generate|pipeline [--json FILE]`.

Real-time factor (RTF) = seconds of compute per second of audio produced; below 1 is faster than
real time. Models are randomly initialised at the preset's size: speed does not depend on the
weights, and EOS is disabled (min_frames) so every run produces exactly the same number of frames.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ira.config import preset_config
from ira.models.speech_lm import SpeechLM
from ira.text_tokenizer import CharTokenizer

FRAME_RATE = 75.0
TEN_WORDS = "The quick brown fox jumps over the lazy dog again today."
BENCH_VOCABULARY = 5300
"""LLM token ids an untrained "vocabulary" adapter reads (the synthetic 20,000-sentence corpus has ~5,300)."""


def machine() -> dict[str, str | int]:
    """What the figures were measured on."""
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_threads": torch.get_num_threads()}


def codec_shape(preset: str) -> tuple[int, int]:
    """(n_codebooks, codebook_size) the preset trains with: MelCodec for cpu, EnCodec 6 kbps otherwise."""
    cfg = preset_config(preset)
    if cfg.codec.name == "mel":
        return cfg.codec.mel_n_codebooks, cfg.codec.mel_codebook_size
    return {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}[cfg.codec.bandwidth], 1024


def build_model(preset: str, seed: int = 0, overrides: list[str] | None = None) -> tuple[SpeechLM, CharTokenizer]:
    torch.manual_seed(seed)
    cfg = preset_config(preset, overrides)
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
    """Every generation figure per preset size: the fast paths and their gains, time to first audio
    (fp32 and int8), and batch throughput; keys like `laptop.rtf_int8_kv_cache`."""
    results: dict[str, float | str] = {**machine(), "frames": frames}
    for preset in presets:
        results.update(bench_generation_paths(preset, frames=frames, repeats=repeats))
        results.update(bench_time_to_first_audio(preset))
        results.update(bench_time_to_first_audio(preset, int8=True))
        results.update(bench_batch_throughput(preset))
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


# --- the pipeline's latency breakdown ---------------------------------------------------------------

def untrained_codec(preset: str) -> Any:
    """The preset's codec with random parameters: the same compute as the trained one, no data needed."""
    from ira.codec.encodec_codec import EncodecCodec
    from ira.codec.mel import MelCodec

    cfg = preset_config(preset).codec
    if cfg.name != "mel":
        return EncodecCodec.untrained(cfg.bandwidth)
    g = torch.Generator().manual_seed(0)
    books = torch.randn(cfg.mel_n_codebooks, cfg.mel_codebook_size, cfg.mel_n_mels, generator=g) * 0.3
    return MelCodec(books, torch.zeros(cfg.mel_n_mels), torch.ones(cfg.mel_n_mels), cfg.mel_griffin_lim_iters)


def bench_pipeline(presets: list[str], llm: Any, seconds: float = 4.0, max_new_tokens: int = 32
                   ) -> dict[str, float | str]:
    """Latency of each step of `end_to_end_pipeline` for a 10-word sentence at each preset's model size.

    The SpeechLM, codec and adapter are randomly initialised at the preset's size (speed does not
    depend on the weights) and speak exactly `seconds` of audio (~10 words); the LLM is the real one.
    Keys like `laptop.speak_s`, `laptop.llm_tokens_per_s`.
    """
    from ira.inference import RESPOND_PROMPT
    from ira.listener import Listener
    from ira.models.adapter import PerceiverAdapter
    from ira.models.vocabulary_reader import VocabularyReader

    results: dict[str, float | str] = {**machine(), "llm": llm.name,
                                       "llm_dtype": str(llm.dtype).replace("torch.", ""), "text": TEN_WORDS}
    for preset in presets:
        model, tokenizer = build_model(preset)
        codec = untrained_codec(preset)
        torch.manual_seed(0)
        adapter_cfg = preset_config(preset).adapter
        reader = None
        if adapter_cfg.output == "vocabulary":  # a reader the size of a 20k-sentence corpus's vocabulary
            reader = VocabularyReader.from_llm_table(llm.model.get_input_embeddings().weight,
                                                     range(BENCH_VOCABULARY), trainable=True)
        adapter = PerceiverAdapter(adapter_cfg, model.cfg.d_model, llm.hidden_size, llm.embed_norm, reader).eval()
        listener = Listener(model, codec, adapter, llm)
        frames = max(1, round(seconds * codec.frame_rate))
        with torch.inference_mode():
            model.generate(texts=[TEN_WORDS], tokenizer=tokenizer, max_frames=4, min_frames=4)   # warm-up
            t0 = time.perf_counter()
            codes = model.generate(texts=[TEN_WORDS], tokenizer=tokenizer, max_frames=frames, min_frames=frames,
                                   temperature=1.0, top_k=50, seed=0)[0]
            t1 = time.perf_counter()
            wav = codec.decode(codes)
            t2 = time.perf_counter()
            vectors = listener.audio_tokens([codes])
            t3 = time.perf_counter()
            reply = listener.answer(vectors, [RESPOND_PROMPT], max_new_tokens=max_new_tokens)[0]
            t4 = time.perf_counter()
        tokens = len(llm.tokenizer.encode(reply, add_special_tokens=False)) if reply else 0
        results.update({f"{preset}.params_m": round(model.num_parameters() / 1e6, 2),
                        f"{preset}.audio_s": round(wav.numel() / codec.sample_rate, 2),
                        f"{preset}.speak_s": round(t1 - t0, 3), f"{preset}.decode_s": round(t2 - t1, 3),
                        f"{preset}.adapter_s": round(t3 - t2, 3), f"{preset}.llm_s": round(t4 - t3, 3),
                        f"{preset}.total_s": round(t4 - t0, 3), f"{preset}.llm_tokens": tokens,
                        f"{preset}.llm_tokens_per_s": round(tokens / max(t4 - t3, 1e-9), 1)})
    return results


def bench_checkpoint(checkpoint: str | Path, llm: Any = None, max_new_tokens: int = 32) -> dict[str, float | str]:
    """`end_to_end_pipeline` on a trained checkpoint, 10-word sentence: its timings as the user sees them."""
    from ira.inference import create_pipeline_from_checkpoints

    pipeline = create_pipeline_from_checkpoints(checkpoint, device="cpu", llm=llm)
    pipeline.end_to_end_pipeline("Hello.", max_new_tokens=2)                       # warm-up
    result = pipeline.end_to_end_pipeline(TEN_WORDS, max_new_tokens=max_new_tokens)
    out: dict[str, float | str] = {"checkpoint": str(checkpoint), "text": TEN_WORDS,
                                   "audio_s": round(result["audio_seconds"], 2),
                                   "llm_tokens": result["llm_tokens"],
                                   "llm_tokens_per_s": round(result["llm_tokens_per_s"], 1)}
    out.update({k: round(v, 3) for k, v in result["timings"].items()})
    out["llm_response"] = result["llm_response"] or result["warning"] or ""
    return out


# --- generation: each fast path's gain, streaming, batches ---------------------------------------

def bench_generation_paths(preset: str, frames: int = 150, repeats: int = 2) -> dict[str, float | str]:
    """Real-time factor of the naive baseline (no cache), the static KV cache, and int8 with the cache,
    with each step's gain as a ratio from this one run; the int8 model's agreement with fp32; and int8
    with the cache through the PyTorch step instead of the compiled one."""
    from ira.models.quantize import quantization_quality, quantize_int8

    model, tokenizer = build_model(preset)
    int8 = quantize_int8(model)
    audio_s = frames / FRAME_RATE
    for m in (model, int8):
        time_generation(m, tokenizer, 8, use_cache=True)                       # warm-up (and compilation)
    naive = time_generation(model, tokenizer, frames, use_cache=False, repeats=1)
    cached = time_generation(model, tokenizer, frames, use_cache=True, repeats=repeats)
    quick = time_generation(int8, tokenizer, frames, use_cache=True, repeats=repeats)
    with mock.patch.dict(os.environ, {"IRA_NUMBA": "0"}):   # the PyTorch step and sampling, to compare
        pytorch_step = time_generation(int8, tokenizer, frames, use_cache=True, repeats=repeats)
    torch.manual_seed(1)
    codes = torch.randint(0, model.codebook_size, (2, model.n_codebooks, 100))
    text_ids, text_mask = tokenizer.batch_encode([TEN_WORDS, TEN_WORDS[:30]])
    quality = quantization_quality(model, int8, codes, None, text_ids, text_mask)
    p = f"{preset}."
    return {p + "params_m": round(model.num_parameters() / 1e6, 2),
            p + "rtf_no_cache": round(naive / audio_s, 4), p + "rtf_kv_cache": round(cached / audio_s, 4),
            p + "rtf_int8_kv_cache": round(quick / audio_s, 4),
            p + "gain_kv_cache": round(naive / cached, 2), p + "gain_int8": round(cached / quick, 2),
            p + "gain_total": round(naive / quick, 2),
            p + "rtf_int8_kv_cache_pytorch_step": round(pytorch_step / audio_s, 4),
            p + "gain_compiled_step": round(pytorch_step / quick, 2),
            p + "int8_token_agreement": round(quality.token_agreement, 4),
            p + "int8_loss_fp32": round(quality.loss_fp32, 4), p + "int8_loss_int8": round(quality.loss_int8, 4)}


def bench_time_to_first_audio(preset: str, chunk_frames: int = 15, int8: bool = False, repeats: int = 3
                              ) -> dict[str, float]:
    """Seconds from the call to the first decoded chunk of streamed speech (best of `repeats`)."""
    from ira.models.quantize import quantize_int8

    model, tokenizer = build_model(preset)
    model = quantize_int8(model) if int8 else model
    codec = untrained_codec(preset)
    best = float("inf")
    with torch.inference_mode():
        for r in range(repeats + 1):                                            # the first is a warm-up
            start = time.perf_counter()
            chunks = model.stream(texts=[TEN_WORDS], tokenizer=tokenizer, chunk_frames=chunk_frames,
                                  max_frames=300, min_frames=300, temperature=1.0, top_k=50, seed=r)
            codec.decode(next(chunks))
            if r:
                best = min(best, time.perf_counter() - start)
            chunks.close()
    tag = "_int8" if int8 else ""
    return {f"{preset}.time_to_first_audio_s{tag}": round(best, 4), f"{preset}.stream_chunk_frames": chunk_frames}


def bench_batch_throughput(preset: str, batches: tuple[int, ...] = (1, 4, 16), frames: int = 75
                           ) -> dict[str, float]:
    """Audio seconds generated per compute second at each batch size (KV cache, fp32)."""
    model, tokenizer = build_model(preset)
    time_generation(model, tokenizer, 4, use_cache=True)
    out: dict[str, float] = {}
    for batch in batches:
        seconds = time_generation(model, tokenizer, frames, use_cache=True, batch=batch)
        out[f"{preset}.batch{batch}_audio_s_per_s"] = round(batch * frames / FRAME_RATE / seconds, 2)
    return out


# --- training throughput and the token cache -----------------------------------------------------

def bench_training(preset: str, batch: int = 8, frames: int = 300, steps: int = 3) -> dict[str, float]:
    """Stage-1 training steps (forward, backward, AdamW) on random codes: frames per second, peak memory,
    and the gain of the token cache (training from cached tokens vs encoding the audio at every step). The peak
    resident memory is this benchmark's own where the system can reset it (Linux), else the process's."""
    from ira import peak_memory
    from ira.training.optim import build_adamw

    peak_memory.reset()

    model, tokenizer = build_model(preset)
    model.train()
    optimizer = build_adamw([{"params": list(model.parameters())}], 1e-4, "cpu")
    torch.manual_seed(0)
    codes = torch.randint(0, model.codebook_size, (batch, model.n_codebooks, frames))
    text_ids, text_mask = tokenizer.batch_encode([TEN_WORDS] * batch)
    codec = untrained_codec(preset)
    wavs = [torch.randn(int(frames / FRAME_RATE * codec.sample_rate)) * 0.1 for _ in range(batch)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(text_ids, text_mask, None, codes, None).loss.backward()
        optimizer.step()

    step()                                                                      # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    with torch.inference_mode():
        for wav in wavs:
            codec.encode(wav, codec.sample_rate)
    encode_s = time.perf_counter() - start
    p = f"{preset}."
    out = {p + "train_frames_per_s": round(batch * frames / step_s, 1), p + "train_step_s": round(step_s, 3),
           p + "token_cache_gain": round((step_s + encode_s) / step_s, 2),
           p + "train_peak_rss_mb": round(peak_memory.peak_mb(), 1)}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def bench_training_variants(preset: str, variants: list[list[str]], batch: int = 8, frames: int = 300,
                            steps: int = 3, rounds: int = 3, gen_frames: int = 150) -> dict[str, float | str]:
    """Stage-1 training frames per second and generation's real-time factor of the preset and of each variant
    (a list of `--set` overrides, e.g. ["speech_lm.frames_per_step=2"]), measured in turns within one process:
    round after round every model runs `steps` steps, and each keeps its best round, so a machine whose speed
    drifts (shared cores) slows them alike. Ratios are against the preset as it is."""
    from ira.training.optim import build_adamw

    labels = ["preset"] + [",".join(v) for v in variants]
    runs = []
    for overrides in [[]] + variants:
        model, tokenizer = build_model(preset, overrides=overrides)
        model.train()
        optimizer = build_adamw([{"params": list(model.parameters())}], 1e-4, "cpu")
        runs.append((model, tokenizer, optimizer))
    torch.manual_seed(0)
    codes = torch.randint(0, runs[0][0].codebook_size, (batch, runs[0][0].n_codebooks, frames))
    text_ids, text_mask = runs[0][1].batch_encode([TEN_WORDS] * batch)

    def train(model: SpeechLM, optimizer: Any) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            model(text_ids, text_mask, None, codes, None).loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    for model, _, optimizer in runs:                                            # warm-up
        train(model, optimizer)
    step_s = [float("inf")] * len(runs)
    gen_s = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (model, tokenizer, optimizer) in enumerate(runs):
            step_s[i] = min(step_s[i], train(model, optimizer))
            model.eval()
            gen_s[i] = min(gen_s[i], time_generation(model, tokenizer, gen_frames, use_cache=True))
            model.train()
    out: dict[str, float | str] = {**machine(), "torch": torch.__version__, "batch": batch, "frames": frames}
    for label, s, g in zip(labels, step_s, gen_s):
        p = f"{preset}[{label}]."
        out[p + "train_frames_per_s"] = round(batch * frames / s, 1)
        out[p + "train_step_s"] = round(s, 3)
        out[p + "train_speedup"] = round(step_s[0] / s, 2)
        out[p + "generate_rtf"] = round(g / (gen_frames / FRAME_RATE), 3)
    return out


def bench_all(presets: list[str], llm: Any, frames: int = 150) -> dict[str, float | str]:
    """Every figure of `ira bench`: generation paths, streaming, batches, training, end to end."""
    results: dict[str, float | str] = {**machine(), "torch": torch.__version__, "frames": frames}
    results.update({k: v for k, v in bench_generate(presets, frames=frames).items() if "." in k})
    for preset in presets:
        results.update(bench_training(preset))
    pipeline = bench_pipeline(presets, llm)
    results.update({k: v for k, v in pipeline.items() if "." in k})
    results["llm"] = pipeline["llm"]
    return results
