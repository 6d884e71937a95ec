"""Prompt layout: the audio spliced into the LLM's chat template, the same in training and inference.

The user turn is

    "<audio>" + AUDIO + "</audio>\\n" + instruction

rendered by the LLM's own chat template (with the generation prompt), where AUDIO is

* student / inference: the adapter's N soft tokens, spliced in as input embeddings;
* teacher (stage 2): the transcript as text.

`<audio>` and `</audio>` are ordinary text for the LLM's tokenizer: no new vocabulary, nothing to
train. The template is rendered once with a placeholder in AUDIO's place and the text is split
around it; the two halves (and the transcript) are tokenised separately, so the prompt tokens around
the audio are the same ids for teacher and student. The markers end and start at the cut, so for
ordinary transcripts the pieces tokenise exactly as the whole text would (tests/test_splice.py).

A sequence is [left padding] [prompt before] [audio] [prompt after] [response + end of turn].
Padding is always on the LEFT (training and generation alike: one layout), with position ids that
count real tokens only, so a padded sample sees the positions it would see alone. The response is
the reply tokenised on its own plus the template's end-of-turn token (<|im_end|> for SmolLM2): the
same ids in a teacher and a student batch, so the KL can be taken position by position over
`response_mask` (see `SplicedBatch.response_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ira.models.llm import LLMError, LoadedLLM

IGNORE_INDEX = -100
REPEAT_INSTRUCTION = "Repeat exactly what was said, word for word."
"""Stage 2's "repeat" task, stage 3's judge and the understanding evaluation all ask this."""
AUDIO_OPEN = "<audio>"
AUDIO_CLOSE = "</audio>"
PLACEHOLDER = "\u2063IRA-AUDIO-PLACEHOLDER\u2063"  # no template rewrites it; never in a real message
SoftTokens = Union[torch.Tensor, Sequence[torch.Tensor]]
"""What the LLM reads in AUDIO's place: [B, N, H], or one [N_i, H] per sample (N_i may differ)."""


def user_message(instruction: str, audio_text: str) -> str:
    """The user turn's content around the audio (its transcript, or the placeholder)."""
    return f"{AUDIO_OPEN}{audio_text}{AUDIO_CLOSE}\n{instruction}"


def prompt_halves(llm: LoadedLLM, instruction: str) -> tuple[str, str]:
    """The rendered chat prompt cut where the audio goes: (text before, text after)."""
    text = llm.chat_prompt(user_message(instruction, PLACEHOLDER))
    if text.count(PLACEHOLDER) != 1:
        raise LLMError(f"the chat template of {llm.name!r} (llm.name) rewrites the user message, so the "
                       f"audio cannot be spliced in; use another instruct model")
    before, after = text.split(PLACEHOLDER)
    return before, after


def response_ids(llm: LoadedLLM, response: str) -> list[int]:
    """What the LLM is trained to say: the reply's tokens, then the end-of-turn token."""
    return llm.encode(response) + [llm.end_of_turn_id]


@dataclass
class SplicedBatch:
    """LLM inputs for a batch, left-padded to one length L (see the module docstring)."""

    inputs_embeds: torch.Tensor    # [B, L, H] in the LLM's dtype
    attention_mask: torch.Tensor   # LongTensor[B, L]: 1 on real tokens, 0 on padding
    position_ids: torch.Tensor     # LongTensor[B, L]: counts real tokens only
    labels: torch.Tensor           # LongTensor[B, L]: the response ids, IGNORE_INDEX elsewhere
    response_mask: torch.Tensor    # BoolTensor[B, L]: True on response tokens (labels != IGNORE_INDEX)
    audio_mask: torch.Tensor       # BoolTensor[B, L]: True on the soft tokens / transcript tokens

    @property
    def has_responses(self) -> bool:
        return bool(self.response_mask.any())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the LLM's forward (add labels=batch.labels for its own loss)."""
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    @property
    def reply_window(self) -> int:
        """How many trailing positions hold every reply token and the position before it. Padding is on
        the left and replies come last, so the LLM's head need only run there (`reply_logits`)."""
        return int(self.response_mask.sum(1).max()) + 1 if self.has_responses else 1

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] -> [R, V]: the rows that predict the R response tokens, sample by sample.

        Row r predicts token r of the concatenated responses, so a teacher's and a student's rows
        line up one to one (their prompts differ in length, their responses do not).
        """
        return logits[:, :-1][self.response_mask[:, 1:]]


def build_student_inputs(llm: LoadedLLM, instructions: Sequence[str], audio_embeds: SoftTokens,
                         responses: Sequence[str] | None = None) -> SplicedBatch:
    """The adapter's soft tokens in AUDIO's place, [B, N, H] or one [N_i, H] per sample; gradients flow
    into them."""
    batch = len(instructions)
    if isinstance(audio_embeds, torch.Tensor) and (audio_embeds.dim() != 3 or audio_embeds.shape[0] != batch):
        raise ValueError(f"audio_embeds must have shape [B={batch}, N, H], got {tuple(audio_embeds.shape)}")
    pieces = list(audio_embeds)
    if len(pieces) != batch:
        raise ValueError(f"{len(pieces)} clips of soft tokens for {batch} instructions")
    for i, piece in enumerate(pieces):
        if piece.dim() != 2 or piece.shape[0] == 0:
            raise ValueError(f"the soft tokens of sample {i} must have shape [N >= 1, H], got {tuple(piece.shape)}")
        if piece.shape[1] != llm.hidden_size:
            raise ValueError(f"audio_embeds have width {piece.shape[1]} but the LLM {llm.name!r} has "
                             f"hidden size {llm.hidden_size}; build the adapter with out_dim=llm.hidden_size")
    spliced = _assemble(llm, instructions, [None] * batch, [p.shape[0] for p in pieces], responses)
    soft = torch.cat(pieces).to(device=llm.device, dtype=spliced.inputs_embeds.dtype)
    # masked_scatter fills the audio positions in row-major order: sample i's N_i vectors, in order.
    spliced.inputs_embeds = spliced.inputs_embeds.masked_scatter(spliced.audio_mask[..., None], soft)
    return spliced


def build_teacher_inputs(llm: LoadedLLM, instructions: Sequence[str], transcripts: Sequence[str],
                         responses: Sequence[str] | None = None) -> SplicedBatch:
    """The transcript as text in AUDIO's place (tokenised on its own, like the prompt halves)."""
    if len(transcripts) != len(instructions):
        raise ValueError(f"{len(transcripts)} transcripts for {len(instructions)} instructions")
    ids = [llm.encode(t) for t in transcripts]
    return _assemble(llm, instructions, ids, [len(i) for i in ids], responses)


def _assemble(llm: LoadedLLM, instructions: Sequence[str], audio_ids: list[list[int] | None],
              audio_lengths: list[int], responses: Sequence[str] | None) -> SplicedBatch:
    """Token ids -> embeddings, left-padded. Audio slots without ids (student) hold the pad id for now."""
    batch = len(instructions)
    if batch == 0:
        raise ValueError("an empty batch: give at least one instruction")
    if responses is not None and len(responses) != batch:
        raise ValueError(f"{len(responses)} responses for {batch} instructions")
    pad = llm.tokenizer.pad_token_id
    rows = []  # (ids, is_audio, is_response) per sample
    for i, instruction in enumerate(instructions):
        before, after = prompt_halves(llm, instruction)
        audio = audio_ids[i] if audio_ids[i] is not None else [pad] * audio_lengths[i]
        reply = response_ids(llm, responses[i]) if responses is not None else []
        pieces = [(llm.encode(before), False, False), (audio, True, False), (llm.encode(after), False, False),
                  (reply, False, True)]
        rows.append(([t for p, _, _ in pieces for t in p],
                     [a for p, a, _ in pieces for _ in p], [r for p, _, r in pieces for _ in p]))

    length = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    audio_mask = torch.zeros(batch, length, dtype=torch.bool)
    response_mask = torch.zeros(batch, length, dtype=torch.bool)
    for i, (row, is_audio, is_reply) in enumerate(rows):
        start = length - len(row)
        ids[i, start:] = torch.tensor(row)
        attention[i, start:] = 1
        audio_mask[i, start:] = torch.tensor(is_audio, dtype=torch.bool)
        response_mask[i, start:] = torch.tensor(is_reply, dtype=torch.bool)
    labels = ids.masked_fill(~response_mask, IGNORE_INDEX)
    device = llm.device
    attention = attention.to(device)
    with torch.no_grad():  # the embedding table is frozen: no graph needed for the prompt tokens
        embeds = llm.embed(ids.to(device))
    return SplicedBatch(inputs_embeds=embeds, attention_mask=attention,
                        position_ids=(attention.cumsum(1) - 1).clamp_min(0), labels=labels.to(device),
                        response_mask=response_mask.to(device), audio_mask=audio_mask.to(device))


def reply_logits(llm: LoadedLLM, inputs: SplicedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's logits on the last `inputs.reply_window` positions only, with the labels there:
    (logits [B, K, V], labels [B, K]). The vocabulary projection of the prompt and audio positions
    (~20% of a 135M LLM's forward and backward) is never computed."""
    window = inputs.reply_window
    logits = llm.model(**inputs.model_inputs(), use_cache=False, logits_to_keep=window).logits
    return logits, inputs.labels[:, -window:]


def reply_log_likelihood(llm: LoadedLLM, instructions: Sequence[str], audio_embeds: SoftTokens,
                         replies: Sequence[str]) -> torch.Tensor:
    """The LLM's mean log-likelihood per token (nats, float32 [B]) of each reply after the soft tokens.

    The judge of stage 3 and the understanding evaluation score audio with it: "how likely does the
    LLM find this text as its answer about this audio". The end-of-turn token counts as a reply token.
    Gradients flow into `audio_embeds` unless the caller disables them.
    """
    inputs = build_student_inputs(llm, instructions, audio_embeds, replies)
    logits, labels = reply_logits(llm, inputs)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
        -1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (log_probs * keep).sum(1) / keep.sum(1).clamp(min=1)


def generate_reply(llm: LoadedLLM, batch: SplicedBatch, max_new_tokens: int, greedy: bool = True,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """The LLM's replies to a batch built with responses=None (left-padded prompts), as text.

    Generating from inputs_embeds alone, transformers returns only the new tokens. The LLM stops at
    its end-of-turn token or EOS.
    """
    if batch.has_responses:
        raise ValueError("this batch already holds responses (a training batch); build it with "
                         "responses=None to generate")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0 (llm.max_new_tokens), got {max_new_tokens}")
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p}
    with torch.no_grad():
        out = llm.model.generate(inputs_embeds=batch.inputs_embeds.detach(), attention_mask=batch.attention_mask,
                                 max_new_tokens=max_new_tokens, do_sample=not greedy,
                                 eos_token_id=llm.stop_ids, pad_token_id=llm.tokenizer.pad_token_id, **sampling)
    return [text.strip() for text in llm.tokenizer.batch_decode(out, skip_special_tokens=True)]
