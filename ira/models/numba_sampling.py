"""A generation step's choice of the next delay-pattern column with top-k sampling, compiled for the CPU
with numba: one call where PyTorch takes ~30 small operations (`SpeechLM._next_column`).

A SpeechLM generation step samples 8 codebooks x 1025 classes; on a CPU `topk` alone took ~80 us of a
~1.8 ms step, and the draw after it as much again. Here each row's k-th largest logit is found by
quickselect (numba's `np.partition` took 6 us a row) and the draw among the k best is a Gumbel-max over
uniforms the caller draws with its own torch generator (so seeds keep working).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of `values` (k >= 1), by quickselect on a copy: expected linear time."""
    a = values.copy()
    lo, hi, target = 0, a.shape[0] - 1, k - 1          # position `target` of the descending order
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:                                   # Hoare partition, descending
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return a[target]


@njit(cache=True)
def draw_top_k(row: np.ndarray, k: int, uniform: np.ndarray) -> int:
    """A draw from the softmax over the k largest of `row`, Gumbel-max over uniform [k]. Ties at the k-th
    value are broken by lower id, as exactly k ids take part."""
    threshold = _kth_largest(row, k)
    best, choice, taken = -np.inf, 0, 0
    for strict in (True, False):        # the ids above the threshold, then those at it, up to k
        for i in range(row.shape[0]):
            if taken == k:
                break
            if (row[i] > threshold) if strict else (row[i] == threshold):
                score = row[i] - np.log(-np.log(uniform[taken]))   # logit + Gumbel noise
                taken += 1
                if score > best:
                    best, choice = score, i
    return choice


@njit(cache=True)
def next_column_top_k(logits: np.ndarray, step: int, ends: np.ndarray, ended: np.ndarray, min_frames: np.ndarray,
                      max_frames: np.ndarray, uniform: np.ndarray, k: int, eos_id: int, fill_id: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`SpeechLM._next_column` with top-k sampling, in one call. logits [B, K, C] (fp32, temperature
    applied); ends, min_frames, max_frames int64 [B]; ended bool [B]; uniform [B * K, k]. Returns new
    (column int64 [B, K], ends, ended); tests/test_numba_step.py checks it against the PyTorch method."""
    batch, n_codebooks, n_classes = logits.shape
    column = np.empty((batch, n_codebooks), dtype=np.int64)
    new_ends, new_ended = ends.copy(), ended.copy()
    row = np.empty(n_classes, dtype=logits.dtype)
    for b in range(batch):
        for q in range(n_codebooks):
            row[:] = logits[b, q]
            if q > 0 or step < min_frames[b]:      # only codebook 0 ends speech, and not before min_frames
                row[eos_id] = -np.inf
            column[b, q] = draw_top_k(row, k, uniform[b * n_codebooks + q])
        if not ended[b] and column[b, 0] == eos_id:
            new_ends[b] = step
        new_ended[b] = ended[b] or column[b, 0] == eos_id or step >= max_frames[b]
        end = new_ends[b]
        for q in range(n_codebooks):                # codebook q holds frame step - q of the delay pattern
            frame = step - q
            if frame == end:
                column[b, q] = eos_id
            elif frame < 0 or frame > end:
                column[b, q] = fill_id
    return column, new_ends, new_ended
