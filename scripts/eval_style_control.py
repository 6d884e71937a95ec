"""Does the voice follow the description? Speak one sentence with opposite descriptions and measure.

    python scripts/eval_style_control.py --checkpoint runs/x/stage1_best.safetensors [--seeds 8]

For each pair (high vs low pitch, fast vs slow) the same sentence is generated with several seeds;
the script prints, for each side, the median over the seeds of the clip's pitch (YIN, median of its
voiced frames) and of its speech duration (silence trimmed), and whether they moved in the described
direction. The median: one clip that goes wrong (a squeak, a long silence) cannot decide it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from ira.audio import trim_silence
from ira.data.annotate import estimate_pitch
from ira.speaker import SamplingSettings, Speaker

SENTENCE = "The weather is lovely today, so we will walk along the river."
YIN_THRESHOLD, YIN_VOICING = 0.5, 0.7
"""Looser than preparation's YIN settings (0.15 / 0.3): the MelCodec's Griffin-Lim audio is less periodic, and
at a low pitch those settings find no voiced frame at all, even in eSpeak's own clips after the codec round
trip (corpus voices of 56-80 Hz: 0 voiced frames; with these: 77-114 Hz, voices of 142 and 350 Hz read 146-161
and 348). The figure is for comparing two descriptions, not an absolute pitch."""
PAIRS = {
    "pitch": ("a very high-pitched voice", "a very low-pitched, deep voice"),
    "rate": ("a person speaking very fast", "a person speaking very slowly"),
}


def measure(speaker: Speaker, description: str, seeds: int, cfg_scale: float,
            length_tolerance: float | None) -> dict[str, float]:
    pitches, durations = [], []
    for seed in range(seeds):
        result = speaker.speak(SENTENCE, style=description,
                               settings=SamplingSettings(seed=seed, cfg_scale=cfg_scale,
                                                         length_tolerance=length_tolerance))
        wav = trim_silence(result.waveform, result.sample_rate)
        durations.append(wav.numel() / result.sample_rate)
        f0 = estimate_pitch(wav, result.sample_rate, threshold=YIN_THRESHOLD, voicing_threshold=YIN_VOICING)
        voiced = f0[f0 > 0]
        if voiced.size:
            pitches.append(float(np.median(voiced)))   # a frame read an octave off cannot move it
    return {"pitch_hz": statistics.median(pitches) if pitches else float("nan"),
            "duration_s": statistics.median(durations),
            "per_seed": {"pitch_hz": [round(x, 1) for x in pitches], "duration_s": [round(x, 2) for x in durations]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--length-tolerance", type=float, default=SamplingSettings().length_tolerance,
                        help="how closely the end follows the length head (negative: off, EOS alone decides)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    speaker = Speaker.from_checkpoint(args.checkpoint, device="cpu")
    report: dict[str, dict] = {}
    for attribute, (high, low) in PAIRS.items():
        tolerance = None if args.length_tolerance < 0 else args.length_tolerance
        a, b = (measure(speaker, description, args.seeds, args.cfg_scale, tolerance) for description in (high, low))
        key = "pitch_hz" if attribute == "pitch" else "duration_s"
        # high pitch -> higher Hz; fast -> shorter duration
        moved = a[key] > b[key] if attribute == "pitch" else a[key] < b[key]
        report[attribute] = {high: a, low: b, "moved_as_described": moved}
        print(f"{attribute}: '{high}' -> pitch {a['pitch_hz']:.0f} Hz, {a['duration_s']:.2f} s | "
              f"'{low}' -> pitch {b['pitch_hz']:.0f} Hz, {b['duration_s']:.2f} s | "
              f"{'moved as described' if moved else 'DID NOT move as described'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    from ira.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main))
