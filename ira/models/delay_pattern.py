"""The MusicGen delay pattern: codebook k is shifted right by k steps.

A codec frame t holds K values, one per codebook, coarse (k = 0) to fine (k = K-1). Predicting all K
values of a frame in one step would make the model guess the fine codebooks blind. Delaying codebook
k by k steps means that the step predicting codebook k of frame t comes after the steps that carried
codebooks 0..k-1 of that same frame, so one step per frame still sees the coarse values first.

    frames (K=3, T=4)             delayed, with end-of-speech: S = T + K = 7 steps
                                  step:  0  1  2  3  4  5  6
    k=0: a0 a1 a2 a3              k=0:   a0 a1 a2 a3 E  .  .
    k=1: b0 b1 b2 b3     ---->    k=1:   F  b0 b1 b2 b3 E  .
    k=2: c0 c1 c2 c3              k=2:   F  F  c0 c1 c2 c3 E

    F = fill: codebook k has not started yet (steps s < k)
    E = end of speech: the step right after codebook k's last frame (s = T + k)
    . = after the end, and padding of shorter samples in a batch: also written as F

Frame t of codebook k sits at step t + k; undoing the delay reads it back from there. In a batch,
samples are right-padded to the longest: a sample of `length` frames has its E at step length + k
and fill after it, so the masks below say exactly which steps carry a real value or an E.
"""

from __future__ import annotations

import torch


def delayed_length(n_frames: int, n_codebooks: int, with_eos: bool = True) -> int:
    """Steps needed to hold `n_frames` delayed frames: T + K - 1, plus one for the last codebook's E."""
    return n_frames + n_codebooks - 1 + int(with_eos)


def _lengths_or_full(lengths: torch.Tensor | None, batch: int, n_frames: int,
                     device: torch.device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), n_frames, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > n_frames).any()):
        raise ValueError(f"lengths must be in [0, {n_frames}] (the padded frame count), got {lengths.tolist()}")
    return lengths


def delay_masks(lengths: torch.Tensor, n_codebooks: int, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the delayed grid holds a real value and where it holds E.

    lengths: [B] frames per sample. Returns two bool tensors [B, K, n_steps]:
    `real[b, k, s]` is true where 0 <= s - k < lengths[b], `eos[b, k, s]` where s - k == lengths[b].
    Everything else is fill (before the start, after the end, or padding).
    """
    device = lengths.device
    steps = torch.arange(n_steps, device=device).view(1, 1, -1)
    frame = steps - torch.arange(n_codebooks, device=device).view(1, -1, 1)  # frame index at (k, s)
    length = lengths.long().view(-1, 1, 1)
    real = (frame >= 0) & (frame < length)
    eos = frame == length
    return real, eos


def apply_delay(codes: torch.Tensor, fill_id: int, lengths: torch.Tensor | None = None,
                eos_id: int | None = None) -> torch.Tensor:
    """[B, K, T] frames -> [B, K, S] delayed grid (see the module docstring).

    S = T + K - 1 without `eos_id`, T + K with it (E at step lengths[b] + k). Values of `codes` past
    a sample's length are ignored (padding may hold anything).
    """
    if codes.dim() != 3:
        raise ValueError(f"codes must have shape [B, K, T], got {tuple(codes.shape)}")
    batch, n_codebooks, n_frames = codes.shape
    lengths = _lengths_or_full(lengths, batch, n_frames, codes.device)
    n_steps = delayed_length(n_frames, n_codebooks, with_eos=eos_id is not None)
    real, eos = delay_masks(lengths, n_codebooks, n_steps)
    frame = torch.arange(n_steps, device=codes.device).view(1, -1) - torch.arange(
        n_codebooks, device=codes.device).view(-1, 1)                     # [K, S]
    index = frame.clamp(0, max(n_frames - 1, 0)).expand(batch, -1, -1)
    if n_frames == 0:
        delayed = torch.full((batch, n_codebooks, n_steps), fill_id, dtype=codes.dtype, device=codes.device)
    else:
        delayed = codes.gather(2, index).masked_fill(~real, fill_id)
    if eos_id is not None:
        delayed = delayed.masked_fill(eos, eos_id)
    return delayed


def undo_delay(delayed: torch.Tensor, n_frames: int | None = None) -> torch.Tensor:
    """[B, K, S] delayed grid -> [B, K, n_frames] frames: out[b, k, t] = delayed[b, k, t + k].

    `n_frames` defaults to S - K + 1 (every frame whose last codebook is inside the grid). Frames
    past a sample's length come back as whatever the grid held there (E or fill): slice them off
    with the sample's length.
    """
    if delayed.dim() != 3:
        raise ValueError(f"delayed must have shape [B, K, S], got {tuple(delayed.shape)}")
    batch, n_codebooks, n_steps = delayed.shape
    max_frames = n_steps - n_codebooks + 1
    if n_frames is None:
        n_frames = max(max_frames, 0)
    if n_frames > max_frames:
        raise ValueError(f"a grid of {n_steps} steps holds at most {max_frames} complete frames "
                         f"for {n_codebooks} codebooks, asked for {n_frames}")
    index = (torch.arange(n_frames, device=delayed.device).view(1, -1)
             + torch.arange(n_codebooks, device=delayed.device).view(-1, 1))  # [K, T]
    return delayed.gather(2, index.expand(batch, -1, -1))
