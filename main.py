"""The seed's command line: `python main.py --stage N --config FILE [--resume_checkpoint CKPT]`.

Same as `ira train --stage N ...` (and takes the same `--set section.key=value` overrides).
"""

import argparse
import sys

from ira.cli import add_train_args
from ira.cli import main as ira_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="main.py", description="Train one IRA stage (same as `ira train`).")
    add_train_args(parser)
    args = parser.parse_args(argv)
    return ira_main(["train", "--stage", args.stage]
                    + (["--config", args.config] if args.config else [])
                    + [f"--set={o}" for o in args.overrides]
                    + (["--resume_checkpoint", args.resume_checkpoint] if args.resume_checkpoint else []))


if __name__ == "__main__":
    sys.exit(main())
