"""Start the IRA web app.

    python app.py [--share] [--auth user:pass] [--preset auto|cpu|laptop|a100] [--port N]
                  [--workspace DIR] [--host 127.0.0.1] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IRA web app: build corpora, train the stages, listen to samples.")
    parser.add_argument("--share", action="store_true",
                        help="also make a public gradio.live link (needs internet; protect it with --auth)")
    parser.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                        help="require this login (repeatable for several users)")
    parser.add_argument("--preset", default="auto", choices=("auto", "cpu", "laptop", "a100"),
                        help="config preset (default: detected from the hardware)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0 serves your network: use --auth)")
    parser.add_argument("--workspace", default="workspace",
                        help="the only folder the app reads and writes (default: ./workspace)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value for everything the app runs (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ui.workspace import GRADIO_TEMP_DIR, gradio_folder
    # before `import gradio`: a few of its folders are fixed at import (build_app makes and checks this one)
    os.environ[GRADIO_TEMP_DIR] = str(gradio_folder(args.workspace))
    from ui.app import build_app, launch_app, parse_auth
    try:
        auth = parse_auth(args.auth)
        demo = build_app(args.workspace, preset=args.preset, overrides=args.overrides)
    except ValueError as exc:   # ConfigError, WorkspaceError and a bad --auth are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost") and not auth:
        print(f"[ira] WARNING: listening on {args.host} without --auth: anyone on your network can use the app.",
              file=sys.stderr)
    try:
        launch_app(demo, host=args.host, port=args.port, share=args.share, auth=auth)
    except OSError as exc:   # the port is taken, or the host is not an address of this machine
        print(f"error: cannot serve on {args.host}:{args.port or 7860}: {exc}; try another --port", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
