"""`ira data prepare`: validation, annotation, codec fit, the token cache and its freshness."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from ira.config import load_config
from ira.data.corpus import read_metadata
from ira.data.dummy import create_dummy_corpus
from ira.data.prepare import cache_is_fresh, prepare_corpus, split_of
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


def test_stale_cache_is_rebuilt_when_data_changes(tmp_path, corpus):
    data = tmp_path / "c"
    shutil.copytree(corpus, data)
    cfg = _cfg(data)
    first = prepare_corpus(cfg)
    speech, sr = sf.read(str(next((data / "wavs").glob("*.wav"))), dtype="float32")
    _append_clip(data, "extra", "one more clip", speech, sr)
    assert not cache_is_fresh(cfg)
    second = prepare_corpus(cfg)
    assert second.rebuilt and second.kept == first.kept + 1


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


def test_split_is_deterministic_and_stable():
    ids = [f"clip{i:04d}" for i in range(2000)]
    splits = [split_of(i, 0.05) for i in ids]
    assert splits == [split_of(i, 0.05) for i in ids]
    assert 50 < splits.count("val") < 150


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
