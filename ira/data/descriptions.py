"""Plain-language voice descriptions, built compositionally from measured levels and known labels.

`attribute_levels` places a clip on discrete scales (pitch, rate, loudness, pitch variation, relative to
the corpus quantiles of `ira.data.annotate.fit_annotation_stats`) and reads its labels (gender, accent,
age, voice quality). `describe` turns those levels into several different sentences: each picks a
sentence frame, a subset of the attributes, a synonym for each and an order, e.g.

    "A slow, deep male voice with a Scottish accent."
    "Scottish man speaking slowly in a low voice"
    "The speaker talks fast with a high pitch."

Two disjoint vocabularies exist. `family="train"` is what training sees. `family="heldout"` is used
ONLY to evaluate retrieval on wordings never seen in training; it has its own sentence frames
(`FRAMES["heldout"]`: "Imagine ...", "This recording features ... whose voice is ...", "I'd like to
hear ...", "Could you sound like ...?", "...: brisk delivery, shrill tone.", "Voice profile: ...") and
its own synonyms (`LEXICON[attribute][level]["heldout"]`: e.g. pitch: rumbling / extremely low,
low-toned / grave, mid-range, high-toned / light, shrill / piping; rate: plodding / at a crawl,
leisurely, evenly paced, brisk / briskly, breakneck / racing; loudness: faint / subdued, forceful /
booming; intonation: droning / unvaried, singsong / melodious; quality: airy / hushed, raspy /
gravelly, machine-like; gender: masculine / gentleman / fellow, feminine / lady; accents as "from
Scotland" or "with Scottish pronunciation"). No frame and no synonym phrase is shared between the
two families (tests check it). Accent names themselves ("Scottish") are content, present in both.

`parse_description_hints` maps free text back to levels (longest phrase wins), for evaluation only.
"""

from __future__ import annotations

import math
import random
import re
import string
from typing import Any, Mapping

from ira.data.annotate import normalize_gender, quantile_bin

FAMILIES = ("train", "heldout")
PITCH_LEVELS = ("very low", "low", "medium", "high", "very high")
RATE_LEVELS = ("very slow", "slow", "medium", "fast", "very fast")
LOUDNESS_LEVELS = ("quiet", "medium", "loud")
VARIATION_LEVELS = ("monotone", "medium", "expressive")
ATTRIBUTES = ("pitch", "rate", "loudness", "pitch_variation", "gender", "age", "accent", "quality")

Forms = dict[str, list[str]]
"""Ways to say one level: "adj" (before "voice"), "person" (before a person noun), "post" (after a
noun: "with a deep voice"), "adv" (after "speaks": rate only), "noun" (gender only)."""


def _f(adj: tuple = (), person: tuple = (), post: tuple = (), adv: tuple = (), noun: tuple = ()) -> Forms:
    return {"adj": list(adj), "person": list(person), "post": list(post), "adv": list(adv), "noun": list(noun)}


# attribute -> level -> family -> forms.  Rate posts are made from the adverbs (see _rate_posts).
LEXICON: dict[str, dict[str, dict[str, Forms]]] = {
    "pitch": {
        "very low": {
            "train": _f(adj=("very deep", "very low-pitched", "bass", "very low"), person=("very deep-voiced",),
                        post=("with a very deep voice", "with a very low pitch", "in a bass register")),
            "heldout": _f(adj=("extremely low", "rumbling"),
                          post=("whose pitch is extremely low", "with a rumbling tone")),
        },
        "low": {
            "train": _f(adj=("deep", "low-pitched", "low"), person=("deep-voiced", "low-voiced"),
                        post=("with a deep voice", "with a low pitch", "in a low register")),
            "heldout": _f(adj=("low-toned", "grave"), post=("whose pitch sits low", "with a grave tone")),
        },
        "medium": {
            "train": _f(adj=("medium-pitched", "mid-pitched", "average-pitched"),
                        post=("with a medium pitch", "with an average pitch")),
            "heldout": _f(adj=("mid-range", "middle-register"),
                          post=("whose pitch is neither high nor low", "in the middle register")),
        },
        "high": {
            "train": _f(adj=("high-pitched", "high", "bright"), person=("high-voiced",),
                        post=("with a high voice", "with a high pitch")),
            "heldout": _f(adj=("high-toned", "light"), post=("whose pitch sits high", "with a light tone")),
        },
        "very high": {
            "train": _f(adj=("very high-pitched", "squeaky", "very high"), person=("squeaky-voiced",),
                        post=("with a very high pitch", "with a squeaky voice")),
            "heldout": _f(adj=("shrill", "piping", "extremely high"),
                          post=("whose pitch is extremely high", "with a shrill tone")),
        },
    },
    "rate": {
        "very slow": {
            "train": _f(adj=("very slow", "extremely slow"), person=("very slow-talking",),
                        adv=("very slowly", "extremely slowly", "at a very slow pace")),
            "heldout": _f(adj=("plodding", "sluggish"), adv=("at a crawl", "sluggishly", "at a snail's pace")),
        },
        "slow": {
            "train": _f(adj=("slow", "unhurried", "measured"), person=("slow-talking", "slow-speaking"),
                        adv=("slowly", "at a slow pace", "without hurrying")),
            "heldout": _f(adj=("leisurely", "drawn-out"), adv=("at a leisurely pace", "in no particular rush")),
        },
        "medium": {
            "train": _f(adj=("moderately paced", "steady"),
                        adv=("at a moderate pace", "at a normal speed", "at an average rate")),
            "heldout": _f(adj=("evenly paced",), adv=("at an ordinary tempo", "at a conversational tempo")),
        },
        "fast": {
            "train": _f(adj=("fast", "quick", "rapid"), person=("fast-talking", "quick-speaking"),
                        adv=("quickly", "fast", "rapidly", "at a fast pace")),
            "heldout": _f(adj=("brisk", "speedy"), adv=("briskly", "at a brisk tempo", "in a hurry")),
        },
        "very fast": {
            "train": _f(adj=("very fast", "very rapid", "hurried"), person=("very fast-talking",),
                        adv=("very quickly", "very fast", "at a very fast pace")),
            "heldout": _f(adj=("breakneck", "racing"), adv=("at breakneck speed", "at a frantic tempo")),
        },
    },
    "loudness": {
        "quiet": {
            "train": _f(adj=("quiet", "soft"), person=("soft-spoken", "quiet"),
                        post=("speaking softly", "at a low volume")),
            "heldout": _f(adj=("faint", "subdued"), post=("at a barely audible level", "with very little volume")),
        },
        "loud": {
            "train": _f(adj=("loud", "powerful"), person=("loud",),
                        post=("speaking loudly", "at a high volume")),
            "heldout": _f(adj=("forceful", "booming"), post=("projecting strongly", "with plenty of volume")),
        },
    },
    "pitch_variation": {
        "monotone": {
            "train": _f(adj=("monotone", "flat"), post=("with little intonation", "in a monotone")),
            "heldout": _f(adj=("droning", "unvaried"), post=("without much melody",)),
        },
        "expressive": {
            "train": _f(adj=("expressive", "lively", "animated"),
                        post=("with lively intonation", "with a lot of pitch variation")),
            "heldout": _f(adj=("singsong", "melodious"), post=("with a musical lilt",)),
        },
    },
    "gender": {
        "male": {
            "train": _f(adj=("male",), noun=("man", "male speaker", "guy")),
            "heldout": _f(adj=("masculine",), noun=("gentleman", "fellow")),
        },
        "female": {
            "train": _f(adj=("female",), noun=("woman", "female speaker")),
            "heldout": _f(adj=("feminine",), noun=("lady",)),
        },
    },
    "age": {
        "old": {
            "train": _f(adj=("elderly", "old"), person=("elderly", "older"), post=("who sounds old",)),
            "heldout": _f(adj=("aging",), person=("senior", "aging"), post=("advanced in years",)),
        },
        "young": {
            "train": _f(adj=("young", "youthful"), person=("young",), post=("who sounds young",)),
            "heldout": _f(adj=("fresh-sounding",), person=("younger",), post=("in the first flush of youth",)),
        },
    },
    "quality": {
        "whispery": {
            "train": _f(adj=("whispery", "breathy", "whispered"), person=("whispering",),
                        post=("in a whisper", "whispering softly")),
            "heldout": _f(adj=("airy", "hushed"), post=("under the breath", "in a hushed tone")),
        },
        "croaky": {
            "train": _f(adj=("croaky", "hoarse", "rough"), post=("with a croak", "with a hoarse voice")),
            "heldout": _f(adj=("raspy", "gravelly"), post=("with a rasp",)),
        },
        "robotic": {
            "train": _f(adj=("robotic", "mechanical"), post=("like a robot", "with a robotic sound")),
            "heldout": _f(adj=("machine-like", "synthetic-sounding"), post=("like an android",)),
        },
        "gruff": {
            "train": _f(adj=("gruff", "growling"), post=("with a growl",)),
            "heldout": _f(adj=("guttural",), post=("with a snarl",)),
        },
    },
}

RATE_VERBS = {"train": ("speaking", "talking"), "heldout": ("going", "delivering the words")}
PERSON_NOUNS = {"train": ("speaker", "person", "narrator"), "heldout": ("individual", "talker")}

# Accents: canonical name <- spellings found in labels and typed text; and where each is from.
ACCENT_ALIASES: dict[str, str] = {
    "american": "American", "us": "American", "usa": "American", "u.s.": "American", "america": "American",
    "the united states": "American", "united states": "American", "general american": "American",
    "british": "British", "british rp": "British", "rp": "British", "received pronunciation": "British",
    "english": "British", "england": "British", "britain": "British", "uk": "British", "southern british": "British",
    "scottish": "Scottish", "scotland": "Scottish", "scots": "Scottish",
    "irish": "Irish", "ireland": "Irish", "welsh": "Welsh", "wales": "Welsh",
    "caribbean": "Caribbean", "the caribbean": "Caribbean", "jamaican": "Caribbean", "jamaica": "Caribbean",
    "west indian": "Caribbean",
    "new york": "New York", "new yorker": "New York", "nyc": "New York",
    "lancastrian": "Lancastrian", "lancashire": "Lancastrian",
    "west midlands": "West Midlands", "the west midlands": "West Midlands", "brummie": "West Midlands",
    "birmingham": "West Midlands",
    "australian": "Australian", "australia": "Australian", "canadian": "Canadian", "canada": "Canadian",
    "indian": "Indian", "india": "Indian", "south african": "South African", "south africa": "South African",
}
ACCENT_PLACES = {
    "American": "the United States", "British": "Britain", "Scottish": "Scotland", "Irish": "Ireland",
    "Welsh": "Wales", "Caribbean": "the Caribbean", "New York": "New York", "Lancastrian": "Lancashire",
    "West Midlands": "the West Midlands", "Australian": "Australia", "Canadian": "Canada", "Indian": "India",
    "South African": "South Africa",
}
ESPEAK_ACCENTS = {
    "en-us": "American", "en-us-nyc": "New York", "en": "British", "en-gb": "British", "en-gb-x-rp": "British",
    "en-gb-scotland": "Scottish", "en-gb-x-gbclan": "Lancastrian", "en-gb-x-gbcwmd": "West Midlands",
    "en-029": "Caribbean",
}
QUALITY_ALIASES = {
    "whisper": "whispery", "whisperf": "whispery", "whispery": "whispery", "whispered": "whispery",
    "breathy": "whispery", "croak": "croaky", "croaky": "croaky", "hoarse": "croaky", "rough": "croaky",
    "raspy": "croaky", "robot": "robotic", "robotic": "robotic", "mechanical": "robotic", "demonic": "gruff",
    "gruff": "gruff", "growl": "gruff",
}
ESPEAK_VARIANT_AGES = {"grandma": "old", "grandpa": "old"}


# ------------------------------------------------------------------------------------- levels

def normalize_accent(value: Any) -> str | None:
    """Canonical accent name ('Scottish', 'New York'...) from a label, or the label tidied; None if empty."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = " ".join(value.strip().split())
    return ACCENT_ALIASES.get(v.lower(), v if not v.islower() else v.title())


def _espeak_parts(annotation: Mapping[str, Any]) -> tuple[str, str]:
    """(language voice, variant) from the eSpeak labels: voice 'en-gb-scotland+m3' or voice + variant."""
    voice = str(annotation.get("voice") or annotation.get("speaker") or "")
    lang, _, variant = voice.lower().partition("+")
    return lang.strip(), str(annotation.get("variant") or variant).strip().lower()


def _age_level(value: Any) -> str | None:
    """'young' / 'old' from an age label (years or words); adults and 'middle-aged' say nothing."""
    if isinstance(value, str):
        v = value.strip().lower()
        try:
            value = float(v)
        except ValueError:
            if "middle" in v:
                return None
            if any(w in v for w in ("old", "elder", "senior", "aged")):
                return "old"
            if any(w in v for w in ("young", "child", "kid", "teen", "youth")):
                return "young"
            return None
    if _number(value):
        return "young" if value < 25 else "old" if value >= 60 else None
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_stats(stats: Mapping[str, Any]) -> None:
    for key in ("pitch", "pitch_variation", "rate", "loudness"):
        if not isinstance(stats.get(key), Mapping) or "all" not in stats[key]:
            raise ValueError(f"annotation stats lack '{key}.all'; build them with "
                             "ira.data.annotate.fit_annotation_stats (or delete a stale annotation_stats.json)")


def attribute_levels(annotation: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, str]:
    """The discrete levels a description uses; an attribute that is not known is absent.

    pitch / rate: PITCH_LEVELS / RATE_LEVELS by the corpus quintiles (pitch against the clip's gender
    where the stats have it); loudness / pitch_variation: only the bottom and top fifths are marked
    (quiet / loud, monotone / expressive), the rest is "medium"; gender, age, accent, quality come
    from the labels (eSpeak voice and variant names included: "en-gb-scotland+croak").
    """
    _check_stats(stats)
    levels: dict[str, str] = {}
    gender = normalize_gender(annotation.get("gender"))
    pitch = annotation.get("pitch_mean_hz")
    if _number(pitch) and pitch > 0:
        table = stats["pitch"]
        levels["pitch"] = PITCH_LEVELS[quantile_bin(pitch, table.get(gender or "all") or table["all"])]
    spread = annotation.get("pitch_std_semitones")
    if _number(spread):
        b = quantile_bin(spread, stats["pitch_variation"]["all"])
        levels["pitch_variation"] = "monotone" if b == 0 else "expressive" if b == 4 else "medium"
    rate = annotation.get("speaking_rate_cps")
    if _number(rate) and rate > 0:
        levels["rate"] = RATE_LEVELS[quantile_bin(rate, stats["rate"]["all"])]
    loud = annotation.get("loudness_db")
    if _number(loud) and loud > -100:
        b = quantile_bin(loud, stats["loudness"]["all"])
        levels["loudness"] = "quiet" if b == 0 else "loud" if b == 4 else "medium"
    if gender:
        levels["gender"] = gender
    lang, variant = _espeak_parts(annotation)
    age = _age_level(annotation.get("age")) or ESPEAK_VARIANT_AGES.get(variant)
    if age:
        levels["age"] = age
    accent = normalize_accent(annotation.get("accent")) or ESPEAK_ACCENTS.get(lang)
    if accent:
        levels["accent"] = accent
    quality = annotation.get("quality")
    quality = (QUALITY_ALIASES.get(quality.strip().lower(), quality.strip().lower())
               if isinstance(quality, str) and quality.strip() else None)
    quality = quality or QUALITY_ALIASES.get(variant) or ("robotic" if "robo" in variant else None)
    if quality:
        levels["quality"] = quality
    return levels


# -------------------------------------------------------------------------------- realisation

def _forms(attr: str, level: str, family: str) -> Forms:
    """The phrases for one attribute level; accents and unknown qualities are built from the name."""
    if attr == "accent":
        a = level
        if family == "train":
            return _f(adj=(f"{a}-accented",), person=(a,), post=(f"with {_article(a)} accent",))
        place = ACCENT_PLACES.get(a)
        return _f(adj=(f"{a}-sounding",), person=(a,),
                  post=((f"from {place}",) if place else ()) + (f"with {a} pronunciation",))
    entry = LEXICON.get(attr, {}).get(level)
    if entry is None:  # a quality label outside the lexicon: say it as it is
        return _f(adj=(level,)) if attr == "quality" else _f()
    forms = entry[family]
    if attr == "rate":
        bare = [adv for adv in forms["adv"] if adv.split()[0] in ("at", "in", "without")]  # "at a slow pace"
        forms = dict(forms, post=bare + [f"{verb} {adv}" for verb in RATE_VERBS[family] for adv in forms["adv"]])
    return forms


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


# Frames: python format strings over these slots (each consumes attributes):
#   {voice}   "a slow, deep male voice"    {person} "a Scottish man"   {the_person} "the woman"
#   {rate_adv} "slowly"   {rate_adj} "slow"   {pitch_adj} "deep"   {pitch_post} "with a low pitch"
#   {tags}    "deep, slow, male voice, Scottish accent"   {posts} the remaining attributes as
#   postmodifiers (" speaking softly, with a Scottish accent"), empty when none remain;
#   {more} the same after a comma, for frames where they follow a finished clause.
FRAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "{voice}{posts}.",
        "{person} speaking {rate_adv} in {voice}{posts}",
        "{the_person} talks {rate_adv} {pitch_post}{more}.",
        "{person} with {voice}{posts}.",
        "{tags}",
        "{person} who speaks {rate_adv}{more}.",
        "Speech by {person}{posts}.",
        "{the_person} has {voice} and speaks {rate_adv}{more}.",
        "Speak in {voice}{posts}.",
        "Read aloud {rate_adv} by {person}{posts}.",
    ),
    "heldout": (
        "Imagine {person}{posts}.",
        "This recording features {person} whose voice is {pitch_adj}{more}.",
        "I'd like to hear {voice}{posts}.",
        "Could you sound like {person}{posts}?",
        "{person}: {rate_adj} delivery, {pitch_adj} tone{more}.",
        "Voice profile: {tags}.",
    ),
}

# How often an attribute is mentioned when a frame does not require it.
MENTION_P = {"pitch": 0.85, "rate": 0.8, "gender": 0.85, "accent": 0.75, "quality": 0.95, "age": 0.75,
             "loudness": 0.6, "pitch_variation": 0.5}
DESCRIPTIVE = ("quality", "loudness", "pitch_variation", "rate", "pitch")
"""Adjectives said with commas before the noun ("a quiet, slow, deep ..."), in this order of preference."""


def _slots(frame: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(frame) if name]


def _frame_needs(frame: str) -> dict[str, str]:
    """Attribute -> form a frame cannot do without."""
    needs = {}
    for slot in _slots(frame):
        if slot in ("rate_adv", "rate_adj", "pitch_adj", "pitch_post"):
            attr, kind = slot.split("_")
            needs[attr] = kind
    return needs


class _Unfit(Exception):
    """The frame cannot say anything with these attributes ("has a voice"): try another."""


class _Realiser:
    """Fills one frame for one set of mentioned attributes."""

    def __init__(self, levels: dict[str, str], family: str, rng: random.Random):
        self.levels, self.family, self.rng = levels, family, rng
        self.left = list(levels)  # attributes not yet said, in random order
        rng.shuffle(self.left)

    def form(self, attr: str, kind: str) -> list[str]:
        return _forms(attr, self.levels[attr], self.family)[kind]

    def take(self, attr: str, kind: str) -> str:
        self.left.remove(attr)
        return self.rng.choice(self.form(attr, kind))

    def voice(self) -> str:
        descriptive = [a for a in self.left if a in DESCRIPTIVE and self.form(a, "adj")]
        if "pitch" in descriptive:  # a "... voice" names its pitch when it can
            descriptive.remove("pitch")
            descriptive.insert(0, "pitch")
        chosen = descriptive[: self.rng.choice((1, 2, 2, 3))]
        chosen.sort(key=DESCRIPTIVE.index)
        words = [", ".join(self.take(a, "adj") for a in chosen)] if chosen else []
        for attr, p in (("age", 0.5), ("accent", 0.5), ("gender", 1.0)):
            if attr in self.left and self.form(attr, "adj") and self.rng.random() < p:
                words.append(self.take(attr, "adj"))
        if not words:
            raise _Unfit
        return _article(" ".join(words + ["voice"]))

    def noun(self) -> str:
        if "gender" in self.left:
            return self.take("gender", "noun")
        return self.rng.choice(PERSON_NOUNS[self.family])

    def person(self, with_voice: bool = False) -> str:
        words = []
        extra = [a for a in self.left if a in ("loudness", "rate", "pitch") and self.form(a, "person")]
        if extra and not with_voice and self.rng.random() < 0.35:  # "a soft-spoken woman"
            words.append(self.take(extra[0], "person"))
        for attr, p in (("age", 0.8), ("accent", 0.7)):
            if attr in self.left and self.form(attr, "person") and self.rng.random() < p:
                words.append(self.take(attr, "person"))
        return _article(" ".join(words + [self.noun()]))

    def tags(self) -> str:
        """A keyword list: "deep, slow, male voice, Scottish accent"."""
        items: list[tuple[str, str]] = []
        for attr in list(self.left):
            if attr == "accent":
                accent = self.take(attr, "post") if self.family == "heldout" else f"{self.take(attr, 'person')} accent"
                items.append((attr, accent))
            elif self.form(attr, "adj"):
                items.append((attr, self.take(attr, "adj")))
        if not items:
            raise _Unfit
        words = [w for _, w in items]
        said = [a for a, _ in items]
        anchor = next((said.index(a) for a in ("gender", "pitch") if a in said), 0)
        if said[anchor] == "accent":  # nothing but the accent: "voice, Scottish accent"
            words.insert(0, "voice")
        else:
            words[anchor] += " voice"
        return ", ".join(words)

    def posts(self, sep: str = " ") -> str:
        parts = [self.take(a, "post") for a in list(self.left) if self.form(a, "post")]
        return (sep + ", ".join(parts)) if parts else ""

    def more(self) -> str:
        return self.posts(sep=", ")

    def fill(self, frame: str) -> str:
        values: dict[str, str] = {}
        slots = _slots(frame)
        order = sorted(slots, key=lambda s: ("rate_adv", "rate_adj", "pitch_adj", "pitch_post", "tags",
                                             "person", "the_person", "voice", "posts", "more").index(s))
        for slot in order:
            if slot in ("rate_adv", "rate_adj", "pitch_adj", "pitch_post"):
                attr, kind = slot.split("_")
                values[slot] = self.take(attr, kind)
            elif slot == "the_person":
                values[slot] = "the " + self.noun()
            elif slot == "person":
                values[slot] = self.person(with_voice="voice" in slots)
            else:
                values[slot] = getattr(self, slot)()
        return frame.format(**values)


def _finish(text: str, rng: random.Random, proper: str | None) -> str:
    """Sentence case most of the time; sometimes typed-query style (lower first letter, no full stop).
    `proper` (an accent name) and "I'd" keep their capital."""
    text = re.sub(r"\s+", " ", text).strip()
    if rng.random() < 0.25 and not text.endswith("?"):
        text = text.rstrip(".")
        keep = text.startswith("I'") or (proper is not None and text.startswith(proper))
        return text if keep else text[0].lower() + text[1:]
    return text[0].upper() + text[1:]


GENERIC = {"train": ("A voice.", "Someone speaking.", "A speaking voice."),
           "heldout": ("Imagine an ordinary voice.", "An unremarkable talker.")}
"""For an annotation that says nothing at all (no measurement, no label)."""


def describe(annotation: Mapping[str, Any], stats: Mapping[str, Any], rng: random.Random, n: int = 4,
             family: str = "train") -> list[str]:
    """`n` different phrasings of the voice of `annotation` (fewer only when there is almost nothing
    to say). Each uses its own frame where possible and a random subset of the known attributes
    (pitch and rate usually, the rest often). Deterministic for the state of `rng`."""
    if family not in FAMILIES:
        raise ValueError(f"describe: family must be one of {FAMILIES}, got {family!r}")
    levels = attribute_levels(annotation, stats)
    frames = list(FRAMES[family])
    rng.shuffle(frames)
    out: list[str] = []
    seen: set[str] = set()
    for attempt in range(n * 12):
        frame = frames[attempt % len(frames)]
        needs = _frame_needs(frame)
        if any(attr not in levels or not _forms(attr, levels[attr], family)[kind] for attr, kind in needs.items()):
            continue
        mentioned = {a: lv for a, lv in levels.items() if a in needs or rng.random() < MENTION_P[a]}
        if not mentioned and levels:
            a = rng.choice(sorted(levels))
            mentioned = {a: levels[a]}
        if not mentioned:
            break
        try:
            text = _finish(_Realiser(mentioned, family, rng).fill(frame), rng, levels.get("accent"))
        except _Unfit:
            continue
        key = text.lower().rstrip(".?")
        if key not in seen:
            seen.add(key)
            out.append(text)
            if len(out) == n:
                return out
    for text in GENERIC[family]:
        if len(out) == n:
            break
        if not levels and text.lower() not in seen:
            out.append(text)
    return out


# ------------------------------------------------------------------------------------- parsing

PARSE_EXTRA: dict[str, tuple[str, str]] = {
    # Common words people type that descriptions never produce.
    "baritone": ("pitch", "low"), "soprano": ("pitch", "very high"), 
    "slow": ("rate", "slow"), "fast": ("rate", "fast"),
    "whisper": ("quality", "whispery"), "whispering": ("quality", "whispery"),
    "boy": ("gender", "male"), "girl": ("gender", "female"), "he": ("gender", "male"), "she": ("gender", "female"),
    "masculine": ("gender", "male"), "feminine": ("gender", "female"), "lady": ("gender", "female"),
    "men": ("gender", "male"), "women": ("gender", "female"),
}


def _phrase_table() -> list[tuple[str, str, str]]:
    """(phrase, attribute, level) for every phrase the lexicon can say, longest first."""
    table: dict[str, tuple[str, str]] = {}
    for attr, levels in LEXICON.items():
        for level in levels:
            for family in FAMILIES:
                forms = _forms(attr, level, family)
                for kind in ("adj", "person", "adv", "noun", "post"):
                    for phrase in forms[kind]:
                        table[phrase.lower()] = (attr, level)
    for phrase, value in PARSE_EXTRA.items():
        table.setdefault(phrase, value)
    for alias, accent in ACCENT_ALIASES.items():
        if len(alias) > 3 or alias == "nyc":  # "us", "uk", "rp" are too easily other words
            table[alias] = ("accent", accent)
    for accent in set(ACCENT_ALIASES.values()):
        for family in FAMILIES:
            for phrase in _forms("accent", accent, family)["adj"]:
                table[phrase.lower()] = ("accent", accent)
    return sorted(((p, a, lv) for p, (a, lv) in table.items()), key=lambda t: (-len(t[0]), t[0]))


_TABLE: list[tuple[re.Pattern[str], str, str, str]] | None = None
"""(whole-phrase pattern, phrase, attribute, level), longest phrase first; compiled once: the table holds
more phrases than `re`'s cache, so compiling per call made parsing a 20,000-clip corpus take minutes."""


def parse_description_hints(text: str) -> dict[str, str]:
    """Best-effort levels named in a free description, e.g. "a slow, deep voice with a British accent"
    -> {"rate": "slow", "pitch": "low", "accent": "British"}. Longest phrases win ("at a low volume"
    is loudness, not pitch); the first mention of an attribute wins. For evaluation only."""
    global _TABLE
    if _TABLE is None:
        _TABLE = [(re.compile(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])"), phrase, attr, level)
                  for phrase, attr, level in _phrase_table()]
    low = " ".join(text.lower().replace("\u2019", "'").split())
    taken = [False] * len(low)
    hits: list[tuple[int, str, str]] = []
    for pattern, phrase, attr, level in _TABLE:
        if phrase not in low:
            continue
        for m in pattern.finditer(low):
            if not any(taken[m.start(): m.end()]):
                taken[m.start(): m.end()] = [True] * (m.end() - m.start())
                hits.append((m.start(), attr, level))
    out: dict[str, str] = {}
    for _, attr, level in sorted(hits):
        out.setdefault(attr, level)
    return out
