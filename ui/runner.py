"""Training jobs in a child process, so the UI never blocks and survives a page reload or restart.

A job is one child process in its own process group (stdout and stderr to `<run>/train.log`),
recorded in `<run>/job.json` (pid, its start time, command, stage, output dir). Any `JobRunner`
on the same runs folder, in this process or in a restarted app, re-attaches to it from that file.

Stop is gentle first: the flag file `<run>/STOP` (the engine finishes its step, writes a
checkpoint and exits), then SIGTERM to the group after `stop_grace_s` (the engine treats it as a
stop request too), then SIGKILL after `term_grace_s` more.

States: running, stopping, finished (exit 0), failed (exit code and log tail), stopped.

A full recipe (`ira train --recipe full`, stage "recipe" in job.json) runs its stages in subfolders of the
run (`style/`, `stage1/`, ...): its Stop is the same `<run>/STOP`, which the running stage watches too, and
its metrics are those of the stage running now (or the last that ran), as `<run>/recipe.json` says.

Every file the runner opens (job.json, the log, metrics.jsonl, recipe.json, the folders a job recorded) is
first checked to stay inside the workspace (`ui.workspace`): a link out of it is a WorkspaceError naming it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil

from ira.cli import EXIT_OK, EXIT_STOPPED
from ira.training.metrics_log import METRICS_FILE, tail_metrics
from ira.training.recipe import STAGE_NAMES, STATE_FILE, RecipeError, RecipeState
from ira.training.run_folder import RunFolderError, check_not_held
from ira.training.stop import request_stop
from ui.workspace import Workspace

JOB_FILE = "job.json"
LOG_FILE = "train.log"
STOP_GRACE_S = 120.0
TERM_GRACE_S = 30.0
TERMINAL_EVENTS = ("done", "stopped", "nan", "oom", "error")
REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_STAGE = "recipe"
"""The stage a full recipe's job record holds (its stages are in recipe.json)."""


class JobError(RuntimeError):
    """A job cannot be started or stopped; the message says why and what to do."""


def train_command(stage: str, config: str, overrides: list[str], resume_checkpoint: Optional[str] = None,
                  init_checkpoint: Optional[str] = None) -> list[str]:
    """`python -m ira.cli train --stage S --config C --set k=v ... [--resume_checkpoint CKPT]`.

    As in the seed's command line, `--resume_checkpoint` takes either a checkpoint of the same stage
    (continue exactly) or one of the previous stage (start from it); resuming wins when both are given.
    """
    command = [sys.executable, "-m", "ira.cli", "train", "--stage", str(stage), "--config", config]
    for item in overrides:
        command += ["--set", item]
    start_from = resume_checkpoint or init_checkpoint
    if start_from:
        command += ["--resume_checkpoint", start_from]
    return command


def recipe_command(config: str, minutes: float, overrides: list[str], recipe: str = "full") -> list[str]:
    """`python -m ira.cli train --recipe full --minutes M --config C --set k=v ...`: every stage in order in
    folders under training.output_dir; the same command again continues a stopped recipe."""
    command = [sys.executable, "-m", "ira.cli", "train", "--recipe", recipe, "--minutes", repr(float(minutes)),
               "--config", config]
    for item in overrides:
        command += ["--set", item]
    return command


def recipe_state(run_dir: str | Path) -> Optional[RecipeState]:
    """The recipe.json of a run folder, or None (no recipe there, or not readable)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return RecipeState.load(path)
    except RecipeError:
        return None


@dataclass
class JobRecord:
    """What job.json holds: enough to find, watch and stop the process after a restart."""
    name: str
    stage: str
    command: list[str]
    output_dir: str
    log_path: str
    pid: int
    create_time: float          # psutil's process start time: tells our pid from a reused one
    started: float
    stop_requested: Optional[float] = None
    term_sent: Optional[float] = None
    kill_sent: Optional[float] = None
    ended: Optional[float] = None
    returncode: Optional[int] = None

    def save(self) -> None:
        path = Path(self.output_dir) / JOB_FILE
        tmp = path.with_name(f".{JOB_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, run_dir: str | Path) -> Optional["JobRecord"]:
        path = Path(run_dir) / JOB_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as exc:
            raise JobError(f"{path} is not a job record ({exc}); delete it if no training runs there") from exc


@dataclass
class JobStatus:
    name: str
    state: str                  # idle | running | stopping | finished | failed | stopped
    message: str = ""
    stage: Optional[str] = None
    pid: Optional[int] = None
    returncode: Optional[int] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    eta_s: Optional[float] = None
    lr: Optional[float] = None
    log_tail: str = ""
    samples: list[str] = field(default_factory=list)
    last_checkpoint: Optional[str] = None
    recipe_stage: Optional[str] = None   # a full recipe: the stage its step, metrics and samples are from
    training_started: Optional[float] = None   # when its training loop began (the `start` event): a time budget
    # counts from there; what came before (data, models, caches) is getting ready
    eval_every: Optional[int] = None     # steps between validations (each one writes the samples), from `start`
    steps_per_s: Optional[float] = None  # the running job's pace since its `start` event (None before two rows)

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")


class _MetricsTail:
    """The rows of one metrics.jsonl, read incrementally (only new complete lines each call)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self.offset:  # replaced or truncated: start over
            self.offset, self.rows = 0, []
        new, self.offset = tail_metrics(self.path, self.offset)
        self.rows.extend(new)
        return self.rows


def log_tail(path: str | Path, max_lines: int = 40, max_bytes: int = 32_768) -> str:
    """The last lines of a log as a terminal would show them (a tqdm bar's '\\r' redraws collapsed)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in data.split("\n")]
    if size > max_bytes:
        lines = lines[1:]  # the first line was cut by the seek
    return "\n".join([line for line in lines if line.strip()][-max_lines:])


class JobRunner:
    """Starts, watches and stops the training jobs of one runs folder (one job at a time)."""

    def __init__(self, runs_dir: str | Path, stop_grace_s: float = STOP_GRACE_S,
                 term_grace_s: float = TERM_GRACE_S):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(self.runs_dir.parent.resolve())   # the folder its jobs run in (their cwd)
        self.stop_grace_s = stop_grace_s
        self.term_grace_s = term_grace_s
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}
        self._escalating: set[str] = set()
        self._metrics: dict[Path, _MetricsTail] = {}

    # ---------------------------------------------------------------- start / stop

    def start(self, name: str, stage: str, command: list[str], env: Optional[dict[str, str]] = None) -> JobRecord:
        """Start `command` as the job of run `name` (output in runs/<name>); refuse if a job runs."""
        with self._lock:
            running = self.active()
            if running is not None:
                raise JobError(f"a training job is already running: run '{running.name}' (stage {running.stage}, "
                               f"pid {running.pid}). Stop it first, or wait for it to finish")
            run_dir = self.runs_dir / name
            self.workspace.checked(run_dir, "the run folder")
            try:   # a run started outside the app (ira train in a shell) may hold the folder: touch nothing of it
                check_not_held(run_dir)
            except RunFolderError as exc:
                raise JobError(str(exc)) from exc
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "STOP").unlink(missing_ok=True)   # a flag left by an earlier run is not for this one
            log_path = run_dir / LOG_FILE
            self.workspace.checked(log_path, "the run's log")
            child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
            child_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
            with open(log_path, "ab") as log:
                log.write(f"\n[{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {shell_quote(command)}\n".encode())
                log.flush()
                try:
                    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=str(self.runs_dir.parent), env=child_env, start_new_session=True)
                except OSError as exc:
                    raise JobError(f"cannot start {command[0]}: {exc}") from exc
            try:
                create_time = psutil.Process(child.pid).create_time()
            except psutil.NoSuchProcess:  # it already ended: the monitor records how
                create_time = time.time()
            record = JobRecord(name=name, stage=str(stage), command=list(command), output_dir=str(run_dir),
                               log_path=str(log_path), pid=child.pid, create_time=create_time, started=time.time())
            record.save()
            self._children[child.pid] = child
            threading.Thread(target=self._monitor, args=(child, record), daemon=True,
                             name=f"ira-job-{name}").start()
            return record

    def stop(self, name: str) -> JobStatus:
        """Ask the job of run `name` to stop (flag file now, signals later if it does not)."""
        with self._lock:
            record = self.record(name)
            if record is None or not self._alive(record):
                raise JobError(f"run '{name}' has no running job to stop")
            if record.stop_requested is None:
                request_stop(self.workspace.checked(record.output_dir, "the run folder"))
                record.stop_requested = time.time()
                record.save()
            self._start_escalation(record)
        return self.status(name)

    def _start_escalation(self, record: JobRecord) -> None:
        if record.name in self._escalating:
            return
        self._escalating.add(record.name)
        threading.Thread(target=self._escalate, args=(record.name,), daemon=True,
                         name=f"ira-stop-{record.name}").start()

    def _escalate(self, name: str) -> None:
        """SIGTERM after the grace period, then SIGKILL, until the process is gone."""
        try:
            while True:
                with self._lock:
                    record = JobRecord.load(self.runs_dir / name)
                    if record is None or record.stop_requested is None or not self._alive(record):
                        return
                    now = time.time()
                    if record.term_sent is None and now >= record.stop_requested + self.stop_grace_s:
                        self._signal(record, signal.SIGTERM)
                        record.term_sent = now
                        record.save()
                    elif (record.term_sent is not None and record.kill_sent is None
                          and now >= record.term_sent + self.term_grace_s):
                        self._signal(record, signal.SIGKILL)
                        record.kill_sent = now
                        record.save()
                time.sleep(0.2)
        finally:
            with self._lock:
                self._escalating.discard(name)

    def _signal(self, record: JobRecord, sig: signal.Signals) -> None:
        try:
            os.killpg(record.pid, sig)   # the child leads its own process group (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise JobError(f"cannot signal pid {record.pid} of run '{record.name}': {exc}") from exc

    def _monitor(self, child: subprocess.Popen, record: JobRecord) -> None:
        """Wait for our own child and write its exit code into job.json."""
        returncode = child.wait()
        with self._lock:
            current = JobRecord.load(record.output_dir) or record
            if current.pid == record.pid:
                current.ended, current.returncode = time.time(), returncode
                current.save()
            self._children.pop(child.pid, None)

    # ---------------------------------------------------------------- watching

    def is_running(self, record: JobRecord) -> bool:
        """Whether the job of `record` is still running (its process, not a reused pid)."""
        with self._lock:
            return self._alive(record)

    def _alive(self, record: JobRecord) -> bool:
        child = self._children.get(record.pid)
        if child is not None:
            return child.poll() is None
        if record.ended is not None:
            return False
        try:
            process = psutil.Process(record.pid)
            if abs(process.create_time() - record.create_time) > 1.0:
                return False   # the pid now belongs to another process
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def active(self) -> Optional[JobRecord]:
        """The record of the job that is running now in any run of this folder, or None."""
        with self._lock:
            for job_file in sorted(self.runs_dir.glob(f"*/{JOB_FILE}")):
                if not self.workspace.inside(job_file):   # a run linked from outside is not ours to watch
                    continue
                try:
                    record = JobRecord.load(job_file.parent)
                except JobError:
                    continue
                if record is not None and self._alive(record):
                    if record.stop_requested is not None:
                        self._start_escalation(record)   # re-attached after a restart mid-stop
                    return record
        return None

    def latest(self) -> Optional[JobRecord]:
        """The record of the job started last in this folder (running or not), or None."""
        records = []
        for job_file in self.runs_dir.glob(f"*/{JOB_FILE}"):
            if not self.workspace.inside(job_file):
                continue
            try:
                record = JobRecord.load(job_file.parent)
            except JobError:
                continue
            if record is not None:
                records.append(record)
        return max(records, key=lambda r: r.started, default=None)

    def record(self, name: str) -> Optional[JobRecord]:
        """The job record of run `name` (None: the run never had a job), checked to be inside the workspace."""
        run_dir = self.runs_dir / name
        self.workspace.checked(run_dir / JOB_FILE, "the job record")
        return JobRecord.load(run_dir)

    def recipe_state(self, name_or_dir: str | Path) -> Optional[RecipeState]:
        """The recipe.json of run `name_or_dir` (a name, or a run folder a job recorded), checked to be inside the
        workspace; None when the run is no recipe."""
        run_dir = self.runs_dir / name_or_dir   # an absolute folder stays itself
        self.workspace.checked(run_dir / STATE_FILE, "the recipe's state")
        return recipe_state(run_dir)

    def watched_folder(self, name: str, stage: Optional[str] = None) -> Path:
        """Where run `name` writes its metrics: its folder, or for a full recipe the folder of `stage` (one of its
        stages that has run), else of the stage running now (else of the last one that ran)."""
        run_dir = self.runs_dir / name
        state = self.recipe_state(name)
        if state is None:
            return run_dir
        picked = [r for r in state.stages if r.stage == stage and r.status != "pending"]
        current = picked[0] if picked else state.current()
        if current is None:
            return run_dir
        return self.workspace.checked(current.folder, "the recipe stage's folder")   # relative: to the job's folder

    def metrics(self, name: str, stage: Optional[str] = None) -> list[dict[str, Any]]:
        """Every complete row of the run's metrics.jsonl (`watched_folder`: a recipe's `stage`, else its running
        one; cached: only new lines are parsed)."""
        path = self.workspace.checked(self.watched_folder(name, stage) / METRICS_FILE, "the run's metrics log")
        with self._lock:
            tail = self._metrics.setdefault(path, _MetricsTail(path))
            return list(tail.read())

    def status(self, name: str) -> JobStatus:
        """Where the job of run `name` stands; 'idle' when the run never had one."""
        with self._lock:
            record = self.record(name)
            rows = self.metrics(name)
            if record is None:
                status = JobStatus(name=name, state="idle", message="no job has run here yet")
                _progress_from(rows, status, since=0.0)
                return status
            alive = self._alive(record)
            child = self._children.get(record.pid)
            if not alive and record.returncode is None and child is not None:
                record.returncode = child.returncode   # reaped, and the monitor is about to record it
            if alive and record.stop_requested is not None:
                self._start_escalation(record)
        status = JobStatus(name=name, state="running", stage=record.stage, pid=record.pid,
                           returncode=record.returncode,
                           log_tail=log_tail(self.workspace.checked(record.log_path, "the run's log")))
        terminal = _progress_from(rows, status, since=record.started - 1.0, running=alive)
        state = self.recipe_state(record.output_dir) if record.stage == RECIPE_STAGE else None
        current = state.current() if state is not None else None
        status.recipe_stage = current.stage if current is not None else None
        if alive:
            status.state = "stopping" if record.stop_requested is not None else "running"
            if record.kill_sent is not None:
                status.message = "stop requested: it did not end when asked twice, so its process was killed"
            elif record.term_sent is not None:
                status.message = (f"stop requested: it did not stop within {self.stop_grace_s:g} s, so the app asked "
                                  "its process to end")
            elif record.stop_requested is not None:
                status.message = "stop requested: finishing the step and writing a checkpoint"
            else:
                status.message = f"training (pid {record.pid})"
            return status
        if record.stage == RECIPE_STAGE:
            return _recipe_outcome(status, record, state, terminal)
        event = terminal.get("event") if terminal else None
        detail = str(terminal.get("message", "")) if terminal else ""
        # the exit code outranks an event: a job refused at once (exit 1) logs nothing of its own, and the
        # events just before its start may be those of the run it refused to write over
        exited = record.returncode in (None, EXIT_OK, EXIT_STOPPED)
        if event == "done" and record.returncode in (None, EXIT_OK):
            status.state, status.message = "finished", detail or "finished"
        elif (event == "stopped" and exited) or (record.stop_requested is not None and event is None):
            status.state = "stopped"
            forced = " (the process had to be killed)" if record.kill_sent else ""
            status.message = (detail or "stopped") + forced
        else:
            status.state = "failed" if record.returncode != 0 or event in ("nan", "oom", "error") else "finished"
            code = ("exit code unknown (it ended while the app was not running)" if record.returncode is None
                    else f"exit code {record.returncode}")
            own = detail if event in ("nan", "oom", "error") or exited else ""
            detail = own or error_line(status.log_tail)   # refused before it logged anything: its error line
            status.message = f"{code}: {detail}" if detail else f"{code}; see the log below"
        return status


_COMMAND_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \$ ")
"""The line `JobRunner.start` writes into the log before each job's own output."""


def error_line(log: str) -> str:
    """The last `error: ...` line the newest job wrote in its log (what `ira` prints when it refuses or fails
    without a traceback), without the prefix; "" when there is none."""
    lines = [line.strip() for line in log.splitlines()]
    starts = [i for i, line in enumerate(lines) if _COMMAND_LINE.match(line)]
    errors = [line for line in lines[(starts[-1] + 1 if starts else 0):] if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else ""


def _recipe_outcome(status: JobStatus, record: JobRecord, state: Optional[RecipeState],
                    terminal: Optional[dict[str, Any]]) -> JobStatus:
    """How an ended recipe went: its exit code says (the last stage's own events only say how that stage
    ended), recipe.json names the stage."""
    current = state.current() if state is not None else None
    where = f" in {STAGE_NAMES[current.stage]}" if current is not None else ""
    unknown = record.returncode is None   # it ended while the app was not running: recipe.json says how
    if record.returncode in (EXIT_OK, None) and state is not None and state.final_checkpoint():
        status.state, status.message = "finished", "full recipe done: every stage finished"
        status.last_checkpoint = state.final_checkpoint()
    elif (record.returncode == EXIT_STOPPED or (record.stop_requested is not None and record.returncode != EXIT_OK)
          or (unknown and current is not None and current.status == "stopped")):
        forced = " (the process had to be killed)" if record.kill_sent else ""
        status.state = "stopped"
        status.message = f"full recipe stopped{where}{forced}: Resume continues it there"
    else:
        status.state = "failed"
        code = ("exit code unknown (it ended while the app was not running)" if record.returncode is None
                else f"exit code {record.returncode}")
        detail = str(terminal.get("message", "")) if terminal and terminal.get("event") != "done" else ""
        detail = detail or error_line(status.log_tail)
        status.message = f"full recipe failed{where} ({code})" + (f": {detail}" if detail else "; see the log below")
    return status


def _progress_from(rows: list[dict[str, Any]], status: JobStatus, since: float,
                   running: bool = False) -> Optional[dict[str, Any]]:
    """Fill step, total, ETA, lr, samples and checkpoint from the metrics rows written after `since`.

    Returns the last terminal event (done, stopped, nan, oom, error) of that window, if any.
    """
    start: Optional[dict[str, Any]] = None
    last_train: Optional[dict[str, Any]] = None
    terminal: Optional[dict[str, Any]] = None
    for row in rows:
        if float(row.get("time", 0.0)) < since:
            continue
        event = row.get("event")
        if event == "start":
            start, terminal = row, None
        elif event in TERMINAL_EVENTS:
            terminal = row
        elif event == "samples":
            status.samples = [str(p) for p in row.get("paths", [])]
        elif event == "checkpoint":
            status.last_checkpoint = str(row.get("latest") or row.get("path"))
        if isinstance(row.get("step"), int):
            status.step = row["step"]
        if event is None and row.get("split") == "train":
            last_train = row
            if isinstance(row.get("lr"), (int, float)):
                status.lr = float(row["lr"])
    if start is not None:
        status.total_steps = start.get("total_steps")
        status.training_started = float(start.get("time", 0.0)) or None
        status.eval_every = start.get("eval_every") if isinstance(start.get("eval_every"), int) else None
    if running and start is not None and last_train is not None and status.total_steps:
        done = last_train["step"] - int(start.get("step", 0))
        elapsed = float(last_train["time"]) - float(start["time"])
        if done > 0 and elapsed > 0:
            status.steps_per_s = done / elapsed
            status.eta_s = max(0.0, (status.total_steps - last_train["step"]) * elapsed / done)
        budget = start.get("max_minutes")
        if isinstance(budget, (int, float)) and budget > 0:   # its time budget ends it first, whatever its steps say
            left = max(0.0, float(budget) * 60.0 - max(0.0, elapsed))
            status.eta_s = left if status.eta_s is None else min(status.eta_s, left)
    if terminal is not None and terminal.get("checkpoint"):
        status.last_checkpoint = str(terminal["checkpoint"])
    return terminal


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


_SAFE = re.compile(r"^[A-Za-z0-9_.:/=+,@-]+$")


def shell_quote(command: list[str]) -> str:
    """The command as one line a person can paste into a shell."""
    return " ".join(part if _SAFE.match(part) else "'" + part.replace("'", "'\\''") + "'" for part in command)
