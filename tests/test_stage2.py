"""Stage 2 on a tiny corpus with the real bundled LLM: what trains, what stays frozen, what is saved."""

import json

import pytest
import torch
from torch import nn

from ira.listener import Listener
from ira.models.splice import build_student_inputs
from ira.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ira.training.metrics_log import read_metrics
from ira.training.stage2 import Stage2Task, distillation_losses, run_stage2
from ira.training.teacher_responses import TASK_INSTRUCTIONS, build_teacher_responses

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def runs(tiny_stage2):
    return tiny_stage2


def test_only_the_adapter_trains(runs, bundled_llm):
    root, _, stage1, stage2, llm_before = runs
    s1, s2 = load_checkpoint(stage1.last_checkpoint), load_checkpoint(stage2.last_checkpoint)
    assert s2.stage == "2" and {"speech_lm", "codec", "adapter"} <= set(s2.modules)
    for key, tensor in s1.state_dict("speech_lm").items():                  # SpeechLM bit-identical
        assert torch.equal(tensor, s2.state_dict("speech_lm")[key]), key
    llm_after = {name: p.detach().double().sum().item() for name, p in bundled_llm.model.named_parameters()}
    assert llm_after == llm_before                                          # the LLM untouched
    assert not any(p.requires_grad for p in bundled_llm.model.parameters())


def test_metrics_log_kd_agreement_and_cer(runs):
    _, _, _, stage2, _ = runs
    rows = read_metrics(stage2.metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    assert train and {"kd_loss", "ce_loss", "agreement"} <= set(train[-1])
    assert val and {"val_kd_loss", "val_agreement", "val_repeat_cer"} <= set(val[-1])
    assert 0.0 <= val[-1]["val_agreement"] <= 1.0 and val[-1]["val_kd_loss"] >= 0.0


def test_teacher_replies_are_cached_once(runs, bundled_llm):
    root, cfg, _, _, _ = runs
    files = list((root / "data" / "teacher").glob("responses-*.jsonl"))
    assert len(files) == 1 and not list((root / "data" / "teacher").glob("*.partial"))
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {row["task"] for row in lines} == {"summarise", "question"}      # repeat's reply is the transcript
    before = files[0].stat().st_mtime_ns
    clips = [(row["id"], "unused") for row in lines if row["task"] == "question"]
    replies = build_teacher_responses(bundled_llm, clips, ["repeat", "summarise", "question"], files[0], 6)
    assert files[0].stat().st_mtime_ns == before and len(replies) == len(lines)   # nothing regenerated


def test_checkpoint_alone_understands_audio(runs, bundled_llm):
    root, _, _, stage2, _ = runs
    listener = Listener.from_checkpoint(stage2.last_checkpoint, device="cpu", llm=bundled_llm)
    wav = next((root / "data" / "wavs").glob("*.wav"))
    answer = listener.understand(wav, "What did the speaker say?", max_new_tokens=5)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="shorter"):
        listener.understand(torch.zeros(100), sample_rate=24000)


def test_student_input_does_not_depend_on_the_transcript(runs, bundled_llm):
    root, cfg, stage1, _, _ = runs
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    batch = next(iter(task.train_dataloader()))
    audio = task.audio_tokens(batch["codes"], batch["codes_lengths"])
    other = {**batch, "transcripts": ["something else entirely"] * len(batch["transcripts"])}
    again = task.audio_tokens(other["codes"], other["codes_lengths"])
    assert torch.equal(audio, again)
    a = build_student_inputs(bundled_llm, batch["instructions"], audio, batch["responses"])
    b = build_student_inputs(bundled_llm, other["instructions"], again, other["responses"])
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)


def test_stage2_refuses_a_checkpoint_without_a_speech_lm(runs, tmp_path):
    root, cfg, _, _, _ = runs
    style = save_checkpoint(tmp_path / "stagestyle_latest.safetensors", {"style": nn.Linear(2, 2)}, stage="style",
                            epoch=0, step=1, config=cfg)
    with pytest.raises(CheckpointError, match="stage 2"):
        run_stage2(cfg, resume_from=style, cpu=True)
    with pytest.raises(ValueError, match="resume_checkpoint"):
        run_stage2(cfg, resume_from=None, cpu=True)


def test_distillation_losses():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 11, generator=gen)
    targets = teacher.argmax(-1)
    same = distillation_losses(teacher.clone(), teacher, targets, torch.zeros(5, dtype=torch.bool), 2.0)
    assert same["kd_loss"].item() == pytest.approx(0.0, abs=1e-6) and same["agreement"].item() == 1.0
    assert same["ce_loss"].item() == 0.0
    student = torch.randn(5, 11, generator=gen, requires_grad=True)
    out = distillation_losses(student, teacher, targets, torch.tensor([True, False, True, False, False]), 2.0)
    assert out["kd_loss"].item() > 0.0 and out["ce_loss"].item() > 0.0
    (out["kd_loss"] + out["ce_loss"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ira_understand_prints_the_answer_last(runs, bundled_llm, capsys):
    from ira.cli import main

    root, _, stage1, stage2, _ = runs
    wav = next((root / "data" / "wavs").glob("*.wav"))
    args = ["understand", "--checkpoint", str(stage2.last_checkpoint), "--audio", str(wav),
            "--prompt", "Who is speaking?", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(args) == 0                  # the LLM the checkpoint names is the one already loaded
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("Who is speaking?") and lines[-1].strip()
    args[2] = str(stage1.last_checkpoint)   # a stage-1 checkpoint has no adapter: a clear error
    assert main(args) == 1
    assert "stage" in capsys.readouterr().err
