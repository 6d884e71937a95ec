"""Several codec frames per autoregressive step: F frames of K codebooks become one step of K * F streams.

At 75 frames per second a SpeechLM takes 75 steps to say one second, and every step costs a pass
through the model in training and in generation. Grouping F consecutive frames into one step (VALL-E 2's
grouped code modelling) divides the audio sequence by F; the step predicts K * F values instead of K.

    frames (K=2, F=2, T=5)               streams (K * F = 4, T' = ceil(T / F) = 3)
    k=0: a0 a1 a2 a3 a4        ---->     j=0 (k=0, f=0): a0 a2 a4
    k=1: b0 b1 b2 b3 b4                  j=1 (k=0, f=1): a1 a3 a4   <- the last group is completed by
                                         j=2 (k=1, f=0): b0 b2 b4      repeating the sample's last frame
                                         j=3 (k=1, f=1): b1 b3 b4

Stream j = k * F + f holds codebook k of frame t * F + f: the coarse codebooks of every frame in the group
come before the finer ones, so under the delay pattern (stream j shifted by j steps, `delay_pattern.py`)
the step that predicts a fine value has already seen every coarser value of its group, as one frame per
step does with codebooks. A sample of T frames takes ceil(T / F) steps; the frames that complete its last
group repeat its last frame, so undoing the grouping gives ceil(T / F) * F frames (at most F - 1 frames,
13 ms each at 75 Hz, of held sound at the end).
"""

from __future__ import annotations

import torch


def steps_for(frames: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """Steps needed for `frames` frames (any shape, integer): ceil(frames / F)."""
    return torch.div(frames + frames_per_step - 1, frames_per_step, rounding_mode="floor")


def stack_frames(codes: torch.Tensor, lengths: torch.Tensor, frames_per_step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, T] frames with `lengths` [B] -> ([B, K * F, ceil(T / F)] streams, steps [B]).

    Values past a sample's length are ignored; its last group is completed with its last frame."""
    if frames_per_step == 1:
        return codes, lengths
    batch, n_codebooks, n_frames = codes.shape
    n_steps = -(-n_frames // frames_per_step)
    frame = torch.arange(n_steps * frames_per_step, device=codes.device)[None]
    last = (lengths.long() - 1).clamp(min=0)[:, None]
    index = torch.minimum(frame, last).clamp(max=max(n_frames - 1, 0))            # [B, T' * F]
    if n_frames == 0:
        grouped = codes.new_zeros(batch, n_codebooks, 0)
    else:
        grouped = codes.gather(2, index[:, None].expand(-1, n_codebooks, -1))     # [B, K, T' * F]
    streams = grouped.view(batch, n_codebooks, n_steps, frames_per_step).permute(0, 1, 3, 2)
    return streams.reshape(batch, n_codebooks * frames_per_step, n_steps), steps_for(lengths.long(), frames_per_step)


def unstack_frames(streams: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """[B, K * F, T'] streams -> [B, K, T' * F] frames (the inverse of `stack_frames` on whole groups)."""
    if frames_per_step == 1:
        return streams
    batch, n_streams, n_steps = streams.shape
    if n_streams % frames_per_step:
        raise ValueError(f"{n_streams} streams do not split into groups of {frames_per_step} frames")
    n_codebooks = n_streams // frames_per_step
    grouped = streams.reshape(batch, n_codebooks, frames_per_step, n_steps).permute(0, 1, 3, 2)
    return grouped.reshape(batch, n_codebooks, n_steps * frames_per_step)
