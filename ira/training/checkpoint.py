"""IRA checkpoints: one safetensors file with every component, plus a side file to resume training.

`<output_dir>/stage1_epoch3.safetensors` holds each module's state dict under its name
(`speech_lm.blocks.0.attn.qkv.weight`, `adapter.latents`, `style.proj.weight`, ...) and string
metadata: format, format_version, stage, epoch, step, config (JSON), modules (JSON list),
checkpoint_id, created, ira_version, plus the task's own keys (codec_fingerprint, tokenizer, ...).

`<output_dir>/stage1_epoch3.train_state.pt` holds the optimizer, scheduler, RNG states and the
data position, as plain tensors / dicts (written with torch.save, read with weights_only=True).
It carries the same checkpoint_id, so a pair torn by a crash between the two writes is detected.

Every write goes to a temporary file that is renamed into place (`os.replace`), so a reader never
sees half a checkpoint; leftover `*.tmp` files are never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

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


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)`, flush it to disk, then rename it to `path`; never leaves `path` half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


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


def best_path(output_dir: str | Path, stage: str) -> Path:
    """`stage{stage}_best.safetensors`: the checkpoint with the best validation figure so far."""
    return Path(output_dir) / f"stage{stage}_best{SUFFIX}"


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


def save_checkpoint(path: str | Path, modules: Mapping[str, ModuleOrState], *, stage: str,
                    epoch: int, step: int, config: Any,
                    metadata: Optional[Mapping[str, str]] = None,
                    train_state: Optional[dict[str, Any]] = None) -> Path:
    """Write `path` (and `<name>.train_state.pt` when `train_state` is given), atomically.

    `modules` maps a name (a Python identifier: speech_lm, adapter, style...) to an nn.Module or a
    state dict. `config` is an IRAConfig or a plain dict. `metadata` holds the task's own string
    keys (codec_fingerprint, tokenizer, ...); they may not reuse the reserved keys.
    Only the main process should call this.
    """
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise CheckpointError(f"checkpoint file name {path.name!r} must end with {SUFFIX}")
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
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    from ira import __version__

    checkpoint_id = uuid.uuid4().hex
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "stage": str(stage),
        "epoch": str(int(epoch)), "step": str(int(step)), "config": json.dumps(config_dict),
        "modules": json.dumps(list(modules)), "checkpoint_id": checkpoint_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ira_version": __version__, **extra,
    }
    if train_state is not None:
        state = {**train_state, "checkpoint_id": checkpoint_id, "stage": str(stage),
                 "step": int(step), "epoch": int(epoch)}
        atomic_write(train_state_path(path), lambda tmp: torch.save(state, tmp))
    saveable = _saveable(tensors)
    atomic_write(path, lambda tmp: save_file(saveable, str(tmp), metadata=meta))
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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load every tensor of an IRA checkpoint, grouped by module. Errors are CheckpointError."""
    path = Path(path)
    meta = read_metadata(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in checkpoint_modules(meta)}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            module, _, rest = key.partition(".")
            tensors.setdefault(module, {})[rest] = f.get_tensor(key)
    return Checkpoint(path=path, tensors=tensors, metadata=dict(meta))


def read_header(path: str | Path) -> Checkpoint:
    """A Checkpoint holding only the metadata (no tensors): stage, modules and config, at the cost of the
    file's header. For deciding what a file is before loading it."""
    path = Path(path)
    return Checkpoint(path=path, tensors={}, metadata=dict(read_metadata(path)))


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
    except Exception as exc:  # pickle errors, a refused global, a truncated file
        raise CheckpointError(f"{side} cannot be read safely ({exc}); it must be written by IRA's "
                              f"trainer (plain tensors and dicts only)") from exc
    if not isinstance(state, dict) or "checkpoint_id" not in state:
        raise CheckpointError(f"{side} is not an IRA training-state file")
    if checkpoint_id is not None and state["checkpoint_id"] != checkpoint_id:
        raise CheckpointError(
            f"{side} belongs to a different save than {Path(path).name} (step {state.get('step')}); "
            f"a save was probably interrupted between the two files. Resume from another "
            f"checkpoint in {Path(path).parent} (e.g. the last stage*_epoch* file).")
    return state


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
