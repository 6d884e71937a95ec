"""The peak resident memory of this process, and (on Linux) of a part of it: a stage of the recipe.

Linux keeps the process's high-water mark (`VmHWM` in /proc/self/status) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so each stage of a recipe run in one process gets its own peak. Elsewhere
the peak is the operating system's since the process started (`ru_maxrss`), and `reset` says it could not.

`give_back` returns what a finished part freed to the system before the next one starts: glibc keeps freed
blocks in its heaps for reuse (and a stage's many threads each get their own), so without it a stage's peak
would start from what the previous one used at its most, not from what it left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
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


def give_back(collect: bool = True) -> bool:
    """Collect unreachable Python objects (`collect`: ~150 ms with the LLM loaded, so not between the steps of a
    stage: tensors are freed when their last reference goes), then ask glibc to return the free memory of its
    heaps to the system (`malloc_trim(0)`, a few ms); False where the C library has no malloc_trim (macOS, musl)."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


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
