"""The sentence pool of the synthetic corpus: size, distinctness, determinism, shape, held-out text."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from ira.data import sentence_pool as sp
from ira.data.sentence_pool import generate, heldout_sentences, normalise, opening, sentence_pool

BUNDLED = 484
FIRST_50_SHA256 = "1909f839ce44fc72a14ea35a2009bbf482dddfc914f0452c28c24302885148f0"
"""sha256 of the first 50 generated sentences joined by newlines: a change to the grammar, the
word lists or the seed changes it. If the change is meant, pin the new value (and note that the
synthetic corpus built from the old pool no longer matches)."""

# a/an by spelling, with the usual exceptions: "an hour", "a university", "a euphonium", "a one".
AN_BEFORE_CONSONANT_LETTER = ("hour", "honest", "honour", "heir")
A_BEFORE_VOWEL_LETTER = ("uni", "use", "usu", "ute", "uk", "eu", "one")


@pytest.fixture(scope="module")
def pool() -> tuple[str, ...]:
    return sentence_pool()


@pytest.fixture(scope="module")
def generated(pool) -> list[tuple[str, str]]:
    """A fresh build of the generated part: (kind, sentence) pairs."""
    return generate(sp.GENERATED, avoid=pool[:BUNDLED])


@pytest.fixture(scope="module")
def words() -> dict:
    return json.loads(sp.WORDS_FILE.read_text(encoding="utf-8"))


def test_pool_is_large_and_distinct_after_normalising(pool):
    assert len(pool) >= 20_000 and len(pool) - BUNDLED >= 25_000
    assert len({normalise(s) for s in pool}) == len(pool)
    assert normalise("  The  Cat sat.") == normalise("the cat sat!") == "the cat sat"


def test_sentences_are_3_to_25_words_and_well_formed(pool):
    counts = [len(s.split()) for s in pool]
    assert min(counts) >= 3 and max(counts) <= 25
    for s in pool[BUNDLED:]:
        assert s[0].isupper() or s[0].isdigit(), s
        assert s[-1] in ".?!" and "{" not in s and "}" not in s and "  " not in s and s == s.strip(), s


def test_bundled_sentences_come_first(pool):
    path = Path(sp.__file__).with_name("sentences.txt")
    bundled = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(bundled) == BUNDLED
    assert list(pool[:BUNDLED]) == bundled


def test_pool_is_deterministic_and_pinned(pool, generated):
    again = generated
    assert tuple(text for _, text in again) == pool[BUNDLED:]
    assert generate(100, avoid=pool[:BUNDLED]) == again[:100]  # a shorter run is a prefix
    digest = hashlib.sha256("\n".join(pool[BUNDLED:BUNDLED + 50]).encode()).hexdigest()
    assert digest == FIRST_50_SHA256, digest


def test_kinds_of_sentence_in_roughly_the_asked_proportions(pool, generated):
    kinds = Counter(kind for kind, _ in generated)
    share = {kind: n / sp.GENERATED for kind, n in kinds.items()}
    assert 0.50 <= share["statement"] <= 0.60
    assert 0.20 <= share["question"] <= 0.30
    assert 0.07 <= share["exclamation"] <= 0.13 and 0.07 <= share["command"] <= 0.13
    n = len(pool)
    assert 0.20 <= sum(s.endswith("?") for s in pool) / n <= 0.30
    assert 0.07 <= sum(s.endswith("!") for s in pool) / n <= 0.13


def test_numbers_and_names_are_common(pool, words):
    n = len(pool)
    assert sum(bool(re.search(r"\d", s)) for s in pool) / n >= 0.15
    lists = ("first_names_female", "first_names_male", "family_names", "towns", "countries", "streets")
    names = {part for key in lists for name in words["words"][key] for part in name.split() if part[0].isupper()}

    def names_a_person_or_place(sentence: str) -> bool:
        tokens = re.findall(r"[A-Za-z][A-Za-z'-]*", sentence)[1:]  # not the first word
        return any(token.split("'")[0] in names for token in tokens)

    assert sum(names_a_person_or_place(s) for s in pool) / n >= 0.30
    assert any(re.search(r"\bin (1[89]|20)\d\d\b", s) for s in pool)             # years
    assert any(re.search(r"\bat \d{1,2}:\d\d\b", s) for s in pool)               # times
    assert any(re.search(r"\b\d+ o'clock\b", s) for s in pool)
    assert any(re.search(r"\b\d+ (pounds|dollars|euros|pence)\b", s) for s in pool)  # prices
    assert any(re.search(r"\bthe \d+(st|nd|rd|th) of [A-Z]", s) for s in pool)  # dates


def test_articles_agree_with_the_next_word(pool):
    checked = Counter()
    for sentence in pool:
        for article, word in re.findall(r"\b([Aa]n?) ([A-Za-z][\w'-]*)", sentence):
            lower = word.lower()
            if lower.startswith(AN_BEFORE_CONSONANT_LETTER):
                expected = "an"
            elif lower.startswith(A_BEFORE_VOWEL_LETTER):
                expected = "a"
            else:
                expected = "an" if lower[0] in "aeiou" else "a"
            assert article.lower() == expected, sentence
            checked[expected] += 1
    assert checked["a"] > 3_000 and checked["an"] > 400
    text = "\n".join(pool)
    assert "a university" in text and "an hour" in text and "an honest" in text  # the exceptions occur


def test_heldout_sentences_are_never_in_the_pool(pool):
    heldout = heldout_sentences()
    assert len(heldout) == 40 and len({normalise(s) for s in heldout}) == 40
    assert all(6 <= len(s.split()) <= 18 for s in heldout)
    assert sum(s.endswith("?") for s in heldout) >= 5
    assert sum(bool(re.search(r"\d", s)) for s in heldout) >= 3
    pool_keys = {normalise(s) for s in pool}
    pool_openings = {opening(s) for s in pool}
    for sentence in heldout:
        assert normalise(sentence) not in pool_keys, sentence
        assert opening(sentence) not in pool_openings, sentence


def test_grammar_is_large_and_varied(words):
    templates = words["templates"]
    assert sum(len(t) for t in templates.values()) >= 40
    assert all(len(templates[kind]) >= 8 for kind in ("question", "exclamation", "command"))
    vocabulary = {token.lower() for entries in words["words"].values() for entry in entries
                  for token in re.findall(r"[A-Za-z][A-Za-z'-]*", entry)}
    assert len(vocabulary) >= 2000
