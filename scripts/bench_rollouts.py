"""Stage 3's rollout speed with and without the ASR term of the reward, measured side by side.

    python scripts/bench_rollouts.py --checkpoint runs/full/stage2/stage2_best.safetensors [--iterations 3]

Builds stage 3 from a stage-2 (or 3) checkpoint with the preset's PPO settings (or `--set`), then alternates
PPO rollouts (speak a batch of training texts, judge it, estimate the advantages) with the reward's ASR on and
off, the same prompts each time, and prints rollouts per second for both: the cost of hearing each sample
(decoding it, and the reward ASR's batched transcription), on this machine, in one run. The first rollout
of each kind is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from ira.checkpoint import load_checkpoint, require_stage
    from ira.config import load_config
    from ira.training.stage3 import Stage3Task
    from ira.training.task import inherit_frozen_sections

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a stage 2 or 3 checkpoint")
    parser.add_argument("--config", default="cpu", help="the preset (or YAML file) whose ppo section is timed")
    parser.add_argument("--iterations", type=int, default=3, help="timed rollouts of each kind (after a warm-up)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.iterations < 1:
        print(f"--iterations must be >= 1 (got {args.iterations})", file=sys.stderr)
        return 2

    source = require_stage(load_checkpoint(args.checkpoint), ("2", "3"), purpose="stage 3's rollouts")
    cfg = load_config(args.config, [f"data.dir={source.ira_config().data.dir}", *args.overrides])
    cfg = inherit_frozen_sections(cfg, source, ("speech_lm", "style", "adapter")).with_training_from("ppo")
    if cfg.ppo.asr_weight <= 0:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, asr_weight=1.0))
    with_asr = Stage3Task(cfg, source, cpu=True)
    without = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, asr_weight=0.0))
    batch = next(iter(with_asr.train_dataloader()))
    rates: dict[str, list[float]] = {"with the ASR term": [], "without": []}
    seconds_audio = []
    for i in range(args.iterations + 1):
        for name, config in (("with the ASR term", cfg), ("without", without)):
            with_asr.cfg = config
            start = time.perf_counter()
            with torch.no_grad():
                with_asr.rollout(batch)
            elapsed = time.perf_counter() - start
            if i:   # the first of each kind warms up (the ASR's first load, caches)
                rates[name].append(cfg.ppo.batch_size / elapsed)
                seconds_audio.append(with_asr.rollout_metrics["rollout_seconds_audio"])
    summary = {name: statistics.mean(values) for name, values in rates.items()}
    print(f"{args.checkpoint}: {cfg.ppo.batch_size} rollouts per iteration ({cfg.ppo.batch_size // cfg.ppo.group_size} "
          f"texts x {cfg.ppo.group_size}), {statistics.mean(seconds_audio):.2f} s of audio each, "
          f"{torch.get_num_threads()} threads")
    for name, value in summary.items():
        print(f"  {name:>18}: {value:.2f} rollouts/s (the whole rollout: speak, judge, advantages; "
              f"{', '.join(f'{v:.2f}' for v in rates[name])})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": args.checkpoint, "batch_size": cfg.ppo.batch_size, "rollouts_per_second": summary,
                       "each": rates, "seconds_audio": statistics.mean(seconds_audio)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    from ira.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main))
