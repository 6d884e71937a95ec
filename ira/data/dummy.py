"""A tiny corpus for smoke tests: short eSpeak NG sentences in three distinct voices.

Where eSpeak NG cannot load, `engine="auto"` falls back (with a warning) to harmonic tones that
follow the same pitch labels, so the pipeline can still be exercised end to end.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from ira.audio import save_audio
from ira.data import espeak
from ira.data.corpus import (WAVS, Clip, CorpusError, claim_corpus_dir, wav_path, write_labels,
                             write_metadata, write_source)
from ira.data.synth import Utterance, load_sentences, remove_stale_wavs, speak

# (voice, accent, variant, gender): three clearly different speakers.
DUMMY_VOICES = (
    ("en-us", "American", "m3", "male"),
    ("en-gb-scotland", "Scottish", "f2", "female"),
    ("en-029", "Caribbean", "m7", "male"),
)
MAX_WORDS = 7
TONE_RATE = 22050
_TONE_BASE_HZ = {"male": 110.0, "female": 200.0}


def plan_dummy(num_clips: int, seed: int) -> list[Utterance]:
    """Clip i: voice i mod 3, a short sentence, seeded pitch and rate settings."""
    short = [s for s in load_sentences() if len(s.split()) <= MAX_WORDS]
    rng = random.Random(f"ira-dummy:{seed}")
    texts = rng.sample(short, min(num_clips, len(short)))
    plans = []
    for i in range(num_clips):
        voice, accent, variant, gender = DUMMY_VOICES[i % len(DUMMY_VOICES)]
        plans.append(Utterance(id=f"dummy_{i:04d}", text=texts[i % len(texts)], voice=voice, accent=accent,
                               variant=variant, gender=gender, pitch_setting=rng.randint(10, 90),
                               range_setting=rng.randint(30, 70), rate_setting=rng.randint(140, 220)))
    return plans


def tone_clip(utt: Utterance, sample_rate: int = TONE_RATE) -> np.ndarray:
    """A voiced-sounding buzz for `utt`: one 'syllable' per word at a pitch set by its labels.

    F0 = base (110 Hz male, 200 Hz female) * 2 ** ((pitch_setting - 50) / 100), so a higher
    pitch setting is a higher tone, as with eSpeak.
    """
    f0 = _TONE_BASE_HZ.get(utt.gender, 150.0) * 2 ** ((utt.pitch_setting - 50) / 100)
    words = len(utt.text.split())
    syllable = 60.0 / utt.rate_setting
    t = np.arange(int(sample_rate * syllable * words)) / sample_rate
    glide = 1 + 0.05 * np.sin(2 * np.pi * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(f0 * glide) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 9))
    envelope = np.sin(np.pi * (t % syllable) / syllable) ** 2
    wav = wav * envelope
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


def create_dummy_corpus(out_dir: str | Path, num_clips: int = 12, seed: int = 0,
                        engine: Literal["auto", "espeak", "tones"] = "auto") -> Path:
    """Write a small corpus (wavs, metadata.csv, labels.jsonl) into `out_dir`; returns it."""
    if num_clips <= 0:
        raise CorpusError(f"num_clips must be > 0, got {num_clips}")
    if engine not in ("auto", "espeak", "tones"):
        raise CorpusError(f"engine must be 'auto', 'espeak' or 'tones', got {engine!r}")
    out_dir = Path(out_dir)
    claim_corpus_dir(out_dir, "dummy")
    if engine == "auto":
        engine = "espeak" if espeak.is_available() else "tones"
        if engine == "tones":
            warnings.warn("eSpeak NG cannot load here: the dummy corpus is made of tones, not speech "
                          "(reinstall espeakng-loader for spoken clips)", RuntimeWarning, stacklevel=2)
    plans = plan_dummy(num_clips, seed)
    (out_dir / WAVS).mkdir(parents=True, exist_ok=True)
    remove_stale_wavs(out_dir, "dummy_", {u.id for u in plans})
    labels = {}
    for utt in plans:
        wav, sr = speak(utt) if engine == "espeak" else (tone_clip(utt), TONE_RATE)
        save_audio(wav_path(out_dir, utt.id), wav, sr)
        labels[utt.id] = utt.labels() if engine == "espeak" else {
            **utt.labels(), "speaker": f"tone-{utt.gender}", "voice": "tone", "accent": None, "variant": None}
    write_metadata(out_dir, [Clip(u.id, u.text, u.text, wav_path(out_dir, u.id)) for u in plans])
    write_labels(out_dir, {k: {n: v for n, v in values.items() if v is not None} for k, values in labels.items()})
    write_source(out_dir, {"source": "dummy", "engine": engine, "seed": seed, "num_clips": num_clips})
    return out_dir
