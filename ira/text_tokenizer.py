"""Text tokenizers for the SpeechLM: phonemes by default, characters or a Hugging Face tokenizer on request.

A small speech model cannot learn English spelling-to-sound from a few thousand sentences, so text is
read as phonemes by default (`"phoneme"`: eSpeak NG's grapheme-to-phoneme, IPA with stress marks, word
boundaries and clause punctuation), as small TTS systems (Piper, Kokoro) do. Characters (`"char"`) and
BPE pieces stay available. Every tokenizer shares one small interface (`encode`, `decode`,
`batch_encode`, `vocab_size`, `pad_id`) and serialises to a JSON-able dict that a checkpoint stores in
its metadata, so loading the checkpoint rebuilds exactly the tokenizer it was trained with.
"""

from __future__ import annotations

import string
import unicodedata
from collections import OrderedDict
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


class TextNotReadableError(ValueError):
    """The text has characters the phoneme tokenizer cannot read (another script, emoji), or nothing to say."""


# Phoneme symbols, in id order after pad (0): word boundary, clause punctuation, the letters and marks eSpeak's
# IPA output uses (plain Latin letters, IPA extensions, spacing modifiers such as stress and length, the few
# Latin-1 / Greek / phonetic-extension letters of IPA, combining diacritics). Generous on purpose: a symbol
# that no training text produced keeps an untrained embedding instead of failing at inference. Changing it
# changes every id; a checkpoint keeps its own copy in to_dict(), so old ones still load.
PHONEME_VOCAB = (" ,.;:!?" + string.ascii_lowercase
                 + "".join(map(chr, range(0x0250, 0x0300)))      # IPA extensions, spacing modifiers (ˈ ˌ ː)
                 + "æçðøŋœθβχ" + "\u1d7b\u1d7f"                  # Latin-1/Greek IPA letters; ᵻ ᵿ
                 + "".join(map(chr, range(0x0300, 0x0370))))     # combining diacritics (tie, syllabic...)
_READABLE_SYMBOLS = set("%&@+=#*/<>^~|\\_°×÷§©®™€£¥¢$")


def unreadable_characters(text: str) -> list[str]:
    """Characters of `text` that English grapheme-to-phoneme cannot read: letters of other scripts than
    Latin, emoji and other pictographs, control characters. Digits, punctuation, spaces and the usual
    symbols ($, %, &, ...) are readable: eSpeak says them."""
    bad = []
    for ch in unicodedata.normalize("NFC", text.translate(_FOLD)):
        category = unicodedata.category(ch)
        if ch.isspace() or ch.isascii() and category[0] != "C":
            continue
        if category[0] == "L":
            readable = "LATIN" in unicodedata.name(ch, "")
        elif category[0] in "PZM":
            readable = True
        elif category == "Nd":
            readable = ch.isascii()
        else:
            readable = ch in _READABLE_SYMBOLS or category == "Sc"
        if not readable and ch not in bad:
            bad.append(ch)
    return bad


class PhonemeTokenizer:
    """One id per symbol of eSpeak NG's IPA reading of the text (`voice` picks the language/dialect).

    "Hello, world!" -> "həlˈoʊ, wˈɜːld!": stress (ˈ ˌ) and length (ː) marks are symbols of their own, a
    space separates words, the punctuation that ends a clause follows it. Numbers, abbreviations and
    symbols are read by eSpeak as it speaks them ("$5" -> "five dollars"). Text it cannot read (another
    script, emoji, nothing to say) raises `TextNotReadableError` naming the characters; a symbol outside
    the vocabulary is an error too, never a silent unknown id. Ids: 0 = pad, then `symbols` in order.
    Readings are remembered (the collator encodes every batch's texts again).
    """

    pad_id = 0
    n_special = 1
    memo_size = 200_000

    def __init__(self, voice: str = "en-us", symbols: str = PHONEME_VOCAB):
        if len(set(symbols)) != len(symbols):
            raise ValueError("PhonemeTokenizer: the symbol vocabulary has duplicates")
        self.voice = voice
        self.symbols = symbols
        self._id = {ch: i + self.n_special for i, ch in enumerate(symbols)}
        self.vocab_size = len(symbols) + self.n_special
        self._memo: OrderedDict[str, str] = OrderedDict()

    def phonemize(self, text: str) -> str:
        """The IPA string the ids encode (see the class docstring)."""
        cached = self._memo.get(text)
        if cached is not None:
            return cached
        from ira.data import espeak   # the ctypes binding loads eSpeak NG on first use only

        bad = unreadable_characters(text)
        if bad:
            shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in bad[:5])
            raise TextNotReadableError(
                f"the phoneme tokenizer ({self.voice}) cannot read {shown} in {text[:80]!r}: write the text "
                "in the Latin alphabet without emoji (or train with speech_lm.text_tokenizer: char)")
        clauses = espeak.text_to_phonemes(" ".join(text.translate(_FOLD).split()), self.voice)
        phonemes = " ".join(p + mark for p, mark in clauses if p).strip()
        if not phonemes:
            raise TextNotReadableError(f"{text[:80]!r} has nothing to speak: eSpeak NG read no phoneme in it")
        unknown = sorted(set(phonemes) - set(self._id))
        if unknown:
            raise TextNotReadableError(
                f"eSpeak NG read {text[:80]!r} with symbols outside the phoneme vocabulary: "
                f"{', '.join(f'{ch!r} (U+{ord(ch):04X})' for ch in unknown)}")
        self._memo[text] = phonemes
        if len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return phonemes

    def encode(self, text: str) -> list[int]:
        return [self._id[ch] for ch in self.phonemize(text)]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            j = int(i) - self.n_special
            if int(i) != self.pad_id:
                out.append(self.symbols[j] if 0 <= j < len(self.symbols) else "\ufffd")
        return "".join(out)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch([self.encode(t) for t in texts], self.pad_id)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "phoneme", "voice": self.voice, "symbols": self.symbols}

    def __repr__(self) -> str:
        return f"PhonemeTokenizer({self.voice!r}, vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | HFTextTokenizer | PhonemeTokenizer


def build_text_tokenizer(name: str) -> Tokenizer:
    """'phoneme' (English, eSpeak's en-us reading) or 'phoneme:<eSpeak voice>' -> PhonemeTokenizer;
    'char' -> CharTokenizer; anything else is a Hugging Face tokenizer id or folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("speech_lm.text_tokenizer must be 'phoneme', 'phoneme:<eSpeak voice>', 'char' or a "
                         f"Hugging Face tokenizer id, got {name!r}")
    name = name.strip()
    if name == "phoneme" or name.startswith("phoneme:"):
        voice = name.partition(":")[2].strip() or "en-us"
        tokenizer = PhonemeTokenizer(voice)
        tokenizer.phonemize("a")   # fails now, with eSpeak's message, if the voice or library is missing
        return tokenizer
    return CharTokenizer() if name == "char" else HFTextTokenizer(name)


def text_tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded with `to_dict()`."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "phoneme":
        voice, symbols = data.get("voice"), data.get("symbols")
        if not isinstance(voice, str) or not voice or not isinstance(symbols, str) or not symbols:
            raise ValueError(f"text tokenizer metadata: 'voice' and 'symbols' must be non-empty strings, got {data!r}")
        return PhonemeTokenizer(voice, symbols)
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
    raise ValueError(f"text tokenizer metadata: unknown type {kind!r} (expected 'phoneme', 'char' or 'hf') in {data!r}")
