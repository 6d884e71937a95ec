"""How well does a trained style encoder match voice descriptions to clips it has never heard?

    python scripts/eval_style.py --checkpoint CKPT [--config cpu] [--set data.dir=DIR]
                                 [--split val] [--family heldout] [--queries 4] [--json OUT]

For every clip of the split (validation by default), `--queries` descriptions of the HELD-OUT
family (wordings never used in training; `--family train` for the training wordings) each rank
all clips of the split by cosine similarity. Reported next to their chance levels:
top-1 / top-5 (the very clip is ranked first / in the first five), desc_match (the top clip has
every level the description names), attr_match (the top clip has the query clip's pitch, rate,
gender and accent levels), and the per-attribute agreement of the top clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ira.config import load_config  # noqa: E402
from ira.training.stage_style import evaluate_checkpoint  # noqa: E402

ROWS = (("top1", "chance_top1"), ("top5", "chance_top5"), ("desc_match", "desc_match_chance"),
        ("attr_match", "attr_match_chance"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint holding a 'style' module")
    parser.add_argument("--config", default=None,
                        help="a preset or YAML file for the corpus location (default: the checkpoint's config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.dir=/data/synth (with or without --config)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--family", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--queries", type=int, default=4, help="descriptions per clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.queries < 1:
        parser.error("--queries must be >= 1")

    cfg = None
    if args.config or args.set:
        if args.config:
            cfg = load_config(args.config, args.set)
        else:
            from ira.checkpoint import load_checkpoint

            cfg = load_checkpoint(args.checkpoint).ira_config().with_overrides(args.set)
    m = evaluate_checkpoint(args.checkpoint, cfg, split=args.split, family=args.family,
                            n_queries=args.queries, device=args.device)
    print(f"{args.checkpoint}: {int(m['n_queries'])} {args.family}-family descriptions ranking "
          f"{int(m['n_clips'])} {args.split} clips")
    for name, chance in ROWS:
        print(f"  {name:<11} {m[name]:6.3f}   (chance {m[chance]:.3f})")
    print("  top clip agrees on: " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in m.items() if k.startswith("acc_")))
    print(f"  contrastive loss {m['loss']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(m, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    from ira.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main))
