"""How long speech for a text may be: the reading-rate bounds that generation, stage 1's samples and
stage 3's rollouts share (so they live below all three)."""

FASTEST_CHARS_PER_SECOND = 25.0  # faster than anyone reads: speech may not end before this


def min_frames_for(text: str, frame_rate: float) -> int:
    """No end of speech before the fastest plausible reading of `text` (an early EOS cuts words off)."""
    return int(len(text.strip()) / FASTEST_CHARS_PER_SECOND * frame_rate)
