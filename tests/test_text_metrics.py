"""Character error rate, the score of "repeat what was said"."""

import pytest

from ira.text_metrics import character_error_rate, corpus_cer, edit_distance, normalize_text


def test_edit_distance_counts_each_kind_of_edit():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("abc", "abc") == 0


def test_cer_ignores_case_and_punctuation_but_not_words():
    assert character_error_rate("Hello, World!", "hello world") == 0.0
    assert normalize_text("  It's   a TEST. ") == "it's a test"
    assert character_error_rate("hello world", "hello") == pytest.approx(6 / 11)
    assert character_error_rate("abc", "xyzxyzxyz") > 1.0          # a long wrong reply is worse than none
    assert character_error_rate("", "") == 0.0 and character_error_rate("", "x") == 1.0


def test_corpus_cer_weighs_by_reference_length():
    assert corpus_cer(["aaaa", "bb"], ["aaaa", "xx"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="references"):
        corpus_cer(["a"], [])
