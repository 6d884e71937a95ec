"""Write a tiny corpus for smoke tests: `python scripts/create_dummy_data.py --out data/dummy --num 12`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ira.data.corpus import CorpusError, corpus_summary  # noqa: E402
from ira.data.espeak import EspeakError  # noqa: E402
from ira.data.dummy import create_dummy_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/dummy", help="corpus folder to write (default: data/dummy)")
    parser.add_argument("--num", type=int, default=12, help="number of clips (default: 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=("auto", "espeak", "tones"), default="auto",
                        help="auto: eSpeak NG speech where it loads, else tones")
    args = parser.parse_args(argv)
    try:
        out = create_dummy_corpus(args.out, num_clips=args.num, seed=args.seed, engine=args.engine)
    except (CorpusError, EspeakError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = corpus_summary(out)
    print(f"wrote {summary['n_clips']} clips ({summary['total_duration_s']:.1f} s) to {out}")
    print(json.dumps({"voices": summary["voices"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
