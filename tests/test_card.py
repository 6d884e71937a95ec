"""A checkpoint's card (ira/eval/card.py): three held-out sentences spoken by the tiny stage-1 and stage-2
checkpoints, heard by the offline ASR and, from stage 2 on, repeated by the bundled LLM."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from ira.cli import EXIT_FAILED, main
from ira.eval import asr
from ira.eval.card import CARD_FILE, CARD_SENTENCES, CardError, make_card, offline_asr, read_card, wav_path
from ira.eval.speech import heldout_sentences
from ira.models.splice import REPEAT_INSTRUCTION

needs_asr = pytest.mark.skipif(not asr.is_available(), reason="the ira[eval] extra (faster-whisper) is not installed")


@needs_asr
def test_a_stage_1_card_speaks_three_heldout_sentences_and_says_what_the_asr_heard(tiny_stage2, tmp_path, one_thread,
                                                                                    capsys):
    stage1 = tiny_stage2[2].last_checkpoint
    assert main(["eval", "card", "--checkpoint", str(stage1), "--out", str(tmp_path / "card"), "--device", "cpu"]) == 0
    path = tmp_path / "card" / CARD_FILE
    printed = capsys.readouterr().out
    assert str(path) in printed and "ASR heard:" in printed and heldout_sentences(limit=1)[0] in printed
    card = read_card(path)
    assert (card.stage, card.checkpoint, card.asr_note) == ("1", str(stage1), "")
    assert [item.sentence for item in card.items] == heldout_sentences(limit=CARD_SENTENCES)
    for item in card.items:
        audio, sr = sf.read(wav_path(path, item))
        assert sr == 24_000 and len(audio) / sr == pytest.approx(item.seconds, abs=0.01) and item.seconds > 0.5
        assert isinstance(item.asr_heard, str) and item.wer is not None and item.wer >= 0
        assert item.llm_answered is None                   # stage 1 has no adapter: the LLM is not asked
    assert card.wer is not None and card.instruction is None and "stage 2" in card.llm_note
    saved = json.loads(path.read_text())
    assert set(saved["items"][0]) == {"sentence", "wav", "seconds", "asr_heard", "wer", "llm_answered", "note"}

    # the same seeds speak the same audio; without an ASR the card says so instead of failing
    again = read_card(make_card(stage1, tmp_path / "again", transcribe=None, device="cpu"))
    for first, second in zip(card.items, again.items):
        assert sf.read(wav_path(path, first))[0].tolist() == sf.read(wav_path(tmp_path / "again", second))[0].tolist()
        assert second.asr_heard is None and second.wer is None
    assert again.wer is None and "no ASR" in again.asr_note


def test_a_stage_2_card_says_what_the_llm_answered_about_the_same_audio(tiny_stage2, bundled_llm, tmp_path,
                                                                        one_thread):
    stage2 = tiny_stage2[3].last_checkpoint
    card = read_card(make_card(stage2, tmp_path, transcribe=None, llm=bundled_llm, device="cpu", max_new_tokens=6))
    assert card.stage == "2" and card.instruction == REPEAT_INSTRUCTION and card.llm_note == ""
    assert len(card.items) == CARD_SENTENCES
    assert all(isinstance(item.llm_answered, str) and item.note == "" for item in card.items), card.items


def test_a_missing_asr_is_a_note_that_says_what_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "no_model"
    empty.mkdir()
    monkeypatch.setenv("IRA_ASR_MODEL", str(empty))     # a model folder that does not load
    asr.transcriber.cache_clear()
    try:
        transcribe, source, note = offline_asr()
    finally:
        asr.transcriber.cache_clear()
    assert transcribe is None and source == ""
    assert "pip install" in note and ("did not load" in note or "no offline ASR" in note)


def test_a_card_needs_a_checkpoint_that_speaks(tmp_path):
    import torch

    from ira.checkpoint import CheckpointError, save_checkpoint

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        make_card(tmp_path / "stage1_best.safetensors")
    style = save_checkpoint(tmp_path / "stagestyle_best.safetensors", {"style": {"w": torch.zeros(1)}}, stage="style",
                            epoch=0, step=1, config={})
    with pytest.raises(CardError, match="does not speak: a card needs a stage 1, 2 or 3 checkpoint"):
        make_card(style)
    (tmp_path / CARD_FILE).write_text("{broken")
    with pytest.raises(CardError, match="is not a readable card"):
        read_card(tmp_path)


def test_the_card_command_names_a_missing_checkpoint_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "typo.safetensors"
    assert main(["eval", "card", "--checkpoint", str(missing)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"checkpoint not found: {missing}" in err and "Traceback" not in err
