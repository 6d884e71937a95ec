"""The codec layer: MelCodec (fit, round trip, storage), EnCodec's weight handling, build_codec."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import math
import threading
from pathlib import Path

import pytest
import torch

from ira.audio import resample
from ira.codec import (CodecError, EncodecCodec, MelCodec, build_codec, codec_from_tensors, codec_to_tensors,
                       mel_codec_path, resolve_codec_name)
from ira.codec import encodec_codec
from ira.codec.kmeans import kmeans, nearest
from ira.codec.mel import (_FrameReservoir, log_mel, log_mel_distance_db, mean_frame_baseline, n_frames)
from ira.config import CodecConfig
from ira.data.espeak import synthesize

SR = 24_000
TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Peter Piper picked a peck of pickled peppers.",
    "A journey of a thousand miles begins with a single step.",
    "Birds of a feather flock together on the hill.",
    "How much wood would a woodchuck chuck?",
    "Actions speak louder than words, they say.",
    "The early bird catches the worm every morning.",
    "Please call Stella and ask her to bring these things.",
    "Six thick thistle sticks stood in a row.",
]
HELD_OUT_TEXTS = ["Never judge a book by its cover.", "All that glitters is not gold, my friend."]
VOICES = ["en-us+m1", "en-gb-scotland+f2", "en+m3", "en-us+f4"]
CFG = CodecConfig(name="mel", mel_n_codebooks=4, mel_codebook_size=64, mel_kmeans_iters=10,
                  mel_griffin_lim_iters=16, allow_download=False)


def speak(text: str, voice: str, rate: int = 160) -> torch.Tensor:
    wav, sr = synthesize(text, voice=voice, rate=rate)
    return resample(torch.from_numpy(wav), sr, SR)


@pytest.fixture(scope="module")
def train_clips() -> list[torch.Tensor]:
    """40 clips (about 95 s of speech, 7k frames): ten sentences in four voices."""
    pairs = [(text, voice) for text in TRAIN_TEXTS for voice in VOICES]
    return [speak(text, voice, 140 + 7 * (i % 9)) for i, (text, voice) in enumerate(pairs)]


@pytest.fixture(scope="module")
def held_out() -> list[torch.Tensor]:
    """Sentences the codec never saw, in two of its voices."""
    return [speak(text, voice) for text in HELD_OUT_TEXTS for voice in (VOICES[1], VOICES[2])]


@pytest.fixture(scope="module")
def codec(train_clips) -> MelCodec:
    return MelCodec.fit(train_clips, CFG, seed=0)


# --- features ------------------------------------------------------------------------------------


def test_log_mel_has_encodec_frame_rate():
    for n in (1, 319, 320, 321, 24_000, 24_321):
        assert log_mel(torch.zeros(n) + 0.01, SR, 80).shape == (80, math.ceil(n / 320)) == (80, n_frames(n))
    stereo_48k = torch.randn(2, 48_000) * 0.1
    assert log_mel(stereo_48k, 48_000, 64).shape == (64, 75)


def test_log_mel_sees_a_tone_in_the_right_band():
    t = torch.arange(SR) / SR
    low, high = log_mel(0.5 * torch.sin(2 * math.pi * 300 * t)), log_mel(0.5 * torch.sin(2 * math.pi * 4000 * t))
    assert low.mean(dim=1).argmax() < high.mean(dim=1).argmax()
    assert float(low.max()) > float(low.min()) + 10  # a tone stands far above the empty bands


# --- k-means -------------------------------------------------------------------------------------


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(8, 5, generator=g) * 10
    points = centers.repeat_interleave(200, dim=0) + 0.1 * torch.randn(1600, 5, generator=g)
    found = kmeans(points, 8, 20, torch.Generator().manual_seed(0))
    index, dist = nearest(centers, found)
    assert len(set(index.tolist())) == 8 and float(dist.max()) < 0.1


def test_kmeans_with_fewer_points_than_centroids():
    points = torch.randn(3, 4)
    found = kmeans(points, 10, 5, torch.Generator().manual_seed(0))
    assert found.shape == (10, 4)
    index, dist = nearest(points, found)
    assert torch.allclose(dist, torch.zeros(3), atol=1e-5)


def test_reservoir_is_seeded_uniform_and_bounded():
    stream = [torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None].numpy() for i in range(50)]
    samples = []
    for seed in (0, 0, 1):
        r = _FrameReservoir(500, 1, seed)
        for chunk in stream:
            r.add(chunk)
        samples.append(r.frames()[:, 0])
    assert len(samples[0]) == 500 and len(set(samples[0].tolist())) == 500
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    assert 2000 < float(samples[0].mean()) < 3000  # uniform over 0..4999, not the first 500


# --- MelCodec ------------------------------------------------------------------------------------


def test_round_trip_shapes_dtypes_ranges(codec, held_out):
    wav = held_out[0]
    codes = codec.encode(wav, SR)
    assert codes.dtype == torch.long and codes.shape == (4, n_frames(wav.numel()))
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert len(codes[0].unique()) > 10  # real speech uses many centroids
    out = codec.decode(codes)
    assert out.dtype == torch.float32 and out.shape == (codes.shape[1] * 320,)
    assert torch.isfinite(out).all() and float(out.abs().max()) <= 1.0
    assert float(out.pow(2).mean().sqrt()) > 0.01
    assert codec.sample_rate == 24_000 and codec.frame_rate == 75.0
    assert codec.describe().startswith("mel (4 codebooks x 64")


def test_round_trip_beats_mean_frame_baseline(codec, held_out):
    """Quantised and fully decoded (Griffin-Lim, re-analysed) mel are far closer than a mean frame."""
    ratios = []
    for wav in held_out:
        reference = log_mel(wav)
        codes = codec.encode(wav, SR)
        baseline = log_mel_distance_db(reference, mean_frame_baseline(reference))
        quantised = log_mel_distance_db(reference, codec.decode_mel(codes))
        decoded = log_mel_distance_db(reference, log_mel(codec.decode(codes)))
        assert baseline > 6.0 and quantised < 0.4 * baseline and decoded < 0.5 * baseline, \
            (quantised, decoded, baseline)
        ratios.append(decoded / baseline)
    assert sum(ratios) / len(ratios) < 0.42


def test_48k_stereo_encodes_like_24k_mono(codec, held_out):
    wav = held_out[1]
    stereo = resample(wav, SR, 48_000).repeat(2, 1) * torch.tensor([[0.9], [1.1]])  # same mix as mono
    a, b = codec.encode(wav, SR), codec.encode(stereo, 48_000)
    assert a.shape == b.shape
    assert float((a[0] == b[0]).float().mean()) > 0.9
    assert log_mel_distance_db(codec.decode_mel(a), codec.decode_mel(b)) < 1.0


def test_fit_is_deterministic_and_seeded(codec, train_clips, held_out):
    again = MelCodec.fit(train_clips, CFG, seed=0)
    assert again.fingerprint == codec.fingerprint
    assert torch.equal(again.encode(held_out[0], SR), codec.encode(held_out[0], SR))
    assert MelCodec.fit(train_clips, CFG, seed=1).fingerprint != codec.fingerprint
    assert torch.equal(codec.decode(codec.encode(held_out[0], SR)), codec.decode(codec.encode(held_out[0], SR)))


def test_fit_reports_progress_and_respects_frame_budget(train_clips):
    calls = []
    cfg = CodecConfig(mel_n_codebooks=2, mel_codebook_size=16, mel_kmeans_iters=3, mel_max_fit_frames=300)
    small = MelCodec.fit(train_clips, cfg, seed=0, progress=lambda f, m: calls.append((f, m)))
    assert small.n_codebooks == 2 and small.codebook_size == 16
    assert calls[-1][0] == pytest.approx(1.0) and all(0.0 <= f <= 1.0 for f, _ in calls)
    assert any("on 300 of" in m for _, m in calls)


def test_fit_with_fewer_frames_than_centroids():
    tiny = torch.sin(torch.arange(2400) * 0.3) * 0.3  # 0.1 s: 8 frames
    small = MelCodec.fit([tiny], CodecConfig(mel_n_codebooks=2, mel_codebook_size=64), seed=0)
    reference = log_mel(tiny)
    assert log_mel_distance_db(reference, small.decode_mel(small.encode(tiny, SR))) < 0.01
    with pytest.raises(CodecError, match="no audio"):
        MelCodec.fit([], CFG)


def test_fingerprint_follows_codebooks(codec):
    tensors, meta = codec.to_tensors()
    changed = tensors["codebooks"].clone()
    changed[2, 5, 0] += 0.5
    assert MelCodec(changed, tensors["mean"], tensors["std"]).fingerprint != codec.fingerprint
    assert MelCodec(tensors["codebooks"].clone(), tensors["mean"], tensors["std"],
                    griffin_lim_iters=99).fingerprint == codec.fingerprint  # decode-only setting
    assert codec.fingerprint.startswith("mel-4x64-") and len(codec.fingerprint.split("-")[-1]) == 10


def test_save_load_round_trip(codec, held_out, tmp_path):
    path = codec.save(tmp_path / "codec" / "mel_codec.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["mel_codec.safetensors"]  # no temporary left
    loaded = MelCodec.load(path, griffin_lim_iters=8)
    assert loaded.fingerprint == codec.fingerprint and loaded.griffin_lim_iters == 8
    for name in ("codebooks", "mean", "std"):
        assert torch.equal(getattr(loaded, name), getattr(codec, name))
    assert torch.equal(loaded.encode(held_out[0], SR), codec.encode(held_out[0], SR))
    via = codec_from_tensors(*codec_to_tensors(codec))
    assert isinstance(via, MelCodec) and via.fingerprint == codec.fingerprint


def test_load_errors_name_the_file(codec, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CodecError, match="nope.safetensors"):
        MelCodec.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(CodecError, match="garbage.safetensors"):
        MelCodec.load(garbage)
    tensors, meta = codec.to_tensors()
    with pytest.raises(CodecError, match="fingerprint"):
        MelCodec.from_tensors({**tensors, "mean": tensors["mean"] + 1}, meta, source="x.safetensors")
    with pytest.raises(CodecError, match="n_mels"):
        MelCodec.from_tensors(tensors, {**meta, "params": meta["params"].replace('"n_mels": 80', '"n_mels": 64')})


def test_decode_rejects_bad_codes(codec):
    with pytest.raises(CodecError, match=r"\[4, T>0\]"):
        codec.decode(torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(CodecError, match=r"\[0, 64\)"):
        codec.decode(torch.full((4, 10), 64))


# --- EnCodec -------------------------------------------------------------------------------------


def _sha_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory, train_clips) -> Path:
    """A weights folder laid out like the real one: the architecture's state dict with codebooks
    drawn from its encoder's own output (so tokens vary the way trained ones do)."""
    model = encodec_codec._build_model()
    with torch.no_grad():
        frames = model.encoder(train_clips[0][None, None])[0].T  # [T, 128]
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.quantizer.vq.layers):
        book = layer._codebook
        picks = frames[torch.randint(len(frames), (book.embed.shape[0],), generator=g)]
        book.embed.copy_(picks * 0.5 ** i + 0.1 * frames.std() * torch.randn(book.embed.shape, generator=g))
        book.inited.fill_(1.0)
    path = tmp_path_factory.mktemp("encodec_weights") / encodec_codec.WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_encodec_loads_weights_from_folder(fake_weights, isolated_hub, monkeypatch, held_out):
    monkeypatch.setattr(encodec_codec, "WEIGHTS_SHA256_PREFIX", _sha_prefix(fake_weights))
    cfg = CodecConfig(name="encodec", bandwidth=3.0, weights_dir=str(fake_weights.parent), allow_download=False)
    codec = build_codec(cfg)
    assert isinstance(codec, EncodecCodec) and codec.n_codebooks == 4 and codec.codebook_size == 1024
    assert codec.fingerprint == f"encodec-24khz-3kbps-{_sha_prefix(fake_weights)}"
    wav = held_out[0][:SR]
    codes = codec.encode(wav, SR)
    assert codes.dtype == torch.long and codes.shape == (4, 75)
    assert len(codes[0].unique()) > 1  # trained (here: random) codebooks, not the all-zero ones
    stereo = codec.encode(resample(wav, SR, 48_000).repeat(2, 1), 48_000)
    assert stereo.shape == codes.shape and float((stereo[0] == codes[0]).float().mean()) > 0.5
    out = codec.decode(codes)
    assert out.shape == (75 * 320,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert resolve_codec_name(CodecConfig(name="auto", weights_dir=str(fake_weights.parent),
                                          allow_download=False)) == "encodec"
    rebuilt = codec_from_tensors(*codec_to_tensors(codec), cfg=cfg)
    assert rebuilt.fingerprint == codec.fingerprint


def test_encodec_missing_weights_says_where_to_put_them(isolated_hub, tmp_path):
    with pytest.raises(CodecError) as err:
        EncodecCodec(6.0, weights_dir=tmp_path / "empty", allow_download=False)
    message = str(err.value)
    assert encodec_codec.WEIGHTS_FILE in message and str(isolated_hub) in message
    assert "allow_download" in message and encodec_codec.WEIGHTS_URL in message


def test_encodec_checksum_mismatch_is_refused(fake_weights, isolated_hub, tmp_path, monkeypatch):
    folder = tmp_path / "bad"
    folder.mkdir()
    corrupt = folder / encodec_codec.WEIGHTS_FILE
    corrupt.write_bytes(fake_weights.read_bytes()[:-100])  # truncated download
    with pytest.raises(CodecError, match=f"{corrupt}: checksum mismatch"):
        EncodecCodec(6.0, weights_dir=folder, allow_download=False)
    # A file whose checksum matches but whose codebooks were never trained is refused too.
    untrained = folder / encodec_codec.WEIGHTS_FILE
    torch.save(encodec_codec._build_model().state_dict(), untrained)
    monkeypatch.setattr(encodec_codec, "WEIGHTS_SHA256_PREFIX", _sha_prefix(untrained))
    with pytest.raises(CodecError, match="untrained"):
        EncodecCodec(6.0, weights_dir=folder, allow_download=False)


def test_encodec_downloads_into_hub_cache(fake_weights, isolated_hub, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fake_weights.parent))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{encodec_codec.WEIGHTS_FILE}"
        monkeypatch.setattr(encodec_codec, "WEIGHTS_URL", url)
        monkeypatch.setattr(encodec_codec, "WEIGHTS_SHA256_PREFIX", _sha_prefix(fake_weights))
        path = encodec_codec.ensure_weights(None, allow_download=True)
    finally:
        server.shutdown()
    assert path == isolated_hub / encodec_codec.WEIGHTS_FILE and _sha_prefix(path) == _sha_prefix(fake_weights)


def test_untrained_encodec_is_labelled(held_out):
    codec = EncodecCodec.untrained(1.5)
    assert codec.fingerprint.endswith("untrained") and codec.n_codebooks == 2
    codes = codec.encode(held_out[0][:SR // 2], SR)
    assert codes.shape == (2, 38) and int(codes.max()) == 0  # why it is only good for shape tests
    with pytest.raises(CodecError, match="bandwidth"):
        EncodecCodec.untrained(5.0)


# --- build_codec ---------------------------------------------------------------------------------


def test_build_codec_mel_needs_prepare(tmp_path):
    with pytest.raises(CodecError, match=f"run `ira data prepare --dir {tmp_path}` first"):
        build_codec(CFG, tmp_path)


def test_build_codec_mel_checks_the_configured_shape(codec, tmp_path):
    codec.save(mel_codec_path(tmp_path))
    assert build_codec(CFG, tmp_path).fingerprint == codec.fingerprint
    with pytest.raises(CodecError, match="re-fit"):
        build_codec(CodecConfig(name="mel", mel_n_codebooks=8, mel_codebook_size=64), tmp_path)


def test_auto_falls_back_to_mel_loudly(codec, tmp_path, isolated_hub, caplog):
    codec.save(mel_codec_path(tmp_path))
    cfg = CodecConfig(name="auto", mel_n_codebooks=4, mel_codebook_size=64, allow_download=False)
    assert resolve_codec_name(cfg) == "mel"
    with caplog.at_level(logging.WARNING):
        built = build_codec(cfg, tmp_path)
    assert isinstance(built, MelCodec) and built.fingerprint == codec.fingerprint
    assert "NOT used" in caplog.text and "allow_download is false" in caplog.text
