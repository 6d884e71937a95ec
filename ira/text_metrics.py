"""Character error rate: how the LLM's "repeat what was said" reply is scored against the transcript."""

from __future__ import annotations

import re
import unicodedata

_NOT_WORD = re.compile(r"[^\w\s']")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped (apostrophes kept), whitespace collapsed: casing and commas are
    not what "did the LLM hear the words" is about."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NOT_WORD.sub(" ", text).replace("_", " ")
    return _SPACES.sub(" ", text).strip()


def edit_distance(reference: str, hypothesis: str) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1), O(len(ref)) memory."""
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
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    edits = sum(edit_distance(r, normalize_text(h)) for r, h in zip(refs, hypotheses))
    return edits / max(1, sum(len(r) for r in refs))
