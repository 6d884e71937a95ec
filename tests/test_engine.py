"""The training engine on a toy regression task: schedule, resume, NaN, OOM, stop, metrics, DDP."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ddp_worker import ToyDataset, ToyTask, toy_config
from ira.training.checkpoint import load_checkpoint, load_train_state
from ira.training.engine import FitResult, Trainer, TrainingError, resolve_mixed_precision
from ira.training.metrics_log import MetricsLogger, read_metrics, tail_metrics
from ira.training.optim import param_groups
from ira.training.schedule import lr_factor, warmup_cosine

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(cfg, task, resume=None) -> FitResult:
    return Trainer(cfg, task, run_name="test", cpu=True).fit(resume_from=resume)


def _params(task: ToyTask) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.model.parameters()]


def _train_lines(path: Path) -> dict[int, dict]:
    """step -> the last train line logged for it (a resumed run may log a step again)."""
    return {r["step"]: r for r in read_metrics(path) if r.get("split") == "train"}


# ---------------------------------------------------------------- schedule and optimizer

def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    warmup, total, floor = 10, 110, 0.1
    f = [lr_factor(s, warmup, total, floor) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))                  # rising warm-up
    assert f[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[10:total - 1], f[11:total]))    # falling cosine
    assert f[60] == pytest.approx(floor + (1 - floor) * 0.5)           # half-way: the mean
    assert f[total] == pytest.approx(floor) and f[total + 4] == pytest.approx(floor)
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)              # no warm-up

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = warmup_cosine(opt, warmup, total, floor)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * x for x in f[:total]])


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "ln": nn.LayerNorm(4)})
    model.lin.pos_embed = nn.Parameter(torch.zeros(3, 4))
    groups = param_groups(list(model.parameters()), {"m": model}, weight_decay=0.1)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decay == {id(model.lin.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mixed_precision_auto_picks_per_device():
    assert resolve_mixed_precision("auto", "cuda", bf16_supported=True) == "bf16"
    assert resolve_mixed_precision("auto", "cuda", bf16_supported=False) == "fp16"
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("auto", "mps") == "no"
    assert resolve_mixed_precision("no", "cuda", bf16_supported=True) == "no"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_mixed_precision("bf16", "cuda", bf16_supported=False)


# ---------------------------------------------------------------- a full run

def test_fit_logs_metrics_checkpoints_and_samples(tmp_path):
    cfg = toy_config(tmp_path, max_steps=6, eval_every=4, save_every=5, log_every=2,
                     keep_step_checkpoints=1)
    task = ToyTask(cfg)
    before = _params(task)
    result = _fit(cfg, task)

    assert result.status == "done" and result.ok and result.step == 6
    assert result.epoch == pytest.approx(6 / 8)
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(task)))
    # the first validation's best wrote step4, save_every=5 wrote step5, the end wrote step6;
    # keep_step_checkpoints=1 pruned step4 and step5 (stage1_best keeps the best's content).
    assert not (tmp_path / "stage1_step5.safetensors").exists()
    assert not (tmp_path / "stage1_step4.safetensors").exists()
    assert (tmp_path / "stage1_step6.safetensors").exists()
    latest = load_checkpoint(tmp_path / "stage1_latest.safetensors")
    assert (latest.stage, latest.step, latest.epoch) == ("1", 6, 0)
    assert latest.extra.keys() == {"codec_fingerprint", "metric"} and latest.extra["codec_fingerprint"] == "toy-codec-v1"
    assert json.loads(latest.extra["metric"])["step"] == 6       # the final validation, just before this save
    assert torch.equal(latest.tensors["speech_lm"]["4.weight"], task.model[4].weight)
    assert torch.equal(latest.tensors["style"]["weight"], task.frozen.weight)   # frozen modules too
    assert load_train_state(latest.path, latest.checkpoint_id)["data"]["batches_in_epoch"] == 6

    records = read_metrics(result.metrics_path)
    for line in result.metrics_path.read_text().splitlines():
        json.loads(line)  # strict JSON on every line
    train = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]   # the first step too: short runs plot a line
    for r in train:
        assert {"time", "step", "epoch", "stage", "split", "loss", "mse", "lr", "grad_norm",
                "throughput", "memory"} <= r.keys()
        assert r["stage"] == "1" and math.isfinite(r["loss"]) and r["lr"] > 0
        assert r["throughput"]["samples_per_s"] > 0 and r["throughput"]["frames_per_s"] > 0
        assert r["memory"]["rss_mb"] > 0
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in val] == [4, 6] and all("val_loss" in r for r in val)
    events = [r["event"] for r in records if "event" in r]
    assert events[0] == "start" and events[-1] == "done"
    assert events.count("checkpoint") == 3 and events.count("samples") == 2
    best_step = min(val, key=lambda r: r["val_loss"])["step"]
    assert load_checkpoint(tmp_path / "stage1_best.safetensors").step == best_step
    assert val[-1]["best_val_loss"] == min(r["val_loss"] for r in val)
    sample = next(r for r in records if r.get("event") == "samples")
    assert Path(sample["paths"][0]).read_text() == "step 4\n"


@pytest.mark.parametrize("stop_call", [14, 8], ids=["mid-epoch", "epoch-end"])
def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, stop_call):
    # 8 batches per epoch, accumulation 3: optimizer steps after batches 3, 6, 8 of each epoch.
    # Call 14 ends step 5 (mid epoch 2); call 8 ends step 3 (epoch end).
    settings = dict(max_steps=10, grad_accum_steps=3, eval_every=4)
    cfg_a = toy_config(tmp_path / "a", **settings)
    task_a = ToyTask(cfg_a)
    assert _fit(cfg_a, task_a).status == "done"

    cfg_b = toy_config(tmp_path / "b", **settings)
    first = _fit(cfg_b, ToyTask(cfg_b, stop_at=stop_call))
    stop_step = {14: 5, 8: 3}[stop_call]
    assert first.status == "stopped" and first.step == stop_step
    assert "flag file" in first.message and str(first.last_checkpoint) in first.message
    assert not (tmp_path / "b" / "STOP").exists()                        # removed when honoured
    assert load_checkpoint(first.last_checkpoint).step == stop_step

    task_b = ToyTask(cfg_b)   # a fresh process would start from fresh weights: resume loads them
    second = _fit(cfg_b, task_b, resume=first.last_checkpoint)
    assert second.status == "done" and second.step == 10

    for a, b in zip(_params(task_a), _params(task_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lines_a = _train_lines(Path(cfg_a.training.output_dir) / "metrics.jsonl")
    lines_b = _train_lines(Path(cfg_b.training.output_dir) / "metrics.jsonl")
    assert sorted(lines_a) == sorted(lines_b) == list(range(1, 11))
    for step in range(1, 11):
        assert lines_a[step]["loss"] == lines_b[step]["loss"], step
        assert lines_a[step]["lr"] == lines_b[step]["lr"], step
    events_b = [r.get("event") for r in read_metrics(Path(cfg_b.training.output_dir) / "metrics.jsonl")]
    assert events_b.count("start") == 2 and "stopped" in events_b and events_b[-1] == "done"


class EpochVaryingBatches(Sampler):
    """A custom batch sampler like length bucketing: shuffled per (seed, epoch), and the number of
    batches changes with the epoch (batches of 8 in even epochs, of 5 in odd ones: 8 vs 13)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        size = 8 if self.epoch % 2 == 0 else 5
        return [order[i:i + size] for i in range(0, self.n, size)]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class VaryingTask(ToyTask):
    def train_dataloader(self) -> DataLoader:
        sampler = EpochVaryingBatches(self.n, self.cfg.training.seed)
        return DataLoader(ToyDataset(self.n), batch_sampler=sampler)


def test_custom_batch_sampler_with_epoch_dependent_length_resumes_exactly(tmp_path):
    # Accumulation 2: 4 steps in epoch 0 (8 batches), 7 in epoch 1 (13 batches), 4 in epoch 2.
    cfg_a = toy_config(tmp_path / "a", num_epochs=3, grad_accum_steps=2)
    task_a = VaryingTask(cfg_a)
    result = _fit(cfg_a, task_a)
    assert result.status == "done" and result.step == 15 and result.epoch == 3
    steps = [load_checkpoint(tmp_path / "a" / f"stage1_epoch{e}.safetensors").step for e in (1, 2, 3)]
    assert steps == [4, 11, 15]
    seen = task_a.seen_ids
    assert sorted(seen[:64]) == sorted(seen[64:128]) == list(range(64)) and seen[:64] != seen[64:128]

    cfg_b = toy_config(tmp_path / "b", num_epochs=3, grad_accum_steps=2)
    first = _fit(cfg_b, VaryingTask(cfg_b, stop_at=13))    # batch 5 of epoch 1: stops after step 7
    assert first.status == "stopped" and first.step == 7
    task_b = VaryingTask(cfg_b)
    assert _fit(cfg_b, task_b, resume="latest").step == 15
    for a, b in zip(_params(task_a), _params(task_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sigint_stops_cleanly_and_restores_the_handler(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8)
    previous = signal.getsignal(signal.SIGINT)
    result = _fit(cfg, ToyTask(cfg, sigint_at=2))
    assert result.status == "stopped" and result.step == 2 and "SIGINT" in result.message
    assert load_checkpoint(tmp_path / "stage1_latest.safetensors").step == 2
    assert signal.getsignal(signal.SIGINT) is previous


def test_bf16_autocast_then_fp32_in_one_process(tmp_path):
    # bf16 autocast also runs on the CPU when asked for explicitly (auto would pick fp32 there).
    cfg = toy_config(tmp_path / "bf16", max_steps=3, mixed_precision="bf16")
    task = ToyTask(cfg)
    result = _fit(cfg, task)
    assert result.status == "done" and task.autocast_seen == {True}
    start = next(r for r in read_metrics(result.metrics_path) if r.get("event") == "start")
    assert start["mixed_precision"] == "bf16"
    assert load_checkpoint(result.last_checkpoint).tensors["speech_lm"]["0.weight"].dtype == torch.float32
    # accelerate's process-wide state was released: another precision works in the same process.
    cfg = toy_config(tmp_path / "fp32", max_steps=3, mixed_precision="no")
    task = ToyTask(cfg)
    assert _fit(cfg, task).status == "done" and task.autocast_seen == {False}


# ---------------------------------------------------------------- failures

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8, save_every=2)
    result = _fit(cfg, ToyTask(cfg, nan_at=5))      # batch 5 = step 5 (no accumulation)

    assert result.status == "nan" and not result.ok and result.step == 4
    assert "not finite" in result.message and "training.learning_rate" in result.message
    assert "--resume_checkpoint" in result.message
    assert result.last_checkpoint == tmp_path / "stage1_latest.safetensors"
    good = load_checkpoint(result.last_checkpoint)
    assert good.step == 4
    assert all(torch.isfinite(t).all() for m in good.tensors.values() for t in m.values())
    assert not (tmp_path / "stage1_step5.safetensors").exists()
    nan_events = [r for r in read_metrics(result.metrics_path) if r.get("event") == "nan"]
    assert len(nan_events) == 1 and nan_events[0]["step"] == 5 and nan_events[0]["loss"] == "nan"
    with pytest.raises(TrainingError, match="not finite"):
        result.raise_for_status()

    # The advice works: resuming from the kept checkpoint (without the fault) finishes the run.
    again = _fit(cfg, ToyTask(cfg), resume="latest")
    assert again.status == "done" and again.step == 8


class _BlowsUp(ToyTask):
    """A step whose loss and gradient are finite but whose update leaves a weight infinite (too large a step)."""

    def __init__(self, cfg, at: int, **kwargs):
        super().__init__(cfg, **kwargs)
        self.at = at

    def training_step(self, batch):
        out = super().training_step(batch)
        if self.model.training and self.calls == self.at:
            self.model[4].bias.data.fill_(float("inf"))   # the bias's gradient does not read its value
        return out


def _stage_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("stage1_*"))


def test_weights_that_an_update_made_infinite_are_never_saved(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8, save_every=1)
    result = _fit(cfg, _BlowsUp(cfg, at=3))
    assert result.status == "nan" and result.step == 3
    assert "weight tensor(s) are not finite" in result.message and "speech_lm.4.bias" in result.message
    assert not (tmp_path / "stage1_step3.safetensors").exists()
    # the message names a checkpoint that is really good, and resuming from it works
    assert result.last_checkpoint == tmp_path / "stage1_latest.safetensors"
    assert f"last good checkpoint (finite weights) is {result.last_checkpoint}" in result.message
    assert load_checkpoint(result.last_checkpoint).step == 2
    assert _fit(cfg, ToyTask(cfg), resume=result.last_checkpoint).status == "done"


def test_an_infinite_learning_rate_names_no_bad_checkpoint_and_a_real_rate(tmp_path):
    """The config refuses inf now; the engine must still never save nor name the weights it makes."""
    cfg = toy_config(tmp_path, max_steps=8, save_every=1)
    cfg.training.learning_rate = float("inf")
    result = _fit(cfg, ToyTask(cfg))
    assert result.status == "nan" and result.step == 1 and result.last_checkpoint is None
    assert "No checkpoint had been saved yet" in result.message and "--resume_checkpoint" not in result.message
    assert "training.learning_rate (e.g. 0.0003; now inf)" in result.message
    assert _stage_files(tmp_path) == []


def test_a_divergence_never_names_a_checkpoint_with_non_finite_weights(tmp_path):
    """A folder that an older IRA left with a NaN latest: the newest finite checkpoint is named instead."""
    from test_checkpoint import poison

    cfg = toy_config(tmp_path, max_steps=4, save_every=2, keep_step_checkpoints=0)
    assert _fit(cfg, ToyTask(cfg)).status == "done"
    for name in ("stage1_latest", "stage1_step4", "stage1_best"):
        poison(tmp_path / f"{name}.safetensors")
    trainer = Trainer(cfg, ToyTask(cfg), cpu=True)
    assert trainer._last_good_checkpoint() == tmp_path / "stage1_step2.safetensors"
    poison(tmp_path / "stage1_step2.safetensors")
    assert trainer._last_good_checkpoint() is None


def test_resuming_from_non_finite_weights_is_refused_naming_the_file(tmp_path):
    from test_checkpoint import poison
    from ira.training.checkpoint import CheckpointError

    cfg = toy_config(tmp_path, max_steps=4, save_every=2)
    assert _fit(cfg, ToyTask(cfg)).status == "done"
    bad = poison(tmp_path / "stage1_latest.safetensors")
    with pytest.raises(CheckpointError, match=f"{bad}: 2 tensor\\(s\\) hold NaN or infinite values"):
        _fit(cfg, ToyTask(cfg), resume=bad)


def test_out_of_memory_is_caught_with_advice(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8, save_every=2, grad_accum_steps=1)
    result = _fit(cfg, ToyTask(cfg, oom_at=3))
    assert result.status == "oom" and result.step == 2
    assert "Out of memory" in result.message
    assert "training.batch_size=4" in result.message and "grad_accum_steps=2" in result.message
    assert "cpu preset" in result.message
    assert result.last_checkpoint == tmp_path / "stage1_latest.safetensors"
    events = [r for r in read_metrics(result.metrics_path) if r.get("event") == "oom"]
    assert len(events) == 1 and "batch_size" in events[0]["message"]
    with pytest.raises(TrainingError):
        result.raise_for_status()


def test_resume_refuses_another_stage_and_another_codec(tmp_path):
    cfg = toy_config(tmp_path, max_steps=2)
    ckpt = _fit(cfg, ToyTask(cfg)).last_checkpoint

    class Stage2(ToyTask):
        stage = "2"

    class OtherCodec(ToyTask):
        def checkpoint_metadata(self):
            return {"codec_fingerprint": "encodec-24khz-6kbps"}

    from ira.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="stage 1 .*resuming stage 2 needs a checkpoint from stage 2"):
        _fit(cfg, Stage2(cfg), resume=ckpt)
    with pytest.raises(CheckpointError, match="codec 'toy-codec-v1'.*current codec is 'encodec-24khz-6kbps'"):
        _fit(cfg, OtherCodec(cfg), resume=ckpt)
    errors = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "error"]
    assert len(errors) == 2


# ---------------------------------------------------------------- metrics log

def test_metrics_readers_skip_a_partial_last_line(tmp_path):
    log = MetricsLogger(tmp_path, stage="1")
    log.metrics("train", 1, 0.1, {"loss": 1.0, "bad": float("inf")})
    log.event("checkpoint", path=tmp_path / "x.safetensors")
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')                       # a writer caught mid-line
    records = read_metrics(log.path)
    assert [r.get("step") for r in records] == [1, None]
    assert records[0]["bad"] == "inf" and records[1]["path"].endswith("x.safetensors")

    first, offset = tail_metrics(log.path)
    assert len(first) == 2 and offset < log.path.stat().st_size
    with open(log.path, "a") as f:
        f.write('ss": 0.5}\n')                           # the line completes
    more, offset2 = tail_metrics(log.path, offset)
    assert more == [{"step": 2, "loss": 0.5}] and offset2 == log.path.stat().st_size
    log.close()

    # A new logger after a crash starts on a fresh line; the torn line is skipped by readers.
    with open(log.path, "a") as f:
        f.write('{"torn": ')
    log2 = MetricsLogger(tmp_path, stage="1")
    log2.event("start")
    log2.close()
    assert read_metrics(log.path)[-1]["event"] == "start"


def test_tensorboard_is_optional(tmp_path):
    log = MetricsLogger(tmp_path, stage="1", tensorboard_dir=tmp_path / "tb")
    log.metrics("train", 1, 0.1, {"loss": 1.0, "throughput": {"samples_per_s": 3.0}})
    log.close()
    if importlib.util.find_spec("tensorboard") is None:
        warning = next(r for r in read_metrics(log.path) if r.get("event") == "warning")
        assert "pip install tensorboard" in warning["message"]
    else:
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- DDP

def test_ddp_two_cpu_processes_shard_the_data_and_only_rank0_writes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # torchrun (not `accelerate launch --cpu`, which runs a single process); --standalone picks
    # a free local port. Its own session, so a hang kills the workers too.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("the 2-process DDP run hung:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["status"] == r1["status"] == "done"
    # One epoch of 64 samples, 4 batches of 8 per rank: disjoint halves that cover the data.
    assert len(r0["ids"]) == len(r1["ids"]) == 32
    assert not set(r0["ids"]) & set(r1["ids"]) and set(r0["ids"]) | set(r1["ids"]) == set(range(64))
    assert r0["params"] == r1["params"]                  # gradients were synchronised
    # rank 0 alone writes: the best of the validation at step 2, then the epoch's end
    assert r0["written"] == [str(tmp_path / "stage1_step2.safetensors"),
                             str(tmp_path / "stage1_epoch1.safetensors")] and r1["written"] == []
    assert (tmp_path / "stage1_best.safetensors").is_file()
    ckpt = load_checkpoint(tmp_path / "stage1_latest.safetensors")
    assert ckpt.step == 4 and load_train_state(ckpt.path)["data"]["num_processes"] == 2
    assert len(load_train_state(ckpt.path)["rng"]) == 2   # every rank's RNG state is kept
    assert not list(tmp_path.glob("*.tmp"))
    start = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "start")
    assert start["num_processes"] == 2


class FakeClock:
    """A clock that moves only when told (the engine's time budget and throughput read it): no test waits
    for, or depends on, the machine's real speed."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_throughput_counts_the_whole_log_window():
    """samples/s over a log window is samples / the window's training time, not the last step's."""
    from ira.training.engine import _Window

    clock = FakeClock()
    window = _Window(clock)
    clock.advance(10.0)                     # the window has been open for 10 s of training
    for _ in range(10):
        window.add({"loss": torch.tensor(1.0), "samples": 4}, None)
    window.exclude(5.0)                     # 5 s of it went to validation and a checkpoint
    assert window.seconds() == 5.0 and window.samples == 40


# ---------------------------------------------------------------- best, early stop, retention, budget

class _ScriptedVal(ToyTask):
    """A toy task whose validation reports scripted values of `metric` (one per validation)."""

    def __init__(self, cfg, values, metric=("val_score", "min"), **kwargs):
        super().__init__(cfg, **kwargs)
        self.values, self.best_metric, self.validations = list(values), metric, 0

    def validate(self, loader):
        value = self.values[min(self.validations, len(self.values) - 1)]
        self.validations += 1
        return {self.best_metric[0]: value}


@pytest.mark.parametrize("mode, values, best_at", [("min", [3.0, 2.0, 2.5, 2.2, 2.1], 4),
                                                   ("max", [0.1, 0.5, 0.4, 0.3, 0.2], 4)])
def test_early_stop_after_patience_keeps_the_best(tmp_path, mode, values, best_at):
    cfg = toy_config(tmp_path, max_steps=40, eval_every=2, early_stop_patience=3)
    result = _fit(cfg, _ScriptedVal(cfg, values, ("val_score", mode)))
    assert result.status == "done" and result.step == 10                 # best at step 4, then 3 worse
    assert "early stop" in result.message and "val_score" in result.message and "step 4" in result.message
    best = load_checkpoint(tmp_path / "stage1_best.safetensors")
    assert best.step == best_at
    # its header carries the metric the best was chosen by (the app's checkpoint lists show it)
    assert json.loads(best.metadata["metric"]) == {"name": "val_score", "value": values[1], "mode": mode,
                                                        "step": best_at}
    state = load_train_state(tmp_path / "stage1_latest.safetensors")
    assert state["best"] == {"value": values[1], "step": 4, "since": 3, "name": "val_score"}


class _UnfinishedFirst(_ScriptedVal):
    """Its model may not be kept as best before step 5 (a part it trains later is still untrained)."""

    def may_be_best(self):
        return self.steps_seen > 4

    def training_step(self, batch):
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        return super().training_step(batch)


def test_a_validation_of_an_unfinished_model_is_never_the_best(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8, eval_every=2)
    _fit(cfg, _UnfinishedFirst(cfg, [0.9, 0.8, 0.3, 0.5], ("val_score", "max")))   # 0.9 at step 2 does not count
    assert load_checkpoint(tmp_path / "stage1_best.safetensors").step == 8


def test_no_early_stop_without_patience_and_a_resume_keeps_the_best_so_far(tmp_path):
    cfg = toy_config(tmp_path, max_steps=8, eval_every=2)
    first = _fit(cfg, _ScriptedVal(cfg, [3.0, 1.0, 2.0], stop_at=5))
    assert first.status == "stopped"
    second = _fit(cfg, _ScriptedVal(cfg, [2.0, 1.5]), resume=first.last_checkpoint)   # never below 1.0
    assert second.status == "done" and second.step == 8
    assert load_checkpoint(tmp_path / "stage1_best.safetensors").step == 4


def test_a_task_validated_at_start_keeps_its_start_when_training_only_makes_it_worse(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, eval_every=2)
    task = _ScriptedVal(cfg, [1.0, 2.0, 3.0])       # the start scores best; every later validation is worse
    task.validate_at_start = True
    start = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    result = _fit(cfg, task)
    assert result.status == "done" and task.validations == 3
    best = load_checkpoint(tmp_path / "stage1_best.safetensors")
    assert best.step == 0 and json.loads(best.metadata["metric"])["value"] == 1.0
    saved = best.state_dict("speech_lm")
    assert all(torch.equal(tensor, saved[name]) for name, tensor in start.items())   # its starting weights
    # a run resumed from that step-0 save (killed in its first steps) does not validate its start again
    resumed = _ScriptedVal(cfg, [2.0, 3.0])
    resumed.validate_at_start = True
    again = _fit(cfg, resumed, resume=tmp_path / "stage1_best.safetensors")
    assert again.status == "done" and resumed.validations == 2
    assert load_train_state(tmp_path / "stage1_latest.safetensors")["best"] == {
        "value": 1.0, "step": 0, "since": 2, "name": "val_score"}
    assert load_checkpoint(tmp_path / "stage1_best.safetensors").step == 0


def test_a_best_chosen_by_another_figure_starts_over_on_resume(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, eval_every=2)
    first = _fit(cfg, _ScriptedVal(cfg, [0.2], ("val_score", "min"), stop_at=3))   # best val_score 0.2 at 2
    other = _ScriptedVal(cfg, [5.0], ("val_other", "min"))     # 5.0 is worse than 0.2, but not comparable
    assert _fit(cfg, other, resume=first.last_checkpoint).status == "done"
    assert load_train_state(tmp_path / "stage1_latest.safetensors")["best"] == {
        "value": 5.0, "step": 4, "since": 0, "name": "val_other"}


def test_only_the_newest_epoch_checkpoints_are_kept(tmp_path):
    cfg = toy_config(tmp_path, num_epochs=5, keep_epoch_checkpoints=2)
    assert _fit(cfg, ToyTask(cfg, n=16, with_val=False)).status == "done"
    assert sorted(p.name for p in tmp_path.glob("stage1_epoch*.safetensors")) == [
        "stage1_epoch4.safetensors", "stage1_epoch5.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("stage1_epoch*.train_state.pt")) == [
        "stage1_epoch4.train_state.pt", "stage1_epoch5.train_state.pt"]
    assert (tmp_path / "stage1_latest.safetensors").is_file()


class _Slow(ToyTask):
    """Each training step takes `seconds` of the trainer's (fake) clock."""

    def __init__(self, cfg, clock: FakeClock, seconds: float, **kwargs):
        super().__init__(cfg, **kwargs)
        self.clock, self.seconds = clock, seconds

    def training_step(self, batch):
        if self.model.training:
            self.clock.advance(self.seconds)
        return super().training_step(batch)


def test_a_time_budget_ends_the_run_with_a_low_learning_rate(tmp_path):
    cfg = toy_config(tmp_path, num_epochs=50, max_minutes=0.02, log_every=1)   # 1.2 s: 400 steps by epochs
    clock = FakeClock()
    task = _Slow(cfg, clock, seconds=1 / 16, with_val=False)
    result = Trainer(cfg, task, run_name="test", cpu=True, clock=clock).fit()
    assert result.status == "done" and "budget" in result.message
    assert result.step == 20                           # the first step at which 1.2 s are spent: 20 x 1/16 s
    lrs = [r["lr"] for r in read_metrics(result.metrics_path) if r.get("split") == "train"]
    peak = max(lrs)
    assert lrs[-1] < 0.3 * peak                        # the cosine followed the clock, not the 400 steps
    assert load_train_state(result.last_checkpoint)["elapsed_s"] == 1.25


def test_the_terminal_bar_of_a_budgeted_run_counts_its_minutes_not_the_steps_of_its_epochs(tmp_path, capsys):
    """With training.max_minutes the clock ends the run, so the bar counts the budget's minutes (a step total
    from the epochs, 400 here, would promise a run that never happens); without one it counts steps."""
    cfg = toy_config(tmp_path / "timed", num_epochs=50, max_minutes=0.02, log_every=1)
    clock = FakeClock()
    assert Trainer(cfg, _Slow(cfg, clock, seconds=1 / 16, with_val=False), run_name="test", cpu=True,
                   clock=clock).fit().ok
    err = capsys.readouterr().err
    assert "100%" in err and "/0.02 min of its budget" in err and "step=20" in err
    assert "/400" not in err
    untimed = toy_config(tmp_path / "untimed", max_steps=3)
    assert _fit(untimed, ToyTask(untimed)).ok
    err = capsys.readouterr().err
    assert "3/3" in err and "min of its budget" not in err


def test_the_budget_schedule_follows_whichever_is_further_along():
    from ira.training.schedule import budget_lr_factor
    assert budget_lr_factor(2, 0.0, 60.0, 5, 100) == pytest.approx(0.6)                 # warm-up by steps
    assert budget_lr_factor(10, 30.0, 60.0, 5, 1000) == pytest.approx(0.55)             # half the time: mid-cosine
    assert budget_lr_factor(10, 120.0, 60.0, 5, 1000) == pytest.approx(0.1)             # past the budget
    assert budget_lr_factor(900, 1.0, 60.0, 5, 1000) == pytest.approx(lr_factor(900, 5, 1000))      # steps lead


def test_a_budgeted_run_tells_its_task_the_share_of_the_budget_spent_after_every_step(tmp_path):
    class Watching(ToyTask):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.shares: list[float] = []

        def on_budget_used(self, share: float) -> None:
            self.shares.append(share)

    cfg = toy_config(tmp_path / "timed", max_steps=5, max_minutes=600.0)
    task = Watching(cfg)
    assert _fit(cfg, task).ok
    assert len(task.shares) == 5 and task.shares == sorted(task.shares) and 0.0 < task.shares[0] < 1.0
    untimed = Watching(toy_config(tmp_path / "untimed", max_steps=3))
    assert _fit(untimed.cfg, untimed).ok and untimed.shares == []          # no budget: no share
