"""The Generate tab through the app's API (gradio_client): speak with a stage-3 and a stage-1 checkpoint of
the tiny training runs, hear the LLM's answer, ask about an uploaded clip, and the errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import TINY_APP, free_port  # noqa: E402
from ira.checkpoint import load_checkpoint, read_metadata, save_checkpoint  # noqa: E402
from ira.hardware import detect_hardware  # noqa: E402
from ui.app import build_app, launch_app  # noqa: E402

SPEAK_DEFAULTS = dict(style="", reference=None, question="", temp=0.8, k=50, p=1.0, cfg=1.5, seed_value=0,
                      seconds=1.0)


def _with_figures(source: str | Path, target: Path, **figures) -> Path:
    """A copy of checkpoint `source` whose header carries the given measured figures (as training writes them)."""
    ckpt = load_checkpoint(source)
    extra = {**ckpt.extra, **{key: json.dumps(value) for key, value in figures.items()}}
    return save_checkpoint(target, ckpt.tensors, stage=ckpt.stage, epoch=ckpt.epoch, step=ckpt.step,
                           config=ckpt.config, metadata=extra)


@pytest.fixture(scope="module")
def generate_app(tiny_stage2, tiny_stage3, bundled_llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    for run, source in (("tiny3", tiny_stage3.last_checkpoint), ("tiny1", tiny_stage2[2].last_checkpoint)):
        (root / "runs" / run).mkdir(parents=True)
        shutil.copy(source, root / "runs" / run / Path(source).name)
    # weak checkpoints, measured as the 3-minute recipe was: speech near random, an LLM that does not hear
    step1 = int(read_metadata(tiny_stage2[2].last_checkpoint)["step"])
    weak1 = _with_figures(tiny_stage2[2].last_checkpoint, root / "runs" / "weak1" / "stage1_best.safetensors",
                          metric={"name": "val_wer", "value": 0.99, "step": step1},
                          speech_eval={"wer": 0.99, "cer": 0.9, "sentences": 8})
    weak3 = _with_figures(tiny_stage3.last_checkpoint, root / "runs" / "weak3" / "stage3_best.safetensors",
                          understanding={"choice_accuracy": 0.25, "clips": 32, "repeat_cer": 1.0})
    hardware = detect_hardware()
    demo = build_app(root, preset="cpu", overrides=TINY_APP, hardware=hardware)
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(launched.local_url, verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    names = {run: f"runs/{run}/{Path(source).name}" for run, source in
             (("tiny3", tiny_stage3.last_checkpoint), ("tiny1", tiny_stage2[2].last_checkpoint),
              ("weak1", weak1), ("weak3", weak3))}
    yield root, client, names
    demo.close()


def _speak(client: Client, checkpoint: str, text: str, **overrides):
    args = {**SPEAK_DEFAULTS, **overrides}
    return client.predict(checkpoint, text, args["style"], args["reference"], args["question"], args["temp"],
                          args["k"], args["p"], args["cfg"], args["seed_value"], args["seconds"], api_name="/speak")


def test_checkpoint_list_holds_the_speaking_checkpoints(generate_app):
    root, client, names = generate_app
    listed = client.predict(None, api_name="/generate_checkpoints")
    choices = {c[1] if isinstance(c, (list, tuple)) else c for c in listed["choices"]}
    assert choices == set(names.values())
    for label, path in listed["choices"]:      # each says which run, stage and step it is
        assert label.startswith(path.removeprefix("runs/").removesuffix(".safetensors")), label
        assert " · stage " in label and " · step " in label, label


def test_speak_then_the_llm_answers(generate_app):
    root, client, names = generate_app
    _, full, answer, status = _speak(client, names["tiny3"], "Good morning to you.",
                                     question="What did the speaker say?")
    data, sr = sf.read(full)
    assert sr == 24000 and data.size > 0
    assert list((root / "generated").glob("speech-*.wav"))               # kept in the workspace
    assert answer.strip()           # the reply, or "(no answer)" when the tiny untrained model says nothing
    assert "s of speech" in status and "answered in" in status
    assert "**Speech**: " in status and "**The LLM's answer**: " in status   # what was measured, beside each output


def test_a_stage1_checkpoint_speaks_and_says_why_it_cannot_answer(generate_app):
    _, client, names = generate_app
    _, full, answer, status = _speak(client, names["weak1"], "Hello there.")
    assert sf.read(full)[0].size > 0 and answer == ""
    assert "holds no adapter" in status and "Train tab" in status
    assert "adapter_checkpoint" not in status          # the app's words, not a Python argument
    # the weak checkpoint's speech carries its measured quality: near random, not "speaks"
    assert "**Speech**: near random: the ASR recognised 1% of the words of 8 new sentences" in status, status
    assert "The LLM's answer" not in status


def test_a_weak_checkpoint_s_answer_says_it_is_made_up(generate_app):
    """The issue: the LLM's fluent made-up answers carried no warning. An adapter measured at chance says so."""
    _, client, names = generate_app
    _, _, answer, status = _speak(client, names["weak3"], "Good morning to you.")
    assert answer.strip() and "answered in" in status
    assert "**The LLM's answer**: near random: the LLM does not hear this audio" in status, status
    assert "its answers are made up" in status and "25% of 32 held-out clips" in status
    about = client.predict(names["weak3"], api_name="/generate_checkpoint_quality")[0]   # the checkpoint line
    assert "Stage 3" in about and "made up" in about


def test_understand_an_uploaded_clip(generate_app, tmp_path):
    root, client, names = generate_app
    _, full, _, _ = _speak(client, names["tiny1"], "Hello there.")
    clip = tmp_path / "clip.wav"
    shutil.copy(full, clip)
    reply, note = client.predict(names["tiny3"], handle_file(str(clip)), "What did they say?",
                                 api_name="/understand_audio")
    assert isinstance(reply, str) and "**The LLM's answer**: " in note


def test_bad_requests_are_clear_errors(generate_app):
    _, client, names = generate_app
    with pytest.raises(AppError, match="empty"):
        _speak(client, names["tiny3"], "   ")
    # no checkpoint chosen: said in the status, not as a red error badge on each output
    assert "Choose a checkpoint above first" in _speak(client, None, "Hello.")[3]
    with pytest.raises(AppError, match="outside the workspace"):
        _speak(client, "../../etc/passwd", "Hello.")
    with pytest.raises(AppError, match="less than minimum value 0.05"):   # the slider's own check
        _speak(client, names["tiny3"], "Hello.", p=0.0)
    with pytest.raises(AppError, match="record or upload"):
        client.predict(names["tiny3"], None, "What?", api_name="/understand_audio")


def test_sampling_settings_are_checked():
    from ui.generate_tab import sampling_settings
    assert sampling_settings(0.0, 0, 1.0, 1.0, 3, 0).max_seconds is None
    with pytest.raises(ValueError, match="top-p"):
        sampling_settings(0.8, 50, 0.0, 1.5, 0, 0)
    with pytest.raises(ValueError, match="temperature"):
        sampling_settings(-1.0, 50, 1.0, 1.5, 0, 0)


def test_build_train_stop_then_speak_with_the_new_checkpoint(generate_app):
    """The whole loop through the app's API with real parts: a corpus, a real stage-1 child process whose
    metrics arrive and which a Stop ends with a checkpoint, then that checkpoint speaks."""
    root, client, _ = generate_app
    client.predict("dummy", "loop", 6, "", 0, False, api_name="/build_corpus")
    client.predict("1", "loop", "cpu", "loop", "(none)", 1, 100000, 2, 1e-3, api_name="/start_training")
    deadline, rows = time.time() + 120, []
    while time.time() < deadline:
        status, loss, *_ = client.predict("loop", None, api_name="/training_status")
        rows = [r for r in _plot_rows(loss) if r["series"] == "train"]
        if len(rows) >= 3:
            break
        time.sleep(0.5)
    assert "RUNNING" in status and len(rows) >= 3, status
    assert "STOPPING" in client.predict("loop", api_name="/stop_training")
    while "STOPPED" not in status and time.time() < deadline:
        status = client.predict("loop", None, api_name="/training_status")[0]
        time.sleep(0.5)
    assert "STOPPED" in status, status
    listed = client.predict(None, api_name="/generate_checkpoints")["choices"]
    new = [c[1] if isinstance(c, (list, tuple)) else c for c in listed]
    new = [c for c in new if c.startswith("runs/loop/")]
    assert new, listed
    _, full, _, status = _speak(client, new[0], "Hello from a fresh model.")
    assert sf.read(full)[0].size > 0 and "holds no adapter" in status


def _plot_rows(plot: dict) -> list[dict]:
    value = plot.get("value", plot) if isinstance(plot, dict) else None
    if not value or not value.get("data"):
        return []
    return [dict(zip(value["columns"], row)) for row in value["data"]]


def test_the_checkpoint_line_says_what_was_measured_and_claims_nothing_else(tmp_path):
    """The issue: a stage 1 with WER 0.99 and a 7-step style encoder was said to speak and follow descriptions."""
    from ui.generate_tab import checkpoint_summary
    from ui.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    save_checkpoint(ws.runs_dir / "quick" / "stage1_best.safetensors", {"speech_lm": {"x": torch.zeros(1)},
                                                                       "style": {"x": torch.zeros(1)}},
                    stage="1", epoch=0, step=16, config={},
                    metadata={"metric": json.dumps({"name": "val_wer", "value": 0.99, "step": 16}),
                              "style_eval": json.dumps({"top5": 0.1, "chance_top5": 0.08, "n_queries": 200,
                                                        "n_clips": 60, "step": 7})})
    line = checkpoint_summary(ws, "runs/quick/stage1_best.safetensors")
    assert "Stage 1, step 16" in line and line.count("near random") == 2, line
    assert "after 7 training steps" in line and "no adapter" in line
    assert "follows voice descriptions" not in line and "speaks" not in line


def test_the_checkpoint_line_puts_espeak_s_figure_beside_the_checkpoint_s(tmp_path):
    """What `ira eval speech` recorded of this save (the model's speech and eSpeak's own audio of the same held-out
    sentences, heard by the same ASR) is said beside the checkpoint; a record outside the workspace is not read."""
    from ira.checkpoint import read_metadata
    from ira.eval.quality import write_speech_record
    from ui.generate_tab import checkpoint_summary
    from ui.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")
    path = save_checkpoint(ws.runs_dir / "full" / "stage1_best.safetensors", {"speech_lm": {"x": torch.zeros(1)}},
                           stage="1", epoch=0, step=16, config={},
                           metadata={"metric": json.dumps({"name": "val_wer", "value": 0.8, "step": 16})})
    assert "eSpeak" not in checkpoint_summary(ws, "runs/full/stage1_best.safetensors")
    record = write_speech_record(path, read_metadata(path), {"asr": "base", "sentences": 40, "wer": 0.486,
                                                             "cer": 0.297, "espeak": {"wer": 0.291, "cer": 0.179}})
    line = checkpoint_summary(ws, "runs/full/stage1_best.safetensors")
    assert ("the ASR recognised 51% of the words of 40 new sentences it spoke (WER 0.49); eSpeak itself 71% "
            "(WER 0.29)") in line, line
    outside = tmp_path / "outside.json"
    record.rename(outside)
    record.symlink_to(outside)
    assert "eSpeak" not in checkpoint_summary(ws, "runs/full/stage1_best.safetensors")


def test_the_checkpoint_list_is_one_line_per_save_best_first_grouped_by_run(tmp_path):
    """The issue: 20 lines with duplicates (best = step 0, latest = step 16) ordered by run age."""
    from ui.generate_tab import speaking_checkpoints
    from ui.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")

    def save(run: str, name: str, step: int, wer: float | None, same_as: str | None = None) -> None:
        path = ws.runs_dir / run / f"{name}.safetensors"
        if same_as is not None:        # the engine's best and latest: another name of the same save
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(ws.runs_dir / run / f"{same_as}.safetensors", path)
            return
        metric = {} if wer is None else {"metric": json.dumps({"name": "val_wer", "value": wer, "step": step})}
        save_checkpoint(path, {"speech_lm": {"x": torch.zeros(1)}}, stage="1", epoch=0, step=step, config={},
                        metadata=metric)
        time.sleep(0.02)

    save("old", "stage1_step0", 0, 0.95)
    save("old", "stage1_best", 0, None, same_as="stage1_step0")
    save("old", "stage1_step8", 8, 0.97)
    save("old", "stage1_step16", 16, 0.96)
    save("old", "stage1_latest", 16, None, same_as="stage1_step16")
    save("new", "stage1_step4", 4, None)
    save("new", "stage1_step2", 2, 0.5)
    listed = speaking_checkpoints(ws)
    paths = [path for _, path in listed]
    assert paths == ["runs/new/stage1_step2.safetensors", "runs/new/stage1_step4.safetensors",   # newest run first
                     "runs/old/stage1_best.safetensors", "runs/old/stage1_latest.safetensors",
                     "runs/old/stage1_step8.safetensors"]                                         # best first in a run
    labels = dict((path, label) for label, path in listed)
    assert labels["runs/old/stage1_best.safetensors"] == \
        "old/stage1_best · stage 1 · step 0 · wer 0.95 · also stage1_step0"
    assert labels["runs/old/stage1_latest.safetensors"].endswith("step 16 · wer 0.96 · also stage1_step16")
    assert labels["runs/new/stage1_step4.safetensors"] == "new/stage1_step4 · stage 1 · step 4"


def test_the_newest_finished_recipe_s_final_checkpoint_is_preselected(tmp_path):
    """The Generate tab starts on the last stage's checkpoint of the newest finished full recipe (its stages'
    checkpoints, in subfolders of the run, are listed too); an unfinished recipe does not count; a refresh
    moves to a recipe that finished since, unless the user chose another checkpoint."""
    import gradio as gr
    import torch

    from ira.checkpoint import save_checkpoint
    from ira.training.recipe import plan
    from ui.generate_tab import build_generate_tab, default_checkpoint, speaking_checkpoints
    from ui.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws")

    def checkpoint(rel: str, stage: str) -> Path:
        return save_checkpoint(ws.root / rel, {"w": {"x": torch.zeros(1)}}, stage=stage, epoch=0, step=1, config={})

    def recipe(name: str, finished: bool) -> str:
        state = plan("full", 10, ws.runs_dir / name)
        for record in state.stages:
            record.status = "done" if finished or record.stage != "3" else "stopped"
            record.checkpoint = str(checkpoint(f"runs/{name}/{Path(record.folder).name}/stage{record.stage}"
                                               f"_best.safetensors", record.stage))
        state.save(ws.runs_dir / name / "recipe.json")
        return f"runs/{name}/stage3/stage3_best.safetensors"

    checkpoint("runs/single/stage1_latest.safetensors", "1")
    assert default_checkpoint(ws, speaking_checkpoints(ws)) == "runs/single/stage1_latest.safetensors"
    final = recipe("full_a", finished=True)
    time.sleep(0.05)
    checkpoint("runs/later/stage1_latest.safetensors", "1")          # written after: listed first
    recipe("full_b", finished=False)                                    # newer, but not finished
    listed = [path for _, path in speaking_checkpoints(ws)]
    assert final in listed and "runs/full_a/stage1/stage1_best.safetensors" in listed
    assert listed[0] != final and default_checkpoint(ws, speaking_checkpoints(ws)) == final

    with gr.Blocks():
        tab = build_generate_tab(ws, device="cpu")
    assert tab.checkpoint.value == final
    newer = recipe("full_c", finished=True)
    dropdown, offered = tab.refresh_lists(final, final)                 # still the default offered: moves on
    assert dropdown.value == newer and offered == newer
    dropdown, _ = tab.refresh_lists("runs/later/stage1_latest.safetensors", final)   # the user's choice stays
    assert dropdown.value == "runs/later/stage1_latest.safetensors"
