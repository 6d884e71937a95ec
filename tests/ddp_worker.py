"""A toy regression task for the engine tests, and the worker the DDP test launches.

As a worker: `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT`
trains one epoch on the CPU (gloo) and writes OUT/rank<R>.json with the sample ids this
rank saw, the checkpoints it wrote and a fingerprint of its parameters.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ira.config import IRAConfig  # noqa: E402
from ira.training.stop import request_stop  # noqa: E402
from ira.training.task import TrainingTask  # noqa: E402


class ToyDataset(Dataset):
    """y = x @ w + noise, deterministic from `seed`; items carry their index as "id"."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        w = torch.tensor([1.5, -2.0, 0.5, 3.0])
        self.y = self.x @ w + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "id": i}


class ToyTask(TrainingTask):
    """A small MLP with dropout (so resuming must restore the RNG) and a frozen input layer.

    Faults are injected at a given call of training_step (1-based, counted over this object).
    """

    stage = "1"

    def __init__(self, cfg: IRAConfig, n: int = 64, *, nan_at: Optional[int] = None,
                 oom_at: Optional[int] = None, stop_at: Optional[int] = None,
                 sigint_at: Optional[int] = None, with_val: bool = True):
        torch.manual_seed(cfg.training.seed)
        self.cfg = cfg
        self.n = n
        self.model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.2),
                                   nn.Linear(16, 1))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.nan_at, self.oom_at, self.stop_at, self.sigint_at = nan_at, oom_at, stop_at, sigint_at
        self.with_val = with_val
        self.calls = 0
        self.seen_ids: list[int] = []
        self.autocast_seen: set[bool] = set()

    def modules(self) -> dict[str, nn.Module]:
        return {"speech_lm": self.model, "style": self.frozen}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ToyDataset(self.n), batch_size=self.cfg.training.batch_size, shuffle=True)

    def val_dataloader(self) -> Optional[DataLoader]:
        return DataLoader(ToyDataset(16, seed=1), batch_size=8) if self.with_val else None

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.model.training:
            self.calls += 1
            if self.calls == self.oom_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (toy)")
            if self.calls == self.stop_at:
                request_stop(self.cfg.training.output_dir)
            if self.calls == self.sigint_at:
                signal.raise_signal(signal.SIGINT)
            self.seen_ids.extend(int(i) for i in batch["id"])
            self.autocast_seen.add(torch.is_autocast_enabled(batch["x"].device.type))
        pred = self.model(self.frozen(batch["x"])).squeeze(-1)
        loss = F.mse_loss(pred, batch["y"])
        if self.model.training and self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach(), "frames": int(batch["x"].shape[0]) * 10}

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        path = out_dir / "sample.txt"
        path.write_text(f"step {step}\n")
        return [str(path)]

    def checkpoint_metadata(self) -> dict[str, str]:
        return {"codec_fingerprint": "toy-codec-v1"}


def toy_config(out_dir: str | Path, **training: Any) -> IRAConfig:
    cfg = IRAConfig()
    t = cfg.training
    t.output_dir = str(out_dir)
    t.batch_size, t.learning_rate, t.warmup_steps, t.mixed_precision = 8, 1e-2, 3, "no"
    t.log_every, t.eval_every, t.save_every, t.num_epochs = 1, 1000, 1000, 1
    for key, value in training.items():
        setattr(t, key, value)
    return cfg.validate()


def main(out_dir: str) -> None:
    from ira.training.engine import Trainer

    cfg = toy_config(out_dir, num_epochs=1, eval_every=2)
    task = ToyTask(cfg)
    result = Trainer(cfg, task, run_name="ddp", cpu=True).fit()
    import torch.distributed as dist

    rank = dist.get_rank()
    report = {
        "status": result.status,
        "ids": task.seen_ids,
        "written": [str(p) for p in result.checkpoints_written],
        "params": [round(float(p.detach().sum()), 6) for p in task.model.parameters()],
        "world": dist.get_world_size(),
    }
    tmp = Path(out_dir) / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, Path(out_dir) / f"rank{rank}.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
