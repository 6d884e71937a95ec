"""The one training loop every stage runs through (Hugging Face accelerate 1.x).

    result = Trainer(cfg, task, run_name="stage1").fit(resume_from=None)
    result.raise_for_status()   # or look at result.status: done | stopped | nan | oom

What it does, so the stages do not have to: device placement, mixed precision, DDP (the same code
under `torchrun` / `accelerate launch`), gradient accumulation and clipping, AdamW with weight
decay on matrices only, warm-up + cosine learning rate, validation every `eval_every` optimizer
steps and at the end, checkpoints every `save_every` steps, at each epoch end and at the end,
exact resume (weights, optimizer, schedule, RNG, position in the epoch), a NaN/inf guard (no checkpoint
with non-finite weights is ever written), an out-of-memory guard, stop requests (Ctrl-C, SIGTERM,
`<output_dir>/STOP`), one run per output folder (its lock), metrics.jsonl and a progress bar. See `ira.training.task` for the contract a stage implements.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import psutil
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs,
                              InitProcessGroupKwargs, gather_object, send_to_device, set_seed)
from accelerate.utils.environment import parse_flag_from_env
from torch import nn
from tqdm.auto import tqdm

from ira import peak_memory
from ira.checkpoint import (Checkpoint, CheckpointError, best_path, check_compatible, checkpoint_path, find_latest,
                            is_finite_checkpoint, latest_path, load_checkpoint, nonfinite_tensors,
                            remove_stale_temporaries, require_stage, stage_checkpoints)
from ira.config import TrainingConfig
from ira.hardware import resolve_device
from ira.training.checkpoint import link_latest, load_train_state, prune_checkpoints, save_checkpoint
from ira.training.metrics_log import MetricsLogger, memory_stats
from ira.training.optim import build_adamw, param_groups
from ira.training.rng import capture_rng_state, restore_rng_state, rng_isolated
from ira.training.run_folder import RunFolderError, RunFolderLock, claim_run_folder
from ira.training.schedule import budget_lr_factor, warmup_cosine
from ira.training.stop import StopRequest, drop_stale_flags
from ira.training.task import COUNT_KEYS, StageTask, batch_size

Status = Literal["done", "stopped", "nan", "oom"]
Clock = Callable[[], float]
"""Seconds from an arbitrary start (time.perf_counter); the time budget and the throughput read it, so a
test can hand the trainer a clock it moves itself."""
TRAIN_STATE_VERSION = 1
FP16_MAX_SKIPPED_STEPS = 25   # consecutive overflowing fp16 steps before we call it divergence
BARRIER_TIMEOUT = timedelta(hours=2)  # other ranks wait while rank 0 validates and writes samples


class _NonFiniteWeights(Exception):
    """Raised by `Trainer._save` instead of writing weights that hold NaN or inf; `_run` ends the run as diverged."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


class TrainingError(RuntimeError):
    """Raised by `FitResult.raise_for_status()` when a run ended on NaN/inf or out of memory."""

    def __init__(self, result: "FitResult"):
        super().__init__(result.message)
        self.result = result


@dataclass
class FitResult:
    status: Status
    message: str
    step: int                                   # optimizer steps done
    epoch: float                                # epochs done (fractional)
    last_checkpoint: Optional[Path]             # the newest good checkpoint (None if none yet)
    metrics_path: Path
    checkpoints_written: list[Path] = field(default_factory=list)   # by this process
    val_metrics: dict[str, float] = field(default_factory=dict)     # last validation (main process)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("done", "stopped")

    def raise_for_status(self) -> "FitResult":
        if not self.ok:
            raise TrainingError(self)
        return self


def device_type(cpu: bool = False) -> str:
    """"cuda", "mps" or "cpu": what accelerate will pick (ACCELERATE_USE_CPU=1 forces the CPU)."""
    if cpu or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def process_device(cpu: bool = False) -> torch.device:
    """The device the engine will train this process on (under DDP each rank has its LOCAL_RANK GPU), for
    what a stage prepares before the engine starts: the LLM loaded there once, the descriptions embedded there."""
    if cpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return resolve_device("auto")


def resolve_mixed_precision(setting: str, device: str, bf16_supported: Optional[bool] = None) -> str:
    """Map training.mixed_precision (auto|no|bf16|fp16) to what accelerate gets on this device.

    auto: bf16 on CUDA GPUs that support it (no loss scaling needed), fp16 with loss scaling on
    older CUDA GPUs, and full fp32 on CPU and Apple MPS: CPU autocast is slower than fp32 on most
    CPUs (no bf16 matrix units) and MPS autocast/GradScaler support is still partial, so fp32 is
    the one setting that trains reliably there.
    """
    if device == "cuda" and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if setting == "auto":
        if device == "cuda":
            return "bf16" if bf16_supported else "fp16"
        return "no"
    if setting == "fp16" and device != "cuda":
        raise ValueError(f"training.mixed_precision=fp16 needs a CUDA GPU, but this run is on {device}; "
                         f"use training.mixed_precision=auto or no")
    if setting == "bf16" and device == "cuda" and not bf16_supported:
        raise ValueError("training.mixed_precision=bf16: this GPU does not support bf16; "
                         "use training.mixed_precision=fp16 or auto")
    if setting == "bf16" and device == "mps":
        raise ValueError("training.mixed_precision=bf16 is not supported on Apple MPS by this trainer; "
                         "use training.mixed_precision=no (or auto)")
    return setting


def is_oom_error(exc: BaseException) -> bool:
    """CUDA OOM (torch.OutOfMemoryError), and the RuntimeErrors MPS and the CPU allocator raise."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _StepModule(nn.Module):
    """The trainable modules as one nn.Module whose forward is the task's training_step.

    DDP wraps this, so gradients of every trainable module are synchronised, and the forward
    runs under accelerate's autocast.
    """

    def __init__(self, task: StageTask, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._task = (task,)  # a tuple, so a task that is itself an nn.Module is not registered

    def forward(self, batch: Any) -> dict[str, Any]:
        return self._task[0].training_step(batch)


class _OnDevice:
    """A loader whose batches are moved to `device` (validation runs unsharded on rank 0)."""

    def __init__(self, loader: Any, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield send_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


def _set_epoch(obj: Any, epoch: int, seen: Optional[set[int]] = None, depth: int = 0) -> None:
    """Call set_epoch(epoch) on a loader and every (batch) sampler it wraps that has one."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 5:
        return
    seen.add(id(obj))
    if callable(getattr(obj, "set_epoch", None)):
        obj.set_epoch(epoch)
    for attr in ("batch_sampler", "sampler"):
        _set_epoch(getattr(obj, attr, None), epoch, seen, depth + 1)


@contextmanager
def _eval_mode(modules: dict[str, nn.Module]) -> Iterator[None]:
    """eval() for validation; afterwards every submodule gets back its own previous mode."""
    modes = [(m, m.training) for module in modules.values() for m in module.modules()]
    for module in modules.values():
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class _Progress:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # epochs completed
    batches_in_epoch: int = 0     # micro-batches of the current epoch consumed (per process)
    last_saved_step: int = -1
    last_eval_step: int = -1
    last_checkpoint: Optional[Path] = None
    skipped_fp16: int = 0
    elapsed_before: float = 0.0   # wall-clock seconds of earlier runs this one resumed (time budget)
    best_value: Optional[float] = None   # the task's best_metric at its best validation so far
    best_step: int = -1
    since_best: int = 0           # validations since that best (early stopping)
    best_pending: bool = False    # this step's validation is a new best: save it as stage{S}_best
    early_stop: Optional[str] = None  # why the run ends early (patience exhausted)


class _Window:
    """Sums over the steps since the last log line (device tensors: no sync per micro-step)."""

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.samples = 0.0
        self.frames = 0.0
        self.grad_norm = 0.0
        self.steps = 0
        self.clock = clock
        self.t0 = clock()

    def add(self, out: dict[str, Any], batch: Any) -> None:
        for key, value in out.items():
            if key in COUNT_KEYS:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean()
            elif not isinstance(value, (int, float)):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.micro += 1
        self.samples += float(out.get("samples", batch_size(batch)))
        if "frames" in out:
            self.frames += float(out["frames"])

    def exclude(self, seconds: float) -> None:
        """Leave time that was not training (validation, checkpoints) out of the throughput."""
        self.t0 += seconds

    def seconds(self) -> float:
        """The window's training time so far (what the throughput divides by; never 0)."""
        return max(self.clock() - self.t0, 1e-9)


class Trainer:
    """Runs a `StageTask` (see ira.training.task) with the settings in `cfg.training`."""

    def __init__(self, cfg: Any, task: StageTask, run_name: Optional[str] = None, *, cpu: bool = False,
                 clock: Clock = time.perf_counter):
        """`cpu=True` forces the CPU even where a GPU is present (tests, debugging); `clock` is what the time
        budget (training.max_minutes) and the throughput are measured by."""
        if not str(getattr(task, "stage", "")):
            raise ValueError(f"{type(task).__name__}.stage must be set ('1', '2', '3' or 'style')")
        self.cfg = cfg
        self.task = task
        self.stage = str(task.stage)
        self.run_name = run_name or f"stage{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.cpu = cpu
        self.clock = clock
        self.output_dir = Path(cfg.training.output_dir)
        self.accelerator: Optional[Accelerator] = None
        self.progress = _Progress()
        self.total_steps = 0
        self.checkpoints_written: list[Path] = []
        self.val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ public

    def fit(self, resume_from: Optional[str | Path] = None) -> FitResult:
        """Train until max_steps / num_epochs, a stop request, NaN/inf or out of memory.

        `resume_from`: a checkpoint of this stage written by this trainer (with its
        .train_state.pt side file), or "latest" for `<output_dir>/stage{stage}_latest.safetensors`;
        the run continues exactly where it was saved.

        The run holds `output_dir` until it returns or raises: RunFolderError (nothing written) when another run
        holds it, when it is a file, or when a fresh run would write over the checkpoints of an earlier run of
        this stage there (ira.training.run_folder).
        """
        t_start = time.time()
        tc = self.cfg.training
        self.progress, self.checkpoints_written, self.val_metrics = _Progress(), [], {}
        dev = device_type(self.cpu)
        self.precision = resolve_mixed_precision(tc.mixed_precision, dev)
        acc = Accelerator(
            cpu=self.cpu,
            mixed_precision=self.precision,
            gradient_accumulation_steps=tc.grad_accum_steps,
            # The sampler's permutation depends only on (seed, epoch): the same on every rank
            # (BatchSamplerShard then deals the batches out) and again after a resume.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed),
            step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not batches
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    find_unused_parameters=bool(getattr(self.task, "find_unused_parameters", False))),
                InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT),
            ],
        )
        self.accelerator = acc
        try:
            lock = self._claim_output_dir(resume_from)
            try:
                status, message = self._fit_in_claimed_folder(resume_from, lock)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            self._release(acc)
        return FitResult(status=status, message=message, step=self.progress.step,
                         epoch=self._epoch_float(), last_checkpoint=self.progress.last_checkpoint,
                         metrics_path=self.logger.path, checkpoints_written=list(self.checkpoints_written),
                         val_metrics=dict(self.val_metrics), elapsed_s=round(time.time() - t_start, 3))

    def _claim_output_dir(self, resume_from: Optional[str | Path]) -> Optional[RunFolderLock]:
        """The main process locks training.output_dir and checks that this run writes over no other run's
        checkpoints (ira.training.run_folder); every rank learns the outcome, so all refuse together."""
        acc = self.accelerator
        lock: Optional[RunFolderLock] = None
        refused: Optional[RunFolderError] = None
        if acc.is_main_process:
            resuming = latest_path(self.output_dir, self.stage) if str(resume_from) == "latest" else resume_from
            try:
                lock = claim_run_folder(self.output_dir, self.stage, resuming)
            except RunFolderError as exc:
                refused = exc
        if acc.num_processes > 1:
            flag = torch.tensor(float(refused is not None), device=acc.device)
            dist.broadcast(flag, src=0)
            if bool(flag) and refused is None:
                refused = RunFolderError(f"the main process refused training.output_dir={self.output_dir} "
                                         f"(its error says why)")
        if refused is not None:
            raise refused
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return lock

    def _fit_in_claimed_folder(self, resume_from: Optional[str | Path],
                               lock: Optional[RunFolderLock]) -> tuple[Status, str]:
        """The run itself, once its folder is its own: metrics, stop requests, the loop, the OOM guard."""
        acc, tc = self.accelerator, self.cfg.training
        self.logger = MetricsLogger(
            self.output_dir, self.stage, enabled=acc.is_main_process,
            tensorboard_dir=(self.output_dir / "tensorboard" / self.run_name) if tc.tensorboard else None)
        try:
            with StopRequest(self.output_dir, watch_file=acc.is_main_process,
                             also=[tc.stop_file] if tc.stop_file else ()) as stop:
                self.stop = stop
                if acc.is_main_process:
                    self._note_stale_lock(lock)
                    self._drop_stale_stop_file()
                    self._drop_stale_temporaries()
                try:
                    return self._run(resume_from)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    message = self._oom_message(exc)
                    del exc
                    self._free_after_oom()
                    self.logger.event("oom", step=self.progress.step, message=message,
                                      last_checkpoint=self.progress.last_checkpoint)
                    self._say(message)
                    return "oom", message
        except BaseException as exc:
            self.logger.event("error", step=self.progress.step,
                              message=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.logger.close()

    # ------------------------------------------------------------------ setup

    def _run(self, resume_from: Optional[str | Path]) -> tuple[Status, str]:
        acc, tc, task = self.accelerator, self.cfg.training, self.task
        if resume_from is not None and str(resume_from) == "latest":
            resume_from = find_latest(self.output_dir, self.stage)
            if resume_from is None:
                raise CheckpointError(f"resume_from='latest': there is no "
                                      f"{latest_path(self.output_dir, self.stage)} to resume from")
        ckpt, state = self._read_resume(resume_from) if resume_from else (None, None)
        set_seed(tc.seed, device_specific=True)

        self.modules = dict(task.modules())
        if not self.modules:
            raise ValueError(f"{type(task).__name__}.modules() returned no modules")
        if ckpt is not None:
            for name, module in self.modules.items():
                ckpt.load_into(name, module, current_config=self.cfg)
        groups = param_groups(task.trainable_parameters(), self.modules, tc.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{type(task).__name__}.trainable_parameters() has no parameter that "
                             f"requires grad: nothing to train")
        trainable = self._trainable_modules()
        for name, module in self.modules.items():
            module.to(acc.device)
            module.train(name in trainable)
        task.setup(acc.device)

        optimizer = build_adamw(groups, tc.learning_rate, acc.device.type)
        loader = task.train_dataloader()
        step_module, optimizer, loader = acc.prepare(
            _StepModule(task, {n: self.modules[n] for n in trainable}), optimizer, loader)
        self.step_module, self.optimizer, self.train_loader = step_module, optimizer, loader
        # Batches per epoch may change with the epoch (length-bucketing samplers): count each.
        self.total_steps = tc.max_steps or sum(
            math.ceil(self._epoch_len(e) / tc.grad_accum_steps) for e in range(tc.num_epochs))
        self.n_batches = self._epoch_len(0)
        self.scheduler = warmup_cosine(optimizer.optimizer, tc.warmup_steps, self.total_steps,
                                       tc.min_lr_ratio)
        self.val_loader = task.val_dataloader()

        rng_pending = self._restore(state) if state is not None else None
        p = self.progress
        if ckpt is not None:
            p.last_checkpoint = ckpt.path
        self.logger.event(
            "start", run_name=self.run_name, step=p.step, epoch=self._epoch_float(),
            total_steps=self.total_steps, batches_per_epoch=self.n_batches,
            grad_accum_steps=tc.grad_accum_steps, eval_every=tc.eval_every, max_minutes=tc.max_minutes,
            num_processes=acc.num_processes, device=str(acc.device), mixed_precision=self.precision,
            trainable_params=sum(q.numel() for q in self.params),
            modules={n: ("trained" if n in trainable else "frozen") for n in self.modules},
            resumed_from=str(resume_from) if resume_from else None, pid=os.getpid())
        if tc.warmup_steps >= self.total_steps and acc.is_main_process:
            self.logger.event("warning", message=f"training.warmup_steps ({tc.warmup_steps}) >= total "
                              f"steps ({self.total_steps}): the learning rate never reaches its peak")
        if p.step >= self.total_steps:
            message = (f"Nothing to do: the run is already at step {p.step} of {self.total_steps}; "
                       f"raise training.max_steps or training.num_epochs to train further.")
            self.logger.event("done", step=p.step, message=message, checkpoint=p.last_checkpoint)
            return "done", message
        try:
            return self._loop(rng_pending)
        except _NonFiniteWeights as exc:
            return self._weights_diverged(exc.names)

    def _trainable_modules(self) -> list[str]:
        owned: dict[int, str] = {}
        for name, module in self.modules.items():
            for q in module.parameters():
                owned.setdefault(id(q), name)
        orphans = [q for q in self.params if id(q) not in owned]
        if orphans:
            raise ValueError(
                f"trainable_parameters() returned {len(orphans)} parameter(s) that belong to no module "
                f"in modules(); add their module to modules() so they are saved and synchronised")
        return sorted({owned[id(q)] for q in self.params}, key=list(self.modules).index)

    def _epoch_len(self, epoch: int) -> int:
        """Batches (per process) the training loader yields in `epoch`; sets the loader's epoch."""
        loader = self.train_loader
        _set_epoch(loader, epoch)
        try:
            n = len(loader)
        except TypeError as exc:
            raise ValueError("the training DataLoader has no length (an IterableDataset?); the trainer "
                             "needs a map-style dataset to count epochs and resume exactly") from exc
        if n == 0:
            raise ValueError(f"the training DataLoader yields no batches (dataset of {len(loader.dataset)} "
                             f"samples; with drop_last a dataset smaller than the batch gives none): "
                             f"lower training.batch_size or add data")
        return n

    def _read_resume(self, path: str | Path) -> tuple[Checkpoint, dict[str, Any]]:
        ckpt = load_checkpoint(path)
        require_stage(ckpt, {self.stage}, purpose=f"resuming stage {self.stage}")
        meta = self.task.checkpoint_metadata()
        check_compatible(ckpt, codec_fingerprint=meta.get("codec_fingerprint"))
        state = load_train_state(path, checkpoint_id=ckpt.checkpoint_id)
        if state.get("format_version", 0) > TRAIN_STATE_VERSION:
            raise CheckpointError(f"{path}: training state format {state['format_version']} is newer "
                                  f"than this IRA understands ({TRAIN_STATE_VERSION}); upgrade IRA")
        missing = [n for n in self.task.modules() if n not in ckpt.modules]
        if missing:
            raise CheckpointError(f"{path} has no weights for module(s) {missing} (it holds "
                                  f"{ckpt.modules}); it was written by a different task")
        return ckpt, state

    def _restore(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Optimizer, schedule, scaler, task state and counters; returns this rank's RNG state."""
        acc, tc, p = self.accelerator, self.cfg.training, self.progress
        configured = [(g["initial_lr"], g["weight_decay"]) for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise CheckpointError(f"the optimizer state in the checkpoint does not fit the trainable "
                                  f"parameters ({exc}); did the task's trainable set change?") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        # A resumed run honours today's learning rate / weight decay (e.g. lowered after a NaN).
        changed = []
        for group, base, (lr, wd) in zip(self.optimizer.param_groups, list(self.scheduler.base_lrs),
                                         configured):
            if base != lr:
                changed.append(f"lr {base:g} -> {lr:g}")
            group["weight_decay"] = wd
            group["initial_lr"] = lr
        if changed:
            self.scheduler.base_lrs = [lr for lr, _ in configured]
            for group, lr, lam in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      self.scheduler.lr_lambdas):
                group["lr"] = lr * lam(self.scheduler.last_epoch)
            self.logger.event("warning", message="resumed with a new learning rate: " + ", ".join(changed))
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state.get("task", {}))
        data = state["data"]
        p.step, p.epoch = int(state["step"]), int(data["epoch"])
        p.batches_in_epoch = int(data["batches_in_epoch"])
        self.n_batches = self._epoch_len(p.epoch)
        if data["n_batches"] != self.n_batches and p.batches_in_epoch:
            old = p.batches_in_epoch
            p.batches_in_epoch = (old * self.n_batches) // data["n_batches"]
            self.logger.event("warning", message=(
                f"batches per epoch changed ({data['n_batches']} -> {self.n_batches}: batch size or "
                f"process count differs); the position in epoch {p.epoch} is approximated "
                f"({old} -> {p.batches_in_epoch} batches), so the resume is not bit-exact"))
        p.last_saved_step = p.step
        best = state.get("best") or {}
        key = self.task.best_metric[0]
        if best.get("value") is not None and best.get("name", key) != key:
            # the task picks its best by another figure here (e.g. stage 3 without the ASR that chose it
            # before): comparing the two would be meaningless, so the best starts over
            self.logger.event("warning", message=(
                f"the best so far was chosen by {best['name']}, this run chooses by {key}: the best starts over"))
            best = {}
        p.best_value, p.best_step = best.get("value"), int(best.get("step", -1))
        p.since_best = int(best.get("since", 0))
        p.elapsed_before = float(state.get("elapsed_s", 0.0))
        rngs = state.get("rng") or []
        if acc.process_index < len(rngs):
            return rngs[acc.process_index]
        set_seed(tc.seed + p.step, device_specific=True)
        return None

    # ------------------------------------------------------------------ the loop

    def _loop(self, rng_pending: Optional[dict[str, Any]]) -> tuple[Status, str]:
        acc, tc, p = self.accelerator, self.cfg.training, self.progress
        step_loss = torch.zeros((), device=acc.device)
        lr = self.optimizer.param_groups[0]["lr"]
        bar = self._progress_bar()
        self._t0 = self.clock()
        # a fresh run only (nothing saved or restored yet): a resume, even from the step-0 save, has done it
        if p.step == 0 and p.last_saved_step < 0 and getattr(self.task, "validate_at_start", False):
            self._validate()        # the starting weights: the best to beat
            if p.best_pending:
                self._save("best")
        window = _Window(self.clock)   # after that validation: the first throughput figure is of training alone
        heap_cap = peak_memory.HeapCap()
        try:
            while True:
                self.n_batches = self._epoch_len(p.epoch)
                skip = p.batches_in_epoch
                loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                _set_epoch(loader, p.epoch)
                # After a resume the RNG state saved with the checkpoint is restored where the
                # uninterrupted run stood when it saved: before the epoch's iterator is created
                # (which draws a seed) when resuming at an epoch start, else just before the
                # next step.
                if rng_pending is not None and not skip:
                    restore_rng_state(rng_pending)
                    rng_pending = None
                for batch in loader:
                    if rng_pending is not None:
                        restore_rng_state(rng_pending)
                        rng_pending = None
                    p.batches_in_epoch += 1
                    with acc.accumulate(self.step_module):
                        out = self._forward(batch)
                        acc.backward(out["loss"])
                        window.add(out, batch)
                        step_loss += out["loss"].detach().float()
                        if not acc.sync_gradients:
                            continue
                        grad_norm = acc.clip_grad_norm_(self.params, tc.grad_clip)
                        failure, stop_reason = self._agree(step_loss, grad_norm)
                        if failure:
                            return self._diverged(failure, step_loss, grad_norm)
                        lr = self.optimizer.param_groups[0]["lr"]
                        self.optimizer.step()
                        self.scheduler.step()
                        self._apply_time_budget(p.step + 1)
                        self.optimizer.zero_grad(set_to_none=True)
                    p.step += 1
                    heap_cap()
                    self._advance_bar(bar)
                    window.steps += 1
                    window.grad_norm += float(grad_norm)
                    step_loss.zero_()
                    epoch_end = p.batches_in_epoch == self.n_batches
                    if epoch_end:
                        p.epoch += 1
                        p.batches_in_epoch = 0
                    used = self._budget_used()
                    out_of_time = used is not None and used >= 1.0
                    if used is not None:
                        self.task.on_budget_used(used)
                    finished = p.step >= self.total_steps or out_of_time

                    if p.step % tc.log_every == 0 or p.step == 1 or finished:   # step 1: a curve from the start
                        self._log_train(window, lr, bar)
                        window = _Window(self.clock)
                    paused = self.clock()
                    if (p.step % tc.eval_every == 0 and not stop_reason) or finished:
                        self._validate()
                        finished = finished or p.early_stop is not None
                    if epoch_end or finished or stop_reason or p.step % tc.save_every == 0:
                        reason = ("epoch" if epoch_end else "stop" if stop_reason
                                  else "end" if finished else "every")
                        self._save(reason)
                    if p.best_pending:
                        self._save("best")
                    window.exclude(self.clock() - paused)
                    if stop_reason:
                        return self._stopped(stop_reason)
                    if finished:
                        return self._done(out_of_time)
                if p.batches_in_epoch:  # the epoch-end step never came: a loader shorter than len()
                    raise RuntimeError(
                        f"the training loader yielded {p.batches_in_epoch} batches in epoch {p.epoch} "
                        f"but its len() is {self.n_batches}; len() must match what it yields")
        finally:
            bar.close()

    def _progress_bar(self) -> Any:
        """The terminal's bar: with a time budget (training.max_minutes) it counts the budget's minutes, which
        end the run (a step total from the epochs, 118800 for a 50-minute stage 1, would say 21 hours); else the
        steps."""
        p, tc = self.progress, self.cfg.training
        common = dict(disable=not self.accelerator.is_main_process, desc=f"stage {self.stage}", dynamic_ncols=True,
                      mininterval=1.0)
        if tc.max_minutes is None:
            return tqdm(total=self.total_steps, initial=p.step, unit="step", **common)
        bar = tqdm(total=float(tc.max_minutes), initial=min(p.elapsed_before / 60.0, float(tc.max_minutes)),
                   unit="min", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} min of its budget "
                                          "[{elapsed}<{remaining}{postfix}]", **common)
        bar.set_postfix(step=p.step, refresh=False)
        return bar

    def _advance_bar(self, bar: Any) -> None:
        """One step done: the step count, or the budget's minutes spent so far (the same clock that ends the run;
        the step is in the bar's postfix, set with each logged loss)."""
        tc = self.cfg.training
        if tc.max_minutes is None:
            bar.update(1)
            return
        bar.update(max(0.0, min(self._elapsed() / 60.0, float(tc.max_minutes)) - bar.n))

    def _forward(self, batch: Any) -> dict[str, Any]:
        out = self.step_module(batch)
        loss = out.get("loss") if isinstance(out, dict) else None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{type(self.task).__name__}.training_step must return a dict with a scalar "
                            f"'loss' tensor; got {type(out).__name__}"
                            + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
        if not loss.requires_grad:
            raise RuntimeError(f"{type(self.task).__name__}.training_step returned a loss that does not "
                               f"require grad: it must be computed from the trainable modules")
        return out

    def _agree(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[Optional[str], Optional[str]]:
        """One small all-reduce per optimizer step: every rank learns of a NaN or a stop request
        anywhere, so all stop at the same step (no rank left waiting in a collective)."""
        acc = self.accelerator
        bad_loss = ~torch.isfinite(step_loss)
        bad_grad = ~torch.isfinite(torch.as_tensor(grad_norm, device=acc.device, dtype=torch.float32))
        local_stop = self.stop.reason() is not None
        flags = torch.stack([bad_loss.float(), bad_grad.float(),
                             torch.tensor(float(local_stop), device=acc.device)])
        if acc.num_processes > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad, stop = (bool(x) for x in flags.tolist())
        if stop and not local_stop:
            self.stop.request("stop requested on another process")
        reason = self.stop.reason()
        if loss_bad:
            return "loss", reason
        if grad_bad:
            # fp16's loss scaler expects overflowing gradients now and then: it skips the step
            # and lowers the scale. Only a long run of them means divergence.
            self.progress.skipped_fp16 += 1
            if acc.scaler is not None and self.progress.skipped_fp16 <= FP16_MAX_SKIPPED_STEPS:
                return None, reason
            return "gradient norm", reason
        self.progress.skipped_fp16 = 0
        return None, reason

    # ------------------------------------------------------------------ outcomes

    def _diverged(self, what: str, step_loss: torch.Tensor, grad_norm: Any) -> tuple[Status, str]:
        """The loss or the gradient of this step is NaN/inf: stop before the update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(step_loss) / self.cfg.training.grad_accum_steps
        return self._stop_diverged(self.progress.step + 1,
                                   f"the {what} is not finite (loss {loss:g}, grad norm {float(grad_norm):g})",
                                   what=what, loss=loss, grad_norm=float(grad_norm))

    def _weights_diverged(self, names: list[str]) -> tuple[Status, str]:
        """An update left weights NaN/inf (a finite loss and gradient, too large a step): nothing was saved."""
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return self._stop_diverged(self.progress.step, f"{len(names)} weight tensor(s) are not finite after the "
                                                       f"update ({shown}), so they were not saved",
                                   what="weights", tensors=names[:20])

    def _stop_diverged(self, step: int, problem: str, **event: Any) -> tuple[Status, str]:
        """End the run as "nan": name the newest checkpoint whose weights are really finite, and what to change."""
        tc, p = self.cfg.training, self.progress
        last = self._last_good_checkpoint()
        if last is not None:
            keep, then = (f"The last good checkpoint (finite weights) is {last}; nothing was saved after the problem.",
                          f"; then resume with --resume_checkpoint {last}.")
        elif stage_checkpoints(self.output_dir, self.stage):
            keep, then = (f"No checkpoint in {self.output_dir} has finite weights.",
                          "; then start anew with another training.output_dir.")
        else:
            keep, then = "No checkpoint had been saved yet.", "; then start the run again."
        tips = [f"a lower training.learning_rate (e.g. {self._lower_learning_rate():g}; now {tc.learning_rate:g})",
                f"a longer training.warmup_steps (now {tc.warmup_steps})"]
        if self.precision != "no":
            tips.append(f"full fp32 with training.mixed_precision=no (now {self.precision})")
        tips.append(f"a smaller training.grad_clip (now {tc.grad_clip:g})")
        message = f"Training stopped at step {step}: {problem}. {keep} Try {', '.join(tips)}{then}"
        self.logger.event("nan", step=step, epoch=self._epoch_float(), last_checkpoint=last, message=message, **event)
        self._say(message)
        p.last_checkpoint = last
        return "nan", message

    def _lower_learning_rate(self) -> float:
        """Half the learning rate that diverged, or the default where that is no real number."""
        lr = self.cfg.training.learning_rate
        return lr / 2 if math.isfinite(lr) and lr > 0 else TrainingConfig.learning_rate

    def _last_good_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint of this stage whose weights are all finite: this run's last save (or the one it
        resumed), else the folder's newest. Each is read again, not trusted: a checkpoint that an older IRA wrote
        may hold the NaN it diverged with."""
        candidates = [self.progress.last_checkpoint, latest_path(self.output_dir, self.stage),
                      *stage_checkpoints(self.output_dir, self.stage)]
        seen: set[Path] = set()
        for candidate in candidates:
            if candidate is None or Path(candidate) in seen:
                continue
            seen.add(Path(candidate))
            if is_finite_checkpoint(candidate):
                return Path(candidate)
        return None

    def _nonfinite_weights(self) -> list[str]:
        """The module tensors that hold NaN or inf (every rank agrees: one all-reduce)."""
        acc = self.accelerator
        flat = {f"{name}.{key}": t.detach() for name, module in self.modules.items()
                for key, t in module.state_dict().items()}
        bad = nonfinite_tensors(flat)
        if acc.num_processes > 1:
            flag = torch.tensor(float(bool(bad)), device=acc.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bool(flag) and not bad:
                bad = ["(weights of another process)"]
        return bad

    def _stopped(self, reason: str) -> tuple[Status, str]:
        p = self.progress
        if self.accelerator.is_main_process:
            self.stop.clear_flag_file()
        message = f"Stopped at step {p.step} ({reason}); checkpoint {p.last_checkpoint}."
        self.logger.event("stopped", step=p.step, epoch=self._epoch_float(), reason=reason,
                          checkpoint=p.last_checkpoint, message=message)
        return "stopped", message

    def _done(self, out_of_time: bool = False) -> tuple[Status, str]:
        p = self.progress
        why = (f" ({p.early_stop})" if p.early_stop else
               f" (the {self.cfg.training.max_minutes:g}-minute budget is spent)" if out_of_time else "")
        best = (f"; best {self.task.best_metric[0]} {p.best_value:.4g} at step {p.best_step}: "
                f"{best_path(self.output_dir, self.stage)}" if p.best_value is not None else "")
        message = (f"Finished {p.step} steps ({self._epoch_float():.2f} epochs){why}; "
                   f"checkpoint {p.last_checkpoint}{best}.")
        self.logger.event("done", step=p.step, epoch=self._epoch_float(), checkpoint=p.last_checkpoint,
                          val=self.val_metrics, message=message)
        return "done", message

    def _oom_message(self, exc: BaseException) -> str:
        tc, p = self.cfg.training, self.progress
        last = p.last_checkpoint or self._existing_latest()
        device = self.accelerator.device if self.accelerator else "?"
        tips = [f"training.batch_size={max(1, tc.batch_size // 2)} with training.grad_accum_steps="
                f"{tc.grad_accum_steps * 2} (the same effective batch)"]
        if tc.max_batch_frames:
            tips.append(f"a smaller training.max_batch_frames (now {tc.max_batch_frames})")
        if self.precision == "no" and device_type(self.cpu) == "cuda":
            tips.append("training.mixed_precision=auto")
        tips.append("the laptop or cpu preset (--preset laptop / --preset cpu)")
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        resume = (f" Resume from {last} with --resume_checkpoint." if last
                  else " No checkpoint had been saved yet.")
        return (f"Out of memory on {device} at step {p.step + 1} with training.batch_size="
                f"{tc.batch_size}, grad_accum_steps={tc.grad_accum_steps}, mixed_precision="
                f"{self.precision} ({first_line}). Try {'; or '.join(tips)}.{resume}")

    def _free_after_oom(self) -> None:
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()
        if self.progress.last_checkpoint is None:
            self.progress.last_checkpoint = self._existing_latest()

    # ------------------------------------------------------------------ logging, validation, saving

    def _log_train(self, window: _Window, lr: float, bar: Any) -> None:
        acc = self.accelerator
        keys = sorted(window.sums)
        device = acc.device
        values = [torch.as_tensor(window.sums[k], device=device, dtype=torch.float32) for k in keys]
        counts = torch.tensor([window.micro, window.samples, window.frames], device=device,
                              dtype=torch.float32)
        packed = torch.cat([torch.stack(values) if values else torch.zeros(0, device=device), counts])
        if acc.num_processes > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        totals = packed.tolist()
        micro, samples, frames = totals[-3:]
        elapsed = window.seconds()
        record: dict[str, Any] = {k: v / max(micro, 1) for k, v in zip(keys, totals)}
        record["lr"] = lr
        record["grad_norm"] = window.grad_norm / max(window.steps, 1)
        record["throughput"] = {"samples_per_s": round(samples / elapsed, 3)}
        if frames:
            record["throughput"]["frames_per_s"] = round(frames / elapsed, 1)
        record["memory"] = memory_stats(device)
        self.logger.metrics("train", self.progress.step, self._epoch_float(), record)
        if "loss" in record:
            bar.set_postfix(step=self.progress.step, loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

    def _validate(self) -> None:
        acc, p = self.accelerator, self.progress
        p.last_eval_step = p.step
        if self.val_loader is None:
            return
        if acc.is_main_process:
            with rng_isolated(), torch.no_grad(), _eval_mode(self.modules):
                with acc.autocast():
                    metrics = self.task.validate(_OnDevice(self.val_loader, acc.device))
                self.val_metrics = {k: float(v) for k, v in metrics.items()}
                self._track_best()
                self.logger.metrics("val", p.step, self._epoch_float(), self.val_metrics)
                out_dir = self.output_dir / "samples" / f"stage{self.stage}_step{p.step}"
                out_dir.mkdir(parents=True, exist_ok=True)
                paths = [str(x) for x in self.task.on_validation_end(p.step, out_dir)]
            if paths:
                self.logger.event("samples", step=p.step, dir=out_dir, paths=paths)
            else:
                try:
                    out_dir.rmdir()  # leave no empty folders behind
                except OSError:
                    pass
        acc.wait_for_everyone()
        if acc.num_processes > 1:   # every rank saves the best and stops early with rank 0
            flags = torch.tensor([float(p.best_pending), float(p.early_stop is not None)], device=acc.device)
            dist.broadcast(flags, src=0)
            p.best_pending = bool(flags[0])
            if bool(flags[1]) and p.early_stop is None:
                p.early_stop = "early stop decided on the main process"

    def _track_best(self) -> None:
        """Compare this validation with the best so far (the task's best_metric); decide early stopping."""
        p, tc = self.progress, self.cfg.training
        key, mode = self.task.best_metric
        value = self.val_metrics.get(key)
        if value is None or not math.isfinite(value) or not self.task.may_be_best():
            return
        better = p.best_value is None or (value < p.best_value if mode == "min" else value > p.best_value)
        if better:
            p.best_value, p.best_step, p.since_best, p.best_pending = value, p.step, 0, True
            self.val_metrics[f"best_{key}"] = value
            return
        p.since_best += 1
        self.val_metrics[f"best_{key}"] = p.best_value
        if tc.early_stop_patience and p.since_best >= tc.early_stop_patience:
            p.early_stop = (f"early stop: {key} has not improved for {p.since_best} validations; "
                            f"the best was {p.best_value:.4g} at step {p.best_step}")

    def _elapsed(self) -> float:
        """Wall-clock seconds of this run so far, earlier runs it resumed included."""
        return self.progress.elapsed_before + self.clock() - self._t0

    def _budget_used(self) -> Optional[float]:
        """The share of training.max_minutes spent so far (rank 0's clock, so that every rank ends, and
        switches phases, at the same step); None without a time budget."""
        budget, acc = self.cfg.training.max_minutes, self.accelerator
        if budget is None:
            return None
        used = torch.tensor(self._elapsed() / (budget * 60.0), dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            dist.broadcast(used, src=0)
        return float(used)

    def _apply_time_budget(self, next_step: int) -> None:
        """With training.max_minutes, set the learning rate of the next step from `budget_lr_factor`."""
        tc = self.cfg.training
        if tc.max_minutes is None:
            return
        factor = budget_lr_factor(next_step, self._elapsed(), tc.max_minutes * 60.0, tc.warmup_steps,
                                  self.total_steps, tc.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor

    def _save(self, reason: str) -> None:
        acc, p, tc = self.accelerator, self.progress, self.cfg.training
        if p.last_saved_step == p.step and p.last_checkpoint is not None:
            if p.best_pending:   # this step is saved already: the best is that file
                if acc.is_main_process:
                    link_latest(latest_path(self.output_dir, self.stage), best_path(self.output_dir, self.stage))
                p.best_pending = False
            return
        bad = self._nonfinite_weights()
        if bad:
            raise _NonFiniteWeights(bad)
        rng = capture_rng_state()
        rngs = gather_object([rng]) if acc.num_processes > 1 else [rng]
        path = (checkpoint_path(self.output_dir, self.stage, epoch=p.epoch) if reason == "epoch"
                else checkpoint_path(self.output_dir, self.stage, step=p.step))
        latest = latest_path(self.output_dir, self.stage)
        if acc.is_main_process:
            train_state = {
                "format_version": TRAIN_STATE_VERSION,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": rngs,
                "task": self.task.state_dict(),
                "data": {"epoch": p.epoch, "batches_in_epoch": p.batches_in_epoch,
                         "n_batches": self.n_batches, "num_processes": acc.num_processes},
                "total_steps": self.total_steps,
                "run_name": self.run_name,
                "elapsed_s": self._elapsed(),
                "best": {"value": p.best_value, "step": p.best_step, "since": p.since_best,
                         "name": self.task.best_metric[0]},
            }
            save_checkpoint(path, self.modules, stage=self.stage, epoch=p.epoch, step=p.step,
                            config=self.cfg, metadata={**self.task.checkpoint_metadata(), **self._metric_metadata()},
                            train_state=train_state)
            link_latest(path, latest)
            if p.best_pending:
                link_latest(path, best_path(self.output_dir, self.stage))
            prune_checkpoints(self.output_dir, self.stage, tc.keep_step_checkpoints)
            prune_checkpoints(self.output_dir, self.stage, tc.keep_epoch_checkpoints, kind="epoch")
            self.checkpoints_written.append(path)
            self.logger.event("checkpoint", step=p.step, epoch=self._epoch_float(), reason=reason,
                              path=path, latest=latest)
        acc.wait_for_everyone()
        # The step file may be pruned later; latest always holds this save.
        p.last_checkpoint = path if reason == "epoch" else latest
        p.last_saved_step = p.step
        p.best_pending = False

    # ------------------------------------------------------------------ helpers

    def _metric_metadata(self) -> dict[str, str]:
        """The task's best-checkpoint metric at the last validation, for the checkpoint's header: the app
        labels its checkpoint lists with it ("stage 2 · step 1200 · val_choice_accuracy 0.72")."""
        key, mode = self.task.best_metric
        value = self.val_metrics.get(key)
        if value is None or self.progress.last_eval_step < 0 or not math.isfinite(value):
            return {}
        return {"metric": json.dumps({"name": key, "value": value, "mode": mode, "step": self.progress.last_eval_step})}

    def _epoch_float(self) -> float:
        p = self.progress
        n = getattr(self, "n_batches", 0)
        return p.epoch + (p.batches_in_epoch / n if n else 0.0)

    def _existing_latest(self) -> Optional[Path]:
        latest = latest_path(self.output_dir, self.stage)
        return latest if latest.is_file() else None

    def _note_stale_lock(self, lock: Optional[RunFolderLock]) -> None:
        """Say so when the folder's lock was left by a run that ended without releasing it (killed)."""
        if lock is not None and lock.stale_pid is not None:
            self.logger.event("warning", message=f"took over {lock.path}, left by process {lock.stale_pid}, which "
                                                 f"ended without releasing it (killed?)")

    def _drop_stale_stop_file(self) -> None:
        """A STOP file older than this process was left by an earlier run: it is not for us."""
        for flag in drop_stale_flags(self.stop.flag_files, since=psutil.Process().create_time()):
            self.logger.event("warning", message=f"removed a stale {flag} left by an earlier run")

    def _drop_stale_temporaries(self) -> None:
        """Half-written saves of crashed runs (`*.<pid>.tmp`, never loaded) would pile up in the folder."""
        removed = remove_stale_temporaries(self.output_dir)
        if removed:
            self.logger.event("warning", message=f"removed {len(removed)} temporary file(s) left by interrupted "
                                                 f"saves in {self.output_dir}: {', '.join(p.name for p in removed[:4])}"
                                                 + (" ..." if len(removed) > 4 else ""))

    def _say(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            tqdm.write(f"[ira] {message}", file=sys.stderr)

    def _release(self, acc: Accelerator) -> None:
        """Drop accelerate's references and singletons so a later fit() in the same process
        (another stage, another precision) starts clean. The process group itself is kept."""
        acc.free_memory()
        self.step_module = None
        AcceleratorState._reset_state()
        GradientState._reset_state()
