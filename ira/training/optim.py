"""AdamW with decoupled weight decay on matrices only (not on norms, biases or embeddings)."""

from __future__ import annotations

from typing import Any, Iterable, Union

import torch
from torch import nn

ParamsOrGroups = Union[Iterable[nn.Parameter], Iterable[dict[str, Any]]]

_NO_DECAY_MODULES = (
    nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)
_NO_DECAY_NAME_PARTS = ("norm", "embed")
ADAM_BETAS = (0.9, 0.95)  # beta2 = 0.95: steadier than 0.999 for small transformers on small data


def no_decay_ids(modules: dict[str, nn.Module]) -> set[int]:
    """ids of parameters that get no weight decay.

    A parameter is exempt when it is 1-D (biases, norm gains, scalars such as a log temperature),
    owned by an embedding or normalisation module, or named like one (``tok_embed``, ``ln_norm``).
    Tied weights are exempt if any of their owners is.
    """
    exempt: set[int] = set()
    for module in modules.values():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}".lower()
                if (p.ndim < 2 or isinstance(mod, _NO_DECAY_MODULES)
                        or any(part in name for part in _NO_DECAY_NAME_PARTS)):
                    exempt.add(id(p))
    return exempt


def param_groups(params: ParamsOrGroups, modules: dict[str, nn.Module],
                 weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters (or the task's own groups) into decay / no-decay groups.

    A task group that sets ``weight_decay`` itself is kept as is; other keys (e.g. ``lr``) are
    carried into both halves. Parameters are de-duplicated by identity and must require grad.
    """
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    exempt = no_decay_ids(modules)
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        plist = []
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            plist.append(p)
        if not plist:
            continue
        if "weight_decay" in extra:
            out.append({"params": plist, **extra})
            continue
        decay = [p for p in plist if id(p) not in exempt]
        no_decay = [p for p in plist if id(p) in exempt]
        if decay:
            out.append({"params": decay, **extra, "weight_decay": weight_decay})
        if no_decay:
            out.append({"params": no_decay, **extra, "weight_decay": 0.0})
    return out


def build_adamw(groups: list[dict[str, Any]], lr: float, device_type: str) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel where every parameter lives on CUDA."""
    fused = device_type == "cuda" and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=1e-8, fused=fused or None)
