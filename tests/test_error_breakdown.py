"""Where the held-out words are lost (ira/eval/error_breakdown.py): the word alignment, and its edits split into
alignment failures (skipped or repeated words) and wrong sounds, on hand-made reference / heard pairs."""

from __future__ import annotations

import random

import pytest

from ira.eval.error_breakdown import DEL, INS, OK, SUB, ErrorBreakdown, Step, align_words, sentence_errors
from ira.text_metrics import corpus_wer, edit_distance


def counts(errors) -> tuple[int, int, int, int, int]:
    """(substitutions, deletions, insertions, alignment edits, wrong-sound edits)."""
    return errors.substitutions, errors.deletions, errors.insertions, errors.alignment_edits, errors.sound_edits


def test_a_perfect_match_has_no_error_after_the_wer_s_normalisation():
    errors = sentence_errors("There are 12 eggs in the box, aren't there?", "there are twelve eggs in the box aren't there")
    assert counts(errors) == (0, 0, 0, 0, 0) and errors.failures == () and not errors.alignment_failure
    assert errors.reference_words == 9


def test_a_skipped_run_of_words_is_an_alignment_failure():
    errors = sentence_errors("The baker sold every loaf before noon.", "the baker sold before noon")
    assert counts(errors) == (0, 2, 0, 2, 0)
    assert errors.failures == ("skipped 'every loaf'",) and errors.alignment_failure


def test_a_word_said_twice_is_an_alignment_failure():
    errors = sentence_errors("The cat sat on the mat.", "the cat cat sat on the mat")
    assert counts(errors) == (0, 0, 1, 1, 0) and errors.failures == ("repeated 'cat'",)
    looping = sentence_errors("the cat sat", "the cat sat sat sat")
    assert counts(looping) == (0, 0, 2, 2, 0) and looping.failures == ("repeated 'sat sat'",)
    added = sentence_errors("open the door", "open we hope the door")
    assert counts(added) == (0, 0, 2, 2, 0) and added.failures == ("added 'we hope'",)


def test_substitutions_and_single_edits_among_aligned_words_are_wrong_sounds():
    assert counts(sentence_errors("the cat sat", "the hat sat")) == (1, 0, 0, 0, 1)
    assert counts(sentence_errors("the big cat sat", "the cat sat")) == (0, 1, 0, 0, 1)
    assert counts(sentence_errors("the cat sat", "the cat sat down")) == (0, 0, 1, 0, 1)
    # two deletions apart (each between aligned words) are two wrong sounds, not a skipped run
    apart = sentence_errors("one two three four five", "one three five")
    assert counts(apart) == (0, 2, 0, 0, 2) and not apart.alignment_failure
    # the garbled sentence: every word heard, every word wrong
    garbled = sentence_errors("The baker sold every loaf before noon.", "make us all we hope we follow")
    assert counts(garbled) == (7, 0, 0, 0, 7) and not garbled.alignment_failure


def test_an_empty_transcript_skips_the_whole_sentence():
    errors = sentence_errors("Please close the door.", "")
    assert counts(errors) == (0, 4, 0, 4, 0) and errors.failures == ("skipped 'please close the door'",)
    assert counts(sentence_errors("Hello.", "")) == (0, 1, 0, 0, 1)     # one word: a single deletion
    assert counts(sentence_errors("", "")) == (0, 0, 0, 0, 0)


def test_the_alignment_is_in_order_and_as_long_as_the_edit_distance():
    assert align_words(["a", "b", "c"], ["a", "x", "c", "d"]) == [
        Step(OK, "a", "a"), Step(SUB, "b", "x"), Step(OK, "c", "c"), Step(INS, None, "d")]
    assert align_words(["a", "b"], []) == [Step(DEL, "a", None), Step(DEL, "b", None)]
    rng = random.Random(0)
    for _ in range(300):
        ref = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        hyp = [rng.choice("abcde") for _ in range(rng.randint(0, 8))]
        steps = align_words(ref, hyp)
        assert [s.ref for s in steps if s.op != INS] == ref and [s.hyp for s in steps if s.op != DEL] == hyp
        assert sum(s.op != OK for s in steps) == edit_distance(ref, hyp)


def test_the_set_s_two_shares_add_up_to_its_wer():
    texts = ["The baker sold every loaf before noon.", "The cat sat on the mat.", "Please close the door.", "a b c"]
    heard = ["the baker sold before noon", "the cat cat sat on the hat", "", "a b c"]
    breakdown = ErrorBreakdown.of(texts, heard)
    figures = breakdown.figures()
    assert figures["alignment_share"] + figures["sound_share"] == pytest.approx(corpus_wer(texts, heard))
    assert (figures["substitutions"], figures["deletions"], figures["insertions"]) == (1, 6, 1)
    assert (figures["alignment_edits"], figures["sound_edits"], figures["reference_words"]) == (7, 1, 20)
    assert figures["sentences_with_alignment_failure"] == 3 and figures["sentences"] == 4
    assert figures["duration_ratio"] is None and len(breakdown.summary_lines()) == 1
    line = breakdown.summary_lines()[0]
    assert "alignment failures 0.350" in line and "in 3 of 4 sentences" in line and "wrong sounds 0.050" in line


def test_durations_against_espeak_s_are_kept_per_sentence_and_summed_up():
    texts, heard = ["a b c d", "e f", "g h"], ["a d", "e f", "g h"]
    breakdown = ErrorBreakdown.of(texts, heard, spoken_seconds=[1.0, 2.0, 3.0], reference_seconds=[2.0, 2.0, 2.0])
    assert [s.duration_ratio for s in breakdown.sentences] == [0.5, 1.0, 1.5]
    durations = breakdown.figures()["duration_ratio"]
    assert durations == {"median": 1.0, "lowest": 0.5, "highest": 1.5, "median_with_alignment_failure": 0.5,
                         "median_without": 1.25}
    assert breakdown.to_dict()["items"][0]["failures"] == ["skipped 'b c'"]
    assert "median 1.00 (0.50-1.50); 0.50 in the sentences with an alignment failure" in breakdown.summary_lines()[1]
    with pytest.raises(ValueError, match="3 sentences but 2 spoken and 3 reference durations"):
        ErrorBreakdown.of(texts, heard, spoken_seconds=[1.0, 2.0], reference_seconds=[2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="3 sentences but 2 transcripts"):
        ErrorBreakdown.of(texts, heard[:2])
