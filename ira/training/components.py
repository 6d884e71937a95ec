"""Put trained parts into a checkpoint and get them back: codec, text tokenizer, SpeechLM.

A checkpoint is self-describing: shapes, tokenizer and codec come from its metadata, never from
constants, so stage 2, stage 3 and inference can load any checkpoint on their own.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ira.codec import codec_from_tensors, codec_to_tensors
from ira.codec.base import Codec
from ira.models.speech_lm import SpeechLM
from ira.text_tokenizer import text_tokenizer_from_dict
from ira.training.checkpoint import Checkpoint, CheckpointError


class CodecState(nn.Module):
    """The codec's tensors as buffers, so the engine saves them under `codec.` like any module.

    MelCodec's fitted codebooks travel with every checkpoint (inference needs no corpus folder);
    EnCodec contributes no tensors, only its fingerprint in the metadata.
    """

    def __init__(self, codec: Codec):
        super().__init__()
        tensors, self.meta = codec_to_tensors(codec)
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "__"), tensor.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): buf for name, buf in self.named_buffers()}


def component_metadata(codec: Codec, tokenizer: Any, speech_lm: SpeechLM) -> dict[str, str]:
    """The string metadata every checkpoint with a SpeechLM carries."""
    _, codec_meta = codec_to_tensors(codec)
    return {
        "codec_fingerprint": codec.fingerprint,
        "codec_meta": json.dumps(codec_meta),
        "tokenizer": json.dumps(tokenizer.to_dict()),
        "speech_lm": json.dumps(speech_lm.config_dict()),
    }


def _meta_json(ckpt: Checkpoint, key: str) -> Any:
    if key not in ckpt.metadata:
        raise CheckpointError(f"{ckpt.path} has no '{key}' metadata: it is not a checkpoint with a SpeechLM "
                              f"(it holds {', '.join(ckpt.modules) or 'nothing'}); use a stage 1, 2 or 3 checkpoint")
    return json.loads(ckpt.metadata[key])


def codec_from_checkpoint(ckpt: Checkpoint, cfg: Any = None) -> Codec:
    meta = _meta_json(ckpt, "codec_meta")
    tensors = {k.replace("__", "."): v for k, v in ckpt.state_dict("codec").items()} if "codec" in ckpt.modules else {}
    codec = codec_from_tensors(tensors, meta, cfg.codec if cfg is not None else None)
    if codec.fingerprint != ckpt.metadata.get("codec_fingerprint"):
        raise CheckpointError(f"{ckpt.path}: the rebuilt codec has fingerprint {codec.fingerprint!r}, the "
                              f"checkpoint records {ckpt.metadata.get('codec_fingerprint')!r}")
    return codec


def tokenizer_from_checkpoint(ckpt: Checkpoint) -> Any:
    return text_tokenizer_from_dict(_meta_json(ckpt, "tokenizer"))


def style_encoder_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> Any:
    """The frozen-text-tower style encoder stored as module "style" (any stage), in eval mode."""
    from ira.config import section_from_dict
    from ira.models.style import StyleEncoder

    if "style" not in ckpt.modules:
        raise CheckpointError(f"{ckpt.path} (stage {ckpt.stage}) holds no style encoder (modules: "
                              f"{', '.join(ckpt.modules)}); train one with `ira train --stage style`")
    cfg = section_from_dict("style", _meta_json(ckpt, "style_config"), source=f"{ckpt.path} (style metadata)")
    model = StyleEncoder(cfg)
    recorded = ckpt.metadata.get("text_encoder")
    if recorded and recorded != model.sentence_encoder.name:
        raise CheckpointError(f"{ckpt.path} was trained on the sentence encoder {recorded!r}, but this machine "
                              f"loads {model.sentence_encoder.name!r}; the projection only fits the former")
    ckpt.load_into("style", model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def speech_lm_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu",
                              module: str = "speech_lm") -> SpeechLM:
    """The SpeechLM of a checkpoint, shaped from its metadata, weights loaded, in eval mode.

    `module="reference"` gives a stage-3 checkpoint's frozen stage-2 SpeechLM (same shape as the policy).
    """
    model = SpeechLM.from_config_dict(_meta_json(ckpt, "speech_lm"))
    ckpt.load_into(module, model)
    return model.to(device).eval()
