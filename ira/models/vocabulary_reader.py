"""Reading the adapter's soft tokens as the LLM's own word pieces.

The LLM-only objectives of stage 2 (distillation, "repeat" cross-entropy) start on a plateau: the LLM
answers from its prior, the gradient that reaches the adapter through 30 frozen layers says little about
the audio, and the adapter's outputs collapse to one vector for every clip. Speech-LLM recipes report
thousands of steps there. The reader gives the adapter a signal that does not run the LLM.

Each of the adapter's N soft tokens is classified, in order, over a vocabulary of LLM token ids (those
of the corpus's transcripts) plus a "blank", by cosine against one direction per token, times a learned
scale; CTC scores the transcript's LLM tokens under every monotonic alignment. The directions start as
the LLM's own input-embedding rows, so a soft token is first pulled toward the embedding of the word
piece spoken in its part of the clip.

Two ways to hand the audio to the LLM (`adapter.output`):

* ``free``: the soft tokens themselves (all N). The directions stay the LLM's rows (frozen) so that
  CTC keeps the tokens near the words' embeddings; only the blank and the scale train.
* ``vocabulary``: the LLM hears what the reader reads. The directions train (CTC learns faster when
  the classifier may move), and each position whose best class is not blank - consecutive positions of
  one class merged, as CTC reads them - becomes the expected input embedding under the reader's
  distribution over the vocabulary (blank excluded): the sum of p(token) * LLM embedding row. The LLM
  thus reads a few vectors inside the hull of its own embeddings, one per word piece heard, instead of
  64 vectors it was never trained on; the mixture stays differentiable, so distillation trains through
  it. Which positions are kept is a hard choice (no gradient), as in CTC decoding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ira.models.phoneme_speller import PhonemeSpeller

BLANK = 0


class VocabularyReader(nn.Module):
    """Cosine classifier of soft tokens [B, N, H] over `vocab_ids` (LLM token ids) + blank; CTC; and the
    tokens the LLM hears in `vocabulary` mode.

    rows: the LLM's input-embedding rows of `vocab_ids` [V, H]. With `trainable` the class directions are
    parameters (initialised from the rows) and the rows are kept as a buffer for the mixture, both saved
    with the module; otherwise the rows are the directions, frozen and not saved (rebuilt from the LLM).
    A `speller` (trainable only) adds to each direction one spelled from its phonemes.
    """

    def __init__(self, rows: torch.Tensor, vocab_ids: Sequence[int], trainable: bool = False,
                 init_scale: float = 10.0, speller: PhonemeSpeller | None = None):
        super().__init__()
        ids = [int(t) for t in vocab_ids]
        if not ids:
            raise ValueError("the vocabulary reader needs at least one token id")
        if sorted(set(ids)) != ids:
            raise ValueError("vocab_ids must be sorted and distinct")
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise ValueError(f"rows must be [V={len(ids)}, H] (the LLM's embedding rows of vocab_ids), "
                             f"got {tuple(rows.shape)}")
        self.trainable = trainable
        self.register_buffer("vocab_ids", torch.tensor(ids, dtype=torch.long), persistent=trainable)
        self.register_buffer("rows", rows.detach().float().clone(), persistent=trainable)
        if trainable:
            self.directions = nn.Parameter(F.normalize(self.rows, dim=-1).clone())
        self.blank = nn.Parameter(torch.randn(rows.shape[1]) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        if speller is not None and (not trainable or speller.spellings.shape[0] != len(ids)):
            raise ValueError(f"a phoneme speller adds to trainable directions, one spelling per token id "
                             f"({len(ids)}); got trainable={trainable}, {speller.spellings.shape[0]} spellings")
        self.speller = speller
        self.blank_penalty = 0.0
        """Subtracted from the blank's logit when deciding which positions are words (not in the CTC loss):
        the adapter's `adapter.blank_penalty`."""
        self._reindex()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._reindex())

    def _reindex(self) -> None:
        """Class index of each token id (0 = blank), rebuilt when a checkpoint's ids are loaded."""
        self._index = {token: i + 1 for i, token in enumerate(self.vocab_ids.tolist())}

    @classmethod
    def from_llm_table(cls, embeddings: torch.Tensor, vocab_ids: Sequence[int], trainable: bool = False,
                       speller: PhonemeSpeller | None = None) -> "VocabularyReader":
        """From the LLM's whole input-embedding table [vocab, H] (a speller spells the sorted ids)."""
        ids = sorted(set(int(t) for t in vocab_ids))
        return cls(embeddings.detach()[torch.tensor(ids, dtype=torch.long)], ids, trainable=trainable,
                   speller=speller)

    @property
    def vocab(self) -> list[int]:
        return self.vocab_ids.tolist()

    def logits(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, H] -> [B, N, 1 + V] (column 0 = blank)."""
        s = F.normalize(soft_tokens.float(), dim=-1)
        if not self.trainable:
            directions = F.normalize(self.rows, dim=-1)
        else:
            directions = F.normalize(self.directions if self.speller is None else self.directions + self.speller(),
                                     dim=-1)
        blank = s @ F.normalize(self.blank.float(), dim=0)
        return torch.cat([blank[..., None], s @ directions.T], dim=-1) * self.log_scale.exp()

    def targets(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """LLM token ids per sample -> class indices; a token outside the vocabulary is an error."""
        out = []
        for ids in token_ids:
            unknown = [t for t in ids if t not in self._index]
            if unknown:
                raise ValueError(f"token ids {unknown[:5]} are not in the reader's vocabulary (built from the "
                                 f"corpus's transcripts); rebuild it with this text")
            out.append(torch.tensor([self._index[t] for t in ids], dtype=torch.long))
        return out

    def ctc_loss(self, soft_tokens: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean CTC loss per target token (nats) of the transcripts' tokens given the soft tokens."""
        log_probs = self.logits(soft_tokens).log_softmax(-1)
        targets = self.targets(token_ids)
        batch, n = log_probs.shape[:2]
        return F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets).to(log_probs.device),
                          torch.full((batch,), n, dtype=torch.long),
                          torch.tensor([len(t) for t in targets], dtype=torch.long),
                          blank=BLANK, reduction="mean", zero_infinity=True)

    @staticmethod
    def _runs(classes: list[int]) -> list[list[int]]:
        """Greedy CTC segmentation: the positions of each run of one non-blank class."""
        runs: list[list[int]] = []
        previous = BLANK
        for position, c in enumerate(classes):
            if c != BLANK:
                if c == previous:
                    runs[-1].append(position)
                else:
                    runs.append([position])
            previous = c
        return runs

    def best_classes(self, logits: torch.Tensor) -> list[list[int]]:
        """The class read at each position ([B, N, 1 + V] logits -> B lists), the blank's logit lowered by
        `blank_penalty` first."""
        if self.blank_penalty:
            logits = torch.cat([logits[..., :1] - self.blank_penalty, logits[..., 1:]], dim=-1)
        return logits.argmax(-1).tolist()

    @torch.no_grad()
    def decode(self, soft_tokens: torch.Tensor) -> list[list[int]]:
        """Greedy CTC reading: best class per soft token, repeats merged, blanks dropped -> LLM token ids."""
        vocab = self.vocab
        return [[vocab[row[run[0]] - 1] for run in self._runs(row)]
                for row in self.best_classes(self.logits(soft_tokens))]

    def heard(self, soft_tokens: torch.Tensor) -> list[torch.Tensor]:
        """What the LLM reads in `vocabulary` mode: per clip [n_i, H], one expected embedding per run of a
        non-blank class (the mean of the run's distributions over the vocabulary, blank excluded, times
        the LLM's rows). A clip read as all blank gives its least-blank position, so no clip is silent."""
        logits = self.logits(soft_tokens)
        words = logits[..., 1:].softmax(-1)                        # [B, N, V]
        out = []
        for b, row in enumerate(self.best_classes(logits)):
            runs = self._runs(row) or [[int(logits[b].log_softmax(-1)[:, BLANK].argmin())]]
            pooled = torch.stack([words[b, run].mean(0) for run in runs])
            out.append(pooled @ self.rows)
        return out
