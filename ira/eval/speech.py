"""Intelligibility of a SpeechLM: it speaks held-out sentences, an offline ASR transcribes them, and the
word and character error rates are printed next to the ceiling the codec allows.

The sentences (`ira/data/heldout_sentences.txt`) are in no corpus the project ships. Each is spoken with a
fixed seed, through the same `Speaker` the CLI and the app use, so the figure is what a user hears. The
ceiling is measured the same way on eSpeak NG's audio of the same sentences, in voices drawn like the
synthetic corpus's (accent, variant, pitch, rate), after the checkpoint's codec round trip: a model that
speaks like its corpus cannot score better. The raw eSpeak audio is scored too (the codec's share of the gap).

Several ASRs can hear the same audio (`evaluate_speech_by`): Whisper tiny.en is thrown by Griffin-Lim's
artefacts more than Whisper base is, and stage 3 rewards with tiny.en, so base is the figure to trust.

Each evaluation also says where the words were lost (`ira.eval.error_breakdown`): skipped or repeated words
(alignment failures) against wrong sounds, and, with the ceiling, each sentence's duration against eSpeak's.

Two bundled sets (`SENTENCE_SETS`): `everyday`, the default and the one the app quotes, and `hard`, rarer content
words (`heldout_hard_sentences.txt`), where a model that only keeps familiar phrases falls behind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ira.eval.error_breakdown import ErrorBreakdown
from ira.eval.quality import EVERYDAY_SET, SPEECH_ERRORS_KEY as ERRORS_KEY
from ira.text_metrics import corpus_cer, corpus_wer, word_error_rate

HELDOUT_FILE = Path(__file__).resolve().parent.parent / "data" / "heldout_sentences.txt"
HARD_FILE = HELDOUT_FILE.with_name("heldout_hard_sentences.txt")
HARD_SET = "hard"
SENTENCE_SETS = {EVERYDAY_SET: HELDOUT_FILE, HARD_SET: HARD_FILE}
"""The bundled held-out sets by name (`--sentences NAME`): in no corpus the project ships."""
CEILING_VOICE_SEED = 20_260_101
"""Seed of the corpus-like voices the ceiling's eSpeak audio is spoken in."""


def sentence_set(name_or_path: str | Path | None) -> Optional[str]:
    """The bundled set `name_or_path` names (None: the default, `everyday`), or None for a file of one's own."""
    if name_or_path is None:
        return EVERYDAY_SET
    return str(name_or_path) if str(name_or_path) in SENTENCE_SETS else None


def heldout_sentences(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The evaluation sentences (one a line; blank lines and `#` comments skipped) of a file, or of the bundled set
    it names (`SENTENCE_SETS`: a file literally called `hard` is `./hard`); None: the everyday set."""
    name = sentence_set(path)
    path = SENTENCE_SETS[name] if name is not None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sentence file (one sentence a line)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line and not line.startswith("#")]
    if not sentences:
        raise ValueError(f"{path} holds no sentence (one sentence a line)")
    return sentences[:limit] if limit else sentences


@dataclass
class Heard:
    text: str
    heard: str
    wer: float
    seconds: float


@dataclass
class SpeechScore:
    """Corpus-level WER and CER over `items` (total edits / total reference words or characters)."""
    wer: float
    cer: float
    items: list[Heard] = field(default_factory=list)

    @classmethod
    def of(cls, texts: Sequence[str], heard: Sequence[str], seconds: Sequence[float]) -> "SpeechScore":
        items = [Heard(t, h, word_error_rate(t, h), s) for t, h, s in zip(texts, heard, seconds)]
        return cls(corpus_wer(list(texts), list(heard)), corpus_cer(list(texts), list(heard)), items)

    def to_dict(self) -> dict[str, Any]:
        return {"wer": self.wer, "cer": self.cer, "items": [asdict(i) for i in self.items]}

    def errors(self, reference: Optional["SpeechScore"] = None) -> ErrorBreakdown:
        """Where the words were lost (`ira.eval.error_breakdown`); with `reference` (eSpeak's score of the same
        sentences), each sentence's duration against eSpeak's."""
        texts, heard = [i.text for i in self.items], [i.heard for i in self.items]
        if reference is None:
            return ErrorBreakdown.of(texts, heard)
        return ErrorBreakdown.of(texts, heard, [i.seconds for i in self.items], [i.seconds for i in reference.items])


Transcribe = Callable[[torch.Tensor, int], str]


def score_speaker(speaker: Any, sentences: Sequence[str], transcribe: Transcribe,
                  settings: Any = None, seed: int = 0, style: Optional[str] = None) -> SpeechScore:
    """Speak each sentence (seed + its index), transcribe it, score it. `speaker`: an `ira.speaker.Speaker`."""
    return score_speaker_by(speaker, sentences, {"asr": transcribe}, settings, seed, style)["asr"]


def score_speaker_by(speaker: Any, sentences: Sequence[str], transcribers: Mapping[str, Transcribe],
                     settings: Any = None, seed: int = 0, style: Optional[str] = None) -> dict[str, SpeechScore]:
    """`score_speaker` with each ASR of `transcribers` (name -> transcribe) hearing the same audio."""
    from ira.speaker import SamplingSettings

    base = settings or SamplingSettings()
    heard: dict[str, list[str]] = {name: [] for name in transcribers}
    seconds = []
    for i, sentence in enumerate(sentences):
        result = speaker.speak(sentence, style=style, settings=_with_seed(base, seed + i))
        for name, transcribe in transcribers.items():
            heard[name].append(transcribe(result.waveform, result.sample_rate) if result.waveform.numel() else "")
        seconds.append(result.seconds)
    return {name: SpeechScore.of(sentences, heard[name], seconds) for name in transcribers}


def _with_seed(settings: Any, seed: int) -> Any:
    from dataclasses import replace
    return replace(settings, seed=seed)


def espeak_clips(sentences: Sequence[str], sample_rate: int) -> list[torch.Tensor]:
    """eSpeak NG's audio of each sentence in a voice drawn like the synthetic corpus's, at `sample_rate`."""
    import torchaudio.functional as AF

    from ira.data import espeak, synth

    voices, variants = espeak.english_voices(), espeak.standard_variants()
    clips = []
    for i, sentence in enumerate(sentences):
        plan = synth.plan_utterance(i, CEILING_VOICE_SEED, (sentence,), voices, variants)
        wav, sr = synth.speak(plan)
        clips.append(AF.resample(torch.from_numpy(wav), sr, sample_rate))
    return clips


def score_ceiling(codec: Any, sentences: Sequence[str], transcribe: Transcribe) -> tuple[SpeechScore, SpeechScore]:
    """(eSpeak's audio as it is, the same audio after `codec`'s encode-decode round trip), both scored."""
    return score_ceiling_by(codec, sentences, {"asr": transcribe})["asr"]


def score_ceiling_by(codec: Any, sentences: Sequence[str], transcribers: Mapping[str, Transcribe]
                     ) -> dict[str, tuple[SpeechScore, SpeechScore]]:
    """`score_ceiling` with each ASR of `transcribers` hearing the same audio."""
    clips = espeak_clips(sentences, codec.sample_rate)
    raw: dict[str, list[str]] = {name: [] for name in transcribers}
    coded: dict[str, list[str]] = {name: [] for name in transcribers}
    seconds = []
    with torch.inference_mode():
        for wav in clips:
            round_trip = codec.decode(codec.encode(wav, codec.sample_rate)).float()
            for name, transcribe in transcribers.items():
                raw[name].append(transcribe(wav, codec.sample_rate))
                coded[name].append(transcribe(round_trip, codec.sample_rate))
            seconds.append(wav.numel() / codec.sample_rate)
    return {name: (SpeechScore.of(sentences, raw[name], seconds), SpeechScore.of(sentences, coded[name], seconds))
            for name in transcribers}


@dataclass
class SpeechEvaluation:
    model: SpeechScore
    ceiling: Optional[SpeechScore]
    espeak: Optional[SpeechScore]
    seconds: float

    def errors(self) -> ErrorBreakdown:
        """Where the model's words were lost; with the ceiling, each sentence's duration against eSpeak's."""
        return self.model.errors(self.espeak)

    def summary(self) -> str:
        lines = [f"held-out sentences: {len(self.model.items)}",
                 f"  model          WER {self.model.wer:.3f}  CER {self.model.cer:.3f}",
                 *self.errors().summary_lines()]
        if self.ceiling is not None and self.espeak is not None:
            lines.append(f"  codec ceiling  WER {self.ceiling.wer:.3f}  CER {self.ceiling.cer:.3f}  "
                         "(eSpeak's audio of the same sentences after the codec round trip)")
            lines.append(f"  eSpeak itself  WER {self.espeak.wer:.3f}  CER {self.espeak.cer:.3f}")
        lines.append(f"  ({self.seconds:.0f} s)")
        return "\n".join(lines)

    def error_figures(self, items: bool = False) -> dict[str, Any]:
        """`ERRORS_KEY`'s value: the model's error breakdown (with every sentence's when `items`), and the ceiling's
        and eSpeak's own figures when they were measured (the ASR's and the codec's share of the wrong sounds)."""
        model = self.errors()
        return {"model": model.to_dict() if items else model.figures(),
                "ceiling": None if self.ceiling is None else self.ceiling.errors().figures(),
                "espeak": None if self.espeak is None else self.espeak.errors().figures()}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(),
                "ceiling": None if self.ceiling is None else self.ceiling.to_dict(),
                "espeak": None if self.espeak is None else self.espeak.to_dict(), "seconds": self.seconds,
                ERRORS_KEY: self.error_figures(items=True)}


def record_figures(evaluation: SpeechEvaluation, asr: str, seed: int, style: Optional[str] = None,
                   set_name: str = EVERYDAY_SET) -> dict[str, Any]:
    """What `ira eval speech` records beside the checkpoint for the app (`ira.eval.quality.write_speech_record`): the
    model's WER and CER by `asr`, on how many sentences of which bundled set (`set_name`), eSpeak's own and the codec
    ceiling's when measured, and where the words were lost (`ERRORS_KEY`)."""
    def figures(score: Optional[SpeechScore]) -> Optional[dict[str, float]]:
        return None if score is None else {"wer": score.wer, "cer": score.cer}

    return {"asr": asr, "sentences": len(evaluation.model.items), "sentence_set": set_name, "seed": seed,
            "style": style, "wer": evaluation.model.wer, "cer": evaluation.model.cer,
            "espeak": figures(evaluation.espeak), "ceiling": figures(evaluation.ceiling),
            ERRORS_KEY: evaluation.error_figures(), "made": time.time()}


def evaluate_speech(speaker: Any, sentences: Sequence[str], transcribe: Transcribe,
                    settings: Any = None, seed: int = 0, style: Optional[str] = None,
                    ceiling: bool = True) -> SpeechEvaluation:
    """The model's score on `sentences`, and (with `ceiling`) eSpeak's and the codec round trip's."""
    return evaluate_speech_by(speaker, sentences, {"asr": transcribe}, settings, seed, style, ceiling)["asr"]


def evaluate_speech_by(speaker: Any, sentences: Sequence[str], transcribers: Mapping[str, Transcribe],
                       settings: Any = None, seed: int = 0, style: Optional[str] = None,
                       ceiling: bool = True) -> dict[str, SpeechEvaluation]:
    """`evaluate_speech` with each ASR of `transcribers` (name -> transcribe) hearing the same audio: one
    evaluation per ASR, each with its own ceiling. `seconds` is the whole run's."""
    start = time.perf_counter()
    models = score_speaker_by(speaker, sentences, transcribers, settings, seed, style)
    ceilings = score_ceiling_by(speaker.codec, sentences, transcribers) if ceiling else {}
    seconds = time.perf_counter() - start
    return {name: SpeechEvaluation(models[name], ceilings[name][1] if ceiling else None,
                                   ceilings[name][0] if ceiling else None, seconds) for name in transcribers}
