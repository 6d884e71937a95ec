"""Every trained part back from a checkpoint, in one place: the way to load a model, for training and
inference alike (the `from_pretrained` of IRA).

A checkpoint is self-describing: shapes, tokenizer and codec come from its metadata, never from
constants, so stage 2, stage 3, inference and the UI can load any checkpoint on their own. The models
build themselves (`SpeechLM.from_checkpoint`, `PerceiverAdapter.from_checkpoint`,
`StyleEncoder.from_checkpoint`); the codec and the text tokenizer, which are not models, are rebuilt
here. Each function takes a loaded `Checkpoint` (read once, many parts) or a path.

The file format is `ira/checkpoint.py`; the training engine's resume side file is not read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ira.checkpoint import Checkpoint, CheckpointError, as_checkpoint
from ira.codec import codec_from_tensors, codec_to_tensors
from ira.codec.base import Codec
from ira.models.adapter import PerceiverAdapter
from ira.models.speech_lm import SpeechLM
from ira.models.style import StyleEncoder
from ira.text_tokenizer import text_tokenizer_from_dict


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


def codec_from_checkpoint(checkpoint: Checkpoint | str | Path, cfg: Any = None) -> Codec:
    """The codec the checkpoint's tokens belong to (MelCodec's fitted codebooks travel with it);
    `cfg` (an IRAConfig) supplies local settings such as where EnCodec's weights are."""
    ckpt = as_checkpoint(checkpoint)
    meta = ckpt.json_metadata("codec_meta")
    tensors = {k.replace("__", "."): v for k, v in ckpt.state_dict("codec").items()} if "codec" in ckpt.modules else {}
    codec = codec_from_tensors(tensors, meta, cfg.codec if cfg is not None else None)
    if codec.fingerprint != ckpt.metadata.get("codec_fingerprint"):
        raise CheckpointError(f"{ckpt.path}: the rebuilt codec has fingerprint {codec.fingerprint!r}, the "
                              f"checkpoint records {ckpt.metadata.get('codec_fingerprint')!r}")
    return codec


def tokenizer_from_checkpoint(checkpoint: Checkpoint | str | Path) -> Any:
    """The text tokenizer the SpeechLM was trained with (phonemes, characters...), exactly as in training."""
    return text_tokenizer_from_dict(as_checkpoint(checkpoint).json_metadata("tokenizer"))


def speech_lm_from_checkpoint(checkpoint: Checkpoint | str | Path, device: str | torch.device = "cpu",
                              module: str = "speech_lm") -> SpeechLM:
    """See `SpeechLM.from_checkpoint`."""
    return SpeechLM.from_checkpoint(checkpoint, device, module=module)


def feature_speech_lm_from_checkpoint(checkpoint: Checkpoint | str | Path,
                                      device: str | torch.device = "cpu") -> SpeechLM:
    """The SpeechLM whose features the adapter was trained on: the stage-2 model. In a stage-3 checkpoint
    that is the frozen reference, not the PPO policy (whose hidden states have drifted from it)."""
    ckpt = as_checkpoint(checkpoint)
    module = "reference" if "reference" in ckpt.modules else "speech_lm"
    return SpeechLM.from_checkpoint(ckpt, device, module=module)


def adapter_from_checkpoint(checkpoint: Checkpoint | str | Path,
                            device: str | torch.device = "cpu") -> PerceiverAdapter:
    """See `PerceiverAdapter.from_checkpoint`."""
    return PerceiverAdapter.from_checkpoint(checkpoint, device)


def style_encoder_from_checkpoint(checkpoint: Checkpoint | str | Path,
                                  device: str | torch.device = "cpu") -> StyleEncoder:
    """See `StyleEncoder.from_checkpoint`."""
    return StyleEncoder.from_checkpoint(checkpoint, device)


def phoneme_reader_from_checkpoint(checkpoint: Checkpoint | str | Path,
                                   device: str | torch.device = "cpu") -> nn.Linear | None:
    """Stage 2's phoneme reader: a linear map from the adapter's encoded frames to the SpeechLM tokenizer's
    ids + 1 (0 = the CTC blank), trained by CTC on the corpus's transcripts (`align.phoneme_ctc_weight`).
    None when the checkpoint has none, or a stage-2 checkpoint whose run did not train it."""
    ckpt = as_checkpoint(checkpoint)
    if "align_phonemes" not in ckpt.modules:
        return None
    if ckpt.stage == "2" and not float(ckpt.config.get("align", {}).get("phoneme_ctc_weight", 0.0)):
        return None
    state = ckpt.state_dict("align_phonemes")
    reader = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    reader.load_state_dict(state)
    return reader.to(device)
