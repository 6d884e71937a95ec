"""Int8 dynamic quantization of the SpeechLM (ira/models/quantize.py): what it changes and by how much."""

import pytest
import torch

from ira.models.quantize import quantization_quality, quantize_int8
from ira.training.checkpoint import load_checkpoint
from ira.training.components import speech_lm_from_checkpoint, tokenizer_from_checkpoint

AGREEMENT_THRESHOLD = 0.9
"""Share of teacher-forced (frame, codebook) argmax tokens int8 must keep equal to fp32 on a trained model."""


@pytest.fixture(scope="module")
def trained(tiny_stage2):
    ckpt = load_checkpoint(tiny_stage2[2].last_checkpoint)
    return speech_lm_from_checkpoint(ckpt), tokenizer_from_checkpoint(ckpt)


def test_int8_copies_and_leaves_the_original_alone(trained):
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in quantized.modules())
    assert all(isinstance(m, torch.nn.Linear) for m in model.modules() if "Linear" in type(m).__name__)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_int8_agrees_with_fp32_above_the_threshold(trained):
    model, tokenizer = trained
    quantized = quantize_int8(model)
    torch.manual_seed(0)
    codes = torch.randint(0, model.codebook_size, (4, model.n_codebooks, 40))
    text_ids, text_mask = tokenizer.batch_encode(["the door is open", "hello there", "a b c", "listen"])
    quality = quantization_quality(model, quantized, codes, None, text_ids, text_mask)
    assert quality.targets > 0
    assert quality.token_agreement >= AGREEMENT_THRESHOLD, quality
    assert abs(quality.loss_int8 - quality.loss_fp32) < 0.05 * quality.loss_fp32, quality


def test_speaker_speaks_with_int8(tiny_stage2):
    from ira.speaker import SamplingSettings, Speaker
    speaker = Speaker.from_checkpoint(tiny_stage2[2].last_checkpoint, device="cpu", int8=True)
    result = speaker.speak("the door is open", settings=SamplingSettings(max_seconds=0.5, temperature=0))
    assert result.codes.shape[1] > 0 and result.waveform.numel() > 0
