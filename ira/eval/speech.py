"""Intelligibility of a SpeechLM: it speaks held-out sentences, an offline ASR transcribes them, and the
word and character error rates are printed next to the ceiling the codec allows.

The sentences (`ira/data/heldout_sentences.txt`) are in no corpus the project ships. Each is spoken with a
fixed seed, through the same `Speaker` the CLI and the app use, so the figure is what a user hears. The
ceiling is measured the same way on eSpeak NG's audio of the same sentences, in voices drawn like the
synthetic corpus's (accent, variant, pitch, rate), after the checkpoint's codec round trip: a model that
speaks like its corpus cannot score better. The raw eSpeak audio is scored too (the codec's share of the gap).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ira.text_metrics import corpus_cer, corpus_wer, word_error_rate

HELDOUT_FILE = Path(__file__).resolve().parent.parent / "data" / "heldout_sentences.txt"
CEILING_VOICE_SEED = 20_260_101
"""Seed of the corpus-like voices the ceiling's eSpeak audio is spoken in."""


def heldout_sentences(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The evaluation sentences (one a line; blank lines and `#` comments skipped)."""
    path = Path(path) if path else HELDOUT_FILE
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


def score_speaker(speaker: Any, sentences: Sequence[str], transcribe: Callable[[torch.Tensor, int], str],
                  settings: Any = None, seed: int = 0, style: Optional[str] = None) -> SpeechScore:
    """Speak each sentence (seed + its index), transcribe it, score it. `speaker`: an `ira.speaker.Speaker`."""
    from ira.speaker import SamplingSettings

    base = settings or SamplingSettings()
    heard, seconds = [], []
    for i, sentence in enumerate(sentences):
        result = speaker.speak(sentence, style=style, settings=_with_seed(base, seed + i))
        heard.append(transcribe(result.waveform, result.sample_rate) if result.waveform.numel() else "")
        seconds.append(result.seconds)
    return SpeechScore.of(sentences, heard, seconds)


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


def score_ceiling(codec: Any, sentences: Sequence[str], transcribe: Callable[[torch.Tensor, int], str]
                  ) -> tuple[SpeechScore, SpeechScore]:
    """(eSpeak's audio as it is, the same audio after `codec`'s encode-decode round trip), both scored."""
    clips = espeak_clips(sentences, codec.sample_rate)
    raw, coded, seconds = [], [], []
    with torch.inference_mode():
        for wav in clips:
            raw.append(transcribe(wav, codec.sample_rate))
            round_trip = codec.decode(codec.encode(wav, codec.sample_rate))
            coded.append(transcribe(round_trip.float(), codec.sample_rate))
            seconds.append(wav.numel() / codec.sample_rate)
    return SpeechScore.of(sentences, raw, seconds), SpeechScore.of(sentences, coded, seconds)


@dataclass
class SpeechEvaluation:
    model: SpeechScore
    ceiling: Optional[SpeechScore]
    espeak: Optional[SpeechScore]
    seconds: float

    def summary(self) -> str:
        lines = [f"held-out sentences: {len(self.model.items)}",
                 f"  model          WER {self.model.wer:.3f}  CER {self.model.cer:.3f}"]
        if self.ceiling is not None and self.espeak is not None:
            lines.append(f"  codec ceiling  WER {self.ceiling.wer:.3f}  CER {self.ceiling.cer:.3f}  "
                         "(eSpeak's audio of the same sentences after the codec round trip)")
            lines.append(f"  eSpeak itself  WER {self.espeak.wer:.3f}  CER {self.espeak.cer:.3f}")
        lines.append(f"  ({self.seconds:.0f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(),
                "ceiling": None if self.ceiling is None else self.ceiling.to_dict(),
                "espeak": None if self.espeak is None else self.espeak.to_dict(), "seconds": self.seconds}


def evaluate_speech(speaker: Any, sentences: Sequence[str], transcribe: Callable[[torch.Tensor, int], str],
                    settings: Any = None, seed: int = 0, style: Optional[str] = None,
                    ceiling: bool = True) -> SpeechEvaluation:
    """The model's score on `sentences`, and (with `ceiling`) eSpeak's and the codec round trip's."""
    start = time.perf_counter()
    model = score_speaker(speaker, sentences, transcribe, settings, seed, style)
    espeak_score = coded = None
    if ceiling:
        espeak_score, coded = score_ceiling(speaker.codec, sentences, transcribe)
    return SpeechEvaluation(model, coded, espeak_score, time.perf_counter() - start)
