"""The peak resident memory of this process, and (on Linux) of a part of it: a stage of the recipe.

Linux keeps the process's high-water mark (`VmHWM` in /proc/self/status) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so each stage of a recipe run in one process gets its own peak. Elsewhere
the peak is the operating system's since the process started (`ru_maxrss`), and `reset` says it could not.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset() -> bool:
    """Start a new peak from the memory resident now; False where the system keeps one peak per process."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The highest resident memory (MiB) since the last successful `reset`, else since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0
