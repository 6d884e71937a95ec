"""A multi-voice English corpus spoken by eSpeak NG: the offline data source.

Every utterance is a seeded random choice of sentence, accent (eSpeak's English dialects), voice
variant (male m1-m7, female f1-f5, and a few special ones: croak, whisper, klatt), pitch, pitch
range and speaking rate, so the corpus spans low..high pitch and slow..fast speech with labels
that say exactly how each clip was made. Utterance i depends only on (seed, i), which makes the
corpus deterministic and resumable: an interrupted run keeps the wavs it wrote, and a larger run
with the same seed keeps the smaller run's clips.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ira.audio import save_audio
from ira.data import espeak
from ira.data.sentence_pool import sentence_pool
from ira.data.corpus import (LABELS, METADATA, WAVS, Clip, CorpusError, Progress, claim_corpus_dir,
                             corpus_summary, wav_path, write_labels, write_metadata, write_source)

GENERATOR_VERSION = 2
"""Bump when a change here would change the audio of an existing (seed, index). 2: the 25,484-sentence
pool (sentence_pool.py) instead of 484 sentences; rates 120-220 instead of 110-260; special voices 6%."""

PITCH_SETTINGS = (5, 95)
"""eSpeak pitch parameter (0-100, relative to the variant's own base pitch)."""
RANGE_SETTINGS = (20, 90)
"""eSpeak pitch-range parameter: low = monotone, high = lively intonation."""
RATE_SETTINGS = (120, 220)
"""Speaking rate in words per minute (eSpeak's default is 175). Whisper tiny.en misheard 78% of the words
of clips above 250 words/min and 30% below 150 (docs/decisions.md): a corpus the model should learn to
speak intelligibly from stays in the range people speak at."""
VOLUME = 80
"""eSpeak volume (0-200); its default 100 clips a few loud syllables."""
SPECIAL_VARIANTS = ("croak", "whisper", "whisperf", "klatt", "klatt2", "klatt3")
SPECIAL_PROBABILITY = 0.06
MIN_SECONDS = 0.3
CHUNK = 100
"""Utterances per task handed to a synthesis worker."""
PARALLEL_FROM = 400
"""Fewer utterances than this are synthesised in this process (starting workers costs ~2 s each)."""


@dataclass(frozen=True)
class Utterance:
    """How one clip is spoken."""

    id: str
    text: str
    voice: str
    accent: str
    variant: str
    gender: str
    pitch_setting: int
    range_setting: int
    rate_setting: int

    @property
    def speaker(self) -> str:
        return f"{self.voice}+{self.variant}"

    def labels(self) -> dict[str, Any]:
        """The labels.jsonl entry (docs/data_layout.md) without the id."""
        values = asdict(self)
        del values["id"], values["text"]
        return {"speaker": self.speaker, **values}


def load_sentences() -> tuple[str, ...]:
    """The sentences the corpus speaks: the pool of `sentence_pool.py` (25,484, none held out)."""
    try:
        return sentence_pool()
    except OSError as exc:
        raise CorpusError(f"the bundled sentence lists cannot be read ({exc}); reinstall ira") from exc


def _sentences_hash(sentences: tuple[str, ...]) -> str:
    return hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _sentence_order(seed: int, block: int, n_sentences: int) -> list[int]:
    """The seeded shuffle that deals block `block` of the sentences (one shuffle per block, not per clip)."""
    return random.Random(f"ira-synth:{seed}:sentences:{block}").sample(range(n_sentences), n_sentences)


def plan_utterance(index: int, seed: int, sentences: tuple[str, ...], voices: dict[str, str],
                   variants: dict[str, str]) -> Utterance:
    """Utterance `index` of the corpus with `seed`: a pure function of its arguments.

    Sentences are dealt from a seeded shuffle (every sentence once before any repeats), accents
    from a seeded shuffle per block of len(voices) clips (each block holds every accent once).
    """
    n_sent, n_voices = len(sentences), len(voices)
    order = _sentence_order(seed, index // n_sent, n_sent)
    accents = random.Random(f"ira-synth:{seed}:voices:{index // n_voices}").sample(sorted(voices), n_voices)
    rng = random.Random(f"ira-synth:{seed}:utterance:{index}")
    voice = accents[index % n_voices]
    specials = [v for v in SPECIAL_VARIANTS if v in variants]
    if specials and rng.random() < SPECIAL_PROBABILITY:
        variant = rng.choice(specials)
    else:
        gender = rng.choice(("male", "female"))
        variant = rng.choice(sorted(v for v, g in variants.items() if g == gender and v not in SPECIAL_VARIANTS))
    return Utterance(
        id=f"synth_{index:05d}",
        text=sentences[order[index % n_sent]],
        voice=voice,
        accent=voices[voice],
        variant=variant,
        gender=variants[variant],
        pitch_setting=rng.randint(*PITCH_SETTINGS),
        range_setting=rng.randint(*RANGE_SETTINGS),
        rate_setting=rng.randint(*RATE_SETTINGS),
    )


def speak(utt: Utterance) -> tuple[np.ndarray, int]:
    """Synthesise one utterance -> (float32 waveform, sample rate)."""
    wav, sr = espeak.synthesize(utt.text, voice=utt.speaker, rate=utt.rate_setting,
                                pitch=utt.pitch_setting, pitch_range=utt.range_setting, volume=VOLUME)
    if len(wav) < MIN_SECONDS * sr:
        raise espeak.EspeakError(f"eSpeak NG produced only {len(wav) / sr:.2f} s of audio for "
                                 f"{utt.text!r} with voice {utt.speaker!r}")
    return wav, sr


def remove_stale_wavs(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete the `<prefix>*.wav` files of an earlier run that are not in `keep`."""
    for path in (out_dir / WAVS).glob(f"{prefix}*.wav"):
        if path.stem not in keep:
            path.unlink()


def _speak_to_files(utterances: list[Utterance], out_dir: Path) -> int:
    """Synthesise and write each utterance's WAV (a worker process's share); returns how many."""
    for utt in utterances:
        wav, sr = speak(utt)
        save_audio(wav_path(out_dir, utt.id), wav, sr)
    return len(utterances)


def _speak_all(utterances: list[Utterance], out_dir: Path, workers: int | None) -> Iterator[int]:
    """Write every utterance's WAV, in `workers` processes (default: one per CPU core, at most 4) when there
    are enough to pay for starting them; yields the count finished after each clip (in this process) or
    each chunk (in workers). Each clip depends on its utterance alone, so the corpus is the same for any
    number of workers."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(utterances) < PARALLEL_FROM:
        for utt in utterances:
            yield _speak_to_files([utt], out_dir)
        return
    chunks = [utterances[i:i + CHUNK] for i in range(0, len(utterances), CHUNK)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_speak_to_files, chunk, out_dir) for chunk in chunks]):
            yield future.result()


def synthesize_corpus(out_dir: str | Path, num_utterances: int = 600, seed: int = 0,
                      progress: Progress | None = None, workers: int | None = None) -> dict[str, Any]:
    """Write (or finish) the eSpeak corpus in `out_dir`; returns its summary.

    The summary is `corpus_summary` plus `generated` / `reused` clip counts and `seconds`. `workers`:
    processes that synthesise (default one per CPU core, at most 4; 1 = in this process).
    """
    if num_utterances <= 0:
        raise CorpusError(f"num_utterances must be > 0, got {num_utterances}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    previous = claim_corpus_dir(out_dir, "synth")
    sentences = load_sentences()
    voices, variants = espeak.english_voices(), espeak.standard_variants()
    if not voices or not variants:
        raise espeak.EspeakError("the eSpeak NG data has no English voices or no voice variants; "
                                 "reinstall espeakng-loader")
    settings = {"source": "synth", "seed": seed, "version": GENERATOR_VERSION,
                "sentences_sha1": _sentences_hash(sentences), "voices": sorted(voices),
                "variants": sorted(variants)}
    same_recipe = previous is not None and all(previous.get(k) == v for k, v in settings.items())
    plans = [plan_utterance(i, seed, sentences, voices, variants) for i in range(num_utterances)]

    if (same_recipe and previous.get("complete") and previous.get("num_utterances") == num_utterances
            and (out_dir / METADATA).is_file() and (out_dir / LABELS).is_file()
            and all(wav_path(out_dir, u.id).is_file() for u in plans)):
        summary = corpus_summary(out_dir)
        if progress:
            progress(1.0, f"the synthetic corpus in {out_dir} is already complete")
        return {**summary, "generated": 0, "reused": num_utterances,
                "seconds": round(time.perf_counter() - start, 3)}

    (out_dir / WAVS).mkdir(parents=True, exist_ok=True)
    # Clips of another recipe must go before source.json names the new one, or a resumed run
    # would take them for its own.
    remove_stale_wavs(out_dir, "synth_", {u.id for u in plans} if same_recipe else set())
    write_source(out_dir, {**settings, "num_utterances": num_utterances, "complete": False})
    todo = [u for u in plans if not (same_recipe and wav_path(out_dir, u.id).is_file())]
    done = num_utterances - len(todo)
    for finished in _speak_all(todo, out_dir, workers):
        done += finished
        if progress:
            progress(done / num_utterances, f"synthesised {done}/{num_utterances} utterances")
    generated = len(todo)

    write_metadata(out_dir, [Clip(u.id, u.text, u.text, wav_path(out_dir, u.id)) for u in plans])
    write_labels(out_dir, {u.id: u.labels() for u in plans})
    write_source(out_dir, {**settings, "num_utterances": num_utterances, "complete": True})
    summary = corpus_summary(out_dir)
    return {**summary, "generated": generated, "reused": num_utterances - generated,
            "seconds": round(time.perf_counter() - start, 3)}
