"""Audio spliced into the chat template: teacher and student line up, gradients reach the soft tokens."""

import pytest
import torch

from ira.config import AdapterConfig
from ira.models.adapter import PerceiverAdapter
from ira.models.splice import (IGNORE_INDEX, build_student_inputs, build_teacher_inputs, generate_reply,
                               prompt_halves, response_ids, user_message)

pytestmark = pytest.mark.usefixtures("one_thread")

INSTRUCTIONS = ["Repeat exactly what was said.", "What is the speaker talking about? Answer briefly."]
TRANSCRIPTS = ["hello world", "The quick brown fox jumps over the lazy dog"]
RESPONSES = ["hello world", "A fox, jumping over a dog."]


def soft_tokens(llm, batch: int, n: int = 4, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(batch, n, llm.hidden_size)
    x = x / x.norm(dim=-1, keepdim=True) * llm.embed_norm
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("instruction, transcript", [
    (INSTRUCTIONS[0], TRANSCRIPTS[0]), (INSTRUCTIONS[1], TRANSCRIPTS[1]),
    ("Summarise.", "It's 3 o'clock, isn't it"), ("", "one two"),
])
def test_cutting_at_the_placeholder_keeps_the_tokenisation(bundled_llm, instruction, transcript):
    whole = bundled_llm.encode(bundled_llm.chat_prompt(user_message(instruction, transcript)))
    before, after = prompt_halves(bundled_llm, instruction)
    assert before.endswith("<audio>") and after.startswith("</audio>\n")
    pieces = bundled_llm.encode(before) + bundled_llm.encode(transcript) + bundled_llm.encode(after)
    assert pieces == whole


def test_teacher_and_student_share_response_ids_and_labels(bundled_llm):
    teacher = build_teacher_inputs(bundled_llm, INSTRUCTIONS, TRANSCRIPTS, RESPONSES)
    student = build_student_inputs(bundled_llm, INSTRUCTIONS, soft_tokens(bundled_llm, 2, n=5), RESPONSES)
    for batch in (teacher, student):
        assert torch.equal(batch.response_mask, batch.labels != IGNORE_INDEX)
        assert (batch.attention_mask[:, -1] == 1).all()  # left padding: every row ends with its response
        assert torch.equal(batch.attention_mask.cummax(dim=1).values, batch.attention_mask)
        assert not (batch.response_mask & ~batch.attention_mask.bool()).any()
    for i, response in enumerate(RESPONSES):
        expected = response_ids(bundled_llm, response)
        assert expected[-1] == bundled_llm.end_of_turn_id
        assert teacher.labels[i][teacher.response_mask[i]].tolist() == expected
        assert student.labels[i][student.response_mask[i]].tolist() == expected
    assert student.audio_mask.sum(dim=1).tolist() == [5, 5]
    assert teacher.audio_mask.sum(dim=1).tolist() == [len(bundled_llm.encode(t)) for t in TRANSCRIPTS]
    vocab = 7
    fake_t = torch.randn(*teacher.labels.shape, vocab)
    fake_s = torch.randn(*student.labels.shape, vocab)
    assert teacher.response_logits(fake_t).shape == student.response_logits(fake_s).shape


def test_student_loss_backpropagates_into_the_adapter(bundled_llm):
    adapter = PerceiverAdapter(AdapterConfig(n_latents=4, dim=32, n_layers=1, n_heads=4, max_audio_frames=64),
                               in_dim=16, out_dim=bundled_llm.hidden_size, target_norm=bundled_llm.embed_norm)
    mask = torch.arange(12)[None] < torch.tensor([[12], [6]])
    audio = adapter(torch.randn(2, 12, 16), mask)
    audio.retain_grad()
    batch = build_student_inputs(bundled_llm, INSTRUCTIONS, audio, RESPONSES)
    # the soft tokens sit exactly at the audio positions, in order
    assert torch.equal(batch.inputs_embeds[batch.audio_mask], audio.detach().reshape(-1, bundled_llm.hidden_size))
    out = bundled_llm.model(**batch.model_inputs(), labels=batch.labels, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(audio.grad).all() and audio.grad.abs().sum() > 0
    assert adapter.latents.grad is not None and adapter.latents.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in bundled_llm.model.parameters())  # the LLM stays frozen


def test_a_sample_reads_the_same_alone_or_left_padded(bundled_llm):
    audio = soft_tokens(bundled_llm, 2)
    batch = build_student_inputs(bundled_llm, INSTRUCTIONS, audio, RESPONSES)
    alone = build_student_inputs(bundled_llm, INSTRUCTIONS[:1], audio[:1], RESPONSES[:1])
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # sample 0 is padded
    with torch.no_grad():
        logits = bundled_llm.model(**batch.model_inputs(), use_cache=False).logits
        logits_alone = bundled_llm.model(**alone.model_inputs(), use_cache=False).logits
    rows = batch.response_logits(logits)[: len(response_ids(bundled_llm, RESPONSES[0]))]
    assert (rows - alone.response_logits(logits_alone)).abs().max() < 5e-4


def test_clips_of_different_token_counts_read_as_each_would_alone(bundled_llm):
    """The "vocabulary" adapter hands one [N_i, H] per clip: each sits in its own slot of N_i positions."""
    torch.manual_seed(0)
    clips = [soft_tokens(bundled_llm, 1, n=2)[0], soft_tokens(bundled_llm, 1, n=6)[0]]
    batch = build_student_inputs(bundled_llm, INSTRUCTIONS, clips, RESPONSES)
    assert batch.audio_mask.sum(dim=1).tolist() == [2, 6]
    assert torch.equal(batch.inputs_embeds[batch.audio_mask], torch.cat(clips).to(batch.inputs_embeds.dtype))
    with torch.no_grad():
        logits = bundled_llm.model(**batch.model_inputs(), use_cache=False).logits
        for i in range(2):
            alone = build_student_inputs(bundled_llm, INSTRUCTIONS[i:i + 1], clips[i][None], RESPONSES[i:i + 1])
            rows = batch.response_logits(logits)
            start = sum(len(response_ids(bundled_llm, r)) for r in RESPONSES[:i])
            own = rows[start: start + len(response_ids(bundled_llm, RESPONSES[i]))]
            expected = alone.response_logits(bundled_llm.model(**alone.model_inputs(), use_cache=False).logits)
            assert (own - expected).abs().max() < 5e-4
    with pytest.raises(ValueError, match="sample 1"):
        build_student_inputs(bundled_llm, INSTRUCTIONS, [clips[0], clips[1][:0]])
    with pytest.raises(ValueError, match="1 clips of soft tokens for 2"):
        build_student_inputs(bundled_llm, INSTRUCTIONS, clips[:1])


def test_generate_reply_from_text_and_from_soft_tokens(bundled_llm):
    teacher = build_teacher_inputs(bundled_llm, ["Repeat exactly what was said."], ["hello world"])
    replies = generate_reply(bundled_llm, teacher, max_new_tokens=12)
    print("teacher reply:", replies)
    assert len(replies) == 1 and replies[0]
    student = build_student_inputs(bundled_llm, INSTRUCTIONS, soft_tokens(bundled_llm, 2))
    replies = generate_reply(bundled_llm, student, max_new_tokens=6)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(ValueError, match="responses=None"):
        generate_reply(bundled_llm, build_teacher_inputs(bundled_llm, INSTRUCTIONS, TRANSCRIPTS, RESPONSES), 4)


def test_wrong_width_or_counts_are_clear_errors(bundled_llm):
    with pytest.raises(ValueError, match="hidden size 576"):
        build_student_inputs(bundled_llm, INSTRUCTIONS, torch.randn(2, 4, 100))
    with pytest.raises(ValueError, match="shape"):
        build_student_inputs(bundled_llm, INSTRUCTIONS, torch.randn(3, 4, 576))
    with pytest.raises(ValueError, match="transcripts"):
        build_teacher_inputs(bundled_llm, INSTRUCTIONS, TRANSCRIPTS[:1])
