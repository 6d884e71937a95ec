"""Error rates of text against a reference: characters (the LLM's "repeat what was said" reply against the
transcript) and words (what an ASR heard in generated speech against the sentence it was to speak)."""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, Sequence

_NOT_WORD = re.compile(r"[^\w\s']")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped (apostrophes kept), whitespace collapsed: casing and commas are
    not what "did the LLM hear the words" is about."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NOT_WORD.sub(" ", text).replace("_", " ")
    return _SPACES.sub(" ", text).strip()


def edit_distance(reference: str | list[str], hypothesis: str | list[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two strings or two
    word lists, O(len(ref)) memory."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_char in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_char in enumerate(hypothesis, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_char != hyp_char))
        previous = current
    return previous[-1]


def character_error_rate(reference: str, hypothesis: str, normalize: bool = True) -> float:
    """Edits / reference length, after `normalize_text` by default. Can exceed 1 (a long wrong reply);
    an empty reference scores 0 for an empty reply and 1 otherwise."""
    if normalize:
        reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    if not reference:
        return 0.0 if not hypothesis else 1.0
    return edit_distance(reference, hypothesis) / len(reference)


def corpus_cer(references: list[str], hypotheses: list[str]) -> float:
    """Total edits / total reference characters over a set of clips (long clips weigh more)."""
    return _corpus_rate(references, hypotheses, normalize_text)


def _corpus_rate(references: list[str], hypotheses: list[str], units: Callable[[str], Sequence]) -> float:
    """Total edits / total reference units, each text cut into units by `units`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [units(r) for r in references]
    edits = sum(edit_distance(r, units(h)) for r, h in zip(refs, hypotheses))
    return edits / max(1, sum(len(r) for r in refs))


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
            "nine": "ninth", "twelve": "twelfth"}
_NUMBER = re.compile(r"(\d+)(st|nd|rd|th)?\b")


def number_words(n: int) -> str:
    """A non-negative integer in words, as people read it: 47 -> "forty seven", 1987 -> "nineteen eighty
    seven" (years 1100-1999 and 2010-2099 in pairs), 2005 -> "two thousand five"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if 1100 <= n <= 1999 or 2010 <= n <= 2099:
        high, low = divmod(n, 100)
        return number_words(high) + (" hundred" if low == 0 else " oh " + _ONES[low] if low < 10
                                     else " " + number_words(low))
    for size, name in ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            high, low = divmod(n, size)
            return number_words(high) + " " + name + ("" if low == 0 else " " + number_words(low))
    raise AssertionError(n)


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    last = _ORDINAL.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return f"{head} {last}".strip()


def spoken_form(text: str) -> str:
    """`normalize_text` with digits read out (47 -> forty seven, 3rd -> third, 7:30 -> seven thirty) and
    hyphens as spaces, so that "47", "forty-seven" and "forty seven" are the same words to compare."""
    def say(match: re.Match) -> str:
        digits = match.group(1)
        if len(digits) > 12:
            return " ".join(_ONES[int(d)] for d in digits)
        words = number_words(int(digits))
        return f" {_ordinal(words) if match.group(2) else words} "
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    return normalize_text(_NUMBER.sub(say, text))


def spoken_words(text: str) -> list[str]:
    """The words of `text` in `spoken_form`: what the word error rates (and `ira.eval.error_breakdown`) compare."""
    return spoken_form(text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word edits / reference words, both in `spoken_form`. Can exceed 1; an empty reference scores 0 for
    an empty hypothesis and 1 otherwise."""
    ref, hyp = spoken_words(reference), spoken_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Total word edits / total reference words over a set of clips (in `spoken_form`)."""
    return _corpus_rate(references, hypotheses, spoken_words)
