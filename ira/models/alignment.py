"""Alignment heads: attention heads that read only the text, with a prior on where to read.

A decoder-only TTS model must discover by itself which text token each audio frame speaks, and small
models learn that monotonic text-to-frame alignment late (or never, within a CPU budget). Here the first
`speech_lm.align_heads` heads of every layer are cross-attention heads in all but name: an audio step
attends only to the conditioning prefix (style and text), never to audio, and its score for text token n
gets the log of a Gaussian prior centred on where uniform progress through the text puts that step:

    centre(s) = s * N / T              (audio step s of T frames, N text tokens; capped at N)
    prior(s, n) = -(centre(s) - (n + 0.5))^2 / (2 sigma^2)      (sigma in text tokens)

so from the first training step those heads hand every frame the few tokens it is likely speaking, and
the model only has to learn what they sound like and refine the timing (the other heads attend freely).
This is the diagonal prior of attention-based TTS (DCTTS's guided attention, RAD-TTS's and T5-TTS's
attention priors) applied as a bias to the scores, kept at inference: T is the true frame count in
training and the length head's prediction when generating. The style token gets no prior (score bias 0:
a place for the head to look when no text token fits); padding gets -inf; with the text dropped the
heads read the style token alone.

Text positions in the prefix: the prefix is [padding] [style] [text 0 .. N-1], left-padded, so
`text_index` numbers the text tokens 0..N-1 and marks the style token -1 and padding -2.
"""

from __future__ import annotations

import torch

STYLE = -1
PADDING = -2


def text_index(prefix_valid: torch.Tensor) -> torch.Tensor:
    """prefix_valid [B, P] (left-padded [style] [text]) -> LongTensor[B, P]: the text token's index
    (0..N-1), STYLE (-1) for the style token, PADDING (-2) for padding."""
    index = prefix_valid.long().cumsum(dim=1) - 2
    return torch.where(prefix_valid, index, torch.full_like(index, PADDING))


def centres(steps: torch.Tensor, n_text: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Where uniform progress puts each audio step in the text, in tokens: steps [S] or [B, S] (audio step
    indices, BOS = 0), n_text [B], n_frames [B] (T; at least 1 is used) -> float [B, S] in [0, N]."""
    steps = steps.float()
    if steps.dim() == 1:
        steps = steps[None]
    rate = n_text.float() / n_frames.float().clamp(min=1.0)
    return torch.minimum(steps * rate[:, None], n_text.float()[:, None])


def prior(index: torch.Tensor, centre: torch.Tensor, sigma: float) -> torch.Tensor:
    """index [B, P] (from `text_index`), centre [B, S] -> score bias [B, S, P] (float32): the Gaussian
    log-prior on text keys, 0 on the style key, -inf on padding."""
    distance = centre[:, :, None] - (index[:, None, :].float() + 0.5)
    bias = -distance.square() / (2.0 * sigma * sigma)
    bias = torch.where(index[:, None, :] == STYLE, torch.zeros_like(bias), bias)
    return bias.masked_fill(index[:, None, :] == PADDING, float("-inf"))


def attention_bias(prefix_valid: torch.Tensor, n_frames: torch.Tensor, n_audio: int, sigma: float,
                   first_step: int = 0, bidirectional_prefix: bool = False) -> torch.Tensor:
    """The additive mask of the alignment heads for a pass over the prefix and `n_audio` audio steps
    (steps first_step .. first_step + n_audio - 1): float [B, 1, P + n_audio, P + n_audio].

    Prefix queries attend to the real prefix keys (no prior): causally, or all of them with
    `bidirectional_prefix` (speech_lm.text_attention: bidirectional, as the other heads do); audio queries
    attend to the prefix with the prior and to no audio key. n_frames [B]: T of each sample (its true
    length in training, the predicted one when generating).
    """
    batch, n_prefix = prefix_valid.shape
    device = prefix_valid.device
    index = text_index(prefix_valid)
    n_text = (index >= 0).sum(dim=1)
    size = n_prefix + n_audio
    bias = torch.full((batch, size, size), float("-inf"), device=device)
    keys = torch.arange(n_prefix, device=device)
    visible = keys[None, :] <= keys[:, None]
    if bidirectional_prefix:
        visible = torch.ones_like(visible)
    prefix_rows = torch.where(visible[None] & prefix_valid[:, None, :], 0.0, float("-inf"))
    # a padding query still sees itself (no row without a key: no NaN); its output is never used
    prefix_rows = torch.where(torch.eye(n_prefix, dtype=torch.bool, device=device)[None], 0.0, prefix_rows)
    bias[:, :n_prefix, :n_prefix] = prefix_rows
    steps = torch.arange(first_step, first_step + n_audio, device=device)
    bias[:, n_prefix:, :n_prefix] = prior(index, centres(steps, n_text, n_frames), sigma)
    return bias[:, None]


class StepPrior:
    """The alignment heads' prior for one generation, one new audio step at a time (the cached steps).

    prefix_valid [rows, P] of the prefill, n_frames [rows] the T of each row. The audio step of a new query
    is `cache_length - P` (the cache holds the prefix and the audio steps before it).
    """

    def __init__(self, prefix_valid: torch.Tensor, n_frames: torch.Tensor, sigma: float):
        self.index = text_index(prefix_valid)
        self.n_prefix = prefix_valid.shape[1]
        self.n_text = (self.index >= 0).sum(dim=1).float()
        self.n_frames = n_frames.float().to(prefix_valid.device)
        self.sigma = float(sigma)

    def step_of(self, cache_length: int) -> int:
        return cache_length - self.n_prefix

    def bias(self, cache_length: int) -> torch.Tensor:
        """The score bias over the prefix keys [rows, P] for the query written at `cache_length`."""
        step = torch.tensor([self.step_of(cache_length)], device=self.index.device)
        return prior(self.index, centres(step, self.n_text, self.n_frames), self.sigma)[:, 0]

    def mask(self, cache_length: int) -> torch.Tensor:
        """The alignment heads' additive mask [rows, 1, 1, cache_length + 1] for the query written at
        `cache_length`: the prior over the prefix, -inf over the audio steps."""
        mask = torch.full((self.index.shape[0], 1, 1, cache_length + 1), float("-inf"), device=self.index.device)
        mask[:, 0, 0, :self.n_prefix] = self.bias(cache_length)
        return mask

    def numpy_parts(self) -> tuple:
        """(index int64 [rows, P], text tokens per row f32, frames per row f32, 1 / (2 sigma^2) f32) for
        the compiled CPU step, which computes the same bias in its attention loop."""
        import numpy as np
        return (np.ascontiguousarray(self.index.cpu().numpy()), self.n_text.cpu().numpy().astype(np.float32),
                self.n_frames.cpu().numpy().astype(np.float32), np.float32(1.0 / (2.0 * self.sigma ** 2)))
