"""The peak resident memory of a part of a run (a recipe's stage, a benchmark)."""

import sys

import numpy as np
import psutil
import pytest

from ira import peak_memory


def resident_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux lets a process reset its peak")
def test_a_reset_peak_counts_only_what_came_after_it():
    block = np.ones(200 * 2**20 // 8)                  # 200 MiB resident
    high = peak_memory.peak_mb()
    assert high >= resident_mb() - 1
    del block                                          # a large block goes back to the system at once
    assert peak_memory.reset()
    assert peak_memory.peak_mb() < high - 150          # the freed block no longer counts...
    start = peak_memory.peak_mb()
    block = np.ones(300 * 2**20 // 8)
    assert peak_memory.peak_mb() >= start + 290        # ...a new one does
    del block


def test_the_peak_is_at_least_what_is_resident_now():
    assert peak_memory.peak_mb() >= resident_mb() - 1
