"""Int8 weight quantization of a SpeechLM for CPU generation (opt-in), and how much it changes.

At batch 1 a generation step is a chain of matrix-vector products, and their time goes into reading the
weights. `Int8Linear` stores each linear layer's weight in int8 with one bf16 scale per output row
(four times less to read than fp32) and multiplies in bf16 with PyTorch's int8 weight-only kernel
(`torch._weight_int8pack_mm`, the one torchao and gpt-fast use on CPU). Activations stay bf16 rather than
being quantized per step: on this machine that kernel ran the laptop model's 33 products per step in
1.16 ms against 1.59 ms for `torch.ao`'s dynamic quantization (which is also deprecated). Embeddings,
norms and attention stay fp32. The quality check runs both models teacher-forced on the same batch and
reports how often their most likely token agrees per frame and codebook, and both losses, so the choice
is made on numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ira.models.speech_lm import SpeechLM

_K_MULTIPLE = 64
"""The kernel needs the input width to be a multiple of 64 (it reads wrong memory otherwise)."""


class Int8Linear(nn.Module):
    """y = x W^T with W in int8 and one scale per output row, computed in bf16, returned in x's dtype.

    An input width that is not a multiple of 64 (the SwiGLU hidden width, 1368 at the laptop size) is
    padded with zero weight columns, and the input with zeros, so the result is unchanged.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear covers bias-free linear layers (the SpeechLM's); this one has a bias")
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.pad = -self.in_features % _K_MULTIPLE
        largest = weight.abs().amax(dim=1).clamp(min=1e-12)
        # the kernel multiplies by a bf16 scale: round it up to one (no weight then clips) and quantize
        # against that very scale, so every weight is off by at most half a step
        scale = (largest / 127.0).to(torch.bfloat16)
        scale = torch.where(scale.float() * 127.0 < largest, torch.nextafter(scale, scale.new_tensor(float("inf"))),
                            scale)
        quantized = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", F.pad(quantized, (0, self.pad)).contiguous())
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_bf16(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_features] in any float dtype -> [N, out_features] in bf16, for callers that go on in bf16
        or let the next operation promote (the cached generation step saves a conversion per layer)."""
        x = x.to(torch.bfloat16)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with, [out_features, in_features]."""
        return self.weight_int8[:, :self.in_features].float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, bf16 compute"


def quantize_int8(model: SpeechLM) -> SpeechLM:
    """A copy of `model` (left untouched), in eval mode, whose nn.Linear layers are `Int8Linear`.

    CPU only: the int8 weight-only kernel is PyTorch's CPU (and Apple MPS) kernel; on a GPU use bf16.
    """
    if model.device.type != "cpu":
        raise ValueError(f"int8 weight quantization runs on the CPU; this model is on {model.device}. "
                         "On a GPU use bf16/fp16 instead")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no int8 weight-only kernel "
                           "(torch._weight_int8pack_mm); run in fp32 or install the pinned torch")
    clone = copy.deepcopy(model).eval()
    _replace_linears(clone)
    return clone


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child)


@dataclass
class QuantizationQuality:
    token_agreement: float
    """Share of (frame, codebook) targets where both models' most likely token is the same."""
    loss_fp32: float
    loss_int8: float
    targets: int


@torch.inference_mode()
def quantization_quality(reference: SpeechLM, quantized: SpeechLM, codes: torch.Tensor,
                         codes_lengths: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None,
                         text_mask: Optional[torch.Tensor] = None, style: Optional[torch.Tensor] = None
                         ) -> QuantizationQuality:
    """Teacher-forced comparison of the two models on `codes` [B, K, T] (and their conditions)."""
    a = reference.eval()(text_ids, text_mask, style, codes, codes_lengths)
    b = quantized.eval()(text_ids, text_mask, style, codes, codes_lengths)
    mask = a.target_mask
    same = (a.logits.argmax(-1) == b.logits.argmax(-1)) & mask
    n = int(mask.sum())
    return QuantizationQuality(token_agreement=float(same.sum()) / max(n, 1), loss_fp32=float(a.loss),
                               loss_int8=float(b.loss), targets=n)
