"""What machine are we on? Device, memory, precision support, 4-bit support, and the preset to use."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
from dataclasses import dataclass

import psutil
import torch


@dataclass(frozen=True)
class HardwareInfo:
    device: str                 # "cuda", "mps" or "cpu"
    device_name: str
    system_memory_gb: float
    accelerator_memory_gb: float | None   # total memory of the GPU (None on CPU; MPS shares system memory)
    accelerator_free_gb: float | None
    bf16: bool
    fp16: bool
    four_bit: bool              # bitsandbytes NF4 usable (CUDA + bitsandbytes importable)
    four_bit_reason: str
    cpu_count: int
    preset: str                 # "cpu", "laptop" or "a100"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        mem = f"{self.accelerator_memory_gb:.1f} GB" if self.accelerator_memory_gb else "shared"
        return (f"{self.device.upper()} ({self.device_name}, {mem}) · RAM {self.system_memory_gb:.1f} GB · "
                f"bf16 {'yes' if self.bf16 else 'no'} · 4-bit {'yes' if self.four_bit else 'no'} · "
                f"preset {self.preset}")


def _bitsandbytes_status(device: str) -> tuple[bool, str]:
    if device == "mps":
        return False, "bitsandbytes 4-bit is not supported on Apple MPS"
    if device != "cuda":
        return False, "4-bit loading needs a CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken CUDA setup shows up here
        return False, f"bitsandbytes does not import: {exc}"
    return True, "bitsandbytes with CUDA"


def pick_preset(device: str, accelerator_memory_gb: float | None, system_memory_gb: float) -> str:
    """a100 for >= 40 GB CUDA cards, laptop for 8+ GB GPUs and Apple silicon with 16+ GB, else cpu."""
    if device == "cuda" and accelerator_memory_gb is not None:
        if accelerator_memory_gb >= 40:
            return "a100"
        if accelerator_memory_gb >= 8:
            return "laptop"
        return "cpu"
    if device == "mps" and system_memory_gb >= 16:
        return "laptop"
    return "cpu"


def detect_hardware() -> HardwareInfo:
    system_gb = psutil.virtual_memory().total / 2**30
    cpu_count = psutil.cpu_count(logical=True) or 1
    if torch.cuda.is_available():
        device = "cuda"
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        name, acc_total, acc_free = props.name, total / 2**30, free / 2**30
        bf16 = torch.cuda.is_bf16_supported()
        fp16 = True
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, name = "mps", f"Apple {platform.machine()}"
        acc_total = acc_free = None
        bf16 = fp16 = True
    else:
        device, name = "cpu", platform.processor() or platform.machine()
        acc_total = acc_free = None
        bf16, fp16 = False, False
    four_bit, reason = _bitsandbytes_status(device)
    return HardwareInfo(
        device=device, device_name=name, system_memory_gb=round(system_gb, 2),
        accelerator_memory_gb=None if acc_total is None else round(acc_total, 2),
        accelerator_free_gb=None if acc_free is None else round(acc_free, 2),
        bf16=bf16, fp16=fp16, four_bit=four_bit, four_bit_reason=reason, cpu_count=cpu_count,
        preset=pick_preset(device, acc_total, system_gb),
    )


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' -> the best available device; an unavailable explicit request is a clear error."""
    requested = requested.lower()
    if requested == "auto":
        return torch.device(detect_hardware().device)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available; use device='auto' or 'cpu'")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' requested but Apple MPS is not available; use device='auto' or 'cpu'")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise RuntimeError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(requested)


def compiled_cpu_kernels_enabled() -> bool:
    """Whether CPU generation may use the numba-compiled step and sampler (`IRA_NUMBA=0` turns them off,
    e.g. to compare with the PyTorch path or where numba misbehaves on a platform)."""
    return os.environ.get("IRA_NUMBA", "1") != "0"
