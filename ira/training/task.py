"""What a training stage gives the engine: its modules, data and one training step.

Subclass `TrainingTask` and fill in `stage`, `modules`, `train_dataloader` and `training_step`;
the other hooks have working defaults. The engine (`Trainer`) does everything else: devices,
mixed precision, DDP, accumulation, clipping, the optimizer and schedule, validation cadence,
checkpoints, resume, the metrics log and stop requests.

Contract details the engine relies on:
- `modules()` returns the same module objects on every call. Names are Python identifiers; they
  prefix the tensors in the checkpoint (`speech_lm.`, `adapter.`, `style.`). Modules with a
  trainable parameter are wrapped for DDP together; the engine puts them in train() mode and the
  others in eval() mode, and moves all of them to the device. Modules that are not saved (a frozen
  hub LLM) are the task's to place in `setup(device)`.
- `training_step(batch)` runs under autocast with the batch already on the device; it returns a
  dict with a scalar "loss" tensor; other scalar tensors/numbers are logged (averaged over the log
  window); "samples" and "frames" (counts in the batch) feed the throughput figures and are not
  logged as losses (samples default to the batch's first dimension).
- Shuffling: a plain `shuffle=True` DataLoader is made reproducible by the engine (the permutation
  depends on (training.seed, epoch)). A custom sampler/batch sampler that shuffles must do the same
  and expose `set_epoch(epoch)`. Datasets and collators should not draw from the global RNGs
  (do random augmentation in `training_step`), so that resuming is exact.
- `validate` / `on_validation_end` run on the main process only, under no_grad, autocast and eval
  mode, without disturbing the training RNG streams.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader

Batch = Any
ParamsOrGroups = Union[list[nn.Parameter], list[dict[str, Any]]]
COUNT_KEYS = ("samples", "frames")


@runtime_checkable
class StageTask(Protocol):
    stage: str
    find_unused_parameters: bool
    best_metric: tuple[str, str]
    validate_at_start: bool

    def setup(self, device: torch.device) -> None: ...
    def modules(self) -> dict[str, nn.Module]: ...
    def trainable_parameters(self) -> ParamsOrGroups: ...
    def train_dataloader(self) -> DataLoader: ...
    def val_dataloader(self) -> Optional[DataLoader]: ...
    def training_step(self, batch: Batch) -> dict[str, Any]: ...
    def validate(self, loader: Any) -> dict[str, float]: ...
    def on_validation_end(self, step: int, out_dir: Path) -> list[str]: ...
    def on_budget_used(self, share: float) -> None: ...
    def may_be_best(self) -> bool: ...
    def checkpoint_metadata(self) -> dict[str, str]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingTask(ABC):
    """Base class with defaults for everything but the stage's own logic."""

    stage: str = ""
    find_unused_parameters: bool = False
    """Set True if some trainable parameters get no gradient in some steps (DDP must know)."""
    best_metric: tuple[str, str] = ("val_loss", "min")
    """(validation metric, "min" or "max") that picks `stage{S}_best` and drives early stopping; a
    validation without that key leaves the best as it is."""
    validate_at_start: bool = False
    """Validate (and keep as the best so far) the starting weights before the first step of a fresh run:
    for a stage that fine-tunes a finished model (stage 3), so that its best is never worse than its start."""

    def setup(self, device: torch.device) -> None:
        """Called once before training, with the device of this process. Default: nothing."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Required: see the module docstring."""

    def trainable_parameters(self) -> ParamsOrGroups:
        """Parameters to optimise (or param groups, e.g. with their own "lr").

        Default: every parameter with requires_grad in `modules()`. The engine splits them into
        weight-decay and no-decay groups (norms, biases, embeddings) unless a group sets
        "weight_decay" itself.
        """
        seen, params = set(), []
        for module in self.modules().values():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    @abstractmethod
    def train_dataloader(self) -> DataLoader:
        """Required: see the module docstring."""

    def val_dataloader(self) -> Optional[DataLoader]:
        return None

    @abstractmethod
    def training_step(self, batch: Batch) -> dict[str, Any]:
        """Required: see the module docstring."""

    def validate(self, loader: Any) -> dict[str, float]:
        """Default: the mean of `training_step`'s outputs over the loader, prefixed with "val_"."""
        sums: dict[str, float] = {}
        weight = 0
        for batch in loader:
            out = self.training_step(batch)
            n = int(out.get("samples", batch_size(batch)))
            for key, value in out.items():
                if key in COUNT_KEYS:
                    continue
                sums[key] = sums.get(key, 0.0) + float(value) * n
            weight += n
        return {f"val_{k}": v / max(weight, 1) for k, v in sums.items()}

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        """Write samples (audio, text) into `out_dir` and return their paths. Default: none."""
        return []

    def on_budget_used(self, share: float) -> None:
        """Called after every optimizer step of a run with a time budget, with the share of it spent (the same
        on every process): a task whose phases split its time switches here. Default: nothing."""

    def may_be_best(self) -> bool:
        """Whether the model as it is now may be kept as the stage's best (False while a part the stage trains
        later is still untrained, whatever the validation says). Default: always."""
        return True

    def checkpoint_metadata(self) -> dict[str, str]:
        """String metadata stored in every checkpoint: codec_fingerprint, tokenizer, shapes..."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra training state to resume exactly (e.g. PPO's adaptive KL coefficient).

        Plain tensors, numbers, strings, lists and dicts only (it is loaded with weights_only).
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def batch_size(batch: Batch) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        for value in batch.values():
            n = batch_size(value)
            if n:
                return n
        return 0
    if isinstance(batch, (list, tuple)):
        for value in batch:
            n = batch_size(value)
            if n:
                return n
        return len(batch)
    return 0


def inherit_frozen_sections(cfg: Any, source: Any, sections: tuple[str, ...]) -> Any:
    """`cfg` (an IRAConfig) with the config sections of the parts a stage loads frozen (or continues) from
    checkpoint `source` replaced by the checkpoint's own, so the new checkpoint records what was trained,
    not a `--set speech_lm.*` that had no effect; a warning lists the settings that are not used."""
    import logging

    from ira.checkpoint import CheckpointError

    try:
        stored = source.ira_config()
    except CheckpointError as exc:   # an older IRA's config: the parts still load from their own metadata
        logging.getLogger(__name__).warning("%s; this run records its own %s settings", exc, ", ".join(sections))
        return cfg
    inherited, unused = cfg.with_sections_of(stored, sections)
    if unused:
        logging.getLogger(__name__).warning(
            "%s come from %s, so these settings of this run are not used: %s", ", ".join(sections), source.path,
            "; ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return inherited
