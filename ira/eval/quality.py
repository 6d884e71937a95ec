"""What a checkpoint was measured to do, in plain words: the notes the app shows beside a checkpoint and beside
each of its outputs (its speech, the LLM's answer, a voice search).

Every sentence comes from a figure the checkpoint carries in its header or from its card, never from what the
stage is meant to teach: a skill that was not measured is said to be unmeasured, and a figure below its
threshold is said to be near random. The figures and where they come from:

- speech: the offline ASR's word error rate on sentences the model never trained on. First what `ira eval speech`
  recorded for this very save (`<its folder>/eval/speech-<checkpoint_id>.json`: the bundled everyday held-out sentences,
  and what the same ASR made of eSpeak NG's own audio of them, the reference a model trained on eSpeak speech is
  read against). Else stage 1 records it as `speech_eval` (and its run's best metric `val_wer`); stage 2, whose
  SpeechLM is stage 1's, carries stage 1's `speech_eval` over; stage 3's best metric `val_asr_wer` is its own.
  Without them, the checkpoint's card (`<stage folder>/card/card.json`, three held-out sentences) when it is the
  card of this very save.
- answers: stage 2's validation of the adapter (`understanding`: the 4-way choice accuracy over held-out clips
  and the repeat character error rate), carried over by stage 3.
- voice descriptions: the style encoder's retrieval figures (`style_eval`: top-5 among the held-out clips, its
  chance level, the number of queries, the step it was trained to), which every stage carries over with the
  encoder.

A figure counts as near random when it is within two standard errors of chance (binomial, over the number of
tries it was measured on) or, for speech, when the ASR recognised less than a tenth of the words.

Only the standard library (and the card's reader and ira.atomic_text, themselves stdlib-only) is imported: the app reads notes for
every checkpoint it lists without loading torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ira.atomic_text import atomic_write_text
from ira.eval.card import CARD_DIR, CARD_FILE, Card, CardError, read_card

SPEECH_EVAL_KEY = "speech_eval"
"""Checkpoint metadata (JSON): stage 1's last val_wer, val_cer and how many sentences they were measured on."""
SPEECH_RECORD_DIR = "eval"
"""`ira eval speech` records what it measured of a save in `<checkpoint's folder>/eval/speech-<checkpoint_id>.json`:
every name of one save (best, latest, its step file) finds it, and no other save does. That is the everyday set's
record, the one the notes quote; another bundled set's is `speech-<checkpoint_id>-<set>.json`."""
EVERYDAY_SET = "everyday"
SPEECH_ERRORS_KEY = "errors"
"""Where a speech record (and `ira eval speech --json`) keeps where the words were lost: the model's, the ceiling's
and eSpeak's error breakdowns (`ira.eval.speech.SpeechEvaluation.error_figures`)."""
"""The default bundled held-out set of `ira eval speech` (`ira.eval.speech.SENTENCE_SETS`), the one the notes quote."""
STYLE_EVAL_KEY = "style_eval"
"""Checkpoint metadata (JSON): the style encoder's retrieval figures (`ira.models.style.StyleEncoder.measured`)."""
NEAR_RANDOM_WER = 0.9
"""At or above this WER (the ASR recognised at most a tenth of the words) speech is called near random."""
HARD_TO_FOLLOW_WER = 0.5
"""At or above this WER (half the words lost) speech is called hard to follow."""
REPEAT_USELESS_CER = 0.9
"""At or above this repeat CER the LLM's answers keep almost none of what was said."""
CHOICES = 4
"""Stage 2's choice task picks the heard transcript among this many (chance 1/4)."""
Z_ABOVE_CHANCE = 2.0
"""A rate counts as above chance when it exceeds chance by this many binomial standard errors."""
MIN_SIMILARITY_SPREAD = 0.02
"""Cosine similarities of a description to a corpus's clips that spread less than this (standard deviation)
single out no clip: an encoder that has learnt nothing maps every clip near one point."""


@dataclass(frozen=True)
class Note:
    """One plain sentence about one skill. `near_random`: measured and no better than chance; `measured`: a
    figure backs the sentence (False: it says that nothing was measured)."""

    text: str
    measured: bool
    near_random: bool = False

    @property
    def trusted(self) -> bool:
        """Measured and above chance."""
        return self.measured and not self.near_random


@dataclass(frozen=True)
class Quality:
    """What one checkpoint was measured to do."""

    stage: str
    step: str
    speech: Optional[Note]      # None: the checkpoint does not speak (a style-stage checkpoint)
    style: Note
    answers: Optional[Note]     # None: the checkpoint does not speak, so there is nothing to answer about

    def notes(self) -> list[tuple[str, Note]]:
        """(what, note) for each skill the checkpoint has a part for, in the order a user meets them."""
        named = [("Speech", self.speech), ("Voice descriptions", self.style), ("The LLM's answers", self.answers)]
        return [(what, note) for what, note in named if note is not None]

    def markdown(self) -> str:
        """The checkpoint line and one line per skill, e.g. for the Generate tab."""
        lines = [f"**Stage {self.stage}, step {self.step}**, as measured:"]
        lines += [f"- **{what}**: {note.text}" for what, note in self.notes()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ figures


def _json(meta: Mapping[str, str], key: str) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(meta.get(key) or "null")
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def percent(share: float) -> str:
    """0.512 -> "51%"; shares under 1% but above 0 -> "under 1%" (never "0%" for something that happened)."""
    share = min(max(share, 0.0), 1.0)
    if 0 < share < 0.005:
        return "under 1%"
    return f"{100 * share:.0f}%"


def how_often(share: float) -> str:
    """A rate as a user says it: "never", "about one time in ten", "about 7 times in ten", "every time"."""
    if share <= 0:
        return "never"
    if share >= 1:
        return "every time"
    if share < 0.5:
        n = round(1 / share)
        return "about one time in ten" if n == 10 else f"about one time in {n}"
    tenths = round(10 * share)
    return "nearly every time" if tenths >= 10 else f"about {tenths} times in ten"


def above_chance(rate: float, chance: float, tries: Optional[float]) -> bool:
    """Whether `rate`, measured over `tries`, exceeds `chance` by Z_ABOVE_CHANCE binomial standard errors
    (unknown tries: by a tenth of what is left above chance, a cautious stand-in)."""
    if tries is None or tries < 1:
        return rate > chance + 0.1 * (1 - chance)
    se = math.sqrt(max(chance * (1 - chance), 1e-12) / tries)
    return rate > chance + Z_ABOVE_CHANCE * se


def _at_step(figure_step: Any, step: Any) -> str:
    return "" if figure_step is None or str(figure_step) == str(step) else f" (measured at step {figure_step})"


# ------------------------------------------------------------------------------------------ speech


@dataclass(frozen=True)
class SpeechRecord:
    """What `ira eval speech` measured of one save: the ASR's word error rate on the model's speech of `sentences`
    held-out sentences and, when it also ran its ceiling, on eSpeak NG's own audio of the same sentences."""

    wer: float
    sentences: int
    asr: str
    espeak_wer: Optional[float] = None


def speech_record_path(checkpoint: str | Path, checkpoint_id: str, sentence_set: str = EVERYDAY_SET) -> Path:
    """Where `ira eval speech` records its figures on the bundled `sentence_set` for the save `checkpoint_id` of
    `checkpoint` (its folder): each set its own file, so that measuring one never overwrites another's."""
    if not sentence_set.isascii() or not sentence_set.isalnum():
        raise ValueError(f"{sentence_set!r} is not the name of a bundled sentence set: use letters and digits, "
                         f"e.g. 'hard'")
    suffix = "" if sentence_set == EVERYDAY_SET else f"-{sentence_set}"
    return Path(checkpoint).parent / SPEECH_RECORD_DIR / f"speech-{checkpoint_id}{suffix}.json"


def write_speech_record(checkpoint: str | Path, meta: Mapping[str, str], figures: Mapping[str, Any]) -> Path:
    """Record `figures` (`ira.eval.speech.record_figures`) for the save whose header is `meta`, next to it, in the
    file of their `sentence_set` (the everyday set's when they name none); returns the file. Written to a temporary
    name and renamed: a reader never sees half a record. A run without the ceiling (`--no-ceiling`, e.g. a second
    seed) keeps the eSpeak and ceiling figures an earlier run of the same ASR on as many sentences recorded: they
    depend on the sentences, the ASR and the save's codec, not the seed."""
    path = speech_record_path(checkpoint, str(meta["checkpoint_id"]), str(figures.get("sentence_set") or EVERYDAY_SET))
    record = {"checkpoint": Path(checkpoint).name, "checkpoint_id": meta["checkpoint_id"],
              "stage": meta.get("stage"), "step": meta.get("step"), **figures}
    earlier = _read_record(path)
    if (earlier is not None and earlier.get("checkpoint_id") == meta["checkpoint_id"]
            and (earlier.get("asr"), earlier.get("sentences")) == (record.get("asr"), record.get("sentences"))):
        for key in ("espeak", "ceiling"):
            if record.get(key) is None and isinstance(earlier.get(key), dict):
                record[key] = earlier[key]
            errors, before = record.get(SPEECH_ERRORS_KEY), earlier.get(SPEECH_ERRORS_KEY)
            if isinstance(errors, dict) and isinstance(before, dict) and errors.get(key) is None \
                    and isinstance(before.get(key), dict):
                record[SPEECH_ERRORS_KEY] = {**errors, key: before[key]}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def _read_record(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object at `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_speech_record(checkpoint: str | Path, meta: Mapping[str, str],
                       allowed: Callable[[Path], bool] = lambda path: True,
                       sentence_set: str = EVERYDAY_SET) -> Optional[SpeechRecord]:
    """What `ira eval speech` recorded on `sentence_set` for this very save (same checkpoint_id); None when nothing
    was, when it cannot be read, or when `allowed` refuses its path (the app: a link out of its workspace)."""
    checkpoint_id = meta.get("checkpoint_id")
    if not checkpoint_id:
        return None
    path = speech_record_path(checkpoint, str(checkpoint_id), sentence_set)
    if not path.is_file() or not allowed(path):
        return None
    data = _read_record(path)
    if (data is None or data.get("checkpoint_id") != checkpoint_id
            or (data.get("sentence_set") or EVERYDAY_SET) != sentence_set):    # older records name no set
        return None
    wer, sentences = _number(data.get("wer")), _number(data.get("sentences"))
    if wer is None or not sentences:
        return None
    espeak = data.get("espeak") if isinstance(data.get("espeak"), dict) else {}
    return SpeechRecord(wer=wer, sentences=int(sentences), asr=str(data.get("asr", "")),
                        espeak_wer=_number(espeak.get("wer")))


def _recognised(wer: float) -> str:
    return percent(1 - min(wer, 1.0))


def speech_note(meta: Mapping[str, str], card: Optional[Card] = None, record: Optional[SpeechRecord] = None) -> Note:
    """How intelligible the checkpoint's speech was measured to be (see the module docstring); with `record`
    (`find_speech_record`), what `ira eval speech` heard, beside what the same ASR heard of eSpeak itself."""
    if record is not None:
        said = f"the ASR recognised {_recognised(record.wer)} of the words of {record.sentences} new sentences it " \
               f"spoke (WER {record.wer:.2f})"
        if record.espeak_wer is not None:
            said += f"; eSpeak itself {_recognised(record.espeak_wer)} (WER {record.espeak_wer:.2f})"
        return _speech_verdict(record.wer, said)
    stage, step = str(meta.get("stage")), meta.get("step")
    figure = _json(meta, SPEECH_EVAL_KEY) or {}
    metric = _json(meta, "metric") or {}
    sentences = _number(figure.get("sentences"))
    source = f"{int(sentences)} new sentences" if sentences else "new sentences"
    wer, when = None, ""
    own_metric = {"1": "val_wer", "3": "val_asr_wer"}.get(stage)
    if own_metric is not None and metric.get("name") == own_metric:
        wer, when = _number(metric.get("value")), _at_step(metric.get("step"), step)
        source = source if stage == "1" else "new sentences"
    elif stage in ("1", "2") and figure:
        wer = _number(figure.get("wer"))
        when = " (measured on the stage-1 SpeechLM it keeps unchanged)" if stage == "2" else ""
    if wer is None and card is not None and card.wer is not None:
        wer, source, when = _number(card.wer), f"the {len(card.items)} sentences of its card", ""
    if wer is None:
        return Note("not measured: no ASR heard this checkpoint speak (install the eval extra and run "
                    "`ira eval speech`); listen before trusting it", measured=False)
    return _speech_verdict(wer, f"the ASR recognised {_recognised(wer)} of the words of {source} it spoke "
                                f"(WER {wer:.2f})" + when)


def _speech_verdict(wer: float, said: str) -> Note:
    """`said` (what the ASR heard) as a note, led by how it reads against the thresholds."""
    if wer >= NEAR_RANDOM_WER:
        return Note(f"near random: {said}; it does not say the text yet", measured=True, near_random=True)
    if wer >= HARD_TO_FOLLOW_WER:
        return Note(f"hard to follow: {said}", measured=True)
    return Note(said, measured=True)


# ------------------------------------------------------------------------------------------ answers


def answers_note(meta: Mapping[str, str], modules: Sequence[str]) -> Note:
    """What the LLM hears through the checkpoint's adapter, as stage 2's validation measured it."""
    if "adapter" not in modules:
        return Note("no adapter: the LLM cannot hear this checkpoint's speech (train stage 2 from it)",
                    measured=False)
    figures = _json(meta, "understanding") or {}
    accuracy, clips = _number(figures.get("choice_accuracy")), _number(figures.get("clips"))
    if accuracy is None:
        return Note("not measured: nothing shows that the LLM hears this adapter's audio, so its answers may be "
                    "made up (run `ira eval understanding`)", measured=False)
    chance = 1 / CHOICES
    tries = f" of {int(clips)} held-out clips" if clips else " of held-out clips"
    choice = f"it picked the right transcript among {CHOICES} for {percent(accuracy)}{tries}, where chance " \
             f"is {percent(chance)}"
    if not above_chance(accuracy, chance, clips):
        return Note(f"near random: the LLM does not hear this audio ({choice}); its answers are made up",
                    measured=True, near_random=True)
    cer = _number(figures.get("repeat_cer"))
    if cer is None:
        return Note(f"the LLM tells held-out speech apart: {choice}; how well it repeats it was not measured",
                    measured=True)
    repeat = f"the LLM repeats new speech with {percent(min(cer, 1.0))} of characters wrong"
    if cer >= REPEAT_USELESS_CER:
        return Note(f"{repeat}, so its answers keep almost nothing of what was said ({choice})", measured=True,
                    near_random=True)
    return Note(f"{repeat} ({choice})", measured=True)


# ------------------------------------------------------------------------------------------ voice descriptions


def style_note(meta: Mapping[str, str], modules: Sequence[str]) -> Note:
    """How well the checkpoint's style encoder finds a described voice, and what was not measured."""
    if "style" not in modules:
        return Note("no style encoder: voice descriptions and reference clips are ignored", measured=False)
    figures = _json(meta, STYLE_EVAL_KEY)
    metric = _json(meta, "metric") or {}
    if figures is None and meta.get("stage") == "style" and metric.get("name") == "val_top5":
        figures = {"top5": metric.get("value"), "step": metric.get("step")}    # an older style checkpoint
    top5 = _number((figures or {}).get("top5"))
    if top5 is None:
        return Note("not measured: nothing shows that its style encoder finds a described voice, so a "
                    "description may change the voice at random", measured=False)
    chance, queries = _number(figures.get("chance_top5")), _number(figures.get("n_queries"))
    clips = _number(figures.get("n_clips"))
    among = f" among {int(clips)} held-out clips" if clips else ""
    trained = figures.get("step")
    age = f" after {int(trained)} training steps" if _number(trained) is not None else ""
    said = f"the style encoder{age} finds the described voice in its top 5{among} {how_often(top5)} " \
           f"({percent(top5)} of held-out descriptions"
    said += f"; chance {percent(chance)})" if chance is not None else "; chance not recorded)"
    follows = "" if meta.get("stage") == "style" else \
        "; how closely the speech follows a description was not measured"
    if chance is not None and not above_chance(top5, chance, queries):
        return Note(f"near random: {said}, so it does not tell described voices apart yet", measured=True,
                    near_random=True)
    return Note(said + follows, measured=True)


# ------------------------------------------------------------------------------------------ the whole checkpoint


def find_card(checkpoint: str | Path, meta: Mapping[str, str],
              allowed: Callable[[Path], bool] = lambda path: True) -> Optional[Card]:
    """The card next to `checkpoint` (`<its folder>/card/card.json`) when it is the card of this very save (same
    stage and step); None otherwise, when it cannot be read, or when `allowed` refuses its path (the app: a link
    out of its workspace)."""
    path = Path(checkpoint).parent / CARD_DIR / CARD_FILE
    if not path.is_file() or not allowed(path):
        return None
    try:
        card = read_card(path)
    except CardError:
        return None
    same = str(card.stage) == str(meta.get("stage")) and str(card.step) == str(meta.get("step"))
    return card if same else None


def checkpoint_quality(meta: Mapping[str, str], card: Optional[Card] = None,
                       speech_record: Optional[SpeechRecord] = None) -> Quality:
    """The notes of a checkpoint from its header (`ira.checkpoint.read_metadata`) and, optionally, its card and
    what `ira eval speech` recorded of it (`find_speech_record`)."""
    try:
        modules = json.loads(meta.get("modules") or "[]")
    except ValueError:
        modules = []
    speaks = "speech_lm" in modules
    return Quality(stage=str(meta.get("stage", "?")), step=str(meta.get("step", "?")),
                   speech=speech_note(meta, card, speech_record) if speaks else None, style=style_note(meta, modules),
                   answers=answers_note(meta, modules) if speaks else None)


def answer_cut_note(tokens: int, limit: int) -> str:
    """"" unless an answer of `tokens` tokens stopped at the `limit` rather than where the LLM ended it (the
    reply is decoded and stripped, so a cut answer re-encodes to the limit or one token fewer)."""
    if tokens >= limit - 1:
        return f"the answer stopped at the {limit}-token limit, so it may be cut off mid-sentence"
    return ""


# ------------------------------------------------------------------------------------------ similarities


def similarity_spread(similarities: Sequence[float]) -> tuple[float, float]:
    """(mean, standard deviation) of similarities."""
    n = len(similarities)
    if n == 0:
        return 0.0, 0.0
    mean = sum(similarities) / n
    return mean, math.sqrt(sum((s - mean) ** 2 for s in similarities) / n)


def nearest_note(top: Sequence[float], everyone: Sequence[float]) -> Note:
    """Whether the nearest clips' similarities (`top`, best first) mean anything, against those of every indexed
    clip (`everyone`): when all clips sit at about one similarity the list singles out nobody."""
    mean, spread = similarity_spread(everyone)
    typical = f"every clip of the corpus scores {mean:+.2f} ± {spread:.2f}"
    if not top:
        return Note("no clip to rank", measured=False)
    if spread < MIN_SIMILARITY_SPREAD:
        return Note(f"these similarities mean nothing: {typical}, so the encoder singles out no voice and the "
                    f"list is arbitrary", measured=True, near_random=True)
    lead = (top[0] - mean) / spread
    return Note(f"the nearest clip scores {top[0]:+.2f}, {lead:.1f} standard deviations above the corpus "
                f"({typical})", measured=True, near_random=lead < Z_ABOVE_CHANCE)


def compare_note(similarity: float, baseline: Sequence[float]) -> Note:
    """What the cosine similarity of two descriptions says, against `baseline`: the similarities the same encoder
    gives pairs of varied descriptions (`baseline_descriptions`). A similarity no higher than theirs says nothing
    about the two voices being alike."""
    mean, spread = similarity_spread(baseline)
    typical = f"pairs of different descriptions score {mean:+.2f} ± {spread:.2f} with this encoder"
    margin = max(Z_ABOVE_CHANCE * spread, MIN_SIMILARITY_SPREAD)
    if similarity >= 0.9 and similarity > mean + margin:
        return Note(f"nearly the same voice, to this encoder ({typical})", measured=True)
    if similarity > mean + margin:
        return Note(f"closer than different descriptions: similar voices, to this encoder ({typical})", measured=True)
    if similarity < mean - margin:
        return Note(f"further apart than different descriptions usually are: different voices ({typical})",
                    measured=True)
    if similarity >= 0.9:
        return Note(f"nearly the same voice, to this encoder, but so are any two descriptions ({typical}): "
                    f"it does not tell voices apart", measured=True, near_random=True)
    return Note(f"this says nothing: {typical}, so these two are no more and no less alike than any two",
                measured=True, near_random=True)


BASELINE_DESCRIPTIONS = (
    "a high-pitched woman speaking very fast",
    "a slow, deep male voice",
    "a quiet, breathy female voice with a Scottish accent",
    "a loud man with an American accent, speaking quickly",
    "a calm, low-pitched voice at a normal pace",
    "a young woman with a bright, high voice and a British accent",
    "a very slow speaker with a monotone voice",
    "an energetic voice with lively, varied pitch",
)
"""Varied voice descriptions whose pairwise similarities are `compare_note`'s baseline: what this encoder gives
two descriptions that name different voices (they differ in pitch, pace, gender, accent or loudness)."""
