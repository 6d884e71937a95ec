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


def held_by_the_c_heap(mib: int):
    """`mib` MiB malloc'ed in 64-KiB blocks and touched, then freed but the last block: glibc keeps the freed
    blocks resident in its heap (the last one pins its top) until malloc_trim. Returns what frees the last one."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(mib * 16)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:
        libc.free(block)
    return lambda: libc.free(blocks[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_what_was_freed_goes_back_to_the_system():
    """Issue 36, item 8: a recipe's stage freed what it used, but the C heap kept it resident, so the next stage's
    peak started from the previous stage's high-water mark."""
    free_last = held_by_the_c_heap(256)
    before = resident_mb()
    assert peak_memory.give_back()
    assert resident_mb() < before - 200
    free_last()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_the_heap_cap_gives_back_what_the_heap_kept_past_its_slack_at_most_once_a_while():
    """Issue 36, item 8: stage 2's steps left ~1 GB in the C heap over 90 steps; between steps the engine's cap
    gives it back once it passes the slack, no more often than its interval, and leaves a heap that did not grow
    alone (no cost)."""
    peak_memory.give_back()                            # what earlier tests freed: not counted as this test's growth
    seconds = [0.0]
    cap = peak_memory.HeapCap(slack_mb=128, every_s=30, clock=lambda: seconds[0])
    assert not cap()                                   # the first call only notes where memory stands
    seconds[0] = 100.0
    free_small = held_by_the_c_heap(32)                # under the slack: kept
    assert not cap() and cap.trims == 0
    free_small()
    free_last = held_by_the_c_heap(256)
    seconds[0] = 110.0
    before = resident_mb()
    assert cap() and cap.trims == 1
    assert resident_mb() < before - 200
    free_last()
    assert not cap()                                   # the first step after a give-back sets the level anew
    free_last = held_by_the_c_heap(256)                # grown past it, but within the interval: kept for now
    seconds[0] = 125.0
    assert not cap() and cap.trims == 1
    seconds[0] = 141.0
    assert cap() and cap.trims == 2
    free_last()
    seconds[0] = 200.0
    assert not cap()                                   # a new level...
    seconds[0] = 300.0
    assert not cap() and cap.trims == 2                # ...that does not grow: nothing to give back
