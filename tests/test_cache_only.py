"""A corpus that travels without its wavs (issue 38's device script): its token cache is used as built, the style
stage and stage 1's style table get their log-mels without audio, a corpus that cannot be used so is a clear
error, and `ira data pack` makes the travelling copy."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_STYLE
from ira.cli import main as cli_main
from ira.codec.mel import log_mel_distance_db, mean_frame_baseline
from ira.config import load_config
from ira.data.cache_only import WavlessCorpusError
from ira.data.dummy import create_dummy_corpus
from ira.data.pack import PackError, pack_corpus
from ira.data.prepare import cache_is_fresh, prepare_corpus
from ira.data.style_mels import FOLDER, MelSettings, split_mels
from ira.data.token_cache import load_split, read_split_metadata, record_metadata

TINY = TINY_STYLE + ["codec.mel_kmeans_iters=3", "data.val_fraction=0.25"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(data_dir: Path, *extra: str):
    return load_config("cpu", TINY + [f"data.dir={data_dir}", *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """10 clips prepared with a tiny MelCodec, wavs and all (the machine where the corpus was made)."""
    data_dir = create_dummy_corpus(tmp_path_factory.mktemp("made") / "corpus", num_clips=10, seed=0)
    prepare_corpus(_cfg(data_dir))
    return data_dir


def _without_wavs(corpus: Path, dest: Path) -> Path:
    """The corpus as it arrives on a device machine: everything but its wavs (a plain copy, not `ira data pack`,
    so that these tests do not depend on it)."""
    shutil.copytree(corpus, dest, ignore=shutil.ignore_patterns("wavs", "style-mels", "style-table"))
    return dest


def _split_files(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (data_dir / "cache").glob("mel-*/*.safetensors")}


def test_a_copy_without_wavs_uses_its_token_cache_as_built(corpus, tmp_path, caplog):
    copy = _without_wavs(corpus, tmp_path / "copy")
    before = _split_files(copy)
    cfg = _cfg(copy)
    assert cache_is_fresh(cfg)
    with caplog.at_level(logging.WARNING, logger="ira.data.prepare"):
        result = prepare_corpus(cfg)
    assert not result.rebuilt and result.kept == 10
    assert _split_files(copy) == before                       # not rebuilt, not rewritten
    assert any("has no wavs: using its token cache as built" in r.getMessage() for r in caplog.records)
    assert not (copy / "wavs").exists()


def test_a_copy_without_wavs_and_without_its_cache_is_a_clear_error(corpus, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metadata.csv", "labels.jsonl"):
        shutil.copy2(corpus / name, bare / name)
    (bare / "wavs").mkdir()                                  # an empty wavs/ is no wavs too
    cfg = _cfg(bare)
    assert not cache_is_fresh(cfg)
    with pytest.raises(WavlessCorpusError, match="has no wavs") as caught:
        prepare_corpus(cfg)
    message = str(caught.value)
    assert str(bare) in message and "ira data prepare" in message and "ira data pack" in message
    assert "MelCodec" in message                             # what is missing: the fitted codec, here


def test_a_copy_whose_cache_is_for_other_data_or_settings_is_a_clear_error(corpus, tmp_path):
    copy = _without_wavs(corpus, tmp_path / "copy")
    with pytest.raises(WavlessCorpusError, match="other data settings"):
        prepare_corpus(_cfg(copy, "data.max_duration=9.5"))   # the cache was built under 10 s
    lines = (copy / "metadata.csv").read_text().splitlines()
    (copy / "metadata.csv").write_text("\n".join(lines[:-1]) + "\n")   # one clip fewer than the cache holds
    with pytest.raises(WavlessCorpusError, match="another metadata.csv"):
        prepare_corpus(_cfg(copy))
    with pytest.raises(WavlessCorpusError, match="rebuild"):
        prepare_corpus(_cfg(copy), force=True)


def test_a_cache_built_before_text_hashes_gets_one_without_encoding_again(corpus, tmp_path):
    made = tmp_path / "made"
    shutil.copytree(corpus, made)
    cfg = _cfg(made)
    files = prepare_corpus(cfg).cache_files
    codes_before = {split: load_split(path).codes for split, path in files.items()}
    for path in files.values():
        record_metadata(path, {"text_hash": ""})             # as an older `ira data prepare` left it
    with pytest.raises(WavlessCorpusError, match="before caches recorded their text hash"):
        prepare_corpus(_cfg(_without_wavs(made, tmp_path / "old_copy")))
    again = prepare_corpus(cfg)                              # where the wavs are: fresh, now with its text hash
    assert not again.rebuilt
    for split, path in again.cache_files.items():
        assert read_split_metadata(path)["text_hash"] and torch.equal(load_split(path).codes, codes_before[split])
    assert not prepare_corpus(_cfg(_without_wavs(made, tmp_path / "new_copy"))).rebuilt


def test_style_mels_without_wavs_are_decoded_from_the_tokens(corpus, tmp_path, monkeypatch):
    copy = _without_wavs(corpus, tmp_path / "copy")
    cfg = _cfg(copy)
    prepared = prepare_corpus(cfg)
    tokens = load_split(prepared.cache_files["train"], prepared.codec.fingerprint)
    settings = MelSettings.of(cfg.style, cfg.data.trim_silence_db)
    made = split_mels(corpus, "train", tokens, prepared.codec, settings)          # from the wavs
    decoded = split_mels(copy, "train", tokens, prepared.codec, settings)
    assert made.source == "wavs" and decoded.source == f"tokens:{prepared.codec.fingerprint}"
    assert list(decoded.mels) == tokens.ids and decoded.path.is_file()
    for clip_id, mel in decoded.mels.items():
        wav_mel = made.mels[clip_id]
        assert mel.dtype == torch.float16 and mel.shape == wav_mel.shape       # the same frames
        # quantised by a tiny codec, yet nearer the wav's mel than its mean frame is
        assert log_mel_distance_db(mel.float(), wav_mel.float()) < \
            log_mel_distance_db(mean_frame_baseline(wav_mel.float()), wav_mel.float())
    import ira.data.style_mels as style_mels
    monkeypatch.setattr(style_mels, "token_mel", lambda *a: pytest.fail("decoded again instead of read back"))
    again = split_mels(copy, "train", tokens, prepared.codec, settings)
    assert all(torch.equal(again.mels[i], decoded.mels[i]) for i in tokens.ids)


def test_the_style_stage_and_stage_1s_style_table_run_without_wavs(corpus, tmp_path, monkeypatch):
    from ira.models.hub import style_encoder_from_checkpoint
    from ira.training.stage_style import load_style_clips, run_style_training
    from ira.training.style_table import StyleTable
    import ira.data.style_mels as style_mels

    monkeypatch.setattr(style_mels, "load_audio", lambda *a: pytest.fail("a wav was read"))
    copy = _without_wavs(corpus, tmp_path / "copy")
    cfg = _cfg(copy, f"training.output_dir={tmp_path / 'style'}")
    clips = load_style_clips(cfg, "train")
    assert clips and all(c.mel.shape[0] == cfg.style.n_mels and c.mel.shape[1] > 0 for c in clips)
    style = run_style_training(cfg, cpu=True)
    assert style.ok, style.message
    encoder = style_encoder_from_checkpoint(style.last_checkpoint)
    prepared = prepare_corpus(cfg)
    split = load_split(prepared.cache_files["train"], prepared.codec.fingerprint)
    table = StyleTable.cached(encoder, split, "train", copy, prepared.codec, cfg.data.trim_silence_db)
    assert table.audio.shape == (len(split), cfg.style.embed_dim) and torch.isfinite(table.audio).all()
    assert table.text.shape[:2] == (len(split), max(len(d) for d in split.descriptions))
    # the audio vectors are the encoder's embedding of the very mels the style stage trained on
    by_id = {c.id: c.mel for c in clips}
    with torch.inference_mode():
        expected = encoder.embed_audio([by_id[i] for i in split.ids])
    assert torch.allclose(table.audio, expected, atol=1e-5)
    assert (copy / "cache" / "style-table").is_dir()


def test_pack_copies_what_travels_and_the_copy_trains_on_the_wav_mels(corpus, tmp_path, capsys):
    made = tmp_path / "made"
    shutil.copytree(corpus, made)
    out = tmp_path / "travel"
    assert cli_main(["data", "pack", "--dir", str(made), "--out", str(out), "--style-mels", "--config", "cpu",
                     *[arg for item in TINY for arg in ("--set", item)]]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed and "KiB a clip" in printed
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not any(n.startswith("wavs") for n in names)
    assert {"metadata.csv", "labels.jsonl", "annotations.jsonl", "annotation_stats.json", "prepare_report.json",
            "codec/mel_codec.safetensors", "codec/mel_codec.json"} <= set(names)
    assert sum(n.startswith(f"cache/{FOLDER}/") for n in names) == 2 and sum(n.startswith("cache/mel-") for n in names) == 2
    # on the device: the token cache as built, and the style stage's mels exactly those made from the wavs
    cfg = _cfg(out)
    assert not prepare_corpus(cfg).rebuilt
    from ira.training.stage_style import load_style_clips
    travelled = {c.id: c.mel for c in load_style_clips(cfg, "train")}
    at_home = {c.id: c.mel for c in load_style_clips(_cfg(made), "train")}
    assert travelled.keys() == at_home.keys() and all(torch.equal(travelled[i], at_home[i]) for i in at_home)


def test_pack_writes_an_archive_and_refuses_what_is_over_budget_or_in_place(corpus, tmp_path):
    made = tmp_path / "made"
    shutil.copytree(corpus, made)
    cfg = _cfg(made)
    archive = tmp_path / "corpus.tgz"
    result = pack_corpus(cfg, made, archive)
    assert archive.is_file() and result.bytes == archive.stat().st_size < result.raw_bytes
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert not prepare_corpus(_cfg(tmp_path / "unpacked")).rebuilt
    with pytest.raises(PackError, match="over the"):
        pack_corpus(cfg, made, tmp_path / "small.tgz", budget=1000)
    assert not (tmp_path / "small.tgz").exists() and not list(tmp_path.glob(".small.tgz*"))
    with pytest.raises(PackError, match="write a .tgz archive instead"):
        pack_corpus(cfg, made, tmp_path / "small", budget=1000)
    assert not (tmp_path / "small").exists()
    with pytest.raises(PackError, match="inside the corpus"):
        pack_corpus(cfg, made, made / "travel")
    with pytest.raises(PackError, match="not an empty folder"):
        pack_corpus(cfg, made, archive)


def test_gpu_recipe_pack_makes_the_travelling_archive_with_the_runs_config(corpus, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    made = tmp_path / "made"
    shutil.copytree(corpus, made)
    env = {**os.environ, "PYTHON": sys.executable, "PRESET": "cpu", "EXTRA_SET": " ".join(TINY),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_recipe.sh"), "pack", str(made), str(tmp_path / "c.tgz")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "c.tgz" in out.stdout and "MiB" in out.stdout
    with tarfile.open(tmp_path / "c.tgz") as tar:
        names = tar.getnames()
    assert "metadata.csv" in names and not any(n.startswith("wavs") for n in names)
