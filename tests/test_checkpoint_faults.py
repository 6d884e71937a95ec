"""What goes wrong with checkpoint files on a user's disk: a full disk, crashed saves, a damaged side file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ddp_worker import ToyTask, toy_config
from ira.checkpoint import load_checkpoint, remove_stale_temporaries
from ira.training.checkpoint import CheckpointError, load_train_state, save_checkpoint, train_state_path
from ira.training.engine import Trainer

DEAD_PID = 2 ** 22 + 12345   # above Linux's pid_max: no process has it


def _save(path: Path, value: float, train_state: dict | None = None) -> Path:
    model = nn.Linear(4, 4)
    nn.init.constant_(model.weight, value)
    return save_checkpoint(path, {"speech_lm": model}, stage="1", epoch=0, step=int(value), config={},
                           train_state=train_state)


def _save_over_a_file_size_limit(path: Path, with_side_file: bool) -> str:
    """Save a ~1 MB checkpoint to `path` in a child process whose file-size limit is 100 kB (the file system
    refuses the bytes as a full disk does); returns the CheckpointError's message."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import torch
        from torch import nn
        from ira.training.checkpoint import CheckpointError, save_checkpoint
        big = nn.Linear(512, 512)   # ~1 MB of weights
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        state = {{"optimizer": {{"m": torch.zeros(512, 512)}}}} if {with_side_file} else None
        try:
            save_checkpoint({str(path)!r}, {{"speech_lm": big}}, stage="1", epoch=0, step=2, config={{}},
                            train_state=state)
        except CheckpointError as exc:
            print(exc)
            sys.exit(3)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    return out.stdout


FILE_SIZE_LIMIT = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="RLIMIT_FSIZE on Linux")


@FILE_SIZE_LIMIT
@pytest.mark.parametrize("with_side_file", [True, False], ids=["torch.save side file", "safetensors file"])
def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, with_side_file):
    """The file system refuses the bytes (here a file-size limit, the same refusal as a full disk): the
    error names the folder and the size needed, never "[enforce fail at inline_container.cc] unexpected pos"."""
    latest = tmp_path / "stage1_latest.safetensors"
    _save(latest, 1.0, train_state={"optimizer": {"m": torch.zeros(4)}})
    message = _save_over_a_file_size_limit(tmp_path / "stage1_step2.safetensors", with_side_file)
    assert f"the checkpoints saved before are intact (the newest: {latest})" in message and "then resume" in message
    assert "is full" in message and str(tmp_path) in message and "MB" in message
    assert "about 1.0 MB" in message or "about 1.1 MB" in message
    assert "enforce fail" not in message
    ckpt = load_checkpoint(latest)                       # the previous save is intact, its pair too
    assert ckpt.step == 1 and torch.all(ckpt.tensors["speech_lm"]["weight"] == 1.0)
    assert load_train_state(latest, ckpt.checkpoint_id)["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


@FILE_SIZE_LIMIT
@pytest.mark.parametrize("with_side_file", [True, False], ids=["torch.save side file", "safetensors file"])
def test_a_full_disk_at_the_very_first_save_says_there_is_no_checkpoint(tmp_path, with_side_file):
    message = _save_over_a_file_size_limit(tmp_path / "stage1_step2.safetensors", with_side_file)
    assert "is full" in message and "intact" not in message and "then resume" not in message
    assert f"No checkpoint had been saved in {tmp_path} yet, so there is none to resume from" in message
    assert "start the run again" in message
    assert not list(tmp_path.iterdir())              # no side file, no temporary file left behind


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f"stage1_step3.safetensors.{DEAD_PID}.tmp"
    dead_side = tmp_path / f"stage1_step3.train_state.pt.{DEAD_PID}.tmp"
    live = tmp_path / f"stage1_step4.safetensors.{os.getpid()}.tmp"
    other = tmp_path / "notes.tmp"                       # not a save of ours: no pid in its name
    for f in (dead, dead_side, live, other):
        f.write_bytes(b"x" * 1000)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, dead_side])
    assert live.exists() and other.exists() and not dead.exists()


def test_a_run_starts_by_clearing_crashed_saves(tmp_path):
    cfg = toy_config(tmp_path, max_steps=2)
    stale = tmp_path / f"stage1_step9.safetensors.{DEAD_PID}.tmp"
    stale.write_bytes(b"\0" * 30_000)
    result = Trainer(cfg, ToyTask(cfg), cpu=True).fit()
    assert result.ok and not stale.exists()
    log = (tmp_path / "metrics.jsonl").read_text()
    assert "removed 1 temporary file(s) left by interrupted saves" in log


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign pickle"])
def test_a_damaged_side_file_never_suggests_an_unsafe_load(tmp_path, damage):
    path = _save(tmp_path / "stage1_step5.safetensors", 5.0, train_state={"optimizer": {"m": torch.zeros(64)}})
    side = train_state_path(path)
    if damage == "truncated":
        side.write_bytes(side.read_bytes()[:200])
    elif damage == "garbage":
        side.write_bytes(b"not a torch file" * 10)
    else:
        torch.save({"checkpoint_id": "x", "model": nn.Linear(2, 2)}, side)   # an object weights_only refuses
    with pytest.raises(CheckpointError) as info:
        load_train_state(path, load_checkpoint(path).checkpoint_id)
    message = str(info.value)
    assert "weights_only" not in message and "can still be loaded" not in message
    assert str(side) in message and "damaged" in message and "previous checkpoint" in message
