"""Training: one engine for every stage, checkpoints and the metrics log.

Imports are lazy, so importing a submodule does not pull in accelerate. Inference and the UI load models
through `ira/checkpoint.py` and `ira/models/hub.py`, never through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "engine", "FitResult": "engine", "TrainingError": "engine",
    "resolve_mixed_precision": "engine", "is_oom_error": "engine",
    "TrainingTask": "task", "StageTask": "task",
    "Checkpoint": "checkpoint", "CheckpointError": "checkpoint", "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "load_train_state": "checkpoint", "read_metadata": "checkpoint",
    "require_stage": "checkpoint", "check_compatible": "checkpoint", "checkpoint_path": "checkpoint",
    "latest_path": "checkpoint", "find_latest": "checkpoint", "train_state_path": "checkpoint",
    "read_metrics": "metrics_log", "tail_metrics": "metrics_log", "MetricsLogger": "metrics_log",
    "request_stop": "stop",
    "lr_factor": "schedule", "warmup_cosine": "schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ira.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ira.training.{_EXPORTS[name]}"), name)
