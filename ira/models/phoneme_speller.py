"""Class directions spelled from phonemes: the vocabulary reader's word pieces share what they sound like.

The reader (ira/models/vocabulary_reader.py) classifies each soft token over the corpus's LLM word pieces,
one direction per piece. Learned one by one, a piece's direction is only as good as the number of times
it was heard: on a synthetic corpus of 20,000 sentences half the pieces of everyday held-out sentences
occur fewer than 200 times, and the reader drops or swaps exactly those, while its phoneme CTC on the same
frames is as good on new sentences as on the corpus's. With a speller, each direction is its own learned
vector plus a function of its phonemes (eSpeak NG's reading of the piece alone: "umbrella" -> ʌmbɹˈɛlə):
every piece heard trains the shared spelling, so a rarely heard piece is recognised by how it sounds.

The spelling of piece k is a bag of (position, phoneme) and of plain phoneme embeddings, summed
(`nn.EmbeddingBag`), then a GELU and a linear map to the LLM's width. That last map starts at zero, so a
new reader's directions are exactly the LLM's rows, as without a speller.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_PHONEMES = 16
"""Phonemes kept per word piece (a piece is a word or less; longer readings are numbers)."""


def spell(pieces: Sequence[str], phonemize: Callable[[str], Sequence[int]], length: int = MAX_PHONEMES
          ) -> torch.Tensor:
    """The phonemes of each word piece's text -> LongTensor [V, length] of phoneme id + 1 (0 = none).
    A piece that `phonemize` cannot read (punctuation, a lone symbol) is spelled with no phoneme."""
    out = torch.zeros(len(pieces), length, dtype=torch.long)
    for k, piece in enumerate(pieces):
        text = piece.strip()
        if not any(ch.isalnum() for ch in text):
            continue
        try:
            ids = list(phonemize(text))[:length]
        except ValueError:      # TextNotReadableError: nothing eSpeak can say
            continue
        if ids:
            out[k, : len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
    return out


class PhonemeSpeller(nn.Module):
    """spellings [V, L] (phoneme id + 1, 0 = none) -> an added direction per word piece [V, out_dim]."""

    def __init__(self, spellings: torch.Tensor, n_phonemes: int, out_dim: int, dim: int = 256):
        super().__init__()
        if spellings.dim() != 2 or spellings.dtype != torch.long:
            raise ValueError(f"spellings must be a LongTensor [V, L], got {spellings.dtype} {tuple(spellings.shape)}")
        if spellings.numel() and int(spellings.max()) > n_phonemes:
            raise ValueError(f"spellings hold phoneme ids beyond the tokenizer's {n_phonemes}")
        self.n_phonemes, self.length = int(n_phonemes), int(spellings.shape[1])
        self.register_buffer("spellings", spellings.clone())
        self.bag = nn.EmbeddingBag((self.length + 1) * (self.n_phonemes + 1), dim, mode="sum")
        nn.init.normal_(self.bag.weight, std=0.02)
        self.out = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._index_bags()     # once, and again when a checkpoint's spellings are loaded
        self.register_load_state_dict_post_hook(lambda module, _keys: module._index_bags())

    def _index_bags(self) -> None:
        indices, offsets = self._bags()
        self.register_buffer("bag_indices", indices, persistent=False)
        self.register_buffer("bag_offsets", offsets, persistent=False)

    def _bags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat EmbeddingBag indices and offsets: piece k's bag holds (position j, phoneme p) for each of its
        phonemes, and the plain phoneme p (the rows after the positional ones)."""
        width = self.n_phonemes + 1
        positions = torch.arange(self.length, device=self.spellings.device)[None] * width
        present = self.spellings > 0
        positional = (positions + self.spellings)[present]
        plain = (self.length * width + self.spellings)[present]
        counts = present.sum(1)
        starts = torch.cumsum(torch.cat([counts.new_zeros(1), counts[:-1]]), 0)
        owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        order = torch.argsort(torch.cat([owner, owner]), stable=True)
        return torch.cat([positional, plain])[order], 2 * starts

    def forward(self) -> torch.Tensor:
        return self.out(F.gelu(self.bag(self.bag_indices, self.bag_offsets)))
