"""A large, deterministic pool of English sentences for the synthetic speech corpus.

Why it exists: a speech model trained on the 484 hand-written sentences of `sentences.txt`
memorises them instead of learning to read. The pool keeps those sentences first and adds tens
of thousands of generated ones, so a corpus of 20,000 clips repeats no sentence, and spreads the
text over many words, names, numbers and sentence shapes for phonetic diversity. The generated
part never contains a sentence of `heldout_sentences.txt` (nor one that opens with the same five
words): those 40 hand-written sentences measure whether the model can speak text it never saw.

The generator is a small template grammar over the word lists in `sentence_words.json`. A template
slot is `{name}` or `{name:argument}`:

- `{S}` the sentence's subject (a name, a pronoun, "my aunt", "the baker", "my parents", ...);
  `{be}`, `{was}`, `{have}`, `{do}`, `{poss}` (his/her/their/...), `{role}` ("a baker"/"bakers")
  and `{pres:V}` agree with it. Commands speak to "you".
- `{pres:V}`, `{past:V}`, `{pp:V}`, `{ing:V}`, `{base:V}`: a verb form, V a verb list or a verb.
- `{P}` another person (third person singular); `{Pposs}` his/her for the last one; `{name}`.
- `{a:N}`, `{the:N}`, `{n:N}` (optional adjective), `{word:N}`, `{pl:N}`, `{plural:N}`, `{np:N}`
  (some determiner), `{own:N}` (the subject's, plural for a plural subject), `{count:N}`
  ("47 sheep"), `{list:N}` ("x, y and z"), N a noun list or lists
  joined with "+"; `{num:LO-HI}` and `{ordinal:LO-HI}` as digits.
- Any other name picks an entry of that list (entries may hold slots themselves).

Everything is drawn from one `random.Random` seeded with a fixed string, so the pool is the same
on every platform and Python version.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

DATA_DIR = Path(__file__).parent
BUNDLED_FILE = DATA_DIR / "sentences.txt"
WORDS_FILE = DATA_DIR / "sentence_words.json"
HELDOUT_FILE = DATA_DIR / "heldout_sentences.txt"

SEED = "ira-sentence-pool-v1"
GENERATED = 25_000
"""Generated sentences after the bundled ones."""
MIN_WORDS, MAX_WORDS = 3, 25
KIND_WEIGHTS = {"statement": 55, "question": 25, "exclamation": 10, "command": 10}
OPENING_WORDS = 5
"""A generated sentence may not open with the same this-many words as a held-out sentence."""

_SLOT = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
_WORD = re.compile(r"[a-z0-9]+(?:['.:-][a-z0-9]+)*")


class _Subject(NamedTuple):
    text: str
    person: int  # 1, 2 or 3
    plural: bool
    poss: str  # my, your, his, her, our, their

    @property
    def third_singular(self) -> bool:
        return self.person == 3 and not self.plural


_YOU = _Subject("you", 2, False, "your")
_PRONOUNS = (_Subject("I", 1, False, "my"), _YOU, _Subject("he", 3, False, "his"),
             _Subject("she", 3, False, "her"), _Subject("we", 1, True, "our"),
             _Subject("they", 3, True, "their"))


def normalise(sentence: str) -> str:
    """The key that makes two sentences 'the same': lowercase, one space, no final punctuation."""
    return " ".join(sentence.lower().split()).rstrip(".!?").rstrip()


def opening(sentence: str, n: int = OPENING_WORDS) -> tuple[str, ...]:
    """The first `n` words, lowercase and without punctuation."""
    return tuple(_WORD.findall(sentence.lower())[:n])


def _read_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def bundled_sentences() -> tuple[str, ...]:
    """The hand-written `sentences.txt`, one sentence a line."""
    return _read_lines(BUNDLED_FILE)


def heldout_sentences() -> tuple[str, ...]:
    """The hand-written test sentences that no pool sentence equals or shares an opening with."""
    return _read_lines(HELDOUT_FILE)


@lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """The bundled sentences, then GENERATED generated ones; all distinct after `normalise`."""
    bundled = bundled_sentences()
    return bundled + tuple(text for _, text in generate(GENERATED, avoid=bundled))


def generate(count: int, seed: str = SEED, avoid: Iterable[str] = ()) -> list[tuple[str, str]]:
    """`count` distinct (kind, sentence) pairs, kind one of KIND_WEIGHTS; none in `avoid` or held out."""
    grammar = _Grammar(json.loads(WORDS_FILE.read_text(encoding="utf-8")), random.Random(seed))
    heldout = heldout_sentences()
    seen = {normalise(s) for s in (*avoid, *heldout)}
    banned_openings = {opening(s) for s in heldout}
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 3 * count:
            raise RuntimeError(f"the grammar gave only {len(out)} distinct sentences of {count}")
        kind = grammar.rng.choices(kinds, weights)[0]
        text = grammar.sentence(kind)
        key = normalise(text)
        if (key in seen or opening(text) in banned_openings
                or not MIN_WORDS <= len(text.split()) <= MAX_WORDS):
            continue
        seen.add(key)
        out.append((kind, text))
    return out


class _Grammar:
    """Expands the templates of sentence_words.json with one random generator."""

    def __init__(self, data: dict[str, Any], rng: random.Random) -> None:
        self.rng = rng
        self.templates: dict[str, list[str]] = data["templates"]
        self.lists: dict[str, list[str]] = {**data["phrases"], **data["words"]}
        self.noun_adjectives: dict[str, list[str]] = data["noun_adjectives"]
        self.always_adjective = frozenset(data["always_adjective"])
        self.uncountable = frozenset(data["uncountable"])
        self.plurals: dict[str, str] = data["irregular_plurals"]
        self.verbs: dict[str, list[str]] = data["irregular_verbs"]
        self.double = frozenset(data["double_final_consonant"])
        self.a_prefixes = tuple(data["a_before_vowel_letter"])
        self.an_prefixes = tuple(data["an_before_h"])
        self._parsed: dict[str, list[str | tuple[str, str | None]]] = {}
        self.slots: dict[str, Callable[[str | None], str]] = {
            "S": lambda _: self._subject().text,
            "be": lambda _: self._agree("am", "is", "are"),
            "was": lambda _: self._agree("was", "was", "were"),
            "have": lambda _: self._agree("have", "has", "have"),
            "do": lambda _: self._agree("do", "does", "do"),
            "poss": lambda _: self._subject().poss,
            "role": self._role,
            "pres": lambda v: self._inflect(v, "third" if self._subject().third_singular else "base"),
            "past": lambda v: self._inflect(v, "past"),
            "pp": lambda v: self._inflect(v, "pp"),
            "ing": lambda v: self._inflect(v, "ing"),
            "base": lambda v: self._inflect(v, "base"),
            "P": lambda _: self._person()[0],
            "Pposs": lambda _: self.person_poss,
            "name": lambda _: self._first_name(self.rng.choice("fm")),
            "a": lambda n: self.article(self._noun(n, 0.3)),
            "the": lambda n: "the " + self._noun(n, 0.3),
            "n": lambda n: self._noun(n, 0.3),
            "word": lambda n: self._noun(n, 0.0),
            "pl": lambda n: self._noun(n, 0.3, plural=True),
            "plural": lambda n: self._noun(n, 0.0, plural=True),
            "np": self._np,
            "own": lambda n: f"{self._subject().poss} {self._noun(n, 0.3, plural=self._subject().plural)}",
            "count": lambda n: f"{self._count()} {self._noun(n, 0.2, plural=True)}",
            "list": self._list,
            "num": lambda r: str(self.rng.randint(*self._range(r))),
            "ordinal": lambda r: _ordinal(self.rng.randint(*self._range(r))),
        }
        self.subject: _Subject | None = None
        self.person_poss = "their"
        self.kind = ""
        self.used: set[str] = set()

    # -- sentences and slots --------------------------------------------------------------------

    def sentence(self, kind: str) -> str:
        self.used = set()
        self.kind = kind
        self.subject = _YOU if kind == "command" else None
        text = self.expand(self.rng.choice(self.templates[kind]))
        return text[0].upper() + text[1:]

    def expand(self, text: str) -> str:
        parts = self._parsed.get(text)
        if parts is None:
            parts = self._parsed[text] = _parse(text)
        return "".join(p if isinstance(p, str) else self._slot(*p) for p in parts)

    def _slot(self, name: str, arg: str | None) -> str:
        handler = self.slots.get(name)
        return handler(arg) if handler else self.expand(self.pick(name))

    def pick(self, name: str) -> str:
        """An entry of list `name`, avoiding one already used in this sentence."""
        options = self.lists[name]
        for _ in range(8):
            choice = self.rng.choice(options)
            if choice not in self.used:
                break
        self.used.add(choice)
        return choice

    # -- people ---------------------------------------------------------------------------------

    def _subject(self) -> _Subject:
        if self.subject is None:
            r = self.rng.random()
            if r < 0.2:  # no "I" in questions ("How long have I lived in Leeds?")
                self.subject = self.rng.choice(_PRONOUNS[self.kind == "question":])
            elif r < 0.78:
                text, poss = self._person()
                self.subject = _Subject(text, 3, False, poss)
            else:
                self.subject = _Subject(self._group(), 3, True, "their")
        return self.subject

    def _agree(self, first: str, third: str, other: str) -> str:
        subject = self._subject()
        if subject.person == 1 and not subject.plural:
            return first
        return third if subject.third_singular else other

    def _first_name(self, gender: str) -> str:
        return self.pick("first_names_female" if gender == "f" else "first_names_male")

    def _person(self) -> tuple[str, str]:
        """A third-person singular person and his/her."""
        gender = self.rng.choice("fm")
        r = self.rng.random()
        if r < 0.45:
            text = self._first_name(gender)
        elif r < 0.62:
            text = f"{self._first_name(gender)} {self.pick('family_names')}"
        elif r < 0.75:
            titles = ("Mrs", "Miss", "Dr", "Professor") if gender == "f" else ("Mr", "Dr", "Professor")
            text = f"{self.rng.choice(titles)} {self.pick('family_names')}"
        elif r < 0.88:
            kind = self.rng.choice(("relatives_f", "relatives_m", "relatives_n"))
            gender = {"relatives_f": "f", "relatives_m": "m"}.get(kind, gender)
            text = f"{self._owner()} {self.pick(kind)}"
        else:
            text = "the " + self._noun("jobs", 0.3)
        self.person_poss = "her" if gender == "f" else "his"
        return text, self.person_poss

    def _owner(self) -> str:
        if self.rng.random() < 0.25:
            return self._first_name(self.rng.choice("fm")) + "'s"
        return self.rng.choice(("my", "my", "our", "your", "his", "her", "their"))

    def _group(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return f"{self._owner()} {self.pick('groups')}"
        if r < 0.7:
            return f"{self._first_name(self.rng.choice('fm'))} and {self._first_name(self.rng.choice('fm'))}"
        if r < 0.85:
            return "the " + self.pick("the_groups")
        return "the " + self._noun("jobs", 0.2, plural=True)

    def _role(self, _: str | None) -> str:
        if self._subject().plural:
            return self._noun("jobs", 0.0, plural=True)
        return self.article(self._noun("jobs", 0.2))

    # -- nouns ----------------------------------------------------------------------------------

    def _noun(self, lists: str, adjective_p: float, plural: bool = False) -> str:
        """A word of one of the '+'-joined noun lists, perhaps plural, perhaps after an adjective."""
        category = self.rng.choice(lists.split("+"))
        word = self.pick(category)
        if plural and category not in self.uncountable:
            word = self.plural(word)
        adjectives = self.noun_adjectives.get(category)
        if adjectives and (lists in self.always_adjective or self.rng.random() < adjective_p):
            word = f"{self.pick(self.rng.choice(adjectives))} {word}"
        return word

    def _np(self, lists: str) -> str:
        noun = self._noun(lists, 0.35)
        r = self.rng.random()
        if r < 0.35:
            return self.article(noun)
        if r < 0.6:
            return "the " + noun
        if r < 0.8:
            return f"{self._subject().poss} {noun}"
        if r < 0.9:
            return f"{self.rng.choice(('this', 'that'))} {noun}"
        return f"{self._first_name(self.rng.choice('fm'))}'s {noun}"

    def _list(self, lists: str) -> str:
        items = [self._noun(lists, 0.15, plural=True) for _ in range(self.rng.choice((2, 3, 3, 4)))]
        return ", ".join(items[:-1]) + " and " + items[-1]

    def _count(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(2, 20)
        return self.rng.randint(21, 99) if r < 0.93 else self.rng.randint(100, 500)

    def plural(self, noun: str) -> str:
        head, _, last = noun.rpartition(" ")
        if last in self.plurals:
            last = self.plurals[last]
        elif last.endswith(("s", "x", "z", "ch", "sh")):
            last += "es"
        elif last.endswith("y") and last[-2] not in "aeiou":
            last = last[:-1] + "ies"
        else:
            last += "s"
        return f"{head} {last}" if head else last

    def article(self, phrase: str) -> str:
        word = phrase.lower()
        if word.startswith(self.an_prefixes):
            return "an " + phrase
        if word.startswith(self.a_prefixes) or word[0] not in "aeiou":
            return "a " + phrase
        return "an " + phrase

    # -- verbs ----------------------------------------------------------------------------------

    def _inflect(self, verb: str | None, form: str) -> str:
        """A form of the first word of `verb` (a verb list, or a verb such as "look for")."""
        assert verb, "a verb slot needs a verb or a verb list"
        phrase = self.pick(verb) if verb in self.lists else verb
        head, _, rest = phrase.partition(" ")
        if form == "third":
            head = _third_person(head)
        elif form in ("past", "pp"):
            head = self._past(head, 0 if form == "past" else 1)
        elif form == "ing":
            head = self._ing(head)
        return f"{head} {rest}" if rest else head

    def _past(self, verb: str, index: int) -> str:
        if verb in self.verbs:
            return self.verbs[verb][index]
        if verb.endswith("e"):
            return verb + "d"
        if verb.endswith("y") and verb[-2] not in "aeiou":
            return verb[:-1] + "ied"
        return verb + verb[-1] + "ed" if verb in self.double else verb + "ed"

    def _ing(self, verb: str) -> str:
        if verb.endswith("ie"):
            return verb[:-2] + "ying"
        if verb.endswith("e") and not verb.endswith(("ee", "oe", "ye")) and verb != "be":
            return verb[:-1] + "ing"
        return verb + verb[-1] + "ing" if verb in self.double else verb + "ing"

    @staticmethod
    def _range(text: str | None) -> tuple[int, int]:
        low, _, high = (text or "").partition("-")
        return int(low), int(high)


def _parse(text: str) -> list[str | tuple[str, str | None]]:
    """A template as literal strings and (slot name, argument) pairs."""
    parts: list[str | tuple[str, str | None]] = []
    position = 0
    for match in _SLOT.finditer(text):
        if match.start() > position:
            parts.append(text[position:match.start()])
        parts.append((match.group(1), match.group(2)))
        position = match.end()
    if position < len(text):
        parts.append(text[position:])
    return parts


def _third_person(verb: str) -> str:
    if verb == "have":
        return "has"
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
