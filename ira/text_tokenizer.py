"""Text tokenizers for the SpeechLM: characters by default, any Hugging Face tokenizer on request.

Small speech models learn to align characters with sound far more easily than 49k-entry BPE pieces,
so `"char"` is the default. Both tokenizers share one small interface (`encode`, `decode`,
`batch_encode`, `vocab_size`, `pad_id`) and serialise to a JSON-able dict that a checkpoint stores in
its metadata, so loading the checkpoint rebuilds exactly the tokenizer it was trained with.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Any, Protocol

import torch

# The fixed character vocabulary, in id order after the two special ids (pad = 0, unk = 1).
# Changing it changes every id: a checkpoint keeps its own copy in to_dict(), so old ones still load.
CHAR_VOCAB = " " + string.ascii_lowercase + string.digits + string.punctuation

# Typographic characters folded to their ASCII look-alikes before lookup.
_FOLD = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u2026": "...", "\u00a0": " ",
})


class TextTokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...
    def to_dict(self) -> dict[str, Any]: ...


def _batch(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (ids LongTensor[B, L], mask BoolTensor[B, L])."""
    width = max((len(ids) for ids in encoded), default=0)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, seq in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = True
    return ids, mask


class CharTokenizer:
    """One id per character of a fixed vocabulary; never fails on any input string.

    Normalisation: Unicode NFKD with accents removed (é -> e), typographic quotes and dashes folded
    to ASCII, lowercase, runs of whitespace collapsed to one space, ends stripped. Any character
    still outside the vocabulary becomes `unk_id`. Ids: 0 = pad, 1 = unk, then `chars` in order.
    """

    pad_id = 0
    unk_id = 1
    n_special = 2

    def __init__(self, chars: str = CHAR_VOCAB):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the character vocabulary has duplicates")
        self.chars = chars
        self._id = {ch: i + self.n_special for i, ch in enumerate(chars)}
        self.vocab_size = len(chars) + self.n_special

    @staticmethod
    def normalize(text: str) -> str:
        text = unicodedata.normalize("NFKD", text.translate(_FOLD))
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
        return " ".join(text.lower().split())

    def encode(self, text: str) -> list[int]:
        return [self._id.get(ch, self.unk_id) for ch in self.normalize(text)]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            j = i - self.n_special
            out.append(self.chars[j] if 0 <= j < len(self.chars) else "\ufffd")
        return "".join(out)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch([self.encode(t) for t in texts], self.pad_id)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTextTokenizer:
    """A Hugging Face tokenizer (hub id or local folder), used without special tokens."""

    def __init__(self, name: str, local_files_only: bool | None = None):
        from transformers import AutoTokenizer

        kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        except Exception as exc:  # the library raises OSError, ValueError, ... depending on the cause
            raise ValueError(
                f"cannot load the Hugging Face tokenizer {name!r} (speech_lm.text_tokenizer): {exc}. "
                "Use 'char', a local folder holding tokenizer files, or a hub id with network access."
            ) from exc
        self.name = name
        tok = self.tokenizer
        self.vocab_size = len(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch([self.encode(t) for t in texts], self.pad_id)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "hf", "name": self.name, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return f"HFTextTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def build_text_tokenizer(name: str) -> CharTokenizer | HFTextTokenizer:
    """'char' -> CharTokenizer; anything else is a Hugging Face tokenizer id or folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"speech_lm.text_tokenizer must be 'char' or a Hugging Face tokenizer id, got {name!r}")
    return CharTokenizer() if name.strip() == "char" else HFTextTokenizer(name.strip())


def text_tokenizer_from_dict(data: dict[str, Any]) -> CharTokenizer | HFTextTokenizer:
    """Rebuild the tokenizer a checkpoint recorded with `to_dict()`."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        chars = data.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"text tokenizer metadata: 'chars' must be a non-empty string, got {chars!r}")
        return CharTokenizer(chars)
    if kind == "hf":
        tokenizer = HFTextTokenizer(str(data.get("name")))
        expected = data.get("vocab_size")
        if expected is not None and int(expected) != tokenizer.vocab_size:
            raise ValueError(
                f"text tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} entries but the checkpoint was "
                f"trained with {expected}: it is not the same tokenizer")
        return tokenizer
    raise ValueError(f"text tokenizer metadata: unknown type {kind!r} (expected 'char' or 'hf') in {data!r}")
