"""The training engine's side of checkpoints: the side file that resumes a run exactly, and a run's files.

`<output_dir>/stage1_epoch3.train_state.pt` holds the optimizer, scheduler, RNG states and the data
position, as plain tensors / dicts (written with torch.save, read with weights_only=True). It carries
its checkpoint's checkpoint_id, so a pair torn by a crash between the two writes is detected.

The checkpoint file itself is `ira/checkpoint.py`'s format, which inference reads without this
package; its names are re-exported here, so `from ira.training.checkpoint import load_checkpoint`
keeps working.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ira.checkpoint import (FORMAT, FORMAT_VERSION, RESERVED_KEYS, SUFFIX, TRAIN_STATE_SUFFIX,
                            Checkpoint, CheckpointError, ModuleOrState, atomic_write, best_path,
                            check_checkpoint_name, check_compatible, checkpoint_modules, checkpoint_path,
                            find_latest, latest_path, load_checkpoint, new_checkpoint_id, read_header,
                            read_metadata, refuse_nonfinite, require_stage, tensor_bytes,
                            train_state_path)
from ira.checkpoint import save_checkpoint as save_checkpoint_file

__all__ = ["FORMAT", "FORMAT_VERSION", "RESERVED_KEYS", "SUFFIX", "TRAIN_STATE_SUFFIX", "Checkpoint", "CheckpointError",
           "atomic_write", "best_path", "check_compatible", "checkpoint_modules", "checkpoint_path", "find_latest",
           "latest_path", "link_latest", "load_checkpoint", "load_train_state", "prune_checkpoints", "read_header",
           "read_metadata", "require_stage", "save_checkpoint", "train_state_path"]


def save_checkpoint(path: str | Path, modules: Mapping[str, ModuleOrState], *, stage: str,
                    epoch: int, step: int, config: Any,
                    metadata: Optional[Mapping[str, str]] = None,
                    train_state: Optional[dict[str, Any]] = None) -> Path:
    """Write checkpoint `path` and, when `train_state` is given, its side file `<name>.train_state.pt`,
    each atomically. The side file goes first: a crash between the two leaves an id mismatch that
    `load_train_state` detects, never a checkpoint paired with another save's optimizer state.
    Only the main process should call this."""
    path = Path(path)
    check_checkpoint_name(path)
    refuse_nonfinite(path, modules)   # before the side file: a refused save replaces nothing
    checkpoint_id = new_checkpoint_id()
    side = train_state_path(path)
    if train_state is not None:
        state = {**train_state, "checkpoint_id": checkpoint_id, "stage": str(stage),
                 "step": int(step), "epoch": int(epoch)}
        atomic_write(side, lambda tmp: torch.save(state, tmp), tensor_bytes(state))
    try:
        return save_checkpoint_file(path, modules, stage=stage, epoch=epoch, step=step, config=config,
                                    metadata=metadata, checkpoint_id=checkpoint_id)
    except CheckpointError:
        if train_state is not None:   # refused before anything was written: leave no orphan side file
            side.unlink(missing_ok=True)
        raise


def load_train_state(path: str | Path, checkpoint_id: Optional[str] = None) -> dict[str, Any]:
    """The side file of checkpoint `path`, loaded with weights_only=True (no arbitrary objects)."""
    side = train_state_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"{path} has no training state ({side.name} is missing): its weights can initialise a "
            f"model, but the run cannot be resumed exactly without the optimizer state. Restore "
            f"the side file or start a new run from these weights.")
    try:
        state = torch.load(side, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or damaged file, a pickle with objects IRA never writes
        raise CheckpointError(
            f"{side} cannot be read safely: it is damaged or was not written by IRA's trainer ({_first_line(exc)}); "
            f"it is never loaded "
            f"unsafely. The weights in {Path(path).name} are unaffected; to continue, resume from the "
            f"previous checkpoint in {Path(path).parent} (stage*_step* or stage*_epoch*, each with its own "
            f"side file).") from exc
    if not isinstance(state, dict) or "checkpoint_id" not in state:
        raise CheckpointError(f"{side} is not an IRA training-state file")
    if checkpoint_id is not None and state["checkpoint_id"] != checkpoint_id:
        raise CheckpointError(
            f"{side} belongs to a different save than {Path(path).name} (step {state.get('step')}); "
            f"a save was probably interrupted between the two files. Resume from another "
            f"checkpoint in {Path(path).parent} (e.g. the last stage*_epoch* file).")
    return state


def _first_line(exc: BaseException) -> str:
    """What went wrong in one sentence, without PyTorch's advice to retry with weights_only=False (an
    unsafe load of a file that may run code): IRA never gives that advice."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
    sentence = line.split(". ")[0].rstrip(". ")
    if not sentence or "weights_only" in sentence:
        return type(exc).__name__
    return sentence


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make `dst` have `src`'s content: a hard link where possible, else a copy."""
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links (FAT, some network shares)
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def link_latest(path: str | Path, latest: str | Path) -> Path:
    """Point `latest` (and its side file) at checkpoint `path`. The side file goes first, so a
    crash in between leaves a detectable id mismatch rather than a silently wrong pair."""
    path, latest = Path(path), Path(latest)
    if train_state_path(path).exists():
        _link_or_copy(train_state_path(path), train_state_path(latest))
    _link_or_copy(path, latest)
    return latest


def prune_checkpoints(output_dir: str | Path, stage: str, keep: int, kind: str = "step") -> list[Path]:
    """Delete all but the `keep` newest `stage{stage}_{kind}*.safetensors` (and their side files); kind is
    "step" or "epoch". `_latest` and `_best` are never touched (hard links keep their content whatever
    happens to the file they were linked from); keep=0 keeps everything.
    """
    if keep <= 0:
        return []
    pattern = re.compile(rf"^stage{re.escape(stage)}_{kind}(\d+){re.escape(SUFFIX)}$")
    found = sorted((int(m.group(1)), p) for p in Path(output_dir).iterdir()
                   if (m := pattern.match(p.name)))
    removed = []
    for _, path in found[:-keep]:
        for f in (path, train_state_path(path)):
            if f.exists():
                f.unlink()
                removed.append(f)
    return removed
