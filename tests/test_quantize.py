"""Int8 weight quantization of the SpeechLM (ira/models/quantize.py): what it changes and by how much."""

import pytest
import torch

from ira.models.quantize import Int8Linear, quantization_quality, quantize_int8
from ira.training.checkpoint import load_checkpoint
from ira.models.hub import speech_lm_from_checkpoint, tokenizer_from_checkpoint

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
    bias_free = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None]
    int8 = [name for name, m in quantized.named_modules() if isinstance(m, Int8Linear)]
    assert bias_free and int8 == bias_free        # every bias-free linear, and only those
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
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


@pytest.mark.parametrize("in_features", [128, 100], ids=["multiple of 64", "padded to 128"])
def test_int8_linear_computes_with_its_dequantized_weight(in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 96, bias=False)
    layer = Int8Linear(linear)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == (96, in_features + layer.pad)
    assert layer.weight_int8.shape[1] % 64 == 0
    # rounding to int8 with a per-row scale moves no weight by more than half a step of that scale
    assert ((layer.dequantized_weight() - linear.weight).abs() <= layer.scale.float()[:, None] * 0.501).all()
    x = torch.randn(2, 3, in_features)
    y = layer(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float32
    reference = x @ layer.dequantized_weight().t()
    assert (y - reference).abs().max() < 0.02 * reference.abs().max()   # bf16 compute
    assert torch.equal(layer.forward_bf16(x.reshape(6, in_features)).float(), y.reshape(6, 96))


def test_int8_linear_refuses_a_bias():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear(torch.nn.Linear(64, 8))
