"""Does the LLM hear? Held-out speech goes through the SpeechLM and the adapter into the frozen LLM, which

* repeats it from the audio alone ("repeat" CER against the transcript);
* chooses among four transcripts: for each clip, the LLM's mean log-likelihood per token of its own
  transcript and of three other clips' transcripts as the reply to "repeat" (stage 3's judge; chance 0.25);
* separates them: the judge's margin, own minus the mean of the other three, in nats per token;
* gives different clips different soft tokens: the mean pairwise cosine of the adapter's outputs
  (each clip's N x H vectors flattened); near 1 means the adapter ignores the audio.

The held-out sentences (`ira/data/heldout_sentences.txt`) are spoken by eSpeak NG in voices drawn like the
synthetic corpus's, and encoded by the checkpoint's codec. Stage 2's validation uses the same figures on
its validation clips.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ira.models.splice import (REPEAT_INSTRUCTION, SoftTokens, build_student_inputs, build_teacher_inputs,
                              generate_reply, reply_log_likelihood)
from ira.text_metrics import character_error_rate, corpus_cer
N_CHOICES = 4
DISTRACTOR_SEED = 20_261_128


def distractors(n_clips: int, n_choices: int = N_CHOICES, seed: int = DISTRACTOR_SEED) -> list[list[int]]:
    """For each clip, `n_choices - 1` other clips whose transcripts compete with its own (seeded, distinct)."""
    if n_clips < n_choices:
        raise ValueError(f"a {n_choices}-way choice needs at least {n_choices} clips, got {n_clips}")
    rng = random.Random(seed)
    return [rng.sample([j for j in range(n_clips) if j != i], n_choices - 1) for i in range(n_clips)]


def choice_metrics(log_likelihood: torch.Tensor) -> tuple[float, float, list[bool], list[float]]:
    """[n_clips, n_choices] log-likelihoods, column 0 the clip's own transcript ->
    (accuracy, mean margin, correct per clip, margin per clip).

    A clip is chosen right when its own transcript scores strictly highest (a tie is wrong, so an
    adapter that makes every reply equally likely scores 0, not chance). The margin is own minus the
    mean of the others.
    """
    if log_likelihood.dim() != 2 or log_likelihood.shape[1] < 2:
        raise ValueError(f"log_likelihood must be [n_clips, n_choices >= 2], got {tuple(log_likelihood.shape)}")
    own, others = log_likelihood[:, 0], log_likelihood[:, 1:]
    correct = (own > others.max(dim=1).values).tolist()
    margins = (own - others.mean(dim=1)).tolist()
    return sum(correct) / len(correct), sum(margins) / len(margins), correct, margins


def mean_pairwise_cosine(audio_tokens: SoftTokens) -> float:
    """Soft tokens ([B, N, H], or one [N_i, H] per clip) -> mean cosine between the flattened outputs of
    every pair of clips (clips of fewer tokens padded with zeros at the end: token i meets token i)."""
    clips = list(audio_tokens)
    if len(clips) < 2:
        raise ValueError("the pairwise cosine needs at least two clips")
    padded = torch.nn.utils.rnn.pad_sequence([c.float() for c in clips], batch_first=True)
    flat = F.normalize(padded.reshape(len(clips), -1), dim=-1)
    sim = flat @ flat.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@dataclass
class UnderstandingScore:
    choice_accuracy: float          # 4-way, chance 0.25
    judge_margin: float             # nats per token, own transcript minus the others
    repeat_cer: float               # "repeat" from audio alone vs the transcript
    adapter_cosine: float           # mean pairwise cosine of the adapter's outputs
    clips: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    text_repeat_cer: Optional[float] = None
    """The ceiling: the same LLM asked to repeat the transcript given as text (it too adds and loops)."""

    def summary(self) -> str:
        ceiling = "" if self.text_repeat_cer is None else f" (the LLM reading the text: {self.text_repeat_cer:.3f})"
        return (f"{N_CHOICES}-way choice {self.choice_accuracy:.2f} (chance {1 / N_CHOICES:.2f}) · judge margin "
                f"{self.judge_margin:+.2f} nats/token · repeat CER {self.repeat_cer:.3f}{ceiling} · adapter cosine "
                f"{self.adapter_cosine:.3f} · {self.clips} held-out clips")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The four figures under their metric names (stage 2's validation logs them with prefix 'val_')."""
        return {f"{prefix}choice_accuracy": self.choice_accuracy, f"{prefix}judge_margin": self.judge_margin,
                f"{prefix}repeat_cer": self.repeat_cer, f"{prefix}adapter_cosine": self.adapter_cosine}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def score_understanding(llm: Any, audio_tokens: Callable[[list[int]], SoftTokens], transcripts: Sequence[str],
                        batch_size: int = 8, max_new_tokens: int = 64, ceiling: bool = False) -> UnderstandingScore:
    """The four figures for clips 0..n-1 with the given transcripts (and with `ceiling`, the repeat CER
    of the LLM given each transcript as text in the audio's place).

    `audio_tokens(indices)` returns what the LLM reads of those clips (the adapter's output: [len(indices),
    N, H] or one [N_i, H] per clip).
    """
    n = len(transcripts)
    others = distractors(n)
    tokens = [clip.float().cpu() for s in range(0, n, batch_size)
              for clip in audio_tokens(list(range(s, min(s + batch_size, n))))]
    rows: list[dict[str, Any]] = []
    log_likelihood = torch.empty(n, N_CHOICES)
    for start in range(0, n, batch_size):
        chunk = list(range(start, min(start + batch_size, n)))
        audio = [tokens[i] for i in chunk]
        replies = generate_reply(llm, build_student_inputs(llm, [REPEAT_INSTRUCTION] * len(chunk), audio, None),
                                 max_new_tokens=max_new_tokens)
        for column in range(N_CHOICES):
            candidates = [transcripts[i] if column == 0 else transcripts[others[i][column - 1]] for i in chunk]
            log_likelihood[chunk, column] = reply_log_likelihood(
                llm, [REPEAT_INSTRUCTION] * len(chunk), audio, candidates).float().cpu()
        for i, reply in zip(chunk, replies):
            rows.append({"transcript": transcripts[i], "reply": reply,
                         "cer": character_error_rate(transcripts[i], reply)})
    accuracy, margin, correct, margins = choice_metrics(log_likelihood)
    for row, ok, m in zip(rows, correct, margins):
        row.update(chosen=ok, margin=m)
    text_cer = None
    if ceiling:
        for start in range(0, n, batch_size):
            chunk = list(transcripts[start:start + batch_size])
            text_replies = generate_reply(llm, build_teacher_inputs(llm, [REPEAT_INSTRUCTION] * len(chunk), chunk),
                                          max_new_tokens=max_new_tokens)
            for row, reply in zip(rows[start:start + batch_size], text_replies):
                row["reply_from_text"] = reply
        text_cer = corpus_cer(list(transcripts), [r["reply_from_text"] for r in rows])
    return UnderstandingScore(choice_accuracy=accuracy, judge_margin=margin,
                              repeat_cer=corpus_cer(list(transcripts), [r["reply"] for r in rows]),
                              adapter_cosine=mean_pairwise_cosine(tokens), clips=n, rows=rows,
                              text_repeat_cer=text_cer)


def evaluate_understanding(listener: Any, sentences: Sequence[str], batch_size: int = 8,
                           ceiling: bool = True) -> UnderstandingScore:
    """Held-out `sentences` spoken by eSpeak in corpus-like voices, heard through `listener`
    (an `ira.listener.Listener`)."""
    from ira.eval.speech import espeak_clips

    codes = [listener.encode(wav) for wav in espeak_clips(sentences, listener.codec.sample_rate)]
    return score_understanding(listener.llm, lambda idx: listener.audio_tokens([codes[i] for i in idx]),
                               sentences, batch_size=batch_size, ceiling=ceiling)
