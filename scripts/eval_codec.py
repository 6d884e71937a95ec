"""How well does the fitted MelCodec reproduce held-out speech?

    python scripts/eval_codec.py --dir DATA_DIR [--max-clips 50] [--save-wavs OUT_DIR]

Reads DIR/wavs/*.wav and DIR/codec/mel_codec.safetensors, encodes the validation clips (the split of
docs/data_layout.md; all clips if none falls in it) and reports the mean log-mel distance (dB L1):
of the quantised mel, and of the fully decoded audio (Griffin-Lim) analysed again, next to a
trivial baseline that replaces every frame by the clip's mean frame. Lower is better; a useful
codec is far below the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ira.audio import load_audio, save_audio  # noqa: E402
from ira.codec import mel_codec_path  # noqa: E402
from ira.codec.mel import MelCodec, log_mel, log_mel_distance_db, mean_frame_baseline  # noqa: E402
from ira.data.corpus import read_metadata  # noqa: E402
from ira.data.prepare import split_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path, help="the prepared corpus folder")
    parser.add_argument("--max-clips", type=int, default=50)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="as data.val_fraction")
    parser.add_argument("--griffin-lim-iters", type=int, default=None, help="override the stored setting")
    parser.add_argument("--save-wavs", type=Path, default=None, help="write the first 5 decoded clips here")
    args = parser.parse_args(argv)

    codec = MelCodec.load(mel_codec_path(args.dir), griffin_lim_iters=args.griffin_lim_iters)
    wavs = sorted((args.dir / "wavs").glob("*.wav"))
    if not wavs:
        parser.error(f"{args.dir / 'wavs'} holds no .wav file")
    texts = {clip.id: clip.normalized_text for clip in read_metadata(args.dir)}
    held_out = [p for p in wavs if p.stem in texts and split_of(texts[p.stem], args.val_fraction) == "val"]
    if not held_out:
        print("no clip falls in the validation split; evaluating on training clips", file=sys.stderr)
        held_out = wavs
    held_out = held_out[: args.max_clips]
    print(f"{codec.describe()}\nevaluating on {len(held_out)} held-out clips of {args.dir}")

    totals = {"quantised": 0.0, "decoded": 0.0, "baseline": 0.0}
    seconds = encode_s = decode_s = 0.0
    for i, path in enumerate(held_out):
        wav = load_audio(path, codec.sample_rate)
        reference = log_mel(wav, codec.sample_rate, codec.n_mels)
        start = time.perf_counter()
        codes = codec.encode(wav, codec.sample_rate)
        encode_s += time.perf_counter() - start
        start = time.perf_counter()
        decoded = codec.decode(codes)
        decode_s += time.perf_counter() - start
        seconds += wav.numel() / codec.sample_rate
        totals["quantised"] += log_mel_distance_db(reference, codec.decode_mel(codes))
        totals["decoded"] += log_mel_distance_db(reference, log_mel(decoded, codec.sample_rate, codec.n_mels))
        totals["baseline"] += log_mel_distance_db(reference, mean_frame_baseline(reference))
        if args.save_wavs is not None and i < 5:
            save_audio(args.save_wavs / f"{path.stem}_original.wav", wav, codec.sample_rate)
            save_audio(args.save_wavs / f"{path.stem}_decoded.wav", decoded, codec.sample_rate)

    n = len(held_out)
    means = {key: value / n for key, value in totals.items()}
    print(f"log-mel distance (dB L1, lower is better) over {seconds:.1f} s of audio:")
    print(f"  quantised mel           {means['quantised']:6.2f}")
    print(f"  decoded + re-analysed   {means['decoded']:6.2f}")
    print(f"  baseline (mean frame)   {means['baseline']:6.2f}")
    print(f"  decoded / baseline      {means['decoded'] / means['baseline']:6.2f}")
    print(f"speed: encode {1000 * encode_s / seconds:.1f} ms, decode {1000 * decode_s / seconds:.1f} ms "
          f"per second of audio")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    from ira.cli import run_reporting_errors

    raise SystemExit(run_reporting_errors(main))
