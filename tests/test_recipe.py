"""The full recipe: every stage in order on a tiny corpus, each from the previous stage's best checkpoint;
a stopped recipe continues at the stage and step where it stopped; clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PPO, TINY_STAGES
from test_peak_memory import held_by_the_c_heap
from ira.checkpoint import best_path, read_header
from ira.config import STAGE_SECTIONS, load_config
from ira.eval.card import read_card, wav_path
from ira.training.recipe import (BUDGET_SHARES, RECIPE_STAGES, RecipeError, ensure_corpus, plan, run_recipe, stage_card,
                                 stage_config)
from ira.training.stop import request_stop

TINY_RECIPE = TINY_STAGES + TINY_PPO + [
    "style.audio_dim=16", "style.audio_layers=1", "style.audio_heads=2", "style.batch_size=4", "style.max_steps=2",
    "style.warmup_steps=1", "training.max_steps=2", "ppo.max_steps=2"]


def real_stages(llm, calls: list):
    """The real stage functions (the bundled LLM loaded once), recording what each was started from."""
    from ira.training.stage1 import run_stage1
    from ira.training.stage2 import run_stage2
    from ira.training.stage3 import run_stage3
    from ira.training.stage_style import run_style_training

    def run(stage, cfg, resume_from):
        calls.append((stage, resume_from, cfg.training.output_dir))
        if stage == "style":
            result = run_style_training(cfg, resume_from, cpu=True)
        elif stage == "1":
            result = run_stage1(cfg, resume_from, cpu=True)
        elif stage == "2":
            result = run_stage2(cfg, resume_from, cpu=True, llm=llm)
        else:
            result = run_stage3(cfg, resume_from, cpu=True, llm=llm)
        return result.status
    return run


def real_cards(llm, made: list):
    """The real card of each stage (ira/eval/card.py) with the bundled LLM loaded once, recording which checkpoints
    got one. One sentence and no ASR keep the test short (tests/test_card.py covers three sentences and the ASR)."""
    from ira.eval.card import CARD_DIR, make_card
    from ira.eval.speech import heldout_sentences

    def card(checkpoint, stage_cfg):
        made.append(checkpoint)
        return str(make_card(checkpoint, Path(stage_cfg.training.output_dir) / CARD_DIR, transcribe=None, llm=llm,
                             device="cpu", max_new_tokens=stage_cfg.llm.max_new_tokens,
                             sentences=heldout_sentences(limit=1)))
    return card


@pytest.fixture
def tiny_recipe(tmp_path):
    from ira.data.dummy import create_dummy_corpus
    create_dummy_corpus(tmp_path / "data", num_clips=8, seed=0)
    return tmp_path, load_config("cpu", TINY_RECIPE + [f"data.dir={tmp_path / 'data'}",
                                                      f"training.output_dir={tmp_path / 'recipe'}"])


def test_the_plan_splits_the_budget_across_the_stages_in_order(tmp_path):
    state = plan("full", 100, tmp_path)
    assert [s.stage for s in state.stages] == list(RECIPE_STAGES) == ["style", "1", "2", "3"]
    assert sum(s.minutes for s in state.stages) == pytest.approx(100)
    assert [s.minutes for s in state.stages] == [100 * BUDGET_SHARES[s] for s in RECIPE_STAGES]
    with pytest.raises(RecipeError, match="minutes"):
        plan("full", 0, tmp_path)
    with pytest.raises(RecipeError, match="unknown recipe 'fast'"):
        plan("fast", 10, tmp_path)


def test_each_stage_runs_for_its_share_of_the_budget_whatever_the_preset_gives_it_alone(tmp_path):
    """Stages 2 and 3 have their own budgets in the preset (align / ppo.max_minutes), which a stage's run takes
    over `training.max_minutes`: the recipe must set those too, or its stage would run for the preset's time."""
    cfg = load_config("cpu")
    assert cfg.align.max_minutes is not None and cfg.ppo.max_minutes is not None
    state = plan("full", 100, tmp_path)
    for record in state.stages:
        stage_cfg = stage_config(cfg, record)
        section = STAGE_SECTIONS.get(record.stage)
        run_cfg = stage_cfg.with_training_from(section) if section else stage_cfg
        assert run_cfg.training.max_minutes == pytest.approx(record.minutes), record.stage
        assert run_cfg.training.output_dir == record.folder


def test_every_stage_runs_in_order_from_the_previous_best_and_a_stopped_recipe_continues(tiny_recipe, bundled_llm):
    root, cfg = tiny_recipe
    torch.set_num_threads(1)
    calls: list = []
    cards: list = []
    run = real_stages(bundled_llm, calls)
    card = real_cards(bundled_llm, cards)

    def stop_in_stage_2(stage, stage_cfg, resume_from):
        if stage == "2":                       # as the UI's Stop does: the engine stops at its first step
            assert (root / "recipe" / "stage1" / "card" / "card.json").is_file()   # stage 1's card came first
            request_stop(stage_cfg.training.output_dir)
        return run(stage, stage_cfg, resume_from)

    assert run_recipe(cfg, "full", 10, stop_in_stage_2, say=lambda _: None, make_card=card) == "stopped"
    state = json.loads((root / "recipe" / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "stopped", "pending"]
    style_best, stage1_best = state["stages"][0]["checkpoint"], state["stages"][1]["checkpoint"]
    assert [c[0] for c in calls] == ["style", "1", "2"]
    assert calls[0][1] is None and calls[1][1] == style_best and calls[2][1] == stage1_best
    assert style_best.endswith("style/stagestyle_best.safetensors")
    assert cards == [stage1_best]                          # the style encoder does not speak: no card
    assert [s["card"] for s in state["stages"]] == [None, str(root / "recipe" / "stage1" / "card" / "card.json"),
                                                    None, None]
    stopped_at = read_header(root / "recipe" / "stage2" / "stage2_latest.safetensors").step

    calls.clear()
    assert run_recipe(cfg, "full", 10, run, say=lambda _: None, make_card=card) == "done"
    assert [c[0] for c in calls] == ["2", "3"]             # the finished stages are not run again
    assert calls[0][1].endswith("stage2/stage2_latest.safetensors")   # stage 2 resumes exactly where it stopped
    state = json.loads((root / "recipe" / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 4
    assert all(s["peak_memory_mb"] > 50 for s in state["stages"])   # each stage's own peak, in recipe.json
    assert calls[1][1] == state["stages"][2]["checkpoint"]
    assert read_header(state["stages"][2]["checkpoint"]).step >= stopped_at
    assert read_header(state["stages"][3]["checkpoint"]).stage == "3"
    assert cards == [stage1_best, state["stages"][2]["checkpoint"], state["stages"][3]["checkpoint"]]
    for record in state["stages"][1:]:                     # a card per speaking stage, of its handed-over checkpoint
        made = read_card(record["card"])
        assert made.checkpoint == record["checkpoint"] and made.stage == record["stage"]
        assert [Path(wav_path(record["card"], item)).is_file() for item in made.items] == [True]
        assert (made.instruction is not None) == (record["stage"] != "1")
        assert all((item.llm_answered is not None) == (record["stage"] != "1") for item in made.items)
    with pytest.raises(RecipeError, match="--minutes 10"):
        run_recipe(cfg, "full", 20, run, say=lambda _: None)


TINY_LAPTOP = [o for o in TINY_RECIPE if not o.startswith(("codec.name=", "align.tasks=", "align.llm_batch_size=",
                                                           "ppo.advantage="))] + ["ppo.group_size=2"]
"""TINY_RECIPE's sizes and steps, without the overrides that would replace the preset's own design: its codec
`auto`, its stage-2 tasks and LLM batch, its group advantage (a group of 2 fits the tiny PPO batch)."""


def test_the_laptop_preset_s_recipe_runs_every_stage_on_a_cpu_and_says_it_fell_back_to_the_mel_codec(
        tmp_path, bundled_llm, one_thread, monkeypatch, caplog):
    """Issue 38: the GPU preset's full recipe (its design of every stage at tiny sizes, a few steps a stage) goes
    from corpus to stage 3 as the cpu preset's does; offline, its codec `auto` takes the MelCodec and says so."""
    import logging

    from ira.data.dummy import create_dummy_corpus
    from ira.training.recipe import prepare_for_recipe

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))      # no EnCodec weights in torch.hub's cache
    create_dummy_corpus(tmp_path / "data", num_clips=8, seed=0)
    cfg = load_config("laptop", TINY_LAPTOP + [f"data.dir={tmp_path / 'data'}", "codec.allow_download=false",
                                               f"training.output_dir={tmp_path / 'recipe'}"])
    assert (cfg.codec.name, cfg.adapter.output, cfg.adapter.cue_tokens, cfg.align.tasks, cfg.align.distill_reading,
            cfg.ppo.advantage, cfg.training.grad_accum_steps) == ("auto", "vocabulary", 8, "repeat", False, "group", 4)
    with caplog.at_level(logging.WARNING, logger="ira"):
        cfg = prepare_for_recipe(cfg, say=lambda _: None)
    assert "EnCodec is NOT used" in caplog.text and "Falling back to the offline MelCodec" in caplog.text
    calls: list = []
    cards: list = []
    assert run_recipe(cfg, "full", 10, real_stages(bundled_llm, calls), say=lambda _: None,
                      make_card=real_cards(bundled_llm, cards)) == "done"
    state = json.loads((tmp_path / "recipe" / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 4
    assert [c[0] for c in calls] == list(RECIPE_STAGES) and len(cards) == 3
    stage2 = read_header(state["stages"][2]["checkpoint"])
    assert stage2.config["preset"] == "laptop" and stage2.config["adapter"]["output"] == "vocabulary"
    assert read_header(state["stages"][3]["checkpoint"]).config["ppo"]["advantage"] == "group"


def test_a_card_that_cannot_be_made_is_recorded_and_the_recipe_goes_on(tmp_path):
    """The default card maker on checkpoints that are not readable fails for every speaking stage: each failure
    is recorded in recipe.json, the recipe still ends "done", and a later run does not try again; a stage done
    before cards existed (no card field at all) gets its card when the recipe is continued."""
    cfg = load_config("cpu", [f"training.output_dir={tmp_path}"])

    def fake_stage(stage, stage_cfg, resume_from):   # "trains" by writing a file where the best checkpoint goes
        best_path(stage_cfg.training.output_dir, stage).parent.mkdir(parents=True, exist_ok=True)
        best_path(stage_cfg.training.output_dir, stage).write_text("not a checkpoint")
        return "done"

    said: list = []
    tried: list = []

    def card(checkpoint, stage_cfg):
        tried.append(checkpoint)
        return stage_card(checkpoint, stage_cfg)

    assert run_recipe(cfg, "full", 10, fake_stage, say=said.append, make_card=card) == "done"
    state = json.loads((tmp_path / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 4
    assert [s["card"] for s in state["stages"]] == [None] * 4
    assert state["stages"][0]["card_error"] is None         # the style encoder gets no card
    for record in state["stages"][1:]:
        assert "CheckpointError" in record["card_error"] and "is not a safetensors file" in record["card_error"]
    assert len(tried) == 3 and sum("no card (CheckpointError" in line for line in said) == 3

    for record in state["stages"]:                          # a recipe.json of before cards
        del record["card"], record["card_error"]
    (tmp_path / "recipe.json").write_text(json.dumps(state))
    tried.clear()
    assert run_recipe(cfg, "full", 10, fake_stage, say=said.append, make_card=card) == "done"
    assert len(tried) == 3                                 # the speaking stages' cards are made now
    tried.clear()
    assert run_recipe(cfg, "full", 10, fake_stage, say=said.append, make_card=card) == "done"
    assert tried == []                                     # a recorded failure is not tried at every run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a stage's own peak and malloc_trim are Linux's")
def test_what_a_stage_freed_goes_back_before_the_next_one_and_is_not_in_its_peak(tmp_path):
    """Issue 36, item 8: each stage's peak (recipe.json) starts from what the stages before left resident, and
    memory they freed is given back to the system first, not kept by the C heap into the next stage."""
    cfg = load_config("cpu", [f"training.output_dir={tmp_path}"])
    pinned: list = []

    def fake_stage(stage, stage_cfg, resume_from):
        if stage == "style":              # uses 300 MiB and frees it, as a stage's tensors are freed
            pinned.append(held_by_the_c_heap(300))
        best_path(stage_cfg.training.output_dir, stage).parent.mkdir(parents=True, exist_ok=True)
        best_path(stage_cfg.training.output_dir, stage).write_text("not a checkpoint")
        return "done"

    said: list = []
    assert run_recipe(cfg, "full", 10, fake_stage, say=said.append, make_card=None) == "done"
    pinned[0]()
    state = json.loads((tmp_path / "recipe.json").read_text())
    style, stage1 = (s["peak_memory_mb"] for s in state["stages"][:2])
    assert stage1 < style - 250
    assert all(f"peak memory {s['peak_memory_mb'] / 1024:.1f} GB" in line
               for s, line in zip(state["stages"], [x for x in said if "done in" in x]))


def test_a_stop_of_the_recipe_reaches_the_running_stage_and_the_recipe_continues(tiny_recipe, one_thread):
    """The app's Stop writes the recipe folder's STOP; the stage running in its subfolder must honour it, and
    flags left over by an earlier run (one killed before it could clear them) must not stop the next run."""
    import os
    import time

    from ira.training.stage1 import run_stage1
    from ira.training.stage_style import run_style_training

    root, cfg = tiny_recipe
    recipe_dir = root / "recipe"
    calls: list = []

    def run(stage, stage_cfg, resume_from, stop_in=None, stop_after=None):
        calls.append((stage, resume_from))
        if stage == stop_in:
            request_stop(recipe_dir)               # what the app's Stop writes: the recipe's own STOP
        result = (run_style_training(stage_cfg, resume_from, cpu=True) if stage == "style"
                  else run_stage1(stage_cfg, resume_from, cpu=True))
        if stage == stop_after:
            request_stop(recipe_dir)               # pressed as the stage ends: the next one must not start
        return result.status

    assert run_recipe(cfg, "full", 10, lambda *a: run(*a, stop_in="1"), say=lambda _: None,
                      make_card=None) == "stopped"   # no cards: tested above
    state = json.loads((recipe_dir / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "stopped", "pending", "pending"]
    assert not (recipe_dir / "STOP").exists()      # honoured, so cleared
    stopped_at = read_header(recipe_dir / "stage1" / "stage1_latest.safetensors").step
    assert stopped_at == 1                         # at the end of the step it was in, not at the budget's end

    old = time.time() - 3600                       # flags left by an earlier run that was killed
    for flag in (recipe_dir / "STOP", recipe_dir / "stage1" / "STOP"):
        flag.write_text("stop requested\n")
        os.utime(flag, (old, old))
    calls.clear()
    assert run_recipe(cfg, "full", 10, lambda *a: run(*a, stop_after="1"), say=lambda _: None,
                      make_card=None) == "stopped"
    assert [c[0] for c in calls] == ["1"]          # the style encoder is not trained again
    assert calls[0][1].endswith("stage1/stage1_latest.safetensors")
    state = json.loads((recipe_dir / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "stopped", "pending"]
    assert read_header(state["stages"][1]["checkpoint"]).step > stopped_at
    assert not (recipe_dir / "STOP").exists() and not (recipe_dir / "stage1" / "STOP").exists()


@pytest.mark.parametrize("argv, message", [
    (["train"], "either --stage"),
    (["train", "--stage", "1", "--recipe", "full", "--minutes", "5"], "either --stage"),
    (["train", "--recipe", "full"], "--minutes"),
    (["train", "--recipe", "full", "--minutes", "5", "--resume_checkpoint", "x.safetensors"], "same recipe command"),
])
def test_the_recipe_command_line_says_what_to_give(argv, message, capsys):
    from ira.cli import EXIT_USAGE, main
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_recipe_folder_of_another_budget_is_refused_with_the_command_that_continues_it(tmp_path):
    cfg = load_config("cpu", [f"training.output_dir={tmp_path}"])
    plan("full", 30, tmp_path).save(tmp_path / "recipe.json")
    with pytest.raises(RecipeError, match="--recipe full --minutes 30"):
        run_recipe(cfg, "full", 60, lambda *a: "done", say=lambda _: None)
    (tmp_path / "recipe.json").write_text("{not json")
    with pytest.raises(RecipeError, match="recipe.json is not a readable recipe state"):
        run_recipe(cfg, "full", 30, lambda *a: "done", say=lambda _: None)


def test_a_recipe_folder_another_recipe_holds_is_refused_and_left_alone(tmp_path):
    """Two recipe commands at once in one folder: the second would rewrite recipe.json (a stage it could not start
    recorded as failed) under the first."""
    from test_run_folder import _holder
    from ira.training.run_folder import RunFolderError

    cfg = load_config("cpu", [f"training.output_dir={tmp_path}"])
    plan("full", 30, tmp_path).save(tmp_path / "recipe.json")
    before = (tmp_path / "recipe.json").read_text()
    ran: list = []
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=f"process {holder.pid}"):
            run_recipe(cfg, "full", 30, lambda *a: ran.append(a) or "done", say=lambda _: None)
    finally:
        holder.stdin.close()
        holder.wait()
    assert ran == [] and (tmp_path / "recipe.json").read_text() == before


def test_from_nothing_the_recipe_speaks_the_synthetic_corpus_first_and_names_the_command_for_other_sources(tmp_path):
    from ira.data.corpus import read_metadata

    said: list[str] = []
    cfg = load_config("cpu", [f"data.dir={tmp_path / 'synth'}", "data.synth_num_utterances=4"])
    minutes = ensure_corpus(cfg, said.append)
    assert minutes is not None and len(read_metadata(tmp_path / "synth")) == 4
    assert "speaking the preset's synthetic corpus" in said[0]
    assert ensure_corpus(cfg, said.append) is None and len(said) == 2          # there now: nothing to do
    other = load_config("cpu", [f"data.dir={tmp_path / 'lj'}", "data.source=ljspeech"])
    with pytest.raises(RecipeError, match="ira data ljspeech"):
        ensure_corpus(other, said.append)


def test_a_small_corpus_gets_batches_it_can_fill_and_each_change_is_said():
    """The cpu preset's batches (style 64, stage 1 8, stage 2 32, PPO 16 in groups of 4 with minibatches of 8)
    on the Data tab's dummy corpus (11 training clips): every batch fits, PPO's stays whole groups with a
    minibatch that divides it; a corpus that already fits is left as it is; one clip is a clear error."""
    from ira.training.recipe import fit_to_corpus

    cfg = load_config("cpu")
    assert (cfg.style.batch_size, cfg.ppo.batch_size, cfg.ppo.group_size, cfg.ppo.advantage) == (64, 16, 4, "group")
    fitted, notes = fit_to_corpus(cfg, 11)
    assert fitted.style.batch_size == 11 and fitted.align.batch_size == 11
    assert fitted.training.batch_size == cfg.training.batch_size == 8      # fits already: unchanged
    assert fitted.ppo.batch_size == 8 and fitted.ppo.minibatch_size == 8   # two groups of 4
    assert len(notes) == 1 and "11 training clips" in notes[0]
    assert "style.batch_size 64 -> 11" in notes[0] and "ppo.batch_size 16 -> 8" in notes[0]
    assert "training.batch_size" not in notes[0]
    odd, _ = fit_to_corpus(load_config("cpu", ["ppo.minibatch_size=4"]), 6)
    assert (odd.ppo.batch_size, odd.ppo.minibatch_size, odd.training.batch_size) == (4, 4, 6)
    same, notes = fit_to_corpus(cfg, 20_000)
    assert same is cfg and notes == []
    with pytest.raises(RecipeError, match="1 training clip.*build a larger corpus"):
        fit_to_corpus(cfg, 1)
    with pytest.raises(RecipeError, match=r"fewer than one PPO group \(ppo.group_size=4\)"):
        fit_to_corpus(cfg, 3)


def test_the_recipe_prepares_the_corpus_once_before_its_stages_with_a_named_phase(tmp_path):
    """`prepare_for_recipe`: the corpus is prepared up front under its own progress bar (not inside stage 1's
    budget), then the batches fit its training split; a second call finds the cache fresh and opens no bar."""
    import contextlib

    from ira.data.dummy import create_dummy_corpus
    from ira.data.prepare import cache_is_fresh
    from ira.training.recipe import PREPARING, prepare_for_recipe

    create_dummy_corpus(tmp_path / "data", num_clips=12, seed=0)
    cfg = load_config("cpu", ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16",
                              "codec.mel_kmeans_iters=2", f"data.dir={tmp_path / 'data'}"])
    bars: list[str] = []
    fractions: list[float] = []

    @contextlib.contextmanager
    def bar(title):
        bars.append(title)
        yield lambda fraction, message: fractions.append(fraction)

    said: list[str] = []
    fitted = prepare_for_recipe(cfg, said.append, progress_bar=bar)
    assert bars == [PREPARING] and fractions and max(fractions) == 1.0
    assert cache_is_fresh(cfg) and "preparing the corpus" in said[0]
    train = json.loads((tmp_path / "data" / "prepare_report.json").read_text())["train"]
    assert fitted.style.batch_size == train < 64 and any("style.batch_size 64 ->" in s for s in said)
    again = prepare_for_recipe(cfg, said.append, progress_bar=bar)
    assert bars == [PREPARING] and again.style.batch_size == train
