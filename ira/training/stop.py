"""Stop requests: SIGINT / SIGTERM, or a flag file `<output_dir>/STOP` (what the UI writes), or another
flag file named by `training.stop_file` (the full recipe's `<recipe folder>/STOP`, so that a stop of the
recipe reaches the stage that runs in its own folder).

A request is honoured at the end of the current optimizer step: the engine saves a checkpoint
and returns with status "stopped". A second Ctrl-C aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterable, Optional

STOP_FILE = "STOP"


def request_stop(output_dir: str | Path) -> Path:
    """Ask a training run writing to `output_dir` to stop cleanly (atomic create of the flag file)."""
    path = Path(output_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STOP_FILE}.{os.getpid()}.tmp")
    tmp.write_text("stop requested\n")
    os.replace(tmp, path)
    return path


def drop_stale_flags(paths: Iterable[str | Path], since: float) -> list[Path]:
    """Remove the flag files among `paths` written before `since` (this process's start): they were left
    by an earlier run (one killed before it could clear its flag) and are not meant for this one."""
    removed = []
    for path in map(Path, paths):
        try:
            if path.stat().st_mtime < since:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


class StopRequest:
    """Collects stop requests from signals and the flag files; use as a context manager.

    `also`: more flag files that stop the run as `<output_dir>/STOP` does (a recipe's own STOP)."""

    def __init__(self, output_dir: str | Path, watch_file: bool = True, also: Iterable[str | Path] = ()):
        self.flag_file = Path(output_dir) / STOP_FILE
        self.flag_files = [self.flag_file, *(Path(p) for p in also if Path(p) != self.flag_file)]
        self.watch_file = watch_file
        self._reason: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread (a UI thread just uses the file).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        self._reason = f"signal {signal.Signals(signum).name}"

    def reason(self) -> Optional[str]:
        """Why a stop was requested, or None. Checks the flag files (one stat call each)."""
        if self._reason is None and self.watch_file:
            found = next((f for f in self.flag_files if f.exists()), None)
            if found is not None:
                self._reason = f"flag file {found}"
        return self._reason

    def request(self, reason: str) -> None:
        self._reason = reason

    def clear_flag_file(self) -> None:
        """Remove the flag files once honoured, so the next run does not stop at once."""
        for flag in self.flag_files:
            flag.unlink(missing_ok=True)
