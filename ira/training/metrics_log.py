"""The metrics log: `<output_dir>/metrics.jsonl`, one JSON object per line, append-only.

Two kinds of lines:
- metrics: {"time", "step", "epoch", "stage", "split": "train"|"val", <losses>, "lr", ...}
  train lines also hold "grad_norm", "throughput" {"samples_per_s", "frames_per_s"} and
  "memory" {"rss_mb", "cuda_max_allocated_mb" | "mps_allocated_mb"}
- events:  {"time", "event", "stage", ...}, event one of start, checkpoint, samples, nan, oom,
  stopped, done, error, warning

Each line is written with one `write` call and flushed, so another process (the UI) can tail the
file while training runs; the readers below skip a last line that is still being written.
Non-finite floats are written as the strings "nan", "inf", "-inf" to keep every line valid JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ira import peak_memory

METRICS_FILE = "metrics.jsonl"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return value


def memory_stats(device: Optional[torch.device] = None) -> dict[str, float]:
    """Resident memory of this process, plus the accelerator's peak allocation when there is one."""
    stats = {"rss_mb": round(peak_memory.resident_mb(), 1)}
    if device is not None and device.type == "cuda":
        stats["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    elif device is not None and device.type == "mps":
        stats["mps_allocated_mb"] = round(torch.mps.current_allocated_memory() / 2**20, 1)
    return stats


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class MetricsLogger:
    """Appends lines to metrics.jsonl (and optionally TensorBoard). Disabled on non-main ranks."""

    def __init__(self, output_dir: str | Path, stage: str, enabled: bool = True,
                 tensorboard_dir: Optional[str | Path] = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.stage = stage
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _ends_mid_line(self.path):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")  # a killed run left half a line: start ours on a fresh one
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            self._tb = self._open_tensorboard(Path(tensorboard_dir))

    def _open_tensorboard(self, log_dir: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            message = ("training.tensorboard is on but the tensorboard package is not installed "
                       "(pip install tensorboard); metrics still go to " + str(self.path))
            print(f"[ira] {message}", file=sys.stderr)
            self.event("warning", message=message)
            return None
        return SummaryWriter(log_dir=str(log_dir))

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def metrics(self, split: str, step: int, epoch: float, values: dict[str, Any]) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "step": step, "epoch": round(epoch, 4),
                  "stage": self.stage, "split": split, **values}
        self._write(record)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{split}/{key}/{sub}", v, step)
        return record

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "event": name, "stage": self.stage, **fields}
        self._write(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def tail_metrics(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records from byte `offset` on, and the offset to pass next time.

    Only complete lines are consumed: a line still being written is left for the next call.
    Lines that are not JSON objects (a run killed mid-write) are skipped.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line yet
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl (tolerates a partially written last line)."""
    return tail_metrics(path, 0)[0]
