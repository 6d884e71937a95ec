"""The UI's job runner, driven with a tiny fake training child (no real training involved)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ui.runner import JOB_FILE, JobError, JobRecord, JobRunner, log_tail, train_command

# A stand-in for `ira train`: writes metrics.jsonl like the engine (a start event, a train row per
# step, a val row and a samples event every 5 steps), honours <out>/STOP within a step (checkpoint
# event, stopped event, removes the flag) and ends with a done event.
# argv: OUT STEPS SLEEP MODE, MODE in: ok | fail | ignore_stop | ignore_all
FAKE_CHILD = r'''
import json, os, signal, sys, time
from pathlib import Path
out, steps, pause, mode = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if mode == "ignore_all":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
out.mkdir(parents=True, exist_ok=True)
metrics = open(out / "metrics.jsonl", "a")
def write(record):
    metrics.write(json.dumps({"time": time.time(), "stage": "1", **record}) + "\n")
    metrics.flush()
write({"event": "start", "step": 0, "total_steps": steps})
print("fake training starts", flush=True)
for step in range(1, steps + 1):
    time.sleep(pause)
    write({"step": step, "split": "train", "loss": 5.0 / step, "lr": 1e-3, "accuracy": step / steps})
    if step % 5 == 0:
        write({"step": step, "split": "val", "loss": 6.0 / step, "accuracy": step / steps / 2})
        sample = out / "samples" / f"stage1_step{step}" / "0.wav"
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_bytes(b"RIFF")
        write({"event": "samples", "step": step, "paths": [str(sample)]})
    if mode == "fail" and step == 3:
        print("RuntimeError: the fake loss exploded", file=sys.stderr, flush=True)
        sys.exit(3)
    if (out / "STOP").exists() and mode == "ok":
        ckpt = out / "stage1_latest.safetensors"
        write({"event": "checkpoint", "step": step, "path": str(ckpt), "latest": str(ckpt)})
        write({"event": "stopped", "step": step, "checkpoint": str(ckpt),
               "message": f"Stopped at step {step} (flag file)"})
        (out / "STOP").unlink()
        sys.exit(0)
write({"event": "done", "step": steps, "message": f"Finished {steps} steps"})
'''


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_CHILD)
    return path


def command(fake: Path, runs: Path, name: str, steps: int, pause: float = 0.02, mode: str = "ok") -> list[str]:
    return [sys.executable, str(fake), str(runs / name), str(steps), str(pause), mode]


def wait_for(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def test_train_command_contract():
    cmd = train_command("2", "cpu", ["training.batch_size=4", "data.dir=\"/w/data/x\""],
                        resume_checkpoint="/w/runs/a/stage2_latest.safetensors",
                        init_checkpoint="/w/runs/b/s1.safetensors")
    assert cmd[:4] == [sys.executable, "-m", "ira.cli", "train"]
    assert cmd[4:8] == ["--stage", "2", "--config", "cpu"]
    assert cmd[8:12] == ["--set", "training.batch_size=4", "--set", "data.dir=\"/w/data/x\""]
    assert cmd[12:] == ["--resume_checkpoint", "/w/runs/a/stage2_latest.safetensors"]   # resuming wins
    start = train_command("2", "cpu", [], init_checkpoint="/w/runs/b/s1.safetensors")
    assert start[-2:] == ["--resume_checkpoint", "/w/runs/b/s1.safetensors"]      # the seed's flag for both


def test_job_runs_to_completion_with_metrics_log_and_samples(tmp_path: Path, fake: Path):
    runs = tmp_path / "runs"
    runner = JobRunner(runs)
    record = runner.start("a", "1", command(fake, runs, "a", steps=12))
    assert json.loads((runs / "a" / JOB_FILE).read_text())["pid"] == record.pid
    status = wait_for(lambda: (s := runner.status("a")).state == "finished" and s)
    assert status.returncode == 0
    assert status.step == 12 and status.total_steps == 12
    assert "Finished 12 steps" in status.message
    assert "fake training starts" in status.log_tail
    assert status.samples and status.samples[0].endswith("stage1_step10/0.wav")
    rows = runner.metrics("a")
    assert [r["step"] for r in rows if r.get("split") == "train"] == list(range(1, 13))
    assert runner.active() is None


def test_second_start_is_refused_while_a_job_runs(tmp_path: Path, fake: Path):
    runs = tmp_path / "runs"
    runner = JobRunner(runs)
    runner.start("a", "1", command(fake, runs, "a", steps=400))
    with pytest.raises(JobError, match="already running: run 'a'"):
        runner.start("b", "1", command(fake, runs, "b", steps=5))
    assert not (runs / "b" / JOB_FILE).exists()
    runner.stop("a")
    wait_for(lambda: runner.status("a").state == "stopped")


def test_stop_writes_the_flag_and_a_new_runner_reattaches(tmp_path: Path, fake: Path):
    runs = tmp_path / "runs"
    first = JobRunner(runs)
    record = first.start("a", "1", command(fake, runs, "a", steps=2000))
    wait_for(lambda: (first.status("a").step or 0) >= 3)

    again = JobRunner(runs)   # a page reload / app restart: only job.json is shared
    status = again.status("a")
    assert status.state == "running" and status.pid == record.pid
    assert status.eta_s is not None and status.eta_s > 0
    assert again.active().name == "a"

    # a snapshot: the fake child honours the flag within one of its short steps, so it may already be gone
    assert again.stop("a").state in ("stopping", "stopped")
    assert JobRecord.load(runs / "a").stop_requested is not None
    status = wait_for(lambda: (s := again.status("a")).state == "stopped" and s)
    assert "Stopped at step" in status.message
    assert status.last_checkpoint.endswith("stage1_latest.safetensors")
    assert not (runs / "a" / "STOP").exists()   # the child honoured and removed it
    with pytest.raises(JobError, match="no running job"):
        again.stop("a")


def test_failed_job_reports_exit_code_and_log_tail(tmp_path: Path, fake: Path):
    runs = tmp_path / "runs"
    runner = JobRunner(runs)
    runner.start("a", "1", command(fake, runs, "a", steps=50, mode="fail"))
    status = wait_for(lambda: (s := runner.status("a")).state == "failed" and s)
    assert status.returncode == 3
    assert "exit code 3" in status.message
    assert "the fake loss exploded" in status.log_tail


def test_a_folder_another_run_holds_is_refused_before_anything_is_written(tmp_path: Path, fake: Path):
    """`ira train` in a shell holds runs/a: the app neither starts a job there nor touches its STOP or files."""
    from test_run_folder import _holder

    runs = tmp_path / "runs"
    holder = _holder(runs / "a")
    try:
        (runs / "a" / "STOP").write_text("the shell run's stop request\n")
        with pytest.raises(JobError, match=f"runs/a is in use.*process {holder.pid}"):
            JobRunner(runs).start("a", "1", command(fake, runs, "a", steps=5))
        assert sorted(p.name for p in (runs / "a").iterdir()) == ["LOCK", "STOP"]
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_run_the_command_refuses_shows_the_refusal(tmp_path: Path):
    """The real `ira train` as the child, into a folder that holds an earlier stage-1 run: it refuses at once, and
    the app's status says why (not only "exit code 1")."""
    from ddp_worker import ToyTask, toy_config
    from ira.training.engine import Trainer

    runs = tmp_path / "runs"
    cfg = toy_config(runs / "a", max_steps=2)
    assert Trainer(cfg, ToyTask(cfg), cpu=True).fit().ok
    runner = JobRunner(runs)
    runner.start("a", "1", train_command("1", "cpu", [f"training.output_dir={runs / 'a'}",
                                                      f"data.dir={tmp_path / 'no_corpus'}"]))
    status = wait_for(lambda: (s := runner.status("a")).state == "failed" and s, timeout=300)
    assert status.returncode == 1
    assert f"{runs / 'a'} already holds a stage-1 run" in status.message
    assert f"--resume_checkpoint {runs / 'a' / 'stage1_latest.safetensors'}" in status.message


@pytest.mark.parametrize("mode, signal_needed", [("ignore_stop", "term_sent"), ("ignore_all", "kill_sent")])
def test_stop_escalates_to_sigterm_then_sigkill(tmp_path: Path, fake: Path, mode: str, signal_needed: str):
    runs = tmp_path / "runs"
    runner = JobRunner(runs, stop_grace_s=0.3, term_grace_s=0.3)
    runner.start("a", "1", command(fake, runs, "a", steps=100_000, pause=0.01, mode=mode))
    wait_for(lambda: (runner.status("a").step or 0) >= 1)
    runner.stop("a")
    status = wait_for(lambda: (s := runner.status("a")).state == "stopped" and s)
    record = JobRecord.load(runs / "a")
    assert getattr(record, signal_needed) is not None
    assert record.returncode is not None and record.returncode < 0   # ended by a signal
    if mode == "ignore_all":
        assert "killed" in status.message


def test_metrics_ignore_a_partial_last_line(tmp_path: Path):
    runs = tmp_path / "runs"
    runner = JobRunner(runs)
    path = runs / "a" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
    assert [r["step"] for r in runner.metrics("a")] == [1]
    with open(path, "a") as f:
        f.write('ain", "loss": 1.5}\n')
    assert [r["step"] for r in runner.metrics("a")] == [1, 2]
    assert runner.status("a").state == "idle"


def test_log_tail_collapses_progress_bar_redraws(tmp_path: Path):
    log = tmp_path / "train.log"
    log.write_text("start\n 10%|#   |\r 50%|##  |\r100%|####|\nend\n")
    assert log_tail(log) == "start\n100%|####|\nend"
    assert log_tail(tmp_path / "missing.log") == ""
