"""Data sources: corpus files, eSpeak NG, the synthetic corpus, LJSpeech (served locally), folders, dummy."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ira.data import espeak
from ira.data.corpus import (Clip, CorpusError, corpus_summary, read_labels, read_metadata, write_labels,
                             write_metadata)
from ira.data.dummy import create_dummy_corpus, plan_dummy, tone_clip
from ira.data.folder import import_folder
from ira.data.ljspeech import DownloadError, download_ljspeech
from ira.data.synth import Utterance, load_sentences, speak, synthesize_corpus

ROOT = Path(__file__).resolve().parent.parent


def median_f0(wav: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0) -> float:
    """Median F0 of the clearly voiced 40 ms frames (normalised autocorrelation peak > 0.6)."""
    frame, lo, hi = int(0.04 * sr), int(sr / fmax), int(sr / fmin)
    f0s = []
    for start in range(0, len(wav) - frame, frame // 2):
        x = wav[start:start + frame] - wav[start:start + frame].mean()
        energy = float(x @ x)
        if energy < 1e-4:
            continue
        acf = np.array([x[:-lag] @ x[lag:] for lag in range(lo, hi)]) / energy
        best = int(np.argmax(acf))
        if acf[best] > 0.6:
            f0s.append(sr / (lo + best))
    assert len(f0s) >= 5, "too few voiced frames to measure pitch"
    return float(np.median(f0s))


def write_corpus(folder: Path, metadata: str, wav_ids: list[str], sr: int = 16000) -> Path:
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.csv").write_text(metadata, encoding="utf-8")
    t = np.arange(sr // 2) / sr
    for i, clip_id in enumerate(wav_ids):
        sf.write(folder / "wavs" / f"{clip_id}.wav", 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t), sr)
    return folder


# --------------------------------------------------------------------------- metadata.csv / labels.jsonl

def test_read_metadata_ljspeech_format(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(
        '\ufeffLJ001-0001|"Hello," he said.|"Hello," he said.\r\n'
        "\n"
        "LJ001-0002|Dr. Smith paid 5 pounds.|Doctor Smith paid five pounds.\n"
        "LJ001-0003.wav|Two columns only\n"
        "LJ001-0004|Empty normalized|\n"
        "   \n".encode("utf-8"))
    clips = read_metadata(tmp_path)
    assert [c.id for c in clips] == ["LJ001-0001", "LJ001-0002", "LJ001-0003", "LJ001-0004"]
    assert clips[0].text == '"Hello," he said.'
    assert clips[1].normalized_text == "Doctor Smith paid five pounds."
    assert clips[2].text == clips[2].normalized_text == "Two columns only"
    assert clips[3].normalized_text == "Empty normalized"
    assert clips[0].wav_path == tmp_path / "wavs" / "LJ001-0001.wav"


@pytest.mark.parametrize("content, line, words", [
    ("a|ok|ok\nb_only_an_id\n", 2, "found 1"),
    ("a|ok|ok\nb|one|two|three\n", 2, "found 4"),
    ("a|ok|ok\n\nb|  |x\n", 3, "transcript of 'b' is empty"),
    ("a|first|first\nb|x|x\na|again|again\n", 3, "duplicate id 'a' (first on line 1)"),
    ("../escape|text|text\n", 1, "not a plain file name"),
    ("|text|text\n", 1, "id (first column) is empty"),
])
def test_read_metadata_errors_name_file_and_line(tmp_path, content, line, words):
    (tmp_path / "metadata.csv").write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        read_metadata(tmp_path)
    message = str(info.value)
    assert f"metadata.csv:{line}:" in message and words in message


def test_read_metadata_missing_empty_and_not_utf8(tmp_path):
    with pytest.raises(CorpusError, match="metadata.csv: no such file.*docs/data_layout.md"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("\n\n")
    with pytest.raises(CorpusError, match="no clips"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_bytes(b"a|fine|fine\nb|caf\xe9|cafe\n")
    with pytest.raises(CorpusError, match=r"metadata.csv:2: not valid UTF-8"):
        read_metadata(tmp_path)


def test_write_metadata_round_trip_and_refusals(tmp_path):
    clips = [Clip("x1", '"Quoted" start', "quoted start", tmp_path / "wavs" / "x1.wav"),
             Clip("x2", "Plain", "Plain", tmp_path / "wavs" / "x2.wav")]
    write_metadata(tmp_path, clips)
    assert read_metadata(tmp_path) == clips
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(CorpusError, match="contains '\\|'"):
        write_metadata(tmp_path, [Clip("x3", "a | b", "a b", tmp_path / "x3.wav")])
    assert read_metadata(tmp_path) == clips  # the failed write left the file alone


def test_labels_round_trip_and_errors(tmp_path):
    assert read_labels(tmp_path) == {}
    labels = {"a": {"gender": "female", "pitch_setting": 40}, "b": {"accent": "Scottish"}}
    write_labels(tmp_path, labels)
    assert read_labels(tmp_path) == {"a": {"id": "a", **labels["a"]}, "b": {"id": "b", **labels["b"]}}
    lines = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["id"] == "a"

    (tmp_path / "labels.jsonl").write_text('{"id": "a"}\n{"id": "b", oops}\n')
    with pytest.raises(CorpusError, match=r"labels.jsonl:2: not valid JSON"):
        read_labels(tmp_path)
    (tmp_path / "labels.jsonl").write_text('{"id": "a"}\n\n{"gender": "male"}\n')
    with pytest.raises(CorpusError, match=r"labels.jsonl:3: .*no string \"id\""):
        read_labels(tmp_path)
    (tmp_path / "labels.jsonl").write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(CorpusError, match=r"labels.jsonl:2: duplicate id 'a'"):
        read_labels(tmp_path)


# --------------------------------------------------------------------------- eSpeak NG

def test_espeak_voices_and_synthesis():
    voices = espeak.english_voices()
    assert {"en-us", "en-gb-scotland", "en-029", "en-gb-x-rp"} <= set(voices)
    assert len(voices) >= 6
    assert {"m1", "f1", "m7", "f5"} <= set(espeak.standard_variants())
    wav, sr = espeak.synthesize("Testing one two three.", "en-gb-scotland+f2")
    assert sr == 22050 and wav.dtype == np.float32
    assert 0.5 < len(wav) / sr < 4 and 0.05 < np.abs(wav).max() <= 1.0
    with pytest.raises(espeak.EspeakError, match="no voice 'xx-nothing'"):
        espeak.synthesize("hello", "xx-nothing")
    with pytest.raises(espeak.EspeakError, match="rate 20"):
        espeak.synthesize("hello", rate=20)


def test_espeak_pitch_and_rate_settings_change_the_audio():
    text = "The quick brown fox jumps over the lazy dog near the river."
    low = speak(Utterance("a", text, "en-us", "American", "m1", "male", 10, 50, 175))
    high = speak(Utterance("b", text, "en-us", "American", "m1", "male", 90, 50, 175))
    assert median_f0(*high) > 1.3 * median_f0(*low)
    slow = speak(Utterance("c", text, "en-us", "American", "m1", "male", 50, 50, 110))
    fast = speak(Utterance("d", text, "en-us", "American", "m1", "male", 50, 50, 260))
    assert len(slow[0]) > 1.8 * len(fast[0])


# --------------------------------------------------------------------------- synthetic corpus

def test_sentence_list():
    sentences = load_sentences()
    assert len(sentences) >= 20_000 and len(set(sentences)) == len(sentences)
    assert all(3 <= len(s.split()) <= 25 and "|" not in s for s in sentences)
    assert sum(s.endswith("?") for s in sentences) >= 40


def test_synthesize_corpus_labels_determinism_and_resume(tmp_path):
    fractions = []
    summary = synthesize_corpus(tmp_path / "a", num_utterances=12, seed=3,
                                progress=lambda f, msg: fractions.append(f))
    assert summary["n_clips"] == 12 and summary["generated"] == 12
    assert summary["sample_rates"] == {22050: 12} and summary["total_duration_s"] > 12
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    clips = read_metadata(tmp_path / "a")
    labels = read_labels(tmp_path / "a")
    assert set(labels) == {c.id for c in clips}
    assert len({v["voice"] for v in labels.values()}) >= 3
    assert len({v["speaker"] for v in labels.values()}) >= 6
    keys = {"speaker", "voice", "accent", "gender", "variant", "pitch_setting", "rate_setting"}
    assert all(keys <= set(v) for v in labels.values())
    pitches = [v["pitch_setting"] for v in labels.values()]
    rates = [v["rate_setting"] for v in labels.values()]
    assert max(pitches) - min(pitches) >= 30 and max(rates) - min(rates) >= 50
    # The pitch labels are audible: within one gender, measured F0 rises with the setting.
    female = [(v["pitch_setting"], median_f0(*sf.read(tmp_path / "a/wavs" / f"{k}.wav", dtype="float32")))
              for k, v in labels.items() if v["gender"] == "female" and not v["variant"].startswith("whisper")]
    assert len(female) >= 5
    settings, measured = np.array(female).T
    rank_corr = np.corrcoef(np.argsort(np.argsort(settings)), np.argsort(np.argsort(measured)))[0, 1]
    assert rank_corr > 0.7, female

    # Same seed: identical corpus, byte for byte; another seed: another corpus.
    synthesize_corpus(tmp_path / "b", num_utterances=12, seed=3)
    assert (tmp_path / "a/metadata.csv").read_bytes() == (tmp_path / "b/metadata.csv").read_bytes()
    assert (tmp_path / "a/labels.jsonl").read_bytes() == (tmp_path / "b/labels.jsonl").read_bytes()
    assert (tmp_path / "a/wavs/synth_00007.wav").read_bytes() == (tmp_path / "b/wavs/synth_00007.wav").read_bytes()
    synthesize_corpus(tmp_path / "c", num_utterances=12, seed=4)
    assert read_labels(tmp_path / "c") != labels

    # Complete: nothing redone.  Partial (wavs lost, interrupted before metadata): only the gap.
    assert synthesize_corpus(tmp_path / "a", num_utterances=12, seed=3)["generated"] == 0
    original = (tmp_path / "a/wavs/synth_00004.wav").read_bytes()
    for i in (4, 5, 11):
        (tmp_path / f"a/wavs/synth_{i:05d}.wav").unlink()
    (tmp_path / "a/metadata.csv").unlink()
    again = synthesize_corpus(tmp_path / "a", num_utterances=12, seed=3)
    assert again["generated"] == 3 and again["n_clips"] == 12
    assert (tmp_path / "a/wavs/synth_00004.wav").read_bytes() == original

    # Growing keeps the first clips; shrinking drops the extra wavs; a new seed redoes everything.
    grown = synthesize_corpus(tmp_path / "a", num_utterances=15, seed=3)
    assert grown["generated"] == 3 and read_metadata(tmp_path / "a")[:12] == clips
    assert synthesize_corpus(tmp_path / "a", num_utterances=10, seed=3)["generated"] == 0
    assert len(list((tmp_path / "a/wavs").glob("*.wav"))) == 10
    assert synthesize_corpus(tmp_path / "a", num_utterances=10, seed=5)["generated"] == 10

    # Interrupted while switching to seed 4 (progress raising = Ctrl-C): the resumed corpus is
    # exactly the seed-4 corpus, with none of the seed-5 clips left over.
    def stop_halfway(fraction, message):
        if fraction > 0.5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        synthesize_corpus(tmp_path / "a", num_utterances=12, seed=4, progress=stop_halfway)
    resumed = synthesize_corpus(tmp_path / "a", num_utterances=12, seed=4)
    assert 0 < resumed["generated"] < 12
    assert (tmp_path / "a/labels.jsonl").read_bytes() == (tmp_path / "c/labels.jsonl").read_bytes()
    for i in range(12):
        name = f"wavs/synth_{i:05d}.wav"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_worker_processes_synthesise_the_same_corpus_and_no_sentence_twice(tmp_path, monkeypatch):
    import ira.data.synth as synth

    synthesize_corpus(tmp_path / "one", num_utterances=9, seed=5, workers=1)
    monkeypatch.setattr(synth, "PARALLEL_FROM", 1)
    monkeypatch.setattr(synth, "CHUNK", 4)
    synthesize_corpus(tmp_path / "two", num_utterances=9, seed=5, workers=2)
    for name in ["metadata.csv", "labels.jsonl"] + [f"wavs/synth_{i:05d}.wav" for i in range(9)]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    texts = [c.text for c in read_metadata(tmp_path / "one")]
    assert len(set(texts)) == len(texts)


def test_synthesize_corpus_refuses_another_corpus(tmp_path):
    write_corpus(tmp_path, "mine|My own words|My own words\n", ["mine"])
    with pytest.raises(CorpusError, match="already holds a corpus made by another tool"):
        synthesize_corpus(tmp_path, num_utterances=2)
    assert read_metadata(tmp_path)[0].id == "mine"


# --------------------------------------------------------------------------- LJSpeech (local server)

LJ_METADATA = ('LJ001-0001|"Printing," he said, "is an art."|"Printing," he said, "is an art."\n'
               "LJ001-0002|It costs 5 dollars.|It costs five dollars.\n"
               "LJ001-0003|The last one|The last one\n")


def make_archive(path: Path, members: dict[str, bytes], symlink: str | None = None) -> bytes:
    with tarfile.open(path, "w:bz2") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path.read_bytes()


def ljspeech_members() -> dict[str, bytes]:
    members = {"LJSpeech-1.1/README": b"LJ Speech Dataset (test copy)\n",
               "LJSpeech-1.1/metadata.csv": LJ_METADATA.encode()}
    for i in range(1, 4):
        buf = io.BytesIO()
        sf.write(buf, np.random.default_rng(i).uniform(-0.2, 0.2, 22050 // 2), 22050, format="WAV", subtype="PCM_16")
        members[f"LJSpeech-1.1/wavs/LJ001-000{i}.wav"] = buf.getvalue()
    return members


class ArchiveServer:
    """Serves one file on 127.0.0.1 with HTTP Range support; can cut a transfer short."""

    def __init__(self, data: bytes):
        self.data, self.ranges, self.sent = data, [], 0
        self.cut_after: int | None = None
        self.support_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                if header and server.support_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(server.data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                else:
                    self.send_response(200)
                body = server.data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body = body[: server.cut_after]
                self.wfile.write(body)
                server.sent += len(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/LJSpeech-1.1.tar.bz2"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lj_server(tmp_path):
    data = make_archive(tmp_path / "source.tar.bz2", ljspeech_members())
    server = ArchiveServer(data)
    server.sha256 = hashlib.sha256(data).hexdigest()
    yield server
    server.close()


def test_ljspeech_download_extract_parse_and_idempotent(tmp_path, lj_server):
    root = tmp_path / "root"
    fractions = []
    corpus = download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256,
                               progress=lambda f, m: fractions.append(f), timeout=5)
    assert corpus == root / "LJSpeech-1.1"
    clips = read_metadata(corpus)
    assert [c.id for c in clips] == ["LJ001-0001", "LJ001-0002", "LJ001-0003"]
    assert clips[0].text == '"Printing," he said, "is an art."'
    assert clips[1].normalized_text == "It costs five dollars."
    assert all(sf.info(c.wav_path).samplerate == 22050 for c in clips)
    assert (corpus / "README").is_file() and fractions[-1] == 1.0
    assert (root / "LJSpeech-1.1.tar.bz2").read_bytes() == lj_server.data
    assert not (root / "LJSpeech-1.1.tar.bz2.part").exists()
    assert not (root / ".LJSpeech-1.1.extracting").exists()
    requests = len(lj_server.ranges)
    assert download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256) == corpus
    assert len(lj_server.ranges) == requests  # already extracted: no network


def test_ljspeech_resumes_a_half_downloaded_part(tmp_path, lj_server):
    root = tmp_path / "root"
    root.mkdir()
    half = len(lj_server.data) // 2
    (root / "LJSpeech-1.1.tar.bz2.part").write_bytes(lj_server.data[:half])
    corpus = download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256, timeout=5)
    assert lj_server.ranges == [f"bytes={half}-"]
    assert lj_server.sent == len(lj_server.data) - half
    assert len(read_metadata(corpus)) == 3


def test_ljspeech_interrupted_transfer_then_resume(tmp_path, lj_server):
    root = tmp_path / "root"
    lj_server.cut_after = len(lj_server.data) // 3
    with pytest.raises(DownloadError, match="run again to resume|kept .* for resuming"):
        download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256, timeout=5)
    part = root / "LJSpeech-1.1.tar.bz2.part"
    assert part.stat().st_size == len(lj_server.data) // 3
    assert not (root / "LJSpeech-1.1").exists()
    lj_server.cut_after = None
    corpus = download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256, timeout=5)
    assert lj_server.ranges[-1] == f"bytes={len(lj_server.data) // 3}-"
    assert len(read_metadata(corpus)) == 3


def test_ljspeech_server_without_range_support_restarts(tmp_path, lj_server):
    root = tmp_path / "root"
    root.mkdir()
    (root / "LJSpeech-1.1.tar.bz2.part").write_bytes(b"stale bytes from another file")
    lj_server.support_range = False
    corpus = download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256, timeout=5)
    assert (root / "LJSpeech-1.1.tar.bz2").read_bytes() == lj_server.data
    assert len(read_metadata(corpus)) == 3


def test_ljspeech_checksum_mismatch(tmp_path, lj_server):
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="SHA-256 .*expected 0000"):
        download_ljspeech(root, url=lj_server.url, sha256="0" * 64, timeout=5)
    assert not (root / "LJSpeech-1.1.tar.bz2.part").exists()
    assert not (root / "LJSpeech-1.1.tar.bz2").exists() and not (root / "LJSpeech-1.1").exists()
    # A damaged archive put there by hand is reported, not silently replaced.
    (root / "LJSpeech-1.1.tar.bz2").write_bytes(b"not the archive")
    with pytest.raises(DownloadError, match="does not match the published SHA-256"):
        download_ljspeech(root, url=lj_server.url, sha256=lj_server.sha256, timeout=5)


def test_ljspeech_network_failure_says_how_to_download_by_hand(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(DownloadError, match="Download it by hand .*LJSpeech-1.1.tar.bz2"):
        download_ljspeech(tmp_path, url=f"http://127.0.0.1:{port}/LJSpeech-1.1.tar.bz2", timeout=2)


@pytest.mark.parametrize("members, symlink, words", [
    ({"LJSpeech-1.1/metadata.csv": b"a|b|c\n", "LJSpeech-1.1/../../evil.txt": b"x"}, None, "outside"),
    ({"LJSpeech-1.1/metadata.csv": b"a|b|c\n", "/tmp/evil.txt": b"x"}, None, "outside"),
    ({"LJSpeech-1.1/metadata.csv": b"a|b|c\n"}, "LJSpeech-1.1/wavs/link.wav", "link or device"),
])
def test_ljspeech_refuses_unsafe_archives(tmp_path, members, symlink, words):
    data = make_archive(tmp_path / "bad.tar.bz2", members, symlink)
    root = tmp_path / "root"
    root.mkdir()
    (root / "LJSpeech-1.1.tar.bz2").write_bytes(data)
    with pytest.raises(DownloadError, match=words):
        download_ljspeech(root, sha256=hashlib.sha256(data).hexdigest())
    assert not (tmp_path / "evil.txt").exists() and not (root / "LJSpeech-1.1").exists()
    assert not (root / ".LJSpeech-1.1.extracting").exists()


# --------------------------------------------------------------------------- folder import and dummy data

@pytest.fixture(scope="module")
def dummy_corpus(tmp_path_factory):
    return create_dummy_corpus(tmp_path_factory.mktemp("dummy") / "corpus", num_clips=6, seed=1)


def test_dummy_corpus(dummy_corpus):
    summary = corpus_summary(dummy_corpus)
    assert summary["n_clips"] == 6 and summary["source"] == "dummy" and not summary["missing_wavs"]
    assert len(summary["voices"]) == 3 and 2.0 < summary["total_duration_s"] < 30
    assert summary["accents"] == {"American": 2, "Scottish": 2, "Caribbean": 2}
    assert all(len(c.text.split()) <= 7 for c in read_metadata(dummy_corpus))


def test_dummy_tones_follow_the_pitch_labels():
    plans = plan_dummy(6, seed=0)
    low = min(plans, key=lambda u: u.pitch_setting)
    high = max(plans, key=lambda u: u.pitch_setting)
    low = Utterance(**{**low.__dict__, "gender": "male"})
    high = Utterance(**{**high.__dict__, "gender": "male"})
    ratio = median_f0(tone_clip(high), 22050) / median_f0(tone_clip(low), 22050)
    expected = 2 ** ((high.pitch_setting - low.pitch_setting) / 100)
    assert high.pitch_setting - low.pitch_setting >= 30
    assert abs(ratio - expected) < 0.05


def test_dummy_script(tmp_path):
    out = tmp_path / "d"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/create_dummy_data.py"), "--out", str(out),
                             "--num", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 clips" in result.stdout and len(read_metadata(out)) == 4


def test_import_folder_in_place_and_copy(tmp_path, dummy_corpus):
    assert import_folder(dummy_corpus) == dummy_corpus
    fractions = []
    out = import_folder(dummy_corpus, tmp_path / "imported", progress=lambda f, m: fractions.append(f))
    assert read_metadata(out) == [Clip(c.id, c.text, c.normalized_text, out / "wavs" / f"{c.id}.wav")
                                  for c in read_metadata(dummy_corpus)]
    assert read_labels(out) == read_labels(dummy_corpus) and fractions[-1] == 1.0
    first = read_metadata(out)[0]
    assert first.wav_path.read_bytes() == (dummy_corpus / "wavs" / f"{first.id}.wav").read_bytes()
    assert os.path.samefile(first.wav_path, dummy_corpus / "wavs" / f"{first.id}.wav")  # hard link
    assert import_folder(dummy_corpus, tmp_path / "imported") == out  # again: fine
    with pytest.raises(CorpusError, match="already holds a corpus made by the 'dummy' source"):
        import_folder(tmp_path / "imported", dummy_corpus)


@pytest.mark.parametrize("inside", ["wavs", "wavs/copy"])
def test_import_into_the_sources_own_wavs_is_refused(tmp_path, capsys, inside):
    """`ira data folder X --out X/wavs` wrote a corpus (metadata.csv, wavs/) among X's own clips."""
    from ira.cli import EXIT_FAILED, main

    src = write_corpus(tmp_path / "mine", "a|one|one\nb|two|two\n", ["a", "b"])
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    out = src / inside
    with pytest.raises(CorpusError, match=f"{out} is inside {src / 'wavs'}.*choose a folder outside it"):
        import_folder(src, out)
    assert main(["data", "folder", str(src), "--out", str(out), "--no-prepare"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: {out} is inside {src / 'wavs'}" in err and "Traceback" not in err
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == before


def test_import_folder_reports_problems(tmp_path):
    src = write_corpus(tmp_path / "src", "a|one|one\nb|two|two\nc|three|three\n", ["a"])
    with pytest.raises(CorpusError, match=r"lists 2 clip\(s\) of 3 whose wav is missing .*b.wav, c.wav"):
        import_folder(src)
    os.remove(src / "metadata.csv")
    with pytest.raises(CorpusError, match="metadata.csv: no such file"):
        import_folder(src)
    with pytest.raises(CorpusError, match="no such folder"):
        import_folder(tmp_path / "nowhere")
    (tmp_path / "nowavs").mkdir()
    (tmp_path / "nowavs" / "metadata.csv").write_text("a|one|one\n")
    with pytest.raises(CorpusError, match="no wavs/ folder"):
        import_folder(tmp_path / "nowavs")
