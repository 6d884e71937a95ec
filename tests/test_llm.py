"""The frozen LLM: the bundled GGUF, errors that name the llm.* setting, precision choices."""

import pytest
import torch

from ira.config import ConfigError, LLMConfig, load_config
from ira.models import llm as llm_module
from ira.models.llm import BUNDLED_NAME, LLMError, load_llm, resolve_dtype, resolve_quantization

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bundled_llm_loads_frozen_with_facts_from_its_config(bundled_llm):
    model = bundled_llm.model
    assert bundled_llm.bundled and bundled_llm.source == "bundled" and bundled_llm.name == BUNDLED_NAME
    assert bundled_llm.hidden_size == model.config.hidden_size == 576  # SmolLM2-135M
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert bundled_llm.dtype == torch.float32 and not bundled_llm.quantized
    weight = model.get_input_embeddings().weight
    assert bundled_llm.embed_norm > 0
    assert bundled_llm.embed_norm == pytest.approx(weight.norm(dim=-1).mean().item(), rel=1e-5)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(bundled_llm.embed(ids)[0], weight[1:4])


def test_bundled_llm_has_smollm2_chat_template(bundled_llm):
    tok = bundled_llm.tokenizer
    assert tok.chat_template
    prompt = bundled_llm.chat_prompt("hi there")
    assert "<|im_start|>user\nhi there<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert bundled_llm.end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert bundled_llm.end_of_turn_id in bundled_llm.stop_ids
    assert tok.pad_token_id is not None


def test_greedy_generation_returns_text(bundled_llm):
    tok = bundled_llm.tokenizer
    ids = torch.tensor([bundled_llm.encode(bundled_llm.chat_prompt("Repeat exactly: hello world"))])
    out = bundled_llm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                     do_sample=False, eos_token_id=bundled_llm.stop_ids)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print("SmolLM2-135M:", repr(reply))
    assert reply


def test_4bit_on_cpu_is_a_clear_error():
    with pytest.raises(LLMError, match=r"llm\.quantization"):
        load_llm(LLMConfig(quantization="4bit"), device="cpu")
    assert resolve_quantization("auto", torch.device("cpu"), gguf=False) is False
    assert resolve_quantization("none", torch.device("cpu"), gguf=False) is False


def test_4bit_is_skipped_for_a_gguf_file(monkeypatch):
    monkeypatch.setattr(llm_module, "four_bit_support", lambda device: (True, "bitsandbytes with CUDA"))
    cuda = torch.device("cuda")
    assert resolve_quantization("auto", cuda, gguf=False) is True
    assert resolve_quantization("4bit", cuda, gguf=True) is False  # transformers refuses GGUF + bitsandbytes
    assert resolve_quantization("auto", cuda, gguf=True) is False


def test_missing_local_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-llm"
    with pytest.raises(LLMError, match=r"llm\.name") as err:
        load_llm(LLMConfig(name=str(missing)))
    assert str(missing) in str(err.value) and "bundled" in str(err.value)
    with pytest.raises(LLMError, match="neither a config.json nor a .gguf"):
        load_llm(LLMConfig(name=str(tmp_path)))


def test_uncached_hub_id_offline_is_a_clear_error():
    with pytest.raises(LLMError, match=r"llm\.name") as err:
        load_llm(LLMConfig(name="ira-tests/no-such-model"))
    assert "ira-tests/no-such-model" in str(err.value) and "bundled" in str(err.value)


def test_dtype_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32


@pytest.mark.parametrize("override, key", [
    ("llm.quantization=8bit", "llm.quantization"),
    ("llm.dtype=fp8", "llm.dtype"),
    ("llm.max_new_tokens=0", "llm.max_new_tokens"),
    ("llm.name=", "llm.name"),
])
def test_llm_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("cpu", [override])


def test_presets_have_an_llm_section():
    assert load_config("cpu").llm.name == "bundled"
    assert load_config("a100").llm.name.startswith("HuggingFaceTB/SmolLM2")


def test_a_gguf_file_or_a_folder_with_one_is_a_source(tmp_path):
    from ira.models.llm import BUNDLED_GGUF, _resolve_source, bundled_llm_dir

    folder = bundled_llm_dir()
    by_file = _resolve_source(str(folder / BUNDLED_GGUF))
    by_folder = _resolve_source(str(folder))
    assert (by_file.location, by_file.gguf_file) == (by_folder.location, by_folder.gguf_file) == (str(folder), BUNDLED_GGUF)
    assert not by_file.bundled
    hub = _resolve_source("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert hub.gguf_file is None and hub.location == hub.name == "HuggingFaceTB/SmolLM2-360M-Instruct"
    (tmp_path / "a.gguf").touch()
    (tmp_path / "b.gguf").touch()
    with pytest.raises(LLMError, match="several .gguf files"):
        _resolve_source(str(tmp_path))


def test_recomputing_activations_gives_the_same_gradient_and_leaves_the_llm_as_it_was(bundled_llm):
    """Activation checkpointing changes what is kept for the backward pass, not the gradient that reaches the
    inputs (the adapter's soft tokens); the frozen LLM is back in evaluation mode, recomputing nothing, after."""
    from ira.models.llm import recomputing_activations

    model = bundled_llm.model
    torch.manual_seed(0)
    embeds = torch.randn(2, 12, bundled_llm.hidden_size) * 0.02

    def gradient(recompute: bool) -> torch.Tensor:
        inputs = embeds.clone().requires_grad_(True)
        with recomputing_activations(bundled_llm, recompute):
            assert model.training == recompute
            logits = model(inputs_embeds=inputs, use_cache=False, logits_to_keep=4).logits
        logits.float().logsumexp(-1).sum().backward()
        return inputs.grad

    kept, recomputed = gradient(False), gradient(True)
    assert kept.abs().sum() > 0
    torch.testing.assert_close(recomputed, kept, rtol=1e-4, atol=1e-6)
    checkpointing = getattr(model, "is_activation_checkpointing", None)   # transformers >= 5.2x
    assert not model.training and not (model.is_gradient_checkpointing if checkpointing is None else checkpointing)
