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


QUICK_START = """### Quick start · 1 → 2 → 3
1. **Data**: press **Build corpus**: *Dummy corpus* is chosen (12 clips in seconds: tries the whole path). For a
   model that speaks new text, choose *Synthetic multi-voice corpus* first (20,000 clips, about 10 minutes).
2. **Train**: *Full recipe* is chosen: pick your corpus, set the budget in minutes and press **Start**. It trains
   the voice style encoder and stages 1, 2 and 3 in order, one line each with its minutes; the first run also
   prepares the corpus once (not counted in the budget).
3. **Generate**: pick the recipe's last checkpoint (`runs/recipe/stage3/...`), type a sentence and press **Speak**."""
"""The way in, above the tabs: a newcomer gets from an empty workspace to speech without the README."""


def build_header(hardware: HardwareInfo, preset: str, requested: str) -> gr.Markdown:
    header = gr.Markdown(header_markdown(hardware, preset, requested))
    with gr.Accordion("Quick start: from nothing to speech in three steps", open=True):
        gr.Markdown(QUICK_START)
    return header
