"""The header above the tabs: what machine this is and which preset the app uses."""

from __future__ import annotations

import gradio as gr

from ira.config import PRESETS
from ira.hardware import HardwareInfo


def resolve_preset(requested: str, hardware: HardwareInfo) -> str:
    """`auto` -> the detected preset; otherwise one of cpu / laptop / a100 (a clear error if not)."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return hardware.preset
    if requested not in PRESETS:
        raise ValueError(f"--preset {requested!r} is not a preset; use auto, {', '.join(PRESETS)}")
    return requested


def header_markdown(hardware: HardwareInfo, preset: str, requested: str) -> str:
    if requested == "auto":
        how = "detected for this machine"
    elif preset == hardware.preset:
        how = "chosen with --preset, the same as detected"
    else:
        how = f"chosen with --preset; this machine would get **{hardware.preset}**"
    lines = ["# IRA · Integrated Reasoning with Audio",
             f"**Hardware**: {hardware.summary()}  ",
             f"**Preset in use**: **{preset}** ({how})"]
    if preset != "cpu" and hardware.device == "cpu":
        lines.append(f"\n> The {preset} preset is sized for a GPU; on this CPU it will be very slow. "
                     "Start the app with `--preset cpu` for a model that trains in minutes.")
    if not hardware.four_bit and preset == "a100":
        lines.append(f"\n> 4-bit loading of the LLM is unavailable ({hardware.four_bit_reason}): it loads in 16 bits.")
    return "\n".join(lines)


def build_header(hardware: HardwareInfo, preset: str, requested: str) -> gr.Markdown:
    return gr.Markdown(header_markdown(hardware, preset, requested))
