"""How long speech for a text may be: the reading-rate bounds that generation, stage 1's samples and
stage 3's rollouts share (so they live below all three)."""

FASTEST_CHARS_PER_SECOND = 25.0  # faster than anyone reads: speech may not end before this


def min_frames_for(text: str, frame_rate: float) -> int:
    """No end of speech before the fastest plausible reading of `text` (an early EOS cuts words off)."""
    return int(len(text.strip()) / FASTEST_CHARS_PER_SECOND * frame_rate)

IMPLAUSIBLE_CHARS_PER_SECOND = 35.0
"""No recording of a transcript reads it this fast: people read about 15 characters a second (LJSpeech), eSpeak at
the synthetic corpus's fastest rate (220 words a minute) up to 28 and the dummy corpus's tone fallback up to 31. A
clip that would have to be this fast was cut short (a third of a clip at 15 characters a second reads 45) or
carries another clip's transcript: preparing a corpus drops it."""


def min_seconds_for(text: str) -> float:
    """The shortest audio that can hold `text`: reading it at IMPLAUSIBLE_CHARS_PER_SECOND."""
    return len(text.strip()) / IMPLAUSIBLE_CHARS_PER_SECOND
