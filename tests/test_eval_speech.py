"""Intelligibility evaluation (ira/eval): the word error rate, and the offline ASR on known audio."""

import numpy as np
import pytest
import torch

from ira.eval import asr
from ira.eval.speech import SpeechScore, espeak_clips, heldout_sentences
from ira.text_metrics import corpus_wer, number_words, spoken_form, word_error_rate

needs_asr = pytest.mark.skipif(not asr.is_available(), reason="the ira[eval] extra (faster-whisper) is not installed")


def test_spoken_form_reads_numbers_ordinals_and_times_as_words():
    assert spoken_form("They counted 47 boats in 1987!") == "they counted forty seven boats in nineteen eighty seven"
    assert spoken_form("At 7:30 on the 3rd of May, 2005.") == "at seven thirty on the third of may two thousand five"
    assert spoken_form("forty-seven") == spoken_form("47") == "forty seven"
    assert [number_words(n) for n in (0, 13, 100, 101, 1900, 1905, 2024, 12000)] == [
        "zero", "thirteen", "one hundred", "one hundred one", "nineteen hundred", "nineteen oh five",
        "twenty twenty four", "twelve thousand"]


def test_word_error_rate_counts_edits_over_reference_words():
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the dog sat down") == pytest.approx(2 / 3)
    assert word_error_rate("a b", "") == 1.0 and word_error_rate("", "") == 0.0
    assert corpus_wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(1 / 5)   # weighted by words


def test_heldout_sentences_are_not_in_the_training_pool():
    from ira.data.sentence_pool import sentence_pool
    from ira.data.prepare import sentence_key

    held = heldout_sentences()
    assert len(held) >= 32
    pool = {sentence_key(s) for s in sentence_pool()}
    assert not [s for s in held if sentence_key(s) in pool]


@needs_asr
def test_the_asr_hears_espeak_and_not_noise_or_silence():
    sentences = ["The kettle began to whistle just as the phone rang.",
                 "Please close the gate behind you when you leave the field."]
    transcribe = asr.transcriber()
    wavs = [torch.from_numpy(w) for w in (espeak_wav(s) for s in sentences)]
    heard = [transcribe(w, 22_050) for w in wavs]
    assert corpus_wer(sentences, heard) < 0.3, heard
    rng = np.random.default_rng(0)
    noise = torch.from_numpy((0.3 * rng.standard_normal(3 * 24_000)).astype(np.float32))
    silence = torch.zeros(3 * 24_000)
    for wav in (noise, silence):
        assert corpus_wer(sentences[:1], [transcribe(wav, 24_000)]) >= 0.9


def espeak_wav(text: str) -> np.ndarray:
    from ira.data import espeak
    wav, sr = espeak.synthesize(text, voice="en-us")
    assert sr == 22_050
    return wav


def test_speech_score_is_corpus_level_and_keeps_what_was_heard():
    score = SpeechScore.of(["one two three", "four"], ["one two three", "five"], [1.0, 0.5])
    assert score.wer == pytest.approx(1 / 4) and [i.wer for i in score.items] == [0.0, 1.0]
    assert score.to_dict()["items"][1] == {"text": "four", "heard": "five", "wer": 1.0, "seconds": 0.5}


def test_ceiling_clips_are_spoken_in_corpus_like_voices_at_the_codec_rate():
    clips = espeak_clips(["Hello there.", "Good morning to you."], 24_000)
    assert len(clips) == 2 and all(c.dtype == torch.float32 and c.numel() > 0.3 * 24_000 for c in clips)
    again = espeak_clips(["Hello there.", "Good morning to you."], 24_000)
    assert all(torch.equal(a, b) for a, b in zip(clips, again))        # the same voices every time
