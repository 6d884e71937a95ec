"""Stage 2's alignment phase: CTC from the adapter's soft tokens onto the LLM's own embedding table.

The LLM-only objectives (distillation, "repeat" cross-entropy) start on a plateau: the LLM answers from its
prior, the gradient that reaches the adapter through 30 frozen layers says little about the audio, and the
adapter's outputs collapse to one vector for every clip. Speech-LLM recipes report thousands of steps there.

This phase does not run the LLM. The adapter's N soft tokens, read in order, are classified against the
LLM's input-embedding rows by cosine (plus one learned "blank" direction), and CTC scores the transcript's
LLM tokens under every monotonic alignment. A soft token is thus pulled toward the embedding of the
word piece spoken in its part of the clip - the very vector the LLM would read had it been given the
transcript as text - and the adapter's outputs depend on what was said from the first steps. The
adapter's `window` prior lays latent i over the i-th N-th of the clip, so CTC only has to place each
token among neighbouring latents. The classifier is the LLM's (frozen) table restricted to the
corpus's tokens; only the blank direction and the scale are trained here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

BLANK = 0


class EmbeddingCTC(nn.Module):
    """Cosine classifier of soft tokens [B, N, H] over `vocab` (LLM token ids) + blank, and its CTC loss."""

    def __init__(self, embeddings: torch.Tensor, vocab: Sequence[int], init_scale: float = 10.0):
        super().__init__()
        if not vocab:
            raise ValueError("EmbeddingCTC needs at least one token id in its vocabulary")
        self.vocab = sorted(set(int(t) for t in vocab))
        self.index = {token: i + 1 for i, token in enumerate(self.vocab)}  # 0 = blank
        rows = F.normalize(embeddings.detach().float()[torch.tensor(self.vocab)], dim=-1)
        self.register_buffer("table", rows, persistent=False)  # rebuilt from the LLM: not saved
        self.blank = nn.Parameter(torch.randn(embeddings.shape[1]) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def logits(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, H] -> [B, N, 1 + V] (column 0 = blank)."""
        s = F.normalize(soft_tokens.float(), dim=-1)
        blank = s @ F.normalize(self.blank.float(), dim=0)
        return torch.cat([blank[..., None], s @ self.table.T], dim=-1) * self.log_scale.exp()

    def targets(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """LLM token ids per sample -> class indices; a token outside the vocabulary is an error."""
        out = []
        for ids in token_ids:
            unknown = [t for t in ids if t not in self.index]
            if unknown:
                raise ValueError(f"token ids {unknown[:5]} are not in the alignment vocabulary (built from the "
                                 f"corpus's transcripts); rebuild it with this text")
            out.append(torch.tensor([self.index[t] for t in ids], dtype=torch.long))
        return out

    def loss(self, soft_tokens: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean CTC loss per target token (nats) of the transcripts' tokens given the soft tokens."""
        log_probs = self.logits(soft_tokens).log_softmax(-1)
        targets = self.targets(token_ids)
        batch, n = log_probs.shape[:2]
        return F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets).to(log_probs.device),
                          torch.full((batch,), n, dtype=torch.long),
                          torch.tensor([len(t) for t in targets], dtype=torch.long),
                          blank=BLANK, reduction="mean", zero_infinity=True)

    @torch.no_grad()
    def decode(self, soft_tokens: torch.Tensor) -> list[list[int]]:
        """Greedy CTC reading: best class per soft token, repeats merged, blanks dropped -> LLM token ids."""
        out = []
        for row in self.logits(soft_tokens).argmax(-1).tolist():
            ids, previous = [], BLANK
            for c in row:
                if c != BLANK and c != previous:
                    ids.append(self.vocab[c - 1])
                previous = c
            out.append(ids)
        return out
