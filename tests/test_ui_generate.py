"""The Generate tab through the app's API (gradio_client): speak with a stage-3 and a stage-1 checkpoint of
the tiny training runs, hear the LLM's answer, ask about an uploaded clip, and the errors."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import TINY_APP, free_port  # noqa: E402
from ira.hardware import detect_hardware  # noqa: E402
from ui.app import build_app, launch_app  # noqa: E402

SPEAK_DEFAULTS = dict(style="", reference=None, question="", temp=0.8, k=50, p=1.0, cfg=1.5, seed_value=0,
                      seconds=1.0)


@pytest.fixture(scope="module")
def generate_app(tiny_stage2, tiny_stage3, bundled_llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    for run, source in (("tiny3", tiny_stage3.last_checkpoint), ("tiny1", tiny_stage2[2].last_checkpoint)):
        (root / "runs" / run).mkdir(parents=True)
        shutil.copy(source, root / "runs" / run / Path(source).name)
    hardware = detect_hardware()
    demo = build_app(root, preset="cpu", overrides=TINY_APP, hardware=hardware)
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(launched.local_url, verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    names = {run: f"runs/{run}/{Path(source).name}" for run, source in
             (("tiny3", tiny_stage3.last_checkpoint), ("tiny1", tiny_stage2[2].last_checkpoint))}
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


def test_a_stage1_checkpoint_speaks_and_says_why_it_cannot_answer(generate_app):
    _, client, names = generate_app
    _, full, answer, status = _speak(client, names["tiny1"], "Hello there.")
    assert sf.read(full)[0].size > 0 and answer == ""
    assert "holds no adapter" in status and "Train tab" in status
    assert "adapter_checkpoint" not in status          # the app's words, not a Python argument


def test_understand_an_uploaded_clip(generate_app, tmp_path):
    root, client, names = generate_app
    _, full, _, _ = _speak(client, names["tiny1"], "Hello there.")
    clip = tmp_path / "clip.wav"
    shutil.copy(full, clip)
    reply = client.predict(names["tiny3"], handle_file(str(clip)), "What did they say?",
                           api_name="/understand_audio")
    assert isinstance(reply, str)


def test_bad_requests_are_clear_errors(generate_app):
    _, client, names = generate_app
    with pytest.raises(AppError, match="empty"):
        _speak(client, names["tiny3"], "   ")
    with pytest.raises(AppError, match="choose a checkpoint"):
        _speak(client, None, "Hello.")
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


def test_the_app_says_the_llm_understands_only_with_its_measured_figure():
    import json as _json

    from ui.generate_tab import understanding_summary

    assert "not measured" in understanding_summary({})
    heard = understanding_summary({"understanding": _json.dumps({"choice_accuracy": 0.93, "clips": 32,
                                                                 "repeat_cer": 0.41})})
    assert "understands" in heard and "0.93" in heard and "32" in heard and "0.41" in heard
    deaf = understanding_summary({"understanding": _json.dumps({"choice_accuracy": 0.28, "clips": 32})})
    assert "does not hear" in deaf and "0.28" in deaf


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
