"""Datasets over the token cache and a length-bucketing batch sampler (no fixed-length zero padding)."""

from __future__ import annotations

import logging
import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ira.data.token_cache import TokenSplit

log = logging.getLogger(__name__)


class SpeechTokenDataset(Dataset):
    """One item per clip: its codes ``LongTensor[K, T]``, transcript and voice descriptions.

    Clips longer than `max_frames` are left out (and counted) rather than cropped, since a cropped
    clip no longer matches its transcript.
    """

    def __init__(self, split: TokenSplit, max_frames: int | None = None):
        self.split = split
        lengths = split.lengths()
        keep = [i for i, n in enumerate(lengths) if n > 0 and (max_frames is None or n <= max_frames)]
        self.skipped = len(lengths) - len(keep)
        if self.skipped:
            log.warning("%d clips longer than %s frames are left out of training", self.skipped, max_frames)
        self.indices = keep
        self._lengths = [lengths[i] for i in keep]

    def __len__(self) -> int:
        return len(self.indices)

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        return {
            "index": i,
            "clip": j,
            "id": self.split.ids[j],
            "text": self.split.texts[j],
            "descriptions": self.split.descriptions[j],
            "codes": self.split.clip_codes(j),
        }


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length clips, shuffled deterministically per (seed, epoch).

    Clips are sorted by length inside random pools of ``pool_batches * batch_size`` clips, cut into
    batches (at most `batch_size` clips and, when `max_batch_frames` > 0, at most that many padded
    frames), and the batches are shuffled. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, max_batch_frames: int = 0, shuffle: bool = True,
                 seed: int = 0, pool_batches: int = 50, drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.max_batch_frames = max_batch_frames
        self.shuffle = shuffle
        self.seed = seed
        self.pool = max(pool_batches, 1) * batch_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start:start + self.pool], key=lambda i: self.lengths[i])
            batch: list[int] = []
            longest = 0
            for i in pool:
                longest_if_added = max(longest, self.lengths[i])
                too_many_frames = self.max_batch_frames > 0 and batch and \
                    longest_if_added * (len(batch) + 1) > self.max_batch_frames
                if len(batch) == self.batch_size or too_many_frames:
                    batches.append(batch)
                    batch, longest_if_added = [], self.lengths[i]
                batch.append(i)
                longest = longest_if_added
            if batch:
                batches.append(batch)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size and self.max_batch_frames == 0:
            batches.pop()
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def pad_codes(codes: list[torch.Tensor], pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad LongTensor[K, T_i] clips to [B, K, T_max]; returns (codes, lengths)."""
    lengths = torch.tensor([c.shape[1] for c in codes], dtype=torch.long)
    n_codebooks = codes[0].shape[0]
    out = torch.full((len(codes), n_codebooks, int(lengths.max())), pad_value, dtype=torch.long)
    for b, c in enumerate(codes):
        out[b, :, : c.shape[1]] = c
    return out, lengths
