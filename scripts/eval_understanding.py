"""Does the LLM hear what was said? "Repeat" from audio alone, scored by CER on held-out clips.

    python scripts/eval_understanding.py --checkpoint runs/x/stage2_latest.safetensors [--clips 32]
    python scripts/eval_understanding.py --checkpoint runs/x/stage1_latest.safetensors --random-adapter

With a stage-2 checkpoint its trained adapter is used; `--random-adapter` (with a stage-1 checkpoint)
puts a freshly initialised adapter in its place: the "before stage 2" figure. The clips are the
validation split of the corpus the checkpoint was trained on (its token cache), which stage 2 never
trains on. Prints the corpus CER, a few examples, and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ira.data.prepare import ensure_prepared
from ira.data.token_cache import load_split
from ira.listener import Listener, adapter_from_checkpoint, feature_speech_lm_from_checkpoint
from ira.models.adapter import PerceiverAdapter
from ira.models.llm import load_llm
from ira.text_metrics import character_error_rate, corpus_cer
from ira.training.checkpoint import load_checkpoint, require_stage
from ira.training.components import codec_from_checkpoint
from ira.training.teacher_responses import TASK_INSTRUCTIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--random-adapter", action="store_true", help="an untrained adapter (seed 0)")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    ckpt = require_stage(load_checkpoint(args.checkpoint), ("1", "2", "3"), purpose="evaluation")
    cfg = ckpt.ira_config()
    llm = load_llm(cfg.llm)
    speech_lm = feature_speech_lm_from_checkpoint(ckpt)
    if args.random_adapter:
        torch.manual_seed(0)
        adapter = PerceiverAdapter(cfg.adapter, speech_lm.cfg.d_model, llm.hidden_size, llm.embed_norm).eval()
    else:
        adapter = adapter_from_checkpoint(ckpt)
    listener = Listener(speech_lm, codec_from_checkpoint(ckpt, cfg), adapter, llm, ckpt.path)

    prepared = ensure_prepared(cfg)
    val = load_split(prepared.cache_files["val"], listener.codec.fingerprint)
    n = min(args.clips, len(val))
    prompt = TASK_INSTRUCTIONS["repeat"]
    rows, start = [], time.perf_counter()
    for i in range(0, n, args.batch_size):
        chunk = list(range(i, min(n, i + args.batch_size)))
        codes = [val.clip_codes(j)[:, : speech_lm.cfg.max_audio_frames] for j in chunk]
        replies = listener.understand_codes(codes, [prompt] * len(chunk), args.max_new_tokens)
        for j, reply in zip(chunk, replies):
            rows.append({"id": val.ids[j], "transcript": val.texts[j], "reply": reply,
                         "cer": character_error_rate(val.texts[j], reply)})
    seconds = time.perf_counter() - start
    cer = corpus_cer([r["transcript"] for r in rows], [r["reply"] for r in rows])
    label = "random adapter" if args.random_adapter else f"stage {ckpt.stage} adapter"
    print(f"{label}: CER {cer:.3f} on {len(rows)} held-out clips ({seconds:.1f} s, {llm.name})")
    for row in rows[:5]:
        print(f"  [{row['cer']:.2f}] said: {row['transcript']!r}\n         heard: {row['reply']!r}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": str(ckpt.path), "adapter": label, "cer": cer, "clips": rows,
                       "seconds": seconds}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
