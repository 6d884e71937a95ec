"""Rough edges of the command line: exit codes scripts can test, errors that name the file, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_STAGES
from ira.audio import AudioError, save_audio
from ira.cli import EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, main
from ira.config import IRAConfig, load_config
from ira.training.task import inherit_frozen_sections

ROOT = Path(__file__).resolve().parents[1]


def test_a_binary_config_file_is_named_and_exits_like_other_config_errors(tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--stage", "1", "--config", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(config) in err and "not a text file" in err and "Traceback" not in err


def test_generate_into_a_folder_is_refused_before_anything_loads(tmp_path, capsys):
    missing_checkpoint = tmp_path / "never_read.safetensors"   # the output is checked first
    assert main(["generate", "--checkpoint", str(missing_checkpoint), "--text", "hello",
                 "-o", str(tmp_path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "is a folder" in err and str(tmp_path / "speech.wav") in err
    with pytest.raises(AudioError, match="is a folder"):
        save_audio(tmp_path, torch.zeros(100), 16000)


def _special_file(kind: str, path: Path) -> tuple[Path, str]:
    """A FIFO, a symbolic link to a wav or a device node (like /dev/null, made in tmp_path: the old code replaced
    the node it wrote to) at `path`, and the words the error uses for it."""
    import stat

    if kind == "fifo":
        os.mkfifo(path)
        return path, "is a named pipe (FIFO)"
    if kind == "symlink":
        target = path.with_name("target.wav")
        target.write_bytes(b"RIFF untouched")
        path.symlink_to(target)
        return path, f"is a symbolic link (to {target})"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path, "is a device"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_audio_is_written_only_to_a_regular_file_or_a_new_name(tmp_path, capsys, kind):
    path, words = _special_file(kind, tmp_path / "out.wav")
    before = os.lstat(path)
    missing_checkpoint = tmp_path / "never_read.safetensors"   # the output is checked before anything loads
    assert main(["generate", "--checkpoint", str(missing_checkpoint), "--text", "hello", "-o", str(path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: {path} {words}" in err and "regular file or a new name" in err and "Traceback" not in err
    with pytest.raises(AudioError, match=words.replace("(", r"\(").replace(")", r"\)")):
        save_audio(path, torch.zeros(100), 16000)
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    if kind == "symlink":
        assert (tmp_path / "target.wav").read_bytes() == b"RIFF untouched"
    assert not list(tmp_path.glob(".*.tmp"))    # no temporary file left behind
    # a regular file and a new name are written as before
    assert save_audio(tmp_path / "new.wav", torch.zeros(100), 16000).is_file()
    assert save_audio(tmp_path / "new.wav", torch.zeros(200), 16000).stat().st_size > 200


def test_generate_from_non_finite_weights_is_an_error_naming_the_file(tmp_path, capsys):
    """A diverged run's checkpoint (an older IRA saved such files) speaks nothing: exit 1, no wav, no traceback."""
    from test_checkpoint import _save, poison

    bad = poison(_save(tmp_path / "stage1_latest.safetensors"))
    out = tmp_path / "speech.wav"
    assert main(["generate", "--checkpoint", str(bad), "--text", "hello", "-o", str(out)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: {bad}: 2 tensor(s) hold NaN or infinite values" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("script, args", [
    ("eval_judge.py", ["--texts", "2"]),
    ("eval_style.py", []),
    ("eval_style_control.py", []),
])
def test_evaluation_scripts_report_a_bad_checkpoint_without_a_traceback(tmp_path, script, args):
    bad = tmp_path / "typo.safetensors"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--checkpoint", str(bad), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == EXIT_FAILED, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and f"checkpoint not found: {bad}" in out.stderr


def test_a_stopped_training_exits_with_its_own_code(tmp_path, capsys):
    from ira.data.dummy import create_dummy_corpus

    create_dummy_corpus(tmp_path / "data", num_clips=8, seed=0)
    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").touch()   # newer than this process: a request for this run, honoured at the first step
    overrides = [*TINY_STAGES, f"data.dir={tmp_path / 'data'}", f"training.output_dir={out}", "training.max_steps=50"]
    code = main(["train", "--stage", "1", "--config", "cpu", *[a for o in overrides for a in ("--set", o)]])
    assert code == EXIT_STOPPED, capsys.readouterr()
    assert (out / "stage1_latest.safetensors").exists()   # resumable: the stop saved where it was


def test_frozen_sections_come_from_the_checkpoint_and_unused_settings_are_named():
    stored = IRAConfig()
    stored.speech_lm.d_model, stored.speech_lm.dropout = 64, 0.0
    mine = load_config("cpu", ["speech_lm.dropout=0.3", "align.batch_size=3"])
    merged, unused = mine.with_sections_of(stored, ["speech_lm", "style"])   # the two must agree (style_dim)
    assert merged.speech_lm == stored.speech_lm and merged.style == stored.style and merged.align.batch_size == 3
    assert any(u.startswith("speech_lm.dropout=0.3 (the checkpoint's: 0.0)") for u in unused)


def test_stage2_records_the_speech_lm_it_was_given_not_an_ignored_override(tiny_stage2, caplog):
    from ira.checkpoint import load_checkpoint

    root, cfg2, stage1, stage2, _ = tiny_stage2
    source = load_checkpoint(stage1.last_checkpoint)
    asked = load_config("cpu", [*TINY_STAGES, "speech_lm.dropout=0.37"])
    with caplog.at_level("WARNING"):
        cfg = inherit_frozen_sections(asked, source, ("speech_lm", "style"))
    assert cfg.speech_lm == source.ira_config().speech_lm
    assert "speech_lm.dropout=0.37" in caplog.text and "not used" in caplog.text
    assert load_checkpoint(stage2.last_checkpoint).config["speech_lm"] == source.config["speech_lm"]
