"""Stop requests: SIGINT / SIGTERM, or a flag file `<output_dir>/STOP` (what the UI writes).

A request is honoured at the end of the current optimizer step: the engine saves a checkpoint
and returns with status "stopped". A second Ctrl-C aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

STOP_FILE = "STOP"


def request_stop(output_dir: str | Path) -> Path:
    """Ask a training run writing to `output_dir` to stop cleanly (atomic create of the flag file)."""
    path = Path(output_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STOP_FILE}.{os.getpid()}.tmp")
    tmp.write_text("stop requested\n")
    os.replace(tmp, path)
    return path


class StopRequest:
    """Collects stop requests from signals and the flag file; use as a context manager."""

    def __init__(self, output_dir: str | Path, watch_file: bool = True):
        self.flag_file = Path(output_dir) / STOP_FILE
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
        """Why a stop was requested, or None. Checks the flag file (one stat call)."""
        if self._reason is None and self.watch_file and self.flag_file.exists():
            self._reason = f"flag file {self.flag_file}"
        return self._reason

    def request(self, reason: str) -> None:
        self._reason = reason

    def clear_flag_file(self) -> None:
        """Remove the flag file once honoured, so the next run does not stop at once."""
        try:
            self.flag_file.unlink()
        except FileNotFoundError:
            pass
