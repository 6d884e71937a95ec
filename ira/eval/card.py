"""A checkpoint's card: what a user would hear and see after a stage, on three held-out sentences.

For a checkpoint that speaks (stage 1, 2 or 3) the card holds, per sentence, the audio it speaks (a wav
in the card's folder, spoken with a fixed seed through the same `Speaker` the CLI and the app use), what
the offline ASR heard in it and its word error rate, and, for a checkpoint with an adapter (stage 2 or 3),
what the LLM answered when asked to repeat that same audio word for word. It is written as `card.json`
next to the wavs (the full recipe writes one into `<stage folder>/card/` after each stage).

A card is a look, not a score: three sentences say little about a figure (`ira eval speech` and
`ira eval understanding` give those), but they are what the user can listen to. A missing ASR, or a clip
the LLM cannot hear, leaves a note in the card instead of failing it.

Only the standard library is imported at module level, so that the app can read cards without loading torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ira.atomic_text import atomic_write_text
from ira.text_metrics import corpus_wer, word_error_rate

CARD_DIR = "card"
CARD_FILE = "card.json"
CARD_SENTENCES = 3
"""How many held-out sentences a card speaks: the first ones of `ira/data/heldout_sentences.txt`."""
CARD_SEED = 0
"""Sentence i is spoken with seed CARD_SEED + i (as `ira eval speech` does), so every card of every stage
speaks the same sentences with the same seeds."""
CARD_VERSION = 1
SPEAKING_STAGES = ("1", "2", "3")
OFFLINE = "offline"
"""`make_card(transcribe=OFFLINE)`: the offline ASR of `ira.eval.asr`, or a note in the card when it is missing."""

Transcribe = Callable[[Any, int], str]


@dataclass
class CardItem:
    sentence: str
    wav: Optional[str]               # the file's path relative to the card's folder; None: no audio was made
    seconds: float
    asr_heard: Optional[str] = None  # None: no ASR here (the card's asr_note says why)
    wer: Optional[float] = None      # of asr_heard against the sentence (ira.text_metrics.word_error_rate)
    llm_answered: Optional[str] = None   # None: no adapter (stage 1) or the LLM could not hear this clip
    note: str = ""                   # why a field is missing for this sentence


@dataclass
class Card:
    checkpoint: str
    stage: str
    step: int
    items: list[CardItem] = field(default_factory=list)
    wer: Optional[float] = None          # corpus WER of the three (None without an ASR)
    asr: Optional[str] = None            # the ASR model used
    asr_note: str = ""                   # why there is no ASR, and what to install
    instruction: Optional[str] = None    # what the LLM was asked (stage 2 and 3)
    llm_note: str = ""                   # why the LLM was not asked
    seed: int = CARD_SEED
    seconds: float = 0.0                 # how long making the card took
    made: float = 0.0                    # time.time() when it was written
    version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Card":
        items = [CardItem(**item) for item in data.pop("items", [])]
        return cls(**data, items=items)


class CardError(ValueError):
    """A card that cannot be made or read (names the file and what to do)."""


# ------------------------------------------------------------------------------------------ reading


def read_card(path: str | Path) -> Card:
    """The card in `path` (a card.json, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    try:
        return Card.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise CardError(f"{path} is not a readable card ({exc}); make it again with "
                        f"`ira eval card --checkpoint <checkpoint>`") from exc


def wav_path(card_path: str | Path, item: CardItem) -> Optional[Path]:
    """The absolute path of an item's audio (items keep it relative to the card's folder), None without one."""
    if item.wav is None:
        return None
    card_path = Path(card_path)
    folder = card_path if card_path.is_dir() else card_path.parent
    return folder / item.wav


# ------------------------------------------------------------------------------------------ making


def offline_asr() -> tuple[Optional[Transcribe], str, str]:
    """(the offline ASR, its model, "") when it loads here, else (None, "", why not and what to install)."""
    from ira.eval import asr

    if not asr.is_available():
        return None, "", f"no offline ASR here, so nothing was transcribed: {asr.INSTALL_HINT}"
    try:
        transcriber = asr.transcriber()
    except (asr.ASRUnavailable, RuntimeError, OSError, ValueError) as exc:   # a model folder that does not load
        return None, "", f"the offline ASR did not load ({exc}); {asr.INSTALL_HINT}"
    return transcriber, transcriber.source, ""


def make_card(checkpoint: str | Path, card_dir: str | Path | None = None, *,
              transcribe: Union[Transcribe, str, None] = OFFLINE, llm: Any = None, device: str = "auto",
              sentences: Optional[list[str]] = None, seed: int = CARD_SEED, max_new_tokens: int = 64) -> Path:
    """Speak the card's sentences with `checkpoint`, transcribe them, ask the LLM (stage 2 and 3), and write
    the wavs and `card.json` into `card_dir` (default: `<checkpoint's folder>/card`); returns card.json's path.

    transcribe: OFFLINE (the offline ASR, or a note when it is missing), a callable (waveform, sample rate)
    -> text, or None (no ASR). llm: an already loaded LLM for a stage 2 or 3 checkpoint (else the one the
    checkpoint names is loaded). sentences: default the first CARD_SENTENCES held-out sentences."""
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    stage, step = _speaking_header(checkpoint)
    card_dir = Path(card_dir) if card_dir is not None else checkpoint.parent / CARD_DIR
    card_dir.mkdir(parents=True, exist_ok=True)
    if sentences is None:
        from ira.eval.speech import heldout_sentences
        sentences = heldout_sentences(limit=CARD_SENTENCES)
    from ira.inference import create_pipeline_from_checkpoints

    card = Card(checkpoint=str(checkpoint), stage=stage, step=step, seed=seed)
    pipeline = create_pipeline_from_checkpoints(checkpoint, device=device, llm=llm)   # what `ira generate` uses
    clips = _speak(pipeline.speaker, sentences, card_dir, seed, card)
    _transcribe(card, clips, transcribe)
    if pipeline.can_understand:
        _ask_llm(card, pipeline.listener, clips, max_new_tokens)
    else:
        card.llm_note = f"a stage-{stage} checkpoint has no adapter: the LLM hears speech from stage 2 on"
    card.seconds = round(time.perf_counter() - start, 2)
    card.made = time.time()
    return write_card(card, card_dir / CARD_FILE)


def write_card(card: Card, path: Path) -> Path:
    """Write card.json atomically (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(card.to_dict(), indent=2, ensure_ascii=False))
    return path


def _speaking_header(checkpoint: Path) -> tuple[str, int]:
    """(stage, step) of a checkpoint that speaks; a clear error for a missing file or a style checkpoint."""
    from ira.checkpoint import read_header

    header = read_header(checkpoint)   # a missing or unreadable file is a CheckpointError naming it
    if header.stage not in SPEAKING_STAGES:
        raise CardError(f"{checkpoint} is a stage-{header.stage} checkpoint, which does not speak: a card needs "
                        f"a stage 1, 2 or 3 checkpoint")
    return header.stage, header.step


@dataclass
class _Clip:
    waveform: Any        # torch.Tensor [T], empty when the model spoke no frame
    sample_rate: int


def _speak(speaker: Any, sentences: list[str], card_dir: Path, seed: int, card: Card) -> list[_Clip]:
    """Speak each sentence with seed `seed + i` and save it as card_dir/<i+1>.wav; adds one item per sentence."""
    from ira.audio import save_audio
    from ira.speaker import SamplingSettings

    clips = []
    for i, sentence in enumerate(sentences):
        result = speaker.speak(sentence, settings=replace(SamplingSettings(), seed=seed + i))
        item = CardItem(sentence=sentence, wav=None, seconds=round(result.seconds, 2))
        if result.waveform.numel():
            name = f"{i + 1}.wav"
            save_audio(card_dir / name, result.waveform, result.sample_rate)
            item.wav = name
        else:
            item.note = "the model ended the speech at once (no frames)"
        card.items.append(item)
        clips.append(_Clip(result.waveform, result.sample_rate))
    return clips


def _transcribe(card: Card, clips: list[_Clip], transcribe: Union[Transcribe, str, None]) -> None:
    """Fill in what the ASR heard and the WERs, or the card's asr_note when there is no ASR."""
    if isinstance(transcribe, str) and transcribe == OFFLINE:
        transcribe, card.asr, card.asr_note = offline_asr()
    elif transcribe is None:
        card.asr_note = "no ASR was given, so nothing was transcribed"
    elif callable(transcribe) and not isinstance(transcribe, str):
        card.asr = getattr(transcribe, "source", None) or getattr(transcribe, "__name__", "given")
    else:
        raise CardError(f"transcribe must be {OFFLINE!r}, a callable (waveform, sample_rate) -> text, or None; "
                        f"got {transcribe!r}")
    if transcribe is None:
        return
    for item, clip in zip(card.items, clips):
        item.asr_heard = transcribe(clip.waveform, clip.sample_rate) if clip.waveform.numel() else ""
        item.wer = round(word_error_rate(item.sentence, item.asr_heard), 4)
    card.wer = round(corpus_wer([i.sentence for i in card.items], [i.asr_heard or "" for i in card.items]), 4)


def _ask_llm(card: Card, listener: Any, clips: list[_Clip], max_new_tokens: int) -> None:
    """Ask the LLM to repeat each clip, through the checkpoint's adapter, as `ira understand` would."""
    from ira.models.splice import REPEAT_INSTRUCTION

    card.instruction = REPEAT_INSTRUCTION
    for item, clip in zip(card.items, clips):
        if not clip.waveform.numel():
            continue
        try:
            answer = listener.understand(clip.waveform, REPEAT_INSTRUCTION, sample_rate=clip.sample_rate,
                                         max_new_tokens=max_new_tokens)
        except ValueError as exc:   # too short, or only silence: the LLM cannot be asked about it
            item.note = f"the LLM was not asked: {exc}"
            continue
        item.llm_answered = answer.replace("\n", " ").strip()


def summary(card: Card) -> str:
    """The card as text for the terminal (`ira eval card`)."""
    wer = f", ASR WER {card.wer:.2f}" if card.wer is not None else ""
    lines = [f"stage {card.stage} checkpoint, step {card.step}{wer} ({card.seconds:.0f} s)"]
    for i, item in enumerate(card.items, start=1):
        lines.append(f"  {i}. {item.sentence}   [{item.wav or 'no audio'}]")
        if item.asr_heard is not None:
            lines.append(f"     ASR heard:    {item.asr_heard or '(nothing)'}  (WER {item.wer:.2f})")
        if item.llm_answered is not None:
            lines.append(f"     LLM answered: {item.llm_answered or '(nothing)'}")
        if item.note:
            lines.append(f"     ({item.note})")
    lines += [f"  ({note})" for note in (card.asr_note, card.llm_note) if note]
    return "\n".join(lines)
