"""Style annotation (pitch, rate, loudness) and the plain-language descriptions built from it."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from ira.data.annotate import (DEFAULT_STATS, annotate_clip, estimate_pitch, fit_annotation_stats,
                               quantile_bin)
from ira.data.descriptions import (FAMILIES, FRAMES, LEXICON, PITCH_LEVELS, RATE_LEVELS, _forms,
                                   attribute_levels, describe, parse_description_hints)


def harmonic(f0: float, sr: int, seconds: float = 2.0, amps=(1.0, 0.5, 0.33, 0.25, 0.2, 0.17)) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t + 0.7 * k) for k, a in enumerate(amps))
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


# ------------------------------------------------------------------------------------ pitch

@pytest.mark.parametrize("sr", [16_000, 22_050, 24_000, 44_100])
@pytest.mark.parametrize("f0", [65.0, 110.0, 220.0, 440.0])
def test_pitch_of_harmonic_signals(f0: float, sr: int) -> None:
    track = estimate_pitch(harmonic(f0, sr), sr)
    assert len(track) == 201  # one value per 10 ms, at 0, 10, ..., 2000 ms
    voiced = track[track > 0]
    assert len(voiced) >= 0.95 * len(track)
    assert np.all(np.abs(voiced / f0 - 1) < 0.03)  # every frame, so no octave error anywhere


def test_pitch_has_no_octave_error_with_a_weak_fundamental() -> None:
    # The fundamental is 20x weaker than the second harmonic: a naive autocorrelation peak-picker
    # is tempted by 2*f0; YIN's first-dip rule must not be.
    sr = 24_000
    track = estimate_pitch(harmonic(150.0, sr, amps=(0.05, 1.0, 1.0, 0.5, 0.5, 0.3)), sr)
    voiced = track[track > 0]
    assert len(voiced) > 0.9 * len(track)
    assert np.all(np.abs(voiced / 150.0 - 1) < 0.03)


def test_pitch_follows_a_glide_and_survives_noise() -> None:
    sr, seconds = 24_000, 2.0
    t = np.arange(int(sr * seconds)) / sr
    phase = 2 * np.pi * (100 * t + 25 * t ** 2)  # instantaneous F0 = 100 + 50 t Hz
    x = sum(np.sin(k * phase) / k for k in range(1, 8)).astype(np.float32) * 0.2
    track = estimate_pitch(x, sr)
    times = np.arange(len(track)) * 0.01
    ok = (track > 0) & (times < seconds - 0.02)
    assert ok.mean() > 0.95
    assert np.max(np.abs(track[ok] / (100 + 50 * times[ok]) - 1)) < 0.03

    rng = np.random.default_rng(0)
    clean = harmonic(220.0, sr)
    noisy = clean + rng.standard_normal(len(clean)).astype(np.float32) * clean.std() / np.sqrt(10)  # 10 dB SNR
    track = estimate_pitch(noisy, sr)
    assert (track > 0).mean() > 0.9
    assert abs(np.median(track[track > 0]) / 220.0 - 1) < 0.03


def test_noise_and_silence_are_unvoiced() -> None:
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(3 * 16_000)).astype(np.float32)
    assert (estimate_pitch(noise, 16_000) > 0).mean() < 0.05
    assert not estimate_pitch(np.zeros(16_000, dtype=np.float32), 16_000).any()
    assert len(estimate_pitch(np.zeros(0, dtype=np.float32), 16_000)) == 0


def test_pitch_accepts_torch_and_stereo() -> None:
    sr = 22_050
    mono = harmonic(200.0, sr, seconds=3.0)
    stereo = torch.from_numpy(np.stack([mono, mono]))
    np.testing.assert_allclose(estimate_pitch(stereo, sr), estimate_pitch(mono, sr), rtol=1e-5)


# ------------------------------------------------------------------------------- annotation

def speechlike(sr: int = 24_000) -> np.ndarray:
    """Three 'syllables' of gliding harmonic sound with pauses, and silence at both ends."""
    parts = [np.zeros(int(0.3 * sr), dtype=np.float32)]
    for f0 in (120.0, 140.0, 110.0):
        parts += [harmonic(f0, sr, seconds=0.4), np.zeros(int(0.1 * sr), dtype=np.float32)]
    parts.append(np.zeros(int(0.3 * sr), dtype=np.float32))
    return np.concatenate(parts)


def test_annotate_clip_measures_and_copies_labels() -> None:
    sr = 24_000
    wav = speechlike(sr)
    ann = annotate_clip(wav, sr, "Hi there, 42!", {"accent": "Scottish", "gender": "male", "duration": 9})
    assert ann["duration"] == pytest.approx(len(wav) / sr, abs=1e-3)
    assert ann["active_duration"] == pytest.approx(1.4, abs=0.05)  # leading/trailing silence trimmed
    assert ann["speaking_rate_cps"] == pytest.approx(9 / ann["active_duration"], rel=1e-3)  # 9 letters+digits
    assert 110 < ann["pitch_mean_hz"] < 140 and ann["pitch_std_hz"] > 5
    assert 0.7 < ann["voiced_fraction"] <= 1.0
    assert ann["accent"] == "Scottish" and ann["gender"] == "male" and ann["text"] == "Hi there, 42!"
    assert ann["label_duration"] == 9  # a label never overwrites a measurement
    assert ann == annotate_clip(wav, sr, "Hi there, 42!", {"accent": "Scottish", "gender": "male", "duration": 9})


def test_speaking_rate_and_pitch_double_when_time_compressed() -> None:
    sr = 24_000
    wav = speechlike(sr)
    normal = annotate_clip(wav, sr, "one two three")
    fast = annotate_clip(wav, 2 * sr, "one two three")  # same samples played twice as fast
    assert fast["speaking_rate_cps"] / normal["speaking_rate_cps"] == pytest.approx(2.0, rel=0.05)
    assert fast["pitch_mean_hz"] / normal["pitch_mean_hz"] == pytest.approx(2.0, rel=0.03)


def test_loudness_follows_gain() -> None:
    sr = 24_000
    wav = speechlike(sr)
    loud = annotate_clip(wav, sr, "abc")
    soft = annotate_clip(wav * 0.5, sr, "abc")
    assert loud["loudness_db"] - soft["loudness_db"] == pytest.approx(20 * np.log10(2), abs=0.1)
    assert soft["pitch_mean_hz"] == pytest.approx(loud["pitch_mean_hz"], rel=0.01)


def test_silent_clip_has_no_pitch() -> None:
    ann = annotate_clip(np.zeros(24_000, dtype=np.float32), 24_000, "")
    assert ann["pitch_mean_hz"] is None and ann["voiced_fraction"] == 0.0
    assert ann["loudness_db"] <= -100 and ann["speaking_rate_cps"] == 0.0


# ------------------------------------------------------------------------------ corpus stats

def fake_corpus(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    anns = []
    for i in range(n):
        gender = "male" if i % 2 else "female"
        anns.append({"id": f"c{i}", "gender": gender,
                     "pitch_mean_hz": rng.uniform(80, 150) if gender == "male" else rng.uniform(160, 260),
                     "pitch_std_semitones": rng.uniform(0.5, 4.0), "speaking_rate_cps": rng.uniform(8, 20),
                     "loudness_db": rng.uniform(-35, -15),
                     "accent": rng.choice(["Scottish", "American", "British RP"])})
    return anns


def test_fit_annotation_stats_quantiles_per_gender_and_fallbacks() -> None:
    anns = fake_corpus()
    stats = fit_annotation_stats(anns)
    male = np.array([a["pitch_mean_hz"] for a in anns if a["gender"] == "male"])
    np.testing.assert_allclose(stats["pitch"]["male"], np.percentile(male, [20, 40, 60, 80]), atol=1e-3)
    assert stats["pitch"]["male"][-1] < stats["pitch"]["female"][0]
    assert stats["source"]["rate"] == "corpus" and stats["count"] == 200
    for key in ("pitch_variation", "rate", "loudness"):
        assert stats[key]["all"] == sorted(stats[key]["all"])

    tiny = fit_annotation_stats(anns[:5])  # too few to speak for themselves
    assert tiny["source"]["pitch"] == "default" and tiny["rate"]["all"] == DEFAULT_STATS["rate"]["all"]
    assert tiny["pitch"]["female"] == DEFAULT_STATS["pitch"]["female"]
    unlabeled = fit_annotation_stats([{k: v for k, v in a.items() if k != "gender"} for a in anns])
    assert set(unlabeled["pitch"]) == {"all"}
    assert quantile_bin(0.0, [1, 2, 3, 4]) == 0 and quantile_bin(4.0, [1, 2, 3, 4]) == 4


# ------------------------------------------------------------------------------ descriptions

def test_levels_are_relative_to_the_corpus_and_gender() -> None:
    stats = fit_annotation_stats(fake_corpus())
    high_man = {"gender": "male", "pitch_mean_hz": 149.0, "speaking_rate_cps": 8.1}
    assert attribute_levels(high_man, stats)["pitch"] == "very high"  # top of the men, though lower than any woman
    assert attribute_levels({"pitch_mean_hz": 149.0}, stats)["pitch"] in ("low", "medium")  # vs everyone
    assert attribute_levels(high_man, stats)["rate"] == "very slow"
    labels = attribute_levels({"voice": "en-gb-scotland", "variant": "whisperf", "accent": "british rp"}, stats)
    assert labels == {"accent": "British", "quality": "whispery"}
    assert attribute_levels({"speaker": "en-029+croak"}, stats) == {"accent": "Caribbean", "quality": "croaky"}
    assert attribute_levels({"speaker": "en-us+grandma", "age": None}, stats)["age"] == "old"


def test_descriptions_vary_and_name_the_right_levels() -> None:
    anns = fake_corpus()
    stats = fit_annotation_stats(anns)
    for i, ann in enumerate(anns[:60]):
        levels = attribute_levels(ann, stats)
        for family in FAMILIES:
            texts = describe(ann, stats, random.Random(i), n=4, family=family)
            assert len(texts) == 4 and len({t.lower() for t in texts}) >= 3, texts
            for text in texts:
                for attr, level in parse_description_hints(text).items():
                    assert levels.get(attr) == level, (text, attr, level, levels)
        # pitch and rate are usually said
        texts = describe(ann, stats, random.Random(i), n=8)
        assert sum("pitch" in parse_description_hints(t) for t in texts) >= 4


def test_a_top_quantile_voice_is_high_never_low() -> None:
    stats = fit_annotation_stats(fake_corpus())
    ann = {"gender": "female", "pitch_mean_hz": 300.0, "pitch_std_semitones": 2.0, "speaking_rate_cps": 14.0}
    said_pitch = 0
    for seed in range(25):
        for text in describe(ann, stats, random.Random(seed), n=4):
            words = text.lower()
            assert not re.search(r"\b(low|deep|bass)\b", words), text
            if re.search(r"\b(very high|squeaky|very high-pitched)\b", words):
                said_pitch += 1
    assert said_pitch >= 50  # of 100 descriptions


def test_describe_is_deterministic_for_the_rng() -> None:
    stats = fit_annotation_stats(fake_corpus())
    ann = fake_corpus()[3]
    assert describe(ann, stats, random.Random(7)) == describe(ann, stats, random.Random(7))
    assert describe(ann, stats, random.Random(7)) != describe(ann, stats, random.Random(8))
    with pytest.raises(ValueError, match="family"):
        describe(ann, stats, random.Random(0), family="test")


def test_heldout_family_shares_no_frame_and_no_synonym_with_train() -> None:
    assert not set(FRAMES["train"]) & set(FRAMES["heldout"])
    for attr, levels in LEXICON.items():
        for level in levels:
            train = {p for ps in _forms(attr, level, "train").values() for p in ps}
            heldout = {p for ps in _forms(attr, level, "heldout").values() for p in ps}
            assert not train & heldout, (attr, level, train & heldout)
    # No phrase means two things (parsing relies on it).
    meaning: dict[str, tuple[str, str]] = {}
    for attr, levels in LEXICON.items():
        for level in levels:
            for family in FAMILIES:
                for phrase in (p for ps in _forms(attr, level, family).values() for p in ps):
                    assert meaning.setdefault(phrase.lower(), (attr, level)) == (attr, level), phrase
    # And no rendered description carries the fixed words of the other family's frames.
    stats = fit_annotation_stats(fake_corpus())
    texts = {f: [t.lower() for i, ann in enumerate(fake_corpus()[:40])
                 for t in describe(ann, stats, random.Random(i), n=6, family=f)] for f in FAMILIES}
    for family, other in (("train", "heldout"), ("heldout", "train")):
        for piece in {p for frame in FRAMES[family] for p in _frame_words(frame)}:
            pattern = re.compile(r"(?<![\w'])" + re.escape(piece) + r"(?![\w'])")
            assert not any(pattern.search(t) for t in texts[other]), (family, piece)


FUNCTION_WORDS = {"a", "an", "the", "with", "in", "by", "and", "of"}


def _frame_words(frame: str) -> list[str]:
    """The fixed text of a frame, in pieces, without the pieces made only of function words."""
    pieces = (p.strip(" .,:?").lower() for p in re.split(r"\{[a-z_]+\}", frame))
    return [p for p in pieces if p and set(re.findall(r"[\w']+", p)) - FUNCTION_WORDS]


def test_empty_and_unknown_labels() -> None:
    stats = fit_annotation_stats([])
    assert attribute_levels({}, stats) == {}
    generic = describe({}, stats, random.Random(0), n=3)
    assert len(generic) == 3 and all(isinstance(t, str) and t for t in generic)
    odd = {"gender": "unknown", "accent": "", "age": "n/a", "quality": None, "speaking_rate_cps": 13.0}
    assert attribute_levels(odd, stats) == {"rate": "medium"}
    assert len(describe(odd, stats, random.Random(0), n=4)) >= 3
    custom = attribute_levels({"quality": "nasal", "accent": "kiwi"}, stats)
    assert custom == {"quality": "nasal", "accent": "Kiwi"}
    assert any("nasal" in t for t in describe({"quality": "nasal"}, stats, random.Random(0)))


@pytest.mark.parametrize("text, expected", [
    ("a slow, deep voice with a British accent", {"rate": "slow", "pitch": "low", "accent": "British"}),
    ("Scottish man speaking slowly in a low voice",
     {"accent": "Scottish", "gender": "male", "rate": "slow", "pitch": "low"}),
    ("the speaker talks fast with a high pitch", {"rate": "fast", "pitch": "high"}),
    ("A woman speaking at a high volume, very quickly", {"gender": "female", "loudness": "loud", "rate": "very fast"}),
    ("Could you sound like a lady from Scotland, with a rasp?",
     {"gender": "female", "accent": "Scottish", "quality": "croaky"}),
    ("an extremely high, breakneck feminine voice", {"pitch": "very high", "rate": "very fast", "gender": "female"}),
    ("nothing to see here", {}),
])
def test_parse_description_hints(text: str, expected: dict) -> None:
    assert parse_description_hints(text) == expected


# ------------------------------------------------------------------------------ real speech

def test_on_espeak_speech() -> None:
    espeak = pytest.importorskip("ira.data.espeak")
    if not espeak.is_available():
        pytest.skip("eSpeak NG does not load here")
    text = "The quick brown fox jumps over the lazy dog near the bank of the river."

    def ann(voice: str, rate: int = 175, pitch: int = 50) -> dict:
        wav, sr = espeak.synthesize(text, voice, rate=rate, pitch=pitch)
        return annotate_clip(wav, sr, text, {"voice": voice})

    low, high = ann("en-us+m3", pitch=10), ann("en-us+m3", pitch=90)
    female = ann("en-us+f2")
    assert 50 < low["pitch_mean_hz"] < high["pitch_mean_hz"] * 0.8 < 200
    assert 150 < female["pitch_mean_hz"] < 300 and low["voiced_fraction"] > 0.3
    slow, fast = ann("en-us+m3", rate=110), ann("en-us+m3", rate=260)
    assert fast["speaking_rate_cps"] > 1.7 * slow["speaking_rate_cps"]
    assert 5 < slow["speaking_rate_cps"] < 12 < fast["speaking_rate_cps"] < 30
    whisper = ann("en-us+whisper")
    assert whisper["voiced_fraction"] < 0.1
    stats = fit_annotation_stats([low, high, female, slow, fast, whisper])
    assert attribute_levels(whisper, stats)["quality"] == "whispery"
    assert PITCH_LEVELS.index(attribute_levels(high, stats)["pitch"]) > PITCH_LEVELS.index(
        attribute_levels(low, stats)["pitch"])
    assert RATE_LEVELS.index(attribute_levels(fast, stats)["rate"]) > RATE_LEVELS.index(
        attribute_levels(slow, stats)["rate"])


def test_age_labels_and_bad_stats() -> None:
    stats = fit_annotation_stats([])
    assert attribute_levels({"age": 70}, stats) == {"age": "old"}
    assert attribute_levels({"age": "12"}, stats) == {"age": "young"}
    assert attribute_levels({"age": "middle-aged"}, stats) == {}
    assert attribute_levels({"pitch_mean_hz": float("nan")}, stats) == {}
    with pytest.raises(ValueError, match="fit_annotation_stats"):
        attribute_levels({"pitch_mean_hz": 120.0}, {"pitch": {}})
