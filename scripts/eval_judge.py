"""What does the judge think of a checkpoint's speech? Stage 3's validation, on its own.

    python scripts/eval_judge.py --checkpoint runs/x/stage2_latest.safetensors   # before PPO
    python scripts/eval_judge.py --checkpoint runs/x/stage3_latest.safetensors   # after

Speaks `--texts` held-out texts of the checkpoint's corpus (each with a voice description), after the first
`--skip` (stage 3 keeps its best checkpoint by its validation's first `ppo.eval_texts` texts: skip them for a
figure that did not choose the checkpoint),
and prints the judge's semantic reward (the LLM's mean log-likelihood per token of the text, from the
audio), the style reward, the KL to the reference (stage-2) SpeechLM, and the proxies that would
reveal a reward hack: the reference's log-likelihood per frame of the samples, the judge's CER when it
repeats what it heard, the seconds spoken per phoneme, and (with `ira[eval]`) the WER and CER of the samples
by the evaluation ASR (`ppo.eval_asr_model`, Whisper base: the one stage 3's reward never hears) and by the
reward's ASR (`ppo.reward_asr`, Whisper tiny.en).

With `--seeds` >= 2 and the evaluation ASR, it also asks whether the judge ranks a text's samples as a listener
does: for each score (the run's weighted reward, and each part of it: the LLM's, the phoneme reader's, the
reward ASR's, the style's), its correlation with the evaluation ASR's CER among the samples of one text
(negative = agrees), and the CER of the sample it would pick against the mean and the evaluation ASR's own pick.
PPO with the group advantage learns from exactly this ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from ira.checkpoint import load_checkpoint, require_stage
from ira.text_metrics import corpus_cer
from ira.training.stage3 import Stage3Task

SCORES = ("reward", "semantic", "phonemes", "asr", "asr_likelihood", "style")


def _pearson(a: list[float], b: list[float]) -> float:
    """statistics.correlation, NaN where one side is constant (e.g. a score that is off)."""
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:
        return float("nan")


def ranking_agreement(samples_by_text: list[list[dict]]) -> dict[str, float]:
    """How each judge score ranks the samples of one text against the ASR's CER: the Pearson correlation of
    both, each centred on its text's mean (negative = the judge prefers what the ASR hears better), and the
    mean CER of the sample each score would pick; `mean_cer` and `oracle_pick_cer` (the evaluation ASR's own pick)
    frame it. Each row gets its `asr_cer` (kept in the JSON report)."""
    for group in samples_by_text:
        for row in group:
            row["asr_cer"] = corpus_cer([row["text"]], [row["eval_asr_heard"]])

    def centred(key: str) -> list[float]:
        return [row[key] - statistics.mean(r[key] for r in group) for group in samples_by_text for row in group]

    out = {"mean_cer": statistics.mean(row["asr_cer"] for group in samples_by_text for row in group),
           "oracle_pick_cer": statistics.mean(min(r["asr_cer"] for r in group) for group in samples_by_text)}
    for key in SCORES:
        out[f"{key}_vs_cer"] = _pearson(centred(key), centred("asr_cer"))
        out[f"{key}_pick_cer"] = statistics.mean(max(group, key=lambda r: r[key])["asr_cer"]
                                                 for group in samples_by_text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a stage 2 or 3 checkpoint")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--skip", type=int, default=0,
                        help="start after this many held-out texts (e.g. the ppo.eval_texts that chose a stage-3 "
                             "checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="speak every text with this many seeds (seed, seed+1, ...) and average: one sample "
                             "per text is a noisy figure")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the checkpoint's config, e.g. --set ppo.temperature=0.6 to judge the samples "
                             "of another sampling temperature (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.texts < 1 or args.skip < 0:
        print(f"--texts must be >= 1 and --skip >= 0 (got {args.texts}, {args.skip})", file=sys.stderr)
        return 2
    ckpt = require_stage(load_checkpoint(args.checkpoint), ("2", "3"), purpose="judging")
    cfg = ckpt.ira_config().with_overrides(args.overrides)
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, eval_seeds=1))   # --seeds does it here
    task = Stage3Task(cfg, ckpt, cpu=True)
    n_val = len(task.val_split)
    if args.skip + args.texts > n_val:
        print(f"{cfg.data.dir} has {n_val} validation clips, fewer than --skip {args.skip} + --texts {args.texts}: "
              f"lower them", file=sys.stderr)
        return 2
    chosen = range(args.skip, args.skip + args.texts)
    loader = task.held_out_loader(chosen)
    runs, samples = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        task.cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))
        with torch.inference_mode():
            runs.append(task.validate(loader))
        samples.append(list(task._last_heard))
    metrics = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    print(f"{args.checkpoint} (stage {ckpt.stage}), {args.texts} held-out texts (from the {args.skip + 1}.) "
          f"x {args.seeds} seed(s):")
    for key, value in metrics.items():
        spread = (f"  (seeds: {', '.join(f'{run[key]:.3f}' for run in runs)})" if len(runs) > 1 else "")
        print(f"  {key[4:]:>24}: {value:.4f}{spread}")
    agreement = None
    if args.seeds >= 2 and all("eval_asr_heard" in row for run in samples for row in run):
        agreement = ranking_agreement([list(group) for group in zip(*samples)])
        print(f"  does the judge rank a text's {args.seeds} samples as the evaluation ASR does? (mean CER "
              f"{agreement['mean_cer']:.3f}; the evaluation ASR's own pick {agreement['oracle_pick_cer']:.3f})")
        for key in SCORES:
            print(f"  {key:>24}: correlation with CER {agreement[key + '_vs_cer']:+.3f} (negative = agrees), "
                  f"its pick's CER {agreement[key + '_pick_cer']:.3f}")
    for row in getattr(task, "_last_heard", [])[:3]:
        print(f"  said {row['text']!r}\n  judge heard {row['heard']!r}")
        if "eval_asr_heard" in row:
            print(f"  evaluation ASR heard {row['eval_asr_heard']!r}")
        if "reward_asr_heard" in row:
            print(f"  reward ASR heard {row['reward_asr_heard']!r}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": args.checkpoint, "texts": args.texts, "skip": args.skip, "seeds": args.seeds,
                       "overrides": args.overrides, **metrics, "per_seed": runs,
                       "judged": [task.val_split.texts[i] for i in chosen], "samples": samples,
                       "agreement": agreement}, handle, indent=2)
    return 0


if __name__ == "__main__":
    from ira.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main))
