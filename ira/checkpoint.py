"""IRA checkpoints: one safetensors file with every component, read by training and inference alike.

`<output_dir>/stage1_epoch3.safetensors` holds each module's state dict under its name
(`speech_lm.blocks.0.attn.qkv.weight`, `adapter.latents`, `style.proj.weight`, ...) and string
metadata: format, format_version, stage, epoch, step, config (JSON), modules (JSON list),
checkpoint_id, created, ira_version, plus the task's own keys (codec_fingerprint, tokenizer, ...).

This module is the file format and its names; it imports nothing of IRA's models or training. The
parts are rebuilt from a checkpoint by their own `from_checkpoint` constructors (`ira/models/hub.py`
gathers them). The side file that resumes a run, `<name>.train_state.pt` (optimizer, scheduler, RNG
states, data position, tied to its checkpoint by checkpoint_id), belongs to the training engine
(`ira/training/checkpoint.py`); only its name is known here, to refuse it politely when it is passed
as a checkpoint.

Every write goes to a temporary file that is renamed into place (`os.replace`), so a reader never
sees half a checkpoint; leftover `*.tmp` files are never loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "ira-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TRAIN_STATE_SUFFIX = ".train_state.pt"
RESERVED_KEYS = frozenset({"format", "format_version", "stage", "epoch", "step", "config", "modules",
                           "checkpoint_id", "created", "ira_version"})
_STAGE_NAMES = {"1": "stage 1 (SpeechLM pre-training)", "2": "stage 2 (adapter alignment)",
                "3": "stage 3 (PPO alignment)", "style": "style-encoder training"}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

ModuleOrState = Union[nn.Module, Mapping[str, torch.Tensor]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked; the message says why and what to do."""


# ---------------------------------------------------------------- names

def checkpoint_path(output_dir: str | Path, stage: str, *, epoch: Optional[int] = None,
                    step: Optional[int] = None) -> Path:
    """`stage{stage}_epoch{epoch}`, `stage{stage}_step{step}` or (neither) `stage{stage}_latest`."""
    if epoch is not None:
        name = f"stage{stage}_epoch{epoch}"
    elif step is not None:
        name = f"stage{stage}_step{step}"
    else:
        name = f"stage{stage}_latest"
    return Path(output_dir) / f"{name}{SUFFIX}"


def latest_path(output_dir: str | Path, stage: str) -> Path:
    return checkpoint_path(output_dir, stage)


def train_state_path(path: str | Path) -> Path:
    """The side file of a checkpoint: `x.safetensors` -> `x.train_state.pt`."""
    path = Path(path)
    stem = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    return path.with_name(stem + TRAIN_STATE_SUFFIX)


def stage_checkpoints(output_dir: str | Path, stage: str) -> list[Path]:
    """Every checkpoint of `stage` in `output_dir` (`stage{stage}_*.safetensors`: step, epoch, latest, best),
    newest first by the step in its header (temporary files are never considered)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"stage{stage}_*{SUFFIX}") if p.is_file()]
    return sorted(found, key=_recency, reverse=True)


def _recency(path: Path) -> tuple[int, float]:
    """(step in the header, modification time): unreadable headers sort as oldest."""
    try:
        step = int(read_metadata(path).get("step", -1))
    except (CheckpointError, ValueError):
        step = -1
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return step, mtime


def find_latest(output_dir: str | Path, stage: str) -> Optional[Path]:
    """`stage{stage}_latest.safetensors` if it exists (temporary files are never considered)."""
    path = latest_path(output_dir, stage)
    return path if path.is_file() else None


# ---------------------------------------------------------------- atomic files

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], expected_bytes: Optional[int] = None) -> Path:
    """Call `write(tmp)`, flush it to disk, then rename it to `path`; never leaves `path` half-written.

    A write the file system refuses (a full disk, a file-size limit) is a CheckpointError that says so,
    where, and how much the file needed (`expected_bytes`, when the caller knows); whatever `path`
    held before stays intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        if not _is_out_of_space(exc):
            raise
        raise CheckpointError(_out_of_space_message(path, expected_bytes)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


_OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC / EFBIG / EDQUOT, also when torch.save's zip writer reports it only as a short write
    ("[enforce fail at inline_container.cc...] unexpected pos") and safetensors as "(os error 28)"."""
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE_ERRNOS:
        return True
    text = str(exc)
    return any(mark in text for mark in ("unexpected pos", "No space left", "File too large", "Disk quota",
                                         *(f"(os error {n})" for n in _OUT_OF_SPACE_ERRNOS)))


def _out_of_space_message(path: Path, expected_bytes: Optional[int]) -> str:
    free = shutil.disk_usage(path.parent).free
    needed = f"about {expected_bytes / 1e6:.1f} MB" if expected_bytes else "more space"
    return (f"the disk holding {path.parent} is full (or a file-size limit was hit): writing {path.name} needed "
            f"{needed} and {free / 1e6:.1f} MB are free. {_what_is_kept(path)}")


def _what_is_kept(path: Path) -> str:
    """After a refused write of `path`: what the folder still holds, truly (the earlier checkpoints of its stage,
    the file's own previous content, or nothing at all), and what to do."""
    room = ("Free some space (old stage*_step* checkpoints can go; training.keep_step_checkpoints keeps fewer) or set "
            "training.output_dir to a disk with room")
    stage = re.match(r"stage([A-Za-z0-9]+)_", path.name)
    kept = stage_checkpoints(path.parent, stage.group(1)) if stage else []
    if kept:
        return (f"Nothing was lost: the checkpoints saved before are intact (the newest: {kept[0]}). {room}, then "
                f"resume from it.")
    if path.exists():
        return f"Nothing was lost: {path} keeps its previous content. {room}."
    return (f"No checkpoint had been saved in {path.parent} yet, so there is none to resume from. {room}, then "
            f"start the run again.")


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: what a save of it will need, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the `*.<pid>.tmp` files of interrupted saves in `directory` whose writing process is gone
    (a live process may still be writing its own). Returns what was removed."""
    removed = []
    for tmp in directory.glob("*.tmp"):
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:   # another cleaner got there first, or a read-only folder: not ours to fight
            pass
    return removed


def best_path(output_dir: str | Path, stage: str) -> Path:
    """`stage{stage}_best.safetensors`: the checkpoint with the best validation figure so far."""
    return Path(output_dir) / f"stage{stage}_best{SUFFIX}"


# ---------------------------------------------------------------- save

def _module_state(obj: ModuleOrState) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (tied weights): safetensors needs that."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()
        elif t.numel():
            seen_storage.add(ptr)
        out[key] = t
    return out


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity (one flag per tensor, read once)."""
    names = [name for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def _nonfinite_summary(names: list[str], n: int = 5) -> str:
    """"3 tensors hold NaN or infinite values (speech_lm.head.weight, ...)"."""
    shown = ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
    return f"{len(names)} tensor(s) hold NaN or infinite values ({shown})"


def refuse_nonfinite(path: str | Path, modules: Mapping[str, ModuleOrState]) -> None:
    """Raise CheckpointError, before anything is written, when a module's weights hold NaN or inf."""
    _refuse_nonfinite(Path(path), {f"{name}.{key}": value for name, obj in modules.items()
                                   for key, value in _module_state(obj).items()})


def _refuse_nonfinite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {_nonfinite_summary(bad)}. Weights that are not finite "
                              f"cannot speak or be trained further; the training diverged before this save "
                              f"(lower the learning rate, then resume from an earlier checkpoint)")


def new_checkpoint_id() -> str:
    """The id that ties a checkpoint to its side file (and tells two saves apart)."""
    return uuid.uuid4().hex


def check_checkpoint_name(path: Path) -> None:
    if not path.name.endswith(SUFFIX):
        raise CheckpointError(f"checkpoint file name {path.name!r} must end with {SUFFIX}")


def save_checkpoint(path: str | Path, modules: Mapping[str, ModuleOrState], *, stage: str,
                    epoch: int, step: int, config: Any,
                    metadata: Optional[Mapping[str, str]] = None,
                    checkpoint_id: Optional[str] = None) -> Path:
    """Write `path` atomically (the training engine writes its resume side file through
    `ira.training.checkpoint.save_checkpoint`, which calls this with the pair's `checkpoint_id`).

    `modules` maps a name (a Python identifier: speech_lm, adapter, style...) to an nn.Module or a
    state dict. `config` is an IRAConfig or a plain dict. `metadata` holds the task's own string
    keys (codec_fingerprint, tokenizer, ...); they may not reuse the reserved keys.
    Only the main process should call this.
    """
    path = Path(path)
    check_checkpoint_name(path)
    extra = dict(metadata or {})
    clash = sorted(RESERVED_KEYS & extra.keys())
    if clash:
        raise CheckpointError(f"task metadata may not use the reserved keys {clash}")
    bad = [k for k, v in extra.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"checkpoint metadata values must be strings; not so for {bad} "
                              f"(json.dumps them)")
    tensors: dict[str, torch.Tensor] = {}
    for name, obj in modules.items():
        if not _MODULE_NAME.match(name):
            raise CheckpointError(f"module name {name!r} must be a Python identifier (it prefixes "
                                  f"the tensor names, e.g. speech_lm.)")
        for key, value in _module_state(obj).items():
            tensors[f"{name}.{key}"] = value
    _refuse_nonfinite(path, tensors)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    from ira import __version__

    checkpoint_id = checkpoint_id or new_checkpoint_id()
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "stage": str(stage),
        "epoch": str(int(epoch)), "step": str(int(step)), "config": json.dumps(config_dict),
        "modules": json.dumps(list(modules)), "checkpoint_id": checkpoint_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ira_version": __version__, **extra,
    }
    saveable = _saveable(tensors)
    atomic_write(path, lambda tmp: save_file(saveable, str(tmp), metadata=meta), tensor_bytes(saveable))
    return path


# ---------------------------------------------------------------- load

@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors grouped by module name, and the raw string metadata."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str]

    @property
    def stage(self) -> str:
        return self.metadata["stage"]

    @property
    def epoch(self) -> int:
        return int(self.metadata["epoch"])

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def checkpoint_id(self) -> str:
        return self.metadata["checkpoint_id"]

    @property
    def modules(self) -> list[str]:
        return checkpoint_modules(self.metadata)

    @property
    def config(self) -> dict[str, Any]:
        """The config of the run that wrote this checkpoint, as a plain dict."""
        return json.loads(self.metadata["config"])

    @property
    def extra(self) -> dict[str, str]:
        """The task's own metadata (codec_fingerprint, tokenizer, shapes...)."""
        return {k: v for k, v in self.metadata.items() if k not in RESERVED_KEYS}

    def json_metadata(self, key: str) -> Any:
        """A JSON metadata entry the parts are rebuilt from (speech_lm, tokenizer, codec_meta, adapter...)."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} (stage {self.stage}) has no '{key}' metadata: it holds "
                                  f"{', '.join(self.modules) or 'nothing'}, not the part that needs it; use a "
                                  f"checkpoint of a stage that trains it (a SpeechLM: stage 1, 2 or 3)")
        return json.loads(self.metadata[key])

    def ira_config(self) -> Any:
        """The writing run's config as an IRAConfig (validated against today's schema)."""
        from ira.config import ConfigError, config_from_dict

        try:
            return config_from_dict(self.config, source=f"{self.path} (stored config)")
        except ConfigError as exc:
            raise CheckpointError(f"{self.path}: its stored config no longer fits this version of "
                                  f"IRA: {exc}") from exc

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.modules:
            raise CheckpointError(f"{self.path} (stage {self.stage}) has no module {name!r}; it holds "
                                  f"{', '.join(self.modules) or 'no modules'}")
        return self.tensors.get(name, {})

    def load_into(self, name: str, module: nn.Module, *, strict: bool = True,
                  current_config: Any = None) -> None:
        """Copy module `name`'s tensors into `module`, with errors that name the tensor and shapes.

        Pass `current_config` (the IRAConfig the model was built from) to have a shape mismatch
        explained by the config keys that differ from the checkpoint's.
        """
        state = dict(self.state_dict(name))
        for prefix, part in module.named_modules():   # older layouts renamed to the current one first
            upgrade = getattr(part, "upgrade_state_dict", None)
            if callable(upgrade):
                upgrade(state, f"{prefix}." if prefix else "")
        own = module.state_dict()
        for key, tensor in state.items():
            if key in own and tuple(own[key].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{self.path}: tensor '{name}.{key}' has shape {list(tensor.shape)} in the "
                    f"checkpoint but {list(own[key].shape)} in the model. "
                    + self._config_hint(name, current_config))
        if strict:
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"missing from the checkpoint: {_few(missing, name)}")
                if unexpected:
                    parts.append(f"not in the model: {_few(unexpected, name)}")
                raise CheckpointError(f"{self.path}: module '{name}' does not match the model "
                                      f"({'; '.join(parts)}). " + self._config_hint(name, current_config))
        module.load_state_dict(state, strict=strict)

    def _config_hint(self, name: str, current: Any) -> str:
        stored = self.config
        hint = f"The checkpoint was written with preset {stored.get('preset', '?')!r}"
        if current is None:
            section = stored.get(name)
            if isinstance(section, dict):
                shown = ", ".join(f"{k}={v}" for k, v in list(section.items())[:8])
                hint += f" and {name}: {shown}"
            return hint + "; build the model from the checkpoint's config (Checkpoint.ira_config())."
        now = current.to_dict() if hasattr(current, "to_dict") else dict(current)
        sections = [name] if isinstance(stored.get(name), dict) else [
            s for s, v in stored.items() if isinstance(v, dict) and s not in ("training", "data")]
        diffs = [f"{s}.{k}: checkpoint {v!r}, current {now.get(s, {}).get(k)!r}"
                 for s in sections for k, v in stored.get(s, {}).items()
                 if isinstance(now.get(s), dict) and now[s].get(k) != v]
        if diffs:
            hint += "; these config keys differ: " + "; ".join(diffs[:8])
        return hint + ". Use the checkpoint's config (Checkpoint.ira_config()) or start a new run."


def _few(keys: list[str], prefix: str, n: int = 5) -> str:
    shown = ", ".join(f"{prefix}.{k}" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _available(directory: Path) -> str:
    if not directory.is_dir():
        return f"the folder {directory} does not exist"
    names = sorted(p.name for p in directory.glob(f"*{SUFFIX}"))
    if not names:
        return f"{directory} holds no checkpoints"
    return f"available in {directory}: {', '.join(names[:8])}"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an IRA checkpoint without loading its tensors (cheap: reads the header)."""
    path = _check_path(Path(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path} is not a safetensors file ({exc}); IRA checkpoints are "
                              f"'*{SUFFIX}' files written by training") from exc
    if meta.get("format") != FORMAT:
        what = f"metadata keys {sorted(meta)}" if meta else "no metadata"
        raise CheckpointError(f"{path} is a safetensors file but not an IRA checkpoint ({what}); "
                              f"IRA checkpoints are written by `ira train` and carry format={FORMAT}")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format {version}, newer than this IRA "
                              f"understands ({FORMAT_VERSION}); upgrade IRA")
    return meta


def checkpoint_modules(meta: Mapping[str, str]) -> list[str]:
    """The module names a checkpoint's metadata (from `read_metadata`) lists: speech_lm, adapter, style..."""
    return json.loads(meta.get("modules", "[]"))


def _check_path(path: Path) -> Path:
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is a temporary file left by an interrupted save; it may be "
                              f"incomplete and is never loaded. Use the checkpoint without '.tmp' "
                              f"({_available(path.parent)})")
    if path.name.endswith(TRAIN_STATE_SUFFIX):
        raise CheckpointError(f"{path} is a checkpoint's training-state side file; pass the "
                              f"checkpoint itself, {path.name[:-len(TRAIN_STATE_SUFFIX)]}{SUFFIX}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file ({_available(path)})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} ({_available(path.parent)})")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    modules: Optional[Iterable[str]] = None) -> Checkpoint:
    """Load every tensor of an IRA checkpoint, grouped by module. Errors are CheckpointError: among them a
    checkpoint whose weights hold NaN or infinite values (a diverged run's), which nothing can use.

    `modules`: read only the tensors of these modules (the others stay empty in `tensors`): the app's Voice Style
    tab reads a stage-3 checkpoint's small style encoder without its SpeechLM, adapter and the rest."""
    path = Path(path)
    meta = read_metadata(path)
    flat = _read_tensors(path, device, None if modules is None else set(modules))
    bad = nonfinite_tensors(flat)
    if bad:
        raise CheckpointError(f"{path}: {_nonfinite_summary(bad)}: it was saved by a run whose weights had diverged, "
                              f"so it can neither speak nor resume. Use an earlier checkpoint of that run "
                              f"({_available(path.parent)}).")
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in checkpoint_modules(meta)}
    for key, tensor in flat.items():
        module, _, rest = key.partition(".")
        tensors.setdefault(module, {})[rest] = tensor
    return Checkpoint(path=path, tensors=tensors, metadata=dict(meta))


def _read_tensors(path: Path, device: str | torch.device = "cpu", modules: Optional[set[str]] = None
                  ) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {key: f.get_tensor(key) for key in f.keys() if modules is None or key.partition(".")[0] in modules}


def is_finite_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a readable IRA checkpoint whose weights are all finite (a good one to go back to)."""
    try:
        path = Path(path)
        read_metadata(path)
        return not nonfinite_tensors(_read_tensors(path))
    except Exception:  # noqa: BLE001 - CheckpointError, OSError, safetensors' own errors: not a good one either way
        return False


def as_checkpoint(checkpoint: "Checkpoint | str | Path") -> Checkpoint:
    """A loaded checkpoint as it is, a path loaded (the parts' `from_checkpoint` take either)."""
    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)


def read_header(path: str | Path) -> Checkpoint:
    """A Checkpoint holding only the metadata (no tensors): stage, modules and config, at the cost of the
    file's header. For deciding what a file is before loading it."""
    path = Path(path)
    return Checkpoint(path=path, tensors={}, metadata=dict(read_metadata(path)))


def require_stage(ckpt: Checkpoint, allowed: Iterable[str], purpose: str = "this") -> Checkpoint:
    """Raise unless `ckpt` comes from one of the `allowed` stages ("1", "2", "3", "style")."""
    allowed = [str(s) for s in allowed]
    if ckpt.stage not in allowed:
        wanted = " or ".join(_STAGE_NAMES.get(s, f"stage {s}") for s in allowed)
        raise CheckpointError(
            f"{ckpt.path} is a {_STAGE_NAMES.get(ckpt.stage, 'stage ' + ckpt.stage)} checkpoint "
            f"(step {ckpt.step}); {purpose} needs a checkpoint from {wanted}. Checkpoints are "
            f"named after their stage: stage<N>_epoch<E>.safetensors, stage<N>_latest.safetensors.")
    return ckpt


def check_compatible(ckpt: Checkpoint, *, codec_fingerprint: Optional[str] = None,
                     **expected: Optional[str]) -> None:
    """Raise if the checkpoint was made with another codec (or other recorded settings).

    Keys the caller passes as None, or that the checkpoint does not record, are not compared.
    """
    if codec_fingerprint is not None:
        have = ckpt.metadata.get("codec_fingerprint")
        if have is not None and have != codec_fingerprint:
            raise CheckpointError(
                f"{ckpt.path} was trained on tokens of codec {have!r}, but the current codec is "
                f"{codec_fingerprint!r}. Tokens of different codecs mean different sounds: use the "
                f"checkpoint's codec (its config is stored in the checkpoint: codec.name="
                f"{ckpt.config.get('codec', {}).get('name', '?')!r}) or retrain from stage 1.")
    for key, want in expected.items():
        have = ckpt.metadata.get(key)
        if want is not None and have is not None and have != str(want):
            raise CheckpointError(f"{ckpt.path} records {key}={have!r} but the current setting is "
                                  f"{want!r}; use matching settings or retrain.")


def checkpoint_figure(meta: Mapping[str, str]) -> str:
    """The figure a checkpoint's run keeps its best by, from its header: "wer 0.612", "choice accuracy 0.938
    (at step 1200)" when the validation was at another step than the save; "" when it holds none."""
    try:
        metric = json.loads(meta.get("metric") or "null")
    except json.JSONDecodeError:
        return ""
    if not isinstance(metric, dict) or not isinstance(metric.get("value"), (int, float)):
        return ""
    text = f"{str(metric.get('name', 'metric')).removeprefix('val_').replace('_', ' ')} {metric['value']:.3g}"
    if str(metric.get("step")) != str(meta.get("step")):
        text += f" (at step {metric.get('step')})"
    return text
