"""Where the held-out words are lost: each sentence's reference words aligned with what the ASR heard, and the
edits split into alignment failures and wrong sounds.

A SpeechLM can lose a word two ways. Its attention over the text can slip, or its speech can end too early or run
on: words are then skipped or said again. Or it stays on the text and says a word badly. The two call for different
levers (the text's mask, frames per step, the length of what it predicts, against more learning), and one WER
cannot tell them apart. So each edit of the word-level Levenshtein alignment (the same words, in `spoken_form`,
that `ira.text_metrics.word_error_rate` compares, and as many edits) is one of:

- an alignment failure: a run of 2 or more consecutive deletions (words skipped), a run of 2 or more
  consecutive insertions (words added, an ASR or a model looping), or an inserted word that repeats the
  reference word next to it (a word said twice);
- a wrong sound: a substitution, or a single deletion or insertion among otherwise aligned words.

The two shares are edits per reference word, so they add up to the WER. Optionally each sentence carries its
spoken duration against eSpeak's of the same sentence: a model that skips words tends to speak for too short a
time, one that loops for too long.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ira.text_metrics import spoken_words

OK, SUB, DEL, INS = "ok", "sub", "del", "ins"
MIN_RUN = 2
"""Consecutive deletions (or insertions) from this many on are an alignment failure, not a wrong sound."""


@dataclass(frozen=True)
class Step:
    """One step of an alignment: `op` is OK, SUB, DEL (a reference word not heard) or INS (a word heard that
    the reference does not have); `ref` / `hyp` the words, None where the step has none."""
    op: str
    ref: Optional[str]
    hyp: Optional[str]


def align_words(reference: Sequence[str], hypothesis: Sequence[str]) -> list[Step]:
    """A minimum-edit alignment (substitution, insertion and deletion all cost 1) of two word lists, in order.
    Its edits are `ira.text_metrics.edit_distance(reference, hypothesis)`. Among equal alignments the backtrace
    prefers a match or substitution, then a deletion, then an insertion."""
    n, m = len(reference), len(hypothesis)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]),
                             cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    steps: list[Step] = []
    i, j = n, m
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            same = reference[i - 1] == hypothesis[j - 1]
            steps.append(Step(OK if same else SUB, reference[i - 1], hypothesis[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            steps.append(Step(DEL, reference[i - 1], None))
            i -= 1
        else:
            steps.append(Step(INS, None, hypothesis[j - 1]))
            j -= 1
    return steps[::-1]


@dataclass(frozen=True)
class SentenceErrors:
    """One sentence's edits; `failures` says what each alignment failure was ("skipped 'before noon'",
    "added 'we hope'", "repeated 'the'"); `duration_ratio` is its spoken duration / eSpeak's, when measured."""
    reference_words: int
    substitutions: int
    deletions: int
    insertions: int
    alignment_edits: int
    failures: tuple[str, ...] = ()
    duration_ratio: Optional[float] = None

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def sound_edits(self) -> int:
        return self.edits - self.alignment_edits

    @property
    def alignment_failure(self) -> bool:
        return self.alignment_edits > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": list(self.failures), "sound_edits": self.sound_edits}


def sentence_errors(reference: str, heard: str, duration_ratio: Optional[float] = None) -> SentenceErrors:
    """The edits of `heard` against `reference` (both in `spoken_form`), classified as the module says."""
    steps = align_words(spoken_words(reference), spoken_words(heard))
    counts = {op: sum(step.op == op for step in steps) for op in (SUB, DEL, INS)}
    alignment, failures = 0, []
    start = 0
    while start < len(steps):
        end = start
        while end < len(steps) and steps[end].op == steps[start].op:
            end += 1
        op, run = steps[start].op, steps[start:end]
        if op == DEL and len(run) >= MIN_RUN:
            alignment += len(run)
            failures.append(f"skipped {_quoted(s.ref for s in run)}")
        elif op == INS:
            # a maximal run of insertions sits between steps that carry reference words
            neighbours = {steps[k].ref for k in (start - 1, end) if 0 <= k < len(steps)}
            repeats = all(s.hyp in neighbours for s in run)
            if repeats or len(run) >= MIN_RUN:
                alignment += len(run)
                failures.append(f"{'repeated' if repeats else 'added'} {_quoted(s.hyp for s in run)}")
        start = end
    return SentenceErrors(sum(step.op != INS for step in steps), counts[SUB], counts[DEL], counts[INS], alignment,
                          tuple(failures), duration_ratio)


def _quoted(words: Any) -> str:
    return "'" + " ".join(words) + "'"


@dataclass(frozen=True)
class ErrorBreakdown:
    """The edits of a set of sentences (`sentences`, in the set's order), classified, with their totals."""
    sentences: list[SentenceErrors] = field(default_factory=list)

    @classmethod
    def of(cls, texts: Sequence[str], heard: Sequence[str], spoken_seconds: Optional[Sequence[float]] = None,
           reference_seconds: Optional[Sequence[float]] = None) -> "ErrorBreakdown":
        """Each text against what was heard; with both durations (the speech the ASR heard, and eSpeak's of the
        same sentence), each sentence's duration ratio too."""
        if len(texts) != len(heard):
            raise ValueError(f"{len(texts)} sentences but {len(heard)} transcripts")
        ratios: list[Optional[float]] = [None] * len(texts)
        if spoken_seconds is not None and reference_seconds is not None:
            if not len(spoken_seconds) == len(reference_seconds) == len(texts):
                raise ValueError(f"{len(texts)} sentences but {len(spoken_seconds)} spoken and "
                                 f"{len(reference_seconds)} reference durations")
            ratios = [s / r if r > 0 else None for s, r in zip(spoken_seconds, reference_seconds)]
        return cls([sentence_errors(t, h, r) for t, h, r in zip(texts, heard, ratios)])

    def _total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.sentences)

    @property
    def reference_words(self) -> int:
        return self._total("reference_words")

    @property
    def alignment_share(self) -> float:
        """Alignment-failure edits per reference word (with `sound_share`, the WER)."""
        return self._total("alignment_edits") / max(1, self.reference_words)

    @property
    def sound_share(self) -> float:
        """Wrong-sound edits per reference word."""
        return self._total("sound_edits") / max(1, self.reference_words)

    @property
    def sentences_with_alignment_failure(self) -> int:
        return sum(s.alignment_failure for s in self.sentences)

    def durations(self) -> Optional[dict[str, Any]]:
        """The duration ratios (spoken / eSpeak's) over the set: median, lowest, highest, and the median of the
        sentences with and without an alignment failure; None when no duration was measured."""
        ratios = [s.duration_ratio for s in self.sentences if s.duration_ratio is not None]
        if not ratios:
            return None

        def median(failed: bool) -> Optional[float]:
            some = [s.duration_ratio for s in self.sentences
                    if s.duration_ratio is not None and s.alignment_failure == failed]
            return statistics.median(some) if some else None

        return {"median": statistics.median(ratios), "lowest": min(ratios), "highest": max(ratios),
                "median_with_alignment_failure": median(True), "median_without": median(False)}

    def figures(self) -> dict[str, Any]:
        """The set's figures (what `ira eval speech` records beside the checkpoint)."""
        return {"reference_words": self.reference_words, "alignment_share": self.alignment_share,
                "sound_share": self.sound_share, "substitutions": self._total("substitutions"),
                "deletions": self._total("deletions"), "insertions": self._total("insertions"),
                "alignment_edits": self._total("alignment_edits"), "sound_edits": self._total("sound_edits"),
                "sentences": len(self.sentences),
                "sentences_with_alignment_failure": self.sentences_with_alignment_failure,
                "duration_ratio": self.durations()}

    def to_dict(self) -> dict[str, Any]:
        """`figures` and every sentence's (`items`, in the order of the set)."""
        return {**self.figures(), "items": [s.to_dict() for s in self.sentences]}

    def summary_lines(self) -> list[str]:
        """One line of where the words were lost, and one of the durations when they were measured."""
        f = self.figures()
        lines = [f"  errors         alignment failures {f['alignment_share']:.3f} of the words (skipped or repeated, "
                 f"in {f['sentences_with_alignment_failure']} of {f['sentences']} sentences), wrong sounds "
                 f"{f['sound_share']:.3f}; substitutions {f['substitutions']}, deletions {f['deletions']}, "
                 f"insertions {f['insertions']}"]
        durations = f["duration_ratio"]
        if durations is not None:
            failed = durations["median_with_alignment_failure"]
            lines.append(f"  duration       spoken / eSpeak's: median {durations['median']:.2f} "
                         f"({durations['lowest']:.2f}-{durations['highest']:.2f})"
                         + ("" if failed is None else f"; {failed:.2f} in the sentences with an alignment failure"))
        return lines
