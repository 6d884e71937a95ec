"""Int8 dynamic quantization of a SpeechLM for CPU generation (opt-in), and how much it changes.

At batch 1 a generation step is a chain of matrix-vector products: the time goes into reading the
weights, so storing the linear layers' weights in int8 (activations quantized on the fly, per step)
reads four times less memory. Embeddings and norms stay fp32. The quality check runs both models
teacher-forced on the same batch and reports how often their most likely token agrees per frame and
codebook, and both losses, so the choice is made on numbers.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ira.models.speech_lm import SpeechLM


def quantize_int8(model: SpeechLM) -> SpeechLM:
    """A copy of `model` (left untouched) whose nn.Linear layers run int8 dynamic quantization.

    CPU only (PyTorch's quantized kernels are fbgemm / qnnpack); the copy is in eval mode, for inference.
    """
    if model.device.type != "cpu":
        raise ValueError(f"int8 dynamic quantization runs on the CPU; this model is on {model.device}. "
                         "On a GPU use bf16/fp16 instead")
    engines = torch.backends.quantized.supported_engines
    if not any(engine in engines for engine in ("fbgemm", "x86", "qnnpack")):
        raise RuntimeError(f"this PyTorch build has no quantized CPU engine ({engines}); run in fp32")
    clone = copy.deepcopy(model).eval()
    with warnings.catch_warnings():   # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)


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
