"""The GPU presets train what was measured (issue 38): `laptop` and `a100` carry the `cpu` preset's design of every
stage, and each setting in which they differ from it is listed here with its reason. A new setting added to one
preset and not the others, or a measured choice that never reached the GPU presets, fails here instead of
silently training the design the project already left behind."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ira.config import CONFIG_DIR, PRESET_FILES, IRAConfig, preset_config

REASONS = ("size", "batch", "budget", "codec", "device", "name")
"""Why a GPU preset may differ from `cpu`: its model size, its batch, its time budget, its codec, what its device
affords, or a name (its output folder). Each reason below starts with one of them."""

GPU_SHARED: dict[str, str] = {
    "codec.name": "codec: EnCodec 6 kbps where its weights are at hand, else the cpu preset's MelCodec (said loudly)",
    "speech_lm.dropout": "device: a GPU sees the corpus many times in the cpu preset's minutes; the masks cost "
                         "little there",
    "speech_lm.style_dim": "size: a 256-wide style space",
    "training.output_dir": "name: its own folder",
    "training.learning_rate": "size: a larger model wants a lower rate",
    "training.mixed_precision": "device: bf16 on CUDA (auto)",
    "training.eval_every": "device: steps are faster than on a CPU",
    "training.save_every": "device: steps are faster than on a CPU",
    "style.embed_dim": "size: = speech_lm.style_dim",
    "style.audio_dim": "size: a larger audio tower",
    "style.audio_layers": "size: a larger audio tower",
    "style.crop_seconds": "device: longer crops cost little on a GPU",
    "style.batch_size": "batch: more negatives per contrastive batch",
    "style.learning_rate": "batch: the larger batch and tower",
    "style.max_steps": "budget: the recipe's share of minutes ends it, not the steps",
    "style.warmup_steps": "batch: the larger batch",
    "align.ctc_steps": "budget: a GPU makes more steps in the same minutes (align.ctc_share still ends the phase)",
    "align.llm_batch_size": "device: the LLM pass over the whole batch is cheap on a GPU",
    "ppo.kl_horizon": "device: a GPU makes several times the rollouts per minute",
    "align.llm_recompute": "device: a GPU's memory holds the LLM's activations; recomputing them is for a laptop's 3 GB",
    "ppo.recompute": "device: a GPU's memory holds the policy's activations; recomputing them is for a laptop's 3 GB",
}
"""The differences both GPU presets make, for the same reason."""

ALLOWED_DIFFERENCES: dict[str, dict[str, str]] = {
    "laptop": {
        **GPU_SHARED,
        "speech_lm.d_model": "size: the seed's 512-wide SpeechLM",
        "speech_lm.n_layers": "size: 8 layers",
        "speech_lm.n_heads": "size: 8 heads of 64",
        "training.warmup_steps": "batch: effective batch 32",
        "training.grad_accum_steps": "batch: effective batch 32 on a 12-16 GB card",
        "adapter.feature_layer": "size: the middle block of 8",
        "ppo.learning_rate": "size: stage 1's rate scaled down as for the larger model (1e-3 -> 3e-4)",
    },
    "a100": {
        **GPU_SHARED,
        "speech_lm.d_model": "size: 1024 wide",
        "speech_lm.n_layers": "size: 16 layers",
        "speech_lm.n_heads": "size: 16 heads of 64",
        "training.batch_size": "device: 40-80 GB holds batch 32",
        "training.warmup_steps": "batch: batch 32",
        "style.audio_heads": "size: 6 heads of 64",
        "llm.name": "size: SmolLM2-1.7B-Instruct, which a 40-80 GB card holds (`bundled` offline)",
        "llm.quantization": "size: 1.7B in bf16 is 3.4 GB, no 4-bit needed",
        "adapter.dim": "size: the 1.7B LLM's 2048-wide embeddings",
        "adapter.n_layers": "size: the 1.7B LLM",
        "adapter.n_heads": "size: 8 heads of 64",
        "adapter.feature_layer": "size: the middle block of 16",
        "ppo.learning_rate": "size: stage 1's rate scaled down as for the larger model (1e-3 -> 2e-4)",
    },
}
"""Every `section.key` in which a GPU preset differs from `cpu`, with the reason."""


def flat(cfg: IRAConfig) -> dict[str, object]:
    """Every setting of every section, by its dotted key (the dataclasses' fields, set in the YAML or not)."""
    return {f"{section}.{key}": value for section, values in dataclasses.asdict(cfg).items()
            if isinstance(values, dict) for key, value in values.items()}


def differences(preset: str) -> dict[str, tuple[object, object]]:
    cpu, other = flat(preset_config("cpu")), flat(preset_config(preset))
    assert cpu.keys() == other.keys()
    return {key: (cpu[key], other[key]) for key in cpu if cpu[key] != other[key]}


@pytest.mark.parametrize("preset", sorted(ALLOWED_DIFFERENCES))
def test_every_difference_from_the_cpu_preset_is_listed_with_its_reason(preset):
    found = differences(preset)
    unlisted = {key: f"cpu {cpu!r}, {preset} {value!r}" for key, (cpu, value) in found.items()
                if key not in ALLOWED_DIFFERENCES[preset]}
    assert not unlisted, (f"{preset} differs from the cpu preset in settings with no reason in "
                          f"ALLOWED_DIFFERENCES (take the cpu preset's value, or list it with its reason): {unlisted}")


@pytest.mark.parametrize("preset", sorted(ALLOWED_DIFFERENCES))
def test_no_listed_difference_is_stale(preset):
    found = differences(preset)
    known = set(flat(preset_config("cpu")))
    gone = sorted(key for key in ALLOWED_DIFFERENCES[preset] if key not in known)
    same = sorted(key for key in ALLOWED_DIFFERENCES[preset] if key in known and key not in found)
    assert not gone, f"ALLOWED_DIFFERENCES[{preset!r}] names settings that no longer exist: {gone}"
    assert not same, f"ALLOWED_DIFFERENCES[{preset!r}] lists settings that no longer differ from cpu: {same}"


@pytest.mark.parametrize("preset", sorted(ALLOWED_DIFFERENCES))
def test_each_reason_is_one_of_the_kinds_and_is_said_in_the_yaml(preset):
    lines = yaml_lines(preset)
    for key, reason in ALLOWED_DIFFERENCES[preset].items():
        assert reason.split(":")[0] in REASONS, f"{preset} {key}: the reason must start with one of {REASONS}"
        assert key in lines, f"{PRESET_FILES[preset]} does not set {key}, in which it differs from cpu"
        assert "#" in lines[key], f"{PRESET_FILES[preset]}: {key} differs from cpu; say why in a comment on its line"


def yaml_lines(preset: str) -> dict[str, str]:
    """Each `section.key` line of a preset's YAML file, as written (comments included)."""
    lines, section = {}, None
    for line in (CONFIG_DIR / PRESET_FILES[preset]).read_text().splitlines():
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
            continue
        key = re.match(r"^\s+(\w+):", line)
        if key and section is not None:
            lines[f"{section}.{key.group(1)}"] = line
    return lines


def test_the_gpu_presets_carry_the_measured_design_of_stages_2_and_3():
    """The settings that made stages 2 and 3 work on the cpu preset (docs/decisions.md), spelled out: what this
    issue found missing from the GPU presets."""
    for preset in ("laptop", "a100"):
        cfg = preset_config(preset)
        assert (cfg.adapter.output, cfg.adapter.reach, cfg.adapter.spelled) == ("vocabulary", 3.0, True), preset
        assert (cfg.adapter.blank_penalty, cfg.adapter.cue_tokens) == (2.0, 8), preset
        assert (cfg.align.tasks, cfg.align.distill_reading) == ("repeat", False), preset
        assert (cfg.ppo.advantage, cfg.ppo.max_steps, cfg.ppo.early_stop_patience) == ("group", None, 0), preset
        assert cfg.data.source == "synth" and cfg.data.synth_num_utterances == 20000, preset


def test_the_gpu_presets_train_in_bf16_on_cuda_and_the_cpu_preset_in_fp32():
    from ira.training.engine import resolve_mixed_precision

    for preset in ("laptop", "a100"):
        assert resolve_mixed_precision(preset_config(preset).training.mixed_precision, "cuda", True) == "bf16"
    assert resolve_mixed_precision(preset_config("cpu").training.mixed_precision, "cpu") == "no"
