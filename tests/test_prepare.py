"""`ira data prepare`: validation, annotation, codec fit, the token cache and its freshness."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from ira.config import load_config
from ira.data.corpus import read_metadata
from ira.data.dummy import create_dummy_corpus
from ira.data.prepare import cache_is_fresh, data_hash, prepare_corpus, sentence_key, split_of
from ira.data.token_cache import load_split

FAST_MEL = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=3",
            "codec.mel_griffin_lim_iters=4", "data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    create_dummy_corpus(root / "c", num_clips=10, seed=0)
    return root / "c"


def _cfg(data_dir):
    return load_config("cpu", FAST_MEL + [f"data.dir={data_dir}"])


def _append_clip(data_dir, clip_id, text, wav, sr):
    sf.write(str(data_dir / "wavs" / f"{clip_id}.wav"), wav, sr)
    with open(data_dir / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(f"{clip_id}|{text}|{text}\n")


def test_prepare_builds_cache_annotations_and_report(tmp_path, corpus):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    cfg = _cfg(data)
    result = prepare_corpus(cfg)
    assert result.rebuilt and result.kept == 10 and not result.dropped
    train = load_split(result.cache_files["train"], expected_fingerprint=result.codec.fingerprint)
    val = load_split(result.cache_files["val"])
    assert len(train) + len(val) == 10 and len(val) >= 1
    assert train.n_codebooks == 2 and int(train.codes.max()) < 16
    assert all(len(d) >= 2 for d in train.descriptions)          # several phrasings per clip
    # about 75 frames per second of audio
    report = json.loads((data / "prepare_report.json").read_text())
    assert abs(train.codes.shape[1] + val.codes.shape[1] - 75 * report["total_seconds"]) < 10 * 2
    annotations = [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines()]
    assert {a["id"] for a in annotations} == {c.id for c in read_metadata(data)}
    assert all(a["pitch_mean_hz"] is None or 50 < a["pitch_mean_hz"] < 500 for a in annotations)
    # a second run is a no-op
    again = prepare_corpus(cfg)
    assert not again.rebuilt and cache_is_fresh(cfg)


def test_bad_clips_are_dropped_with_reasons_and_stereo_48k_is_kept(tmp_path, corpus):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    speech, sr = sf.read(str(next((data / "wavs").glob("*.wav"))), dtype="float32")
    from ira.audio import resample
    import torch
    stereo48 = resample(torch.from_numpy(speech), sr, 48000).numpy()
    _append_clip(data, "stereo48k", "stereo at forty eight kilohertz", np.stack([stereo48, 0.5 * stereo48], axis=1), 48000)
    (data / "wavs" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with open(data / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write("corrupt|this file is not audio|this file is not audio\n")
    _append_clip(data, "silent", "nothing to hear", np.zeros(sr * 2, dtype=np.float32), sr)
    _append_clip(data, "tiny", "too short", speech[: sr // 20], sr)
    cfg = _cfg(data)
    result = prepare_corpus(cfg)
    reasons = {row["id"]: row["reason"] for row in result.dropped}
    assert set(reasons) == {"corrupt", "silent", "tiny"}
    assert "unreadable" in reasons["corrupt"] and "silent" in reasons["silent"] and "too short" in reasons["tiny"]
    assert result.kept == 11
    ids = load_split(result.cache_files["train"]).ids + load_split(result.cache_files["val"]).ids
    assert "stereo48k" in ids
    report = json.loads((data / "prepare_report.json").read_text())
    assert {row["id"] for row in report["dropped"]} == {"corrupt", "silent", "tiny"}


def test_a_clip_cut_short_of_its_transcript_is_dropped_with_the_reason(tmp_path, corpus):
    """A wav cut to a third of its length, its full sentence kept in metadata.csv: the model would learn that
    sentence from a third of its sound. The other clips, eSpeak's fastest included, are kept."""
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    clips = read_metadata(data)
    longest = max(clips, key=lambda c: len(c.normalized_text))
    speech, sr = sf.read(str(longest.wav_path), dtype="float32")
    sf.write(str(longest.wav_path), speech[: len(speech) // 3], sr)
    from ira.data import espeak
    if espeak.is_available():   # the fastest reading measured in the synthetic corpus's settings: 28 characters/s
        text = "Kwame needed a rolling pin in May."
        fast, fast_sr = espeak.synthesize(text, voice="en-gb-scotland", rate=220)
        _append_clip(data, "fastest", text, fast, fast_sr)
    result = prepare_corpus(_cfg(data))
    assert [row["id"] for row in result.dropped] == [longest.id]
    assert result.kept == len(read_metadata(data)) - 1
    reason = result.dropped[0]["reason"]
    assert reason.startswith("too short for its transcript") and f"for {len(longest.normalized_text)} characters" in reason
    report = json.loads((data / "prepare_report.json").read_text())
    assert report["dropped"] == result.dropped


def test_stale_cache_is_rebuilt_with_the_same_codec_when_data_changes(tmp_path, corpus, caplog):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    cfg = _cfg(data)
    first = prepare_corpus(cfg)
    speech, sr = sf.read(str(next((data / "wavs").glob("*.wav"))), dtype="float32")
    _append_clip(data, "extra", "one more clip", speech, sr)
    assert not cache_is_fresh(cfg)
    caplog.set_level("INFO", logger="ira.data.prepare")
    second = prepare_corpus(cfg)
    assert second.rebuilt and second.kept == first.kept + 1
    said = [r.getMessage() for r in caplog.records if "re-encoding the clips" in r.getMessage()]
    assert len(said) == 1                                # said once, when it re-encodes ...
    caplog.clear()
    assert not prepare_corpus(cfg).rebuilt               # ... and never again once the cache is rebuilt
    assert not [r for r in caplog.records if "re-encoding the clips" in r.getMessage()]
    # the grown corpus keeps its codec, so checkpoints trained on it still resume
    assert second.codec.fingerprint == first.codec.fingerprint          # tokens of the same codec
    assert sorted(second.cache_files) == sorted(first.cache_files) and cache_is_fresh(cfg)
    stamp = data / "codec" / "mel_codec.json"
    assert json.loads(stamp.read_text())["data_hash"] != data_hash(data, cfg)   # fitted on the corpus before
    refit = prepare_corpus(cfg, force=True)                                      # a refit on request only
    assert refit.rebuilt and json.loads(stamp.read_text())["data_hash"] == data_hash(data, cfg)


def test_interrupted_cache_file_is_rebuilt(tmp_path, corpus):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    cfg = _cfg(data)
    result = prepare_corpus(cfg)
    path = result.cache_files["train"]
    path.write_bytes(path.read_bytes()[:200])            # as if the process died while writing in place
    assert not cache_is_fresh(cfg)
    again = prepare_corpus(cfg)
    assert again.rebuilt and len(load_split(path)) == len(load_split(result.cache_files["train"]))


@pytest.mark.parametrize("line, message", [("onlyid", "metadata.csv:11: expected 2 or 3"),
                                           ("emptytext||", "metadata.csv:11: the transcript of 'emptytext' is empty")])
def test_empty_transcript_and_missing_column_are_clear(tmp_path, corpus, line, message):
    from ira.data.corpus import CorpusError
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    with open(data / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(_cfg(data))
    assert not (data / "cache").exists()                 # nothing half-built


def test_split_is_by_sentence_deterministic_and_stable():
    texts = [f"This is sentence number {i}." for i in range(2000)]
    splits = [split_of(t, 0.05) for t in texts]
    assert splits == [split_of(t, 0.05) for t in texts]
    assert 50 < splits.count("val") < 150
    # the same sentence however it is cased or punctuated: always the same side
    for text in texts[:200]:
        assert split_of(text.upper().replace(".", "!"), 0.05) == split_of(text, 0.05)
    assert sentence_key("Hello,  World!  It's me.") == "hello world it's me"


def test_other_ranks_wait_for_rank0(tmp_path, corpus, monkeypatch):
    from ira.data.prepare import ensure_prepared
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    cfg = _cfg(data)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="rank 1: rank 0 did not finish"):
        ensure_prepared(cfg, wait_s=0.1)                 # rank 1 never builds the cache itself
    assert not (data / "cache").exists()
    monkeypatch.setenv("RANK", "0")
    ensure_prepared(cfg)
    monkeypatch.setenv("RANK", "1")
    assert not ensure_prepared(cfg, wait_s=0.1).rebuilt  # fresh now: rank 1 reads it


def test_clips_of_one_sentence_never_straddle_the_split(tmp_path, corpus):
    """Every sentence spoken twice (another clip id, the same text): both clips land on the same side."""
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    for clip in read_metadata(data):
        shutil.copy(clip.wav_path, data / "wavs" / f"{clip.id}_again.wav")
        with open(data / "metadata.csv", "a", encoding="utf-8") as handle:
            handle.write(f"{clip.id}_again|{clip.text.upper()}|{clip.normalized_text.upper()}\n")
    result = prepare_corpus(_cfg(data))
    train = load_split(result.cache_files["train"])
    val = load_split(result.cache_files["val"])
    assert len(val) >= 2
    assert not {sentence_key(t) for t in train.texts} & {sentence_key(t) for t in val.texts}


def test_worker_processes_build_the_same_cache(tmp_path, corpus, monkeypatch):
    import ira.data.prepare as prepare

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(corpus, here)
    shutil.copytree(corpus, there)
    assert prepare.prepare_workers(10) == 1
    one = prepare_corpus(_cfg(here))
    monkeypatch.setattr(prepare, "PARALLEL_FROM", 2)
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 2)
    assert prepare.prepare_workers(10) == 2
    two = prepare_corpus(_cfg(there))
    for split in ("train", "val"):
        a, b = load_split(one.cache_files[split]), load_split(two.cache_files[split])
        assert a.ids == b.ids and a.texts == b.texts and torch.equal(a.codes, b.codes)
    def annotations(d):
        return [json.loads(line) for line in (d / "annotations.jsonl").read_text().splitlines()]
    assert annotations(here) == annotations(there)


def test_transcripts_the_phonemizer_cannot_read_are_dropped_with_the_reason(tmp_path, corpus):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    first = read_metadata(data)[0]
    for clip_id, text in (("chinese", "你好，世界"), ("emoji", "😀 😀"), ("long", "word " * 300)):
        shutil.copy(first.wav_path, data / "wavs" / f"{clip_id}.wav")
        with open(data / "metadata.csv", "a", encoding="utf-8") as handle:
            handle.write(f"{clip_id}|{text}|{text}\n")
    result = prepare_corpus(load_config("cpu", FAST_MEL + [f"data.dir={data}", "data.max_text_chars=2000"]))
    reasons = {d["id"]: d["reason"] for d in result.dropped}
    assert set(reasons) == {"chinese", "emoji", "long"} and result.kept == 10
    assert "U+4F60" in reasons["chinese"] and "U+1F600" in reasons["emoji"]
    assert "speech_lm.max_text_tokens" in reasons["long"]
