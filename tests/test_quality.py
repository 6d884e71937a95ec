"""What a checkpoint was measured to do, in plain words (ira/eval/quality.py): the notes beside a checkpoint and
its outputs say near random below their thresholds, and never claim a skill that was not measured."""

from __future__ import annotations

import json

import pytest

from ira.eval.card import Card, CardItem, write_card
from ira.eval.quality import (BASELINE_DESCRIPTIONS, MIN_SIMILARITY_SPREAD, SPEECH_EVAL_KEY, STYLE_EVAL_KEY,
                              above_chance, answer_cut_note, checkpoint_quality, compare_note, find_card,
                              find_speech_record, how_often, nearest_note, percent, speech_record_path,
                              write_speech_record)


def header(stage: str, step: int = 16, modules=("speech_lm",), **extra) -> dict[str, str]:
    """A checkpoint header as `ira.checkpoint.read_metadata` returns it (string values, JSON inside)."""
    meta = {"stage": stage, "step": str(step), "modules": json.dumps(list(modules))}
    meta.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()})
    return meta


STYLE_RANDOM = {"top5": 0.1, "chance_top5": 0.08, "n_queries": 200, "n_clips": 60, "step": 7}
STYLE_GOOD = {"top5": 0.55, "chance_top5": 0.08, "n_queries": 200, "n_clips": 60, "step": 900}


def test_the_issue_s_untrained_stage_1_is_called_near_random_and_claims_nothing():
    """A stage 1 with WER 0.99 and a 7-step style encoder: neither "speaks" nor "follows voice descriptions"."""
    meta = header("1", modules=("speech_lm", "style"), metric={"name": "val_wer", "value": 0.99, "step": 16},
                  **{STYLE_EVAL_KEY: STYLE_RANDOM, SPEECH_EVAL_KEY: {"wer": 0.99, "cer": 0.9, "sentences": 8}})
    quality = checkpoint_quality(meta)
    assert quality.speech.near_random and quality.speech.text.startswith("near random")
    assert "recognised 1% of the words of 8 new sentences" in quality.speech.text and "WER 0.99" in quality.speech.text
    assert quality.style.near_random and "after 7 training steps" in quality.style.text
    assert "top 5 among 60 held-out clips about one time in ten" in quality.style.text
    assert "chance 8%" in quality.style.text
    assert not quality.answers.measured and "no adapter" in quality.answers.text
    text = quality.markdown()
    assert "Stage 1, step 16" in text and "follows voice descriptions" not in text and "speaks" not in text


def test_speech_figures_read_in_plain_words_with_their_thresholds():
    good = checkpoint_quality(header("1", metric={"name": "val_wer", "value": 0.49, "step": 16})).speech
    assert good.trusted and good.text == "the ASR recognised 51% of the words of new sentences it spoke (WER 0.49)"
    hard = checkpoint_quality(header("1", metric={"name": "val_wer", "value": 0.7, "step": 12})).speech
    assert hard.trusted and hard.text.startswith("hard to follow") and "(measured at step 12)" in hard.text
    # stage 3 measures its own speech; stage 2 keeps stage 1's SpeechLM and says so
    third = checkpoint_quality(header("3", metric={"name": "val_asr_wer", "value": 0.3, "step": 16},
                                      **{SPEECH_EVAL_KEY: {"wer": 0.99, "sentences": 8}})).speech
    assert "recognised 70%" in third.text and third.trusted           # not stage 1's figure it started from
    second = checkpoint_quality(header("2", metric={"name": "val_choice_accuracy", "value": 0.9, "step": 16},
                                       **{SPEECH_EVAL_KEY: {"wer": 0.2, "sentences": 8}})).speech
    assert "recognised 80% of the words of 8 new sentences" in second.text and "stage-1 SpeechLM" in second.text


def test_nothing_measured_is_said_to_be_unmeasured():
    """A stage 1 trained without an ASR keeps its best by loss: that says nothing a user can hear."""
    meta = header("1", modules=("speech_lm", "style", "adapter"), metric={"name": "val_loss", "value": 3.2, "step": 4})
    quality = checkpoint_quality(meta)
    for note in (quality.speech, quality.style, quality.answers):
        assert not note.measured and note.text.startswith("not measured"), note
    assert "3.2" not in quality.markdown()


def test_a_card_of_the_same_save_backs_the_speech_note(tmp_path):
    folder = tmp_path / "stage1"
    folder.mkdir()
    checkpoint = folder / "stage1_best.safetensors"
    card = Card(checkpoint=str(checkpoint), stage="1", step=16, wer=0.95,
                items=[CardItem(sentence=f"s{i}", wav=None, seconds=1.0) for i in range(3)])
    write_card(card, _card_path(folder))
    meta = header("1")
    found = find_card(checkpoint, meta)
    assert found is not None and found.wer == 0.95
    speech = checkpoint_quality(meta, found).speech
    assert speech.near_random and "the 3 sentences of its card" in speech.text
    assert find_card(checkpoint, header("1", step=17)) is None        # another save's card says nothing of this one
    assert find_card(tmp_path / "elsewhere.safetensors", meta) is None


def _evaluation(wer: float, espeak_wer=None):
    """An `ira eval speech` result of 4 sentences (eSpeak's own figure only with `espeak_wer`)."""
    from ira.eval.speech import Heard, SpeechEvaluation, SpeechScore

    items = [Heard(f"s{i}", f"s{i}", wer, 1.0) for i in range(4)]
    espeak = None if espeak_wer is None else SpeechScore(espeak_wer, espeak_wer / 2, items)
    return SpeechEvaluation(SpeechScore(wer, wer / 2, items), espeak, espeak, seconds=1.0)


def test_what_eval_speech_recorded_of_this_save_is_said_beside_espeak_itself(tmp_path):
    """`ira eval speech` records its figures beside the checkpoint, for this save only (its checkpoint_id): the note
    then says what the ASR made of the model's speech and of eSpeak's own audio of the same sentences, both measured,
    never typed in; without the ceiling it says the model's figure alone."""
    from ira.eval.speech import record_figures

    checkpoint = tmp_path / "stage1" / "stage1_best.safetensors"
    meta = header("1", metric={"name": "val_wer", "value": 0.8, "step": 16}, checkpoint_id="save-a")
    write_speech_record(checkpoint, meta, record_figures(_evaluation(0.49, espeak_wer=0.29), "base", seed=0))
    record = find_speech_record(checkpoint, meta)
    assert (record.wer, record.sentences, record.asr, record.espeak_wer) == (0.49, 4, "base", 0.29)
    speech = checkpoint_quality(meta, speech_record=record).speech
    assert speech.text == ("the ASR recognised 51% of the words of 4 new sentences it spoke (WER 0.49); eSpeak itself "
                           "71% (WER 0.29)") and speech.trusted
    # every name of the save finds it (best, latest, its step file); another save of the same file does not
    assert find_speech_record(checkpoint.with_name("stage1_step16.safetensors"), meta) == record
    assert find_speech_record(checkpoint, {**meta, "checkpoint_id": "save-b"}) is None
    assert find_speech_record(checkpoint, meta, allowed=lambda path: False) is None
    # a second seed without the ceiling keeps eSpeak's figure (it does not depend on the seed) ...
    write_speech_record(checkpoint, meta, record_figures(_evaluation(0.55), "base", seed=1))
    assert find_speech_record(checkpoint, meta).espeak_wer == 0.29
    kept = json.loads(speech_record_path(checkpoint, "save-a").read_text())["errors"]
    assert kept["espeak"]["alignment_share"] == 0.0 and kept["model"]["duration_ratio"] is None   # so are its errors
    # ... but not another ASR's, and a save measured without the ceiling says the model's figure alone
    write_speech_record(checkpoint, meta, record_figures(_evaluation(0.6), "tiny.en", seed=0))
    assert find_speech_record(checkpoint, meta).espeak_wer is None
    other = {**meta, "checkpoint_id": "save-c"}
    write_speech_record(checkpoint, other, record_figures(_evaluation(0.95), "base", seed=0))
    speech = checkpoint_quality(other, speech_record=find_speech_record(checkpoint, other)).speech
    assert speech.near_random and "eSpeak" not in speech.text and "4 new sentences" in speech.text


def test_ira_eval_speech_records_its_figures_where_the_app_reads_them(tmp_path, monkeypatch):
    """The command (here with a stand-in ASR, speaker and evaluation) writes the record of the checkpoint's save,
    which the Generate tab's note then reads; a sentence file of the user's own is not recorded as new sentences."""
    import torch

    import ira.eval.speech
    import ira.speaker
    from ira.checkpoint import read_metadata
    from ira.cli import main
    from ira.config import load_config
    from ira.eval import asr
    from ira.training.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "run" / "stage1_best.safetensors", {"speech_lm": torch.nn.Linear(2, 2)},
                                 stage="1", epoch=0, step=16, config=load_config("cpu"))
    monkeypatch.setattr(asr, "is_available", lambda name=None: True)
    monkeypatch.setattr(asr, "transcriber", lambda name=None: (lambda wav, rate: ""))
    monkeypatch.setattr(ira.speaker.Speaker, "from_checkpoint", classmethod(lambda cls, *args, **kwargs: None))
    monkeypatch.setattr(ira.eval.speech, "evaluate_speech_by", lambda speaker, sentences, transcribers, *args, **kw:
                        {name: _evaluation(0.49, espeak_wer=0.29) for name in transcribers})
    mine = tmp_path / "mine.txt"
    mine.write_text("A sentence of my own.\n")
    assert main(["eval", "speech", "--checkpoint", str(checkpoint), "--sentences", str(mine)]) == 0
    meta = read_metadata(checkpoint)
    assert find_speech_record(checkpoint, meta) is None
    assert main(["eval", "speech", "--checkpoint", str(checkpoint), "--limit", "4"]) == 0
    record = find_speech_record(checkpoint, meta)
    assert record is not None and (record.asr, record.wer, record.espeak_wer) == (asr.BASE, 0.49, 0.29)
    saved = json.loads(speech_record_path(checkpoint, meta["checkpoint_id"]).read_text())
    assert saved["sentence_set"] == "everyday" and saved["errors"]["model"]["alignment_share"] == 0.0


def test_eval_speech_on_the_hard_set_keeps_its_own_record_and_the_app_still_quotes_the_everyday_one(
        tmp_path, monkeypatch, capsys):
    """`--sentences hard` speaks the bundled hard set and records it beside the everyday set's record, which the
    Generate tab's note keeps quoting; its --json output and the summary say where the words were lost."""
    import torch

    import ira.eval.speech
    import ira.speaker
    from ira.checkpoint import read_metadata
    from ira.cli import main
    from ira.config import load_config
    from ira.eval import asr
    from ira.eval.speech import Heard, SpeechEvaluation, SpeechScore, heldout_sentences
    from ira.training.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "run" / "stage1_best.safetensors", {"speech_lm": torch.nn.Linear(2, 2)},
                                 stage="1", epoch=0, step=16, config=load_config("cpu"))
    spoken = []

    def evaluate(speaker, sentences, transcribers, *args, **kwargs):
        spoken.append(list(sentences))
        hard = sentences[0] == heldout_sentences("hard")[0]
        heard = [" ".join(s.split()[:2]) if hard else s for s in sentences]        # the hard set: words skipped
        model = SpeechScore.of(sentences, heard, [1.0] * len(sentences))
        espeak = SpeechScore.of(sentences, sentences, [2.0] * len(sentences))
        return {name: SpeechEvaluation(model, espeak, espeak, seconds=1.0) for name in transcribers}

    monkeypatch.setattr(asr, "is_available", lambda name=None: True)
    monkeypatch.setattr(asr, "transcriber", lambda name=None: (lambda wav, rate: ""))
    monkeypatch.setattr(ira.speaker.Speaker, "from_checkpoint", classmethod(lambda cls, *args, **kwargs: None))
    monkeypatch.setattr(ira.eval.speech, "evaluate_speech_by", evaluate)
    meta = read_metadata(checkpoint)
    assert main(["eval", "speech", "--checkpoint", str(checkpoint), "--limit", "4"]) == 0
    everyday = find_speech_record(checkpoint, meta)
    assert everyday is not None and everyday.wer == 0.0
    out = tmp_path / "hard.json"
    capsys.readouterr()
    assert main(["eval", "speech", "--checkpoint", str(checkpoint), "--sentences", "hard", "--limit", "4",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert spoken[-1] == heldout_sentences("hard", limit=4)
    assert "the bundled hard held-out set" in printed and "in 4 of 4 sentences" in printed
    assert find_speech_record(checkpoint, meta) == everyday           # the everyday record is not overwritten
    hard = find_speech_record(checkpoint, meta, sentence_set="hard")
    assert hard is not None and hard.wer > 0.5 and hard.sentences == 4
    assert speech_record_path(checkpoint, meta["checkpoint_id"], "hard").name == f"speech-{meta['checkpoint_id']}-hard.json"
    assert "recognised 100% of the words" in checkpoint_quality(meta, speech_record=everyday).speech.text
    report = json.loads(out.read_text())
    assert report["sentence_set"] == "hard" and report["errors"]["model"]["sentences_with_alignment_failure"] == 4
    assert report["errors"]["model"]["items"][0]["failures"] == ["skipped 'sold every loaf before noon'"]
    assert report["by_asr"][asr.BASE]["errors"]["model"]["duration_ratio"]["median"] == 0.5
    saved = json.loads(speech_record_path(checkpoint, meta["checkpoint_id"], "hard").read_text())
    assert saved["sentence_set"] == "hard" and saved["errors"]["model"]["alignment_share"] == pytest.approx(hard.wer)


def test_a_record_of_one_sentence_set_is_never_read_as_another_s(tmp_path):
    from ira.eval.speech import record_figures

    checkpoint = tmp_path / "stage1" / "stage1_best.safetensors"
    meta = header("1", checkpoint_id="save-a")
    path = write_speech_record(checkpoint, meta, record_figures(_evaluation(0.7), "base", seed=0, set_name="hard"))
    assert path == speech_record_path(checkpoint, "save-a", "hard") and find_speech_record(checkpoint, meta) is None
    path.rename(speech_record_path(checkpoint, "save-a"))             # a hard record under the everyday name
    assert find_speech_record(checkpoint, meta) is None
    with pytest.raises(ValueError, match="'../x' is not the name of a bundled sentence set"):
        speech_record_path(checkpoint, "save-a", "../x")


def _card_path(folder):
    (folder / "card").mkdir()
    return folder / "card" / "card.json"


def test_the_llm_s_answers_are_made_up_until_it_tells_speech_apart_above_chance():
    adapter = ("speech_lm", "adapter")
    deaf = checkpoint_quality(header("2", modules=adapter, understanding={"choice_accuracy": 0.28, "clips": 32,
                                                                         "repeat_cer": 0.95})).answers
    assert deaf.near_random and "made up" in deaf.text and "28% of 32 held-out clips" in deaf.text
    hears = checkpoint_quality(header("3", modules=adapter, understanding={"choice_accuracy": 0.72, "clips": 32,
                                                                          "repeat_cer": 0.43})).answers
    assert hears.trusted and hears.text.startswith("the LLM repeats new speech with 43% of characters wrong")
    lost = checkpoint_quality(header("2", modules=adapter, understanding={"choice_accuracy": 0.9, "clips": 32,
                                                                         "repeat_cer": 0.97})).answers
    assert lost.near_random and "almost nothing" in lost.text
    unmeasured = checkpoint_quality(header("2", modules=adapter)).answers
    assert not unmeasured.measured and "may be made up" in unmeasured.text


def test_a_good_style_encoder_is_described_without_claiming_the_speech_follows_it():
    style = checkpoint_quality(header("1", modules=("speech_lm", "style"), **{STYLE_EVAL_KEY: STYLE_GOOD})).style
    assert style.trusted and "55%" in style.text and "about 6 times in ten" in style.text
    assert "how closely the speech follows a description was not measured" in style.text
    own = checkpoint_quality(header("style", modules=("style",), **{STYLE_EVAL_KEY: STYLE_GOOD}))
    assert own.speech is None and own.answers is None and "not measured" not in own.style.text
    older = checkpoint_quality(header("style", modules=("style",), metric={"name": "val_top5", "value": 0.4,
                                                                            "step": 30})).style
    assert older.measured and "40%" in older.text and "chance not recorded" in older.text
    assert "no style encoder" in checkpoint_quality(header("1")).style.text


def test_chance_and_rates_in_words():
    assert not above_chance(0.10, 0.08, 200) and above_chance(0.30, 0.08, 200)
    assert not above_chance(0.35, 0.25, 32) and above_chance(0.45, 0.25, 32)      # 2 standard errors: 0.153
    assert [how_often(p) for p in (0.0, 0.1, 0.26, 0.55, 1.0)] == [
        "never", "about one time in ten", "about one time in 4", "about 6 times in ten", "every time"]
    assert percent(0.001) == "under 1%" and percent(0.0) == "0%" and percent(1.2) == "100%"


def test_an_answer_that_ran_to_the_token_limit_says_so():
    assert "64-token limit" in answer_cut_note(64, 64) and "cut off" in answer_cut_note(63, 64)
    assert answer_cut_note(20, 64) == ""


def test_similarities_that_do_not_stand_out_mean_nothing():
    flat = nearest_note([-0.008, -0.009], [-0.01 + 0.001 * (i % 3) for i in range(50)])
    assert flat.near_random and "mean nothing" in flat.text
    spread = [0.1 * ((i % 7) - 3) for i in range(70)]
    standing = nearest_note([0.9, 0.8], spread)
    assert standing.trusted and "standard deviations above the corpus" in standing.text
    assert nearest_note([0.31], spread).near_random                       # within the corpus's own spread
    assert MIN_SIMILARITY_SPREAD > 0


def test_compare_reads_a_similarity_against_what_different_descriptions_score():
    """The issue's pair: +0.75 for two opposite voices is "similar" only if different descriptions score less."""
    collapsed = [0.74, 0.76, 0.75, 0.73, 0.77, 0.75]
    said = compare_note(0.75, collapsed)
    assert said.near_random and "says nothing" in said.text and "+0.75 ± 0.01" in said.text
    varied = [0.1, 0.3, -0.1, 0.2, 0.0, 0.15]
    assert not compare_note(0.75, varied).near_random and "similar voices" in compare_note(0.75, varied).text
    assert "nearly the same voice" in compare_note(1.0, varied).text
    assert "does not tell voices apart" in compare_note(0.95, [0.95, 0.96, 0.94]).text
    assert "different voices" in compare_note(-0.5, varied).text
    assert len(set(BASELINE_DESCRIPTIONS)) == len(BASELINE_DESCRIPTIONS) >= 6


def test_the_style_figures_travel_with_the_encoder_to_later_checkpoints(tmp_path):
    """A style encoder loaded from a checkpoint keeps its measured figures, and saving it (as every later stage
    does, through `metadata()`) writes them again: a stage-3 checkpoint knows how good its encoder is."""
    import torch

    from ira.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from ira.config import load_config
    from ira.models.style import STYLE_EVAL_KEY as MODEL_KEY, StyleEncoder

    from conftest import TINY_STYLE

    assert MODEL_KEY == STYLE_EVAL_KEY
    cfg = load_config("cpu", TINY_STYLE)
    encoder = StyleEncoder(cfg.style)
    assert STYLE_EVAL_KEY not in encoder.metadata()                    # nothing measured, nothing said
    encoder.measured = dict(STYLE_GOOD)
    first = save_checkpoint(tmp_path / "stagestyle_best.safetensors", {"style": encoder}, stage="style", epoch=0,
                            step=900, config=cfg, metadata=encoder.metadata())
    loaded = StyleEncoder.from_checkpoint(first)
    assert loaded.measured == pytest.approx(STYLE_GOOD)
    later = save_checkpoint(tmp_path / "stage1_best.safetensors", {"style": loaded, "speech_lm": {"w": torch.ones(3)}},
                            stage="1", epoch=0, step=5, config=cfg, metadata=loaded.metadata())
    assert json.loads(read_metadata(later)[STYLE_EVAL_KEY]) == pytest.approx(STYLE_GOOD)
    # the Voice Style tab reads only the style tensors of a later stage's checkpoint (issue 37, item 5)
    only_style = load_checkpoint(later, modules=("style",))
    assert only_style.tensors["speech_lm"] == {} and only_style.tensors["style"]
    assert StyleEncoder.from_checkpoint(only_style).measured == pytest.approx(STYLE_GOOD)
    assert load_checkpoint(later).tensors["speech_lm"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_real_training_writes_the_figures_the_notes_read(tmp_path, one_thread):
    """A real (tiny) style run records its retrieval figures in its checkpoint, and a stage-1 run started from it
    carries them: the stage-1 checkpoint's note on voice descriptions comes from the style stage's measurement."""
    from ira.checkpoint import read_metadata
    from ira.config import load_config
    from ira.data.dummy import create_dummy_corpus
    from ira.training.stage1 import run_stage1
    from ira.training.stage_style import run_style_training

    from conftest import TINY_STAGES, TINY_STYLE

    corpus = create_dummy_corpus(tmp_path / "data", num_clips=12, seed=0)
    style = run_style_training(load_config("cpu", TINY_STYLE + [f"data.dir={corpus}", "training.eval_every=1",
                                                                "data.val_fraction=0.25",
                                                                f"training.output_dir={tmp_path / 'style'}"]), cpu=True)
    assert style.ok, style.message
    figures = json.loads(read_metadata(style.last_checkpoint)[STYLE_EVAL_KEY])
    assert 0 <= figures["top5"] <= 1 and figures["chance_top5"] > 0 and figures["step"] >= 1
    stage1 = run_stage1(load_config("cpu", TINY_STAGES + [f"data.dir={corpus}", "training.max_steps=1",
                                                          "training.val_asr_sentences=0",
                                                          f"training.output_dir={tmp_path / 's1'}"]),
                        resume_from=style.last_checkpoint, cpu=True)
    assert stage1.ok, stage1.message
    meta = read_metadata(stage1.last_checkpoint)
    assert json.loads(meta[STYLE_EVAL_KEY]) == pytest.approx(figures)
    note = checkpoint_quality(meta).style
    assert note.measured and f"after {figures['step']} training steps" in note.text
    assert SPEECH_EVAL_KEY not in meta                                   # no ASR asked: nothing said of its speech
    assert checkpoint_quality(meta).speech.text.startswith("not measured")
