"""One run per folder, nothing written over an earlier run: the lock of training.output_dir (a second run is
refused naming the holder, a lock left by `kill -9` is taken over, every exit releases it) and the refusal of a
fresh run over an earlier run's checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddp_worker import ToyTask, toy_config
from ira.cli import EXIT_FAILED, main
from ira.training.engine import Trainer
from ira.training.metrics_log import read_metrics
from ira.training.run_folder import LOCK_FILE, RunFolderError, RunFolderLock, lock_holder

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys
    from ira.training.run_folder import RunFolderError, RunFolderLock
    try:
        RunFolderLock(sys.argv[1]).acquire()
    except RunFolderError as exc:
        print("refused", exc, flush=True)
        sys.exit(0)
    print("holding", flush=True)
    sys.stdin.read()   # until the test closes our stdin (or kills us)
""")

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(cfg, task, resume=None):
    return Trainer(cfg, task, run_name="test", cpu=True).fit(resume_from=resume)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock (as a run does) and keeps it until told."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "holding"
    return child


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- the lock

def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    cfg = toy_config(tmp_path, max_steps=2)
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderError) as err:
            _fit(cfg, ToyTask(cfg))
        message = str(err.value)
        assert f"process {holder.pid}" in message and str(tmp_path / LOCK_FILE) in message
        assert "training.output_dir" in message
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]   # the refused run wrote nothing
        assert lock_holder(tmp_path) == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)   # kill -9: the holder never releases
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)   # its file stays, naming a dead pid
    assert lock_holder(tmp_path) is None
    result = _fit(cfg, ToyTask(cfg))
    assert result.status == "done"
    warnings = [r["message"] for r in read_metrics(result.metrics_path) if r.get("event") == "warning"]
    assert any(f"left by process {holder.pid}" in w for w in warnings)
    assert not (tmp_path / LOCK_FILE).exists() and lock_holder(tmp_path) is None


def test_of_runs_started_at_once_in_one_folder_exactly_one_holds_it(tmp_path):
    children = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                for _ in range(4)]
    try:
        said = [child.stdout.readline().strip() for child in children]
        holders = [child for child, line in zip(children, said) if line == "holding"]
        assert len(holders) == 1, said
        refusals = [line for line in said if line.startswith("refused")]
        assert len(refusals) == 3 and all(f"process {holders[0].pid}" in line for line in refusals)
    finally:
        for child in children:
            child.stdin.close()
            child.wait()
    assert lock_holder(tmp_path) is None


class _Fails(ToyTask):
    def training_step(self, batch):
        if self.model.training and self.calls == 1:
            raise RuntimeError("a bug in the task")
        return super().training_step(batch)


class _Terminated(ToyTask):
    def training_step(self, batch):
        if self.model.training and self.calls == 1:
            signal.raise_signal(signal.SIGTERM)   # what the app's Stop sends after its grace period
        return super().training_step(batch)


@pytest.mark.parametrize("how", ["done", "STOP", "SIGTERM", "exception", "nan"])
def test_every_way_a_run_ends_releases_its_folder(tmp_path, how):
    cfg = toy_config(tmp_path, max_steps=4)
    task = {"done": ToyTask(cfg), "STOP": ToyTask(cfg, stop_at=2), "SIGTERM": _Terminated(cfg),
            "exception": _Fails(cfg), "nan": ToyTask(cfg, nan_at=2)}[how]
    previous = signal.getsignal(signal.SIGTERM)
    if how == "exception":
        with pytest.raises(RuntimeError, match="a bug in the task"):
            _fit(cfg, task)
    else:
        expected = {"done": "done", "STOP": "stopped", "SIGTERM": "stopped", "nan": "nan"}[how]
        assert _fit(cfg, task).status == expected
    assert signal.getsignal(signal.SIGTERM) is previous
    assert lock_holder(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()
    RunFolderLock(tmp_path).acquire().release()   # free for the next run


def test_a_folder_held_by_this_process_is_refused_too(tmp_path):
    with RunFolderLock(tmp_path):
        assert lock_holder(tmp_path) == os.getpid()
        with pytest.raises(RunFolderError, match="this process"):
            RunFolderLock(tmp_path).acquire()
    assert lock_holder(tmp_path) is None


# ---------------------------------------------------------------- a fresh run over an earlier one

def test_a_fresh_run_into_a_folder_with_a_run_is_refused_and_says_how_to_continue_it(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, save_every=2, eval_every=2)
    assert _fit(cfg, ToyTask(cfg)).status == "done"
    before = _files(tmp_path)
    with pytest.raises(RunFolderError) as err:
        _fit(cfg, ToyTask(cfg))
    message = str(err.value)
    latest = tmp_path / "stage1_latest.safetensors"
    assert f"{tmp_path} already holds a stage-1 run" in message and "stage1_latest.safetensors (step 4)" in message
    assert f"--resume_checkpoint {latest}" in message and "same recipe command again" in message
    assert f"training.output_dir={tmp_path.with_name(tmp_path.name + '-2')}" in message
    assert _files(tmp_path) == before                 # best, latest, step files and metrics untouched
    # the advice works: continuing the run there is allowed
    assert _fit(toy_config(tmp_path, max_steps=6, save_every=2, eval_every=2), ToyTask(cfg), resume=latest).step == 6


def test_continuing_another_folders_run_over_a_run_is_refused(tmp_path):
    a, b = toy_config(tmp_path / "a", max_steps=2), toy_config(tmp_path / "b", max_steps=2)
    assert _fit(a, ToyTask(a)).ok and _fit(b, ToyTask(b)).ok
    with pytest.raises(RunFolderError, match="a checkpoint of another folder"):
        _fit(b, ToyTask(b), resume=tmp_path / "a" / "stage1_latest.safetensors")


def test_another_stage_may_start_in_a_folder_holding_an_earlier_stages_run(tmp_path):
    class Stage2(ToyTask):
        stage = "2"

    cfg = toy_config(tmp_path, max_steps=2)
    assert _fit(cfg, ToyTask(cfg)).ok
    assert _fit(cfg, Stage2(cfg)).ok                   # stage2_* beside stage1_*: nothing of stage 1 is written


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    cfg = toy_config(path, max_steps=2)
    with pytest.raises(RunFolderError, match=f"training.output_dir={path} is a file, not a folder"):
        _fit(cfg, ToyTask(cfg))
    code = main(["train", "--stage", "1", "--config", "cpu", "--set", f"training.output_dir={path}",
                 "--set", f"data.dir={tmp_path / 'no_corpus'}"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and f"error: training.output_dir={path} is a file" in err and "Traceback" not in err
    assert path.read_text() == "mine"


def test_the_command_refuses_before_loading_anything(tmp_path, capsys):
    """No corpus at data.dir: a refusal that comes first proves nothing was loaded before it (stage 2 spends
    minutes on its features before the trainer starts)."""
    cfg = toy_config(tmp_path / "run", max_steps=2)
    assert _fit(cfg, ToyTask(cfg)).ok
    argv = ["train", "--stage", "1", "--config", "cpu", "--set", f"training.output_dir={tmp_path / 'run'}",
            "--set", f"data.dir={tmp_path / 'no_corpus'}"]
    assert main(argv) == EXIT_FAILED
    assert "already holds a stage-1 run" in capsys.readouterr().err
    holder = _holder(tmp_path / "other")
    try:
        argv[argv.index(f"training.output_dir={tmp_path / 'run'}")] = f"training.output_dir={tmp_path / 'other'}"
        assert main(argv) == EXIT_FAILED
        err = capsys.readouterr().err
        assert f"error: {tmp_path / 'other'} is in use" in err and f"process {holder.pid}" in err
    finally:
        holder.stdin.close()
        holder.wait()
