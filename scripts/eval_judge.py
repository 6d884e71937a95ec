"""What does the judge think of a checkpoint's speech? Stage 3's validation, on its own.

    python scripts/eval_judge.py --checkpoint runs/x/stage2_latest.safetensors   # before PPO
    python scripts/eval_judge.py --checkpoint runs/x/stage3_latest.safetensors   # after

Speaks the first `--texts` held-out texts of the checkpoint's corpus (each with a voice description)
and prints the judge's semantic reward (the LLM's mean log-likelihood per token of the text, from the
audio), the style reward, the KL to the reference (stage-2) SpeechLM, and the proxies that would
reveal a reward hack: the reference's log-likelihood per frame of the samples, the judge's CER when it
repeats what it heard, the seconds spoken per character, and (with `ira[eval]`) the offline ASR's WER and
CER of the samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from ira.checkpoint import load_checkpoint, require_stage
from ira.training.stage3 import Stage3Task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a stage 2 or 3 checkpoint")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="speak every text with this many seeds (seed, seed+1, ...) and average: one sample "
                             "per text is a noisy figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    ckpt = require_stage(load_checkpoint(args.checkpoint), ("2", "3"), purpose="judging")
    cfg = ckpt.ira_config()
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, eval_texts=args.texts),
                              training=dataclasses.replace(cfg.training, seed=args.seed))
    task = Stage3Task(cfg, ckpt, cpu=True)
    loader = task.val_dataloader()
    if loader is None:
        print(f"{cfg.data.dir} has no validation clips", file=sys.stderr)
        return 1
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        task.cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))
        with torch.inference_mode():
            runs.append(task.validate(loader))
    metrics = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    print(f"{args.checkpoint} (stage {ckpt.stage}), {args.texts} held-out texts x {args.seeds} seed(s):")
    for key, value in metrics.items():
        spread = (f"  (seeds: {', '.join(f'{run[key]:.3f}' for run in runs)})" if len(runs) > 1 else "")
        print(f"  {key[4:]:>24}: {value:.4f}{spread}")
    for row in getattr(task, "_last_heard", [])[:3]:
        print(f"  said {row['text']!r}\n  judge heard {row['heard']!r}")
        if "asr" in row:
            print(f"  ASR heard {row['asr']!r}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": args.checkpoint, "texts": args.texts, "seeds": args.seeds, **metrics,
                       "per_seed": runs}, handle, indent=2)
    return 0


if __name__ == "__main__":
    from ira.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main))
