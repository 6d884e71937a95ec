"""The peak resident memory of this process, and (on Linux) of a part of it: a stage of the recipe.

Linux keeps the process's high-water mark (`VmHWM` in /proc/self/status) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so each stage of a recipe run in one process gets its own peak. Elsewhere
the peak is the operating system's since the process started (`ru_maxrss`), and `reset` says it could not.

`give_back` returns what a finished part freed to the system before the next one starts: glibc keeps freed
blocks in its heaps for reuse (and a stage's many threads each get their own), so without it a stage's peak
would start from what the previous one used at its most, not from what it left. Within a stage, `HeapCap`
does the same whenever the heap has kept enough: stage 2's steps allocate blocks of many sizes, and glibc kept
the freed ones resident, +1 GB in 90 steps (issue 36).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

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


class HeapCap:
    """Called between training steps: gives freed heap memory back (`give_back` without the cycle collection)
    when resident memory has grown `slack_mb` past its level after a step (the first one's, and again the first
    after each give-back: the step's working set faulted back in), at most once every `every_s` seconds.
    Trimming after every step cost stage 2 ~10% of its steps (its ~600 MB working set came back as page faults
    at each), so the cap does not chase the working set: it removes what the heap keeps on top of it (stage 2:
    +1 GB in 90 steps, issue 36), and a stage whose memory does not grow never pays."""

    def __init__(self, slack_mb: float = 256.0, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.slack_mb, self.every_s, self.clock = slack_mb, every_s, clock
        self.trims = 0
        self._floor: Optional[float] = None
        self._last = clock()

    def __call__(self) -> bool:
        """True when it gave memory back."""
        now = resident_mb()
        if self._floor is None or now < self._floor:
            self._floor = now
            return False
        if now < self._floor + self.slack_mb or self.clock() - self._last < self.every_s:
            return False
        if not give_back(collect=False):
            return False
        self.trims += 1
        self._floor, self._last = None, self.clock()
        return True


def resident_mb() -> float:
    """This process's resident memory now (MiB)."""
    return psutil.Process().memory_info().rss / 2**20


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
