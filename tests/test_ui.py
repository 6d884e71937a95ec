"""The Gradio app, launched on 127.0.0.1 and driven through its API with gradio_client."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import soundfile as sf
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from conftest import free_port  # noqa: E402
from ira.data.dummy import create_dummy_corpus  # noqa: E402
from ira.hardware import detect_hardware  # noqa: E402
from ui.app import build_app, launch_app, parse_auth  # noqa: E402
from ui.runner import JobRunner  # noqa: E402
from ui.workspace import Workspace, WorkspaceError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# A tiny codec so that preparing the dummy corpus takes seconds.
FAST = ["codec.mel_codebook_size=16", "codec.mel_kmeans_iters=2", "codec.mel_n_codebooks=2"]
HARDWARE = detect_hardware()

# Writes metrics like the training engine and honours <out>/STOP; argv: OUT STEPS.
FAKE_TRAINING = r'''
import json, sys, time
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
metrics = open(out / "metrics.jsonl", "a")
def write(record):
    metrics.write(json.dumps({"time": time.time(), "stage": "1", **record}) + "\n"); metrics.flush()
write({"event": "start", "step": 0, "total_steps": steps})
for step in range(1, steps + 1):
    time.sleep(0.02)
    write({"step": step, "split": "train", "loss": 4.0 / step, "lr": 1e-3, "accuracy": step / steps})
    if step % 4 == 0:
        write({"step": step, "split": "val", "val_loss": 5.0 / step, "val_accuracy": step / steps})
        wav = out / "samples" / f"stage1_step{step}" / "sample_0.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        import numpy as np, soundfile as sf
        sf.write(wav, np.zeros(2400, dtype="float32"), 24000)
        replies = wav.parent / "replies.jsonl"
        replies.write_text(json.dumps({"transcript": "a cat", "reply": "a cap", "cer": 0.2}) + "\n")
        write({"event": "samples", "step": step, "paths": [str(replies), str(wav)]})
    if (out / "STOP").exists():
        write({"event": "stopped", "step": step, "message": f"Stopped at step {step}"})
        (out / "STOP").unlink(); sys.exit(0)
write({"event": "done", "step": steps, "message": "done"})
'''


def value(output):
    """A component returned as an update ({"__type__": "update", "value": ...}) -> its value."""
    return output.get("value") if isinstance(output, dict) and output.get("__type__") == "update" else output



@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    outside = tmp_path_factory.mktemp("outside")
    runner = JobRunner(Path(root) / "runs", stop_grace_s=10, term_grace_s=5)
    demo = build_app(root, preset="cpu", overrides=FAST, runner=runner, hardware=HARDWARE)
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(launched.local_url, verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    yield SimpleNamespace(root=Path(root), outside=Path(outside), runner=runner, client=client,
                          url=launched.local_url, tmp=tmp_path_factory)
    demo.close()


def test_build_dummy_corpus_through_the_data_tab(app):
    job = app.client.submit("dummy", "tiny", 6, "", 0, False, api_name="/build_corpus")
    deadline = time.time() + 30
    while job.status().code not in (Status.PROCESSING, Status.PROGRESS) and not job.done() and time.time() < deadline:
        time.sleep(0.02)
    # Other events are served while the build runs (the UI never blocks on long work).
    app.client.predict(None, api_name="/list_corpora")
    assert not job.done(), "the corpus build finished before a second request was served"
    corpus, summary, clips, problems, clip, audio = job.result(timeout=120)

    assert value(corpus) == "tiny"
    assert "6 clips kept" in summary and "train 5 / validation 1" in summary
    assert "Voices** 3" in summary and "Scottish" in summary
    assert "mel (2 codebooks x 16" in summary and "Problems**: none found" in summary
    assert clips["headers"][:2] == ["id", "text"]
    assert len(clips["data"]) == 6 and all(row[5] for row in clips["data"])   # every clip has a description
    assert problems["data"] == []
    assert value(clip) == "dummy_0000"
    wav, sr = sf.read(audio)
    assert sr > 0 and len(wav) / sr > 0.3
    assert (app.root / "data" / "tiny" / "annotations.jsonl").is_file()

    summary2, *_, audio2 = app.client.predict("tiny", api_name="/show_corpus")
    assert "Codec**: mel-2x16-" in summary2   # without a build, the fingerprint from prepare_report.json
    assert summary2.split("- **Codec")[0] == summary.split("- **Codec")[0]
    assert Path(audio2).name == "dummy_0000.wav"
    other = app.client.predict("tiny", "dummy_0003", api_name="/clip_audio")
    assert Path(other).name == "dummy_0003.wav"
    assert value(app.client.predict(None, api_name="/list_corpora")) == "tiny"


def test_bad_clips_are_reported_as_problems(app):
    corpus = app.root / "data" / "mixed"
    (corpus / "wavs").mkdir(parents=True)
    import numpy as np
    t = np.arange(24000) / 24000
    sf.write(corpus / "wavs" / "good.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype("float32"), 24000)
    sf.write(corpus / "wavs" / "silent.wav", np.zeros(24000, dtype="float32"), 24000)
    (corpus / "wavs" / "broken.wav").write_bytes(b"not audio")
    (corpus / "metadata.csv").write_text("good|A tone.|A tone.\nsilent|Nothing.|Nothing.\nbroken|Broken.|Broken.\n")
    summary, clips, problems, clip, audio = app.client.predict("mixed", False, api_name="/prepare_corpus")
    reasons = {row[0]: row[1] for row in problems["data"]}
    assert set(reasons) == {"silent", "broken"}
    assert "silent" in reasons["silent"] and "unreadable" in reasons["broken"]
    assert "2 clip(s) dropped" in summary and [row[0] for row in clips["data"]] == ["good"]


def test_paths_outside_the_workspace_are_refused(app):
    with pytest.raises(AppError, match="outside the workspace"):
        app.client.predict("folder", "imported", 1, "../" + app.outside.name, 0, False, api_name="/build_corpus")
    with pytest.raises(AppError, match="outside the workspace"):
        app.client.predict("folder", "imported", 1, str(app.outside), 0, False, api_name="/build_corpus")
    (app.root / "escape").symlink_to(app.outside, target_is_directory=True)
    with pytest.raises(AppError, match="outside the workspace"):
        app.client.predict("folder", "imported", 1, "escape", 0, False, api_name="/build_corpus")
    with pytest.raises(AppError, match="not allowed"):
        app.client.predict("dummy", "../evil", 3, "", 0, False, api_name="/build_corpus")
    assert not (app.root / "data" / "imported").exists() and not (app.root / "evil").exists()
    assert value(app.client.predict("tiny", api_name="/list_corpora")) == "tiny"   # still serving


SECRET = "SECRET-FIRST-LINE:x:0:0:not for the app"
"""The first line of a file outside the workspace, which no answer of the app may hold."""


def _tone(path: Path) -> Path:
    import numpy as np
    t = np.arange(24000) / 24000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype("float32"), 24000)
    return path


def test_a_metadata_file_linked_from_outside_is_refused_and_named(app):
    """`ln -s /etc/passwd data/leak/metadata.csv`: showing, preparing or importing the corpus names the link and
    reads nothing through it (before: the metadata parser's error quoted the outside file's first line)."""
    secret = app.outside / "passwd"
    secret.write_text(SECRET + "\n")
    leak = app.root / "data" / "leak"
    leak.mkdir(parents=True)
    (leak / "metadata.csv").symlink_to(secret)
    calls = {"show": lambda: app.client.predict("leak", api_name="/show_corpus"),
             "prepare": lambda: app.client.predict("leak", False, api_name="/prepare_corpus"),
             "import": lambda: app.client.predict("folder", "copied", 1, "data/leak", 0, False,
                                                  api_name="/build_corpus"),
             "rebuild": lambda: app.client.predict("dummy", "leak", 3, "", 0, False, api_name="/build_corpus")}
    for what, call in calls.items():
        with pytest.raises(AppError) as caught:
            call()
        message = str(caught.value)
        assert "SECRET" not in message, (what, message)
        assert "data/leak/metadata.csv" in message and "outside the workspace" in message, (what, message)
    assert not (app.root / "data" / "copied").exists() and secret.read_text() == SECRET + "\n"


def test_wavs_linked_from_outside_are_refused_before_preparing(app):
    """A wav in wavs/ that links outside: the corpus is refused before anything of it is read or prepared, the
    link named; a link that stays inside the workspace is followed."""
    corpus = app.root / "data" / "linked"
    (corpus / "wavs").mkdir(parents=True)
    _tone(corpus / "wavs" / "own.wav")
    (app.root / "uploads").mkdir(exist_ok=True)
    (corpus / "wavs" / "inner.wav").symlink_to(_tone(app.root / "uploads" / "inner.wav"))
    (corpus / "wavs" / "stray.wav").symlink_to(_tone(app.outside / "stray.wav"))
    (corpus / "metadata.csv").write_text("own|A tone.\ninner|Another tone.\nstray|A third tone.\n")
    for api_name, args in (("/prepare_corpus", ("linked", False)), ("/show_corpus", ("linked",))):
        with pytest.raises(AppError, match=r"corpus 'linked' holds links that lead outside the workspace: "
                                           r"data/linked/wavs/stray\.wav \(to .*stray\.wav\)"):
            app.client.predict(*args, api_name=api_name)
    assert sorted(p.name for p in corpus.iterdir()) == ["metadata.csv", "wavs"]   # nothing prepared, no cache
    (corpus / "wavs" / "stray.wav").unlink()
    (corpus / "metadata.csv").write_text("own|A tone.\ninner|Another tone.\n")
    summary, clips, *_ = app.client.predict("linked", False, api_name="/prepare_corpus")
    assert sorted(row[0] for row in clips["data"]) == ["inner", "own"], summary


def test_workspace_resolve_unit(tmp_path: Path):
    ws = Workspace.create(tmp_path / "ws")
    assert ws.resolve("data/x") == ws.root / "data" / "x"
    assert ws.resolve(ws.root / "runs") == ws.runs_dir
    assert ws.resolve("data/../runs/a") == ws.runs_dir / "a"
    for bad in ("..", "../ws2", "/etc/passwd", "data/../../x"):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            ws.resolve(bad)
    (ws.data_dir / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        ws.resolve("data/link")
    (ws.data_dir / "inner").symlink_to(ws.runs_dir, target_is_directory=True)
    assert ws.resolve("data/inner") == ws.runs_dir   # a link that stays inside is fine
    with pytest.raises(WorkspaceError, match="does not exist"):
        ws.resolve("data/none", must_exist=True)
    with pytest.raises(WorkspaceError, match="not allowed"):
        ws.corpus_dir("a/b")


def test_links_out_of_the_workspace_are_found_through_links_that_stay_inside(tmp_path: Path):
    ws = Workspace.create(tmp_path / "ws")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.wav").write_bytes(b"outside")
    shared = ws.root / "uploads" / "wavs"
    shared.mkdir(parents=True)
    (shared / "a.wav").write_bytes(b"inside")
    (shared / "x.wav").symlink_to(tmp_path / "elsewhere" / "x.wav")
    corpus = ws.data_dir / "c"
    corpus.mkdir()
    (corpus / "metadata.csv").write_text("a|A.\n")
    (corpus / "wavs").symlink_to(shared, target_is_directory=True)   # inside: followed, and what it holds checked
    (corpus / "loop").symlink_to(corpus / "loop")
    assert ws.links_leaving(corpus) == [(corpus / "loop", None), (corpus / "wavs" / "x.wav",
                                                                  tmp_path / "elsewhere" / "x.wav")]
    with pytest.raises(WorkspaceError, match=r"corpus 'c' holds links that lead outside the workspace: data/c/loop "
                                             r"\(a loop of links\), data/c/wavs/x\.wav \(to .*elsewhere/x\.wav\)"):
        ws.existing_corpus("c")
    (corpus / "loop").unlink()
    (shared / "x.wav").unlink()
    assert ws.existing_corpus("c") == corpus and ws.links_leaving(corpus) == []
    assert ws.checked(corpus / "wavs" / "a.wav") == shared / "a.wav"
    with pytest.raises(WorkspaceError, match=r"the log /etc/passwd leads outside the workspace \(to /etc/passwd\)"):
        ws.checked("/etc/passwd", "the log")
    with pytest.raises(WorkspaceError, match="no corpus 'none' in data/"):
        ws.existing_corpus("none")


def test_corpora_linked_from_outside_are_not_listed_and_are_named(tmp_path: Path):
    from ui.data_tab import outside_links_note

    ws = Workspace.create(tmp_path / "ws")
    create_dummy_corpus(tmp_path / "elsewhere", num_clips=2)
    create_dummy_corpus(ws.root / "uploads" / "mine", num_clips=2)
    (ws.data_dir / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (ws.data_dir / "inside").symlink_to(ws.root / "uploads" / "mine", target_is_directory=True)
    assert ws.list_corpora() == ["inside"]            # listed only when every use of it would be allowed
    assert ws.links_outside() == ["outside"]
    assert "`outside`" in outside_links_note(ws) and "never follows" in outside_links_note(ws)
    with pytest.raises(WorkspaceError, match="not followed. Copy the files"):
        ws.resolve("data/outside")


def _buttons(app, run_name: str) -> list[bool]:
    """Whether Start, Stop and Resume are enabled, as the status timer sets them for `run_name` (its last three
    outputs; the default client leaves buttons and States out of an event's values, so this one keeps them, in
    a session of its own: a first tick, never answered with skips)."""
    raw = Client(app.url, verbose=False, analytics_enabled=False, _skip_components=False)
    outputs = raw.predict(run_name, None, None, "", False, api_name="/training_status")
    return [button["interactive"] for button in outputs[-3:]]


def test_train_tab_watches_and_stops_a_job(app):
    create_dummy_corpus(app.root / "data" / "for_training", num_clips=3)
    form = dict(stage="1", run_name="watched", preset="cpu", corpus="for_training", checkpoint="(none)", epochs=1,
                max_steps=5, batch_size=2, learning_rate=1e-3)
    from ira.cli import TRAIN_STAGES
    from ui.train_tab import STAGES
    assert {stage for _, stage in STAGES} == set(TRAIN_STAGES)   # only stages `ira train` can run
    with pytest.raises(AppError, match="training.learning_rate"):
        app.client.predict(**{**form, "learning_rate": -1.0}, api_name="/start_training")
    with pytest.raises(AppError, match="no stage1_latest.safetensors to resume from"):
        app.client.predict(**form, api_name="/resume_training")

    fake = app.tmp.mktemp("fake") / "fake_training.py"
    fake.write_text(FAKE_TRAINING)
    app.runner.start("watched", "1", [sys.executable, str(fake), str(app.root / "runs" / "watched"), "100000"])
    with pytest.raises(AppError, match="already running: run 'watched'"):
        app.client.predict(**{**form, "run_name": "second"}, api_name="/start_training")

    deadline = time.time() + 30
    while True:
        status, loss, metric, metric_plot, log, sample, replies, *_ = app.client.predict(
            "watched", None, api_name="/training_status")
        if value(sample) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert "RUNNING" in status and "stage 1" in status and "ETA" in status
    # while it runs: Start and Resume are disabled, Stop is enabled
    assert _buttons(app, "watched") == [False, True, False]
    series = {row["series"] for row in _plot_rows(loss)}
    assert series == {"train", "val"}
    assert value(metric) == "accuracy"
    assert Path(value(sample)).name == "sample_0.wav"   # the audio player is offered audio only
    table = value(replies)
    assert table["headers"] == ["transcript", "reply", "cer"] and table["data"][0][:2] == ["a cat", "a cap"]

    assert "STOPPING" in app.client.predict("watched", api_name="/stop_training")
    deadline = time.time() + 30
    while "STOPPED" not in status and time.time() < deadline:
        status = app.client.predict("watched", None, api_name="/training_status")[0]
        time.sleep(0.2)
    assert "STOPPED" in status and "Stopped at step" in status
    # idle: Start is enabled, Stop is not, Resume neither (this run has no checkpoint to go on from)
    assert _buttons(app, "watched") == [True, False, False]
    # a Stop that comes when nothing runs (the API, or a click racing the job's end) shows the run, not an error
    again = app.client.predict("watched", api_name="/stop_training")
    assert "STOPPED" in again and "Error" not in again
    (app.root / "runs" / "watched" / "stage1_latest.safetensors").write_bytes(b"not read by this test")
    assert _buttons(app, "watched") == [True, False, True]
    (app.root / "runs" / "watched" / "stage1_latest.safetensors").unlink()


def test_a_run_or_corpus_linking_outside_is_neither_shown_nor_trained_on(app):
    """A run whose train.log and latest checkpoint link outside: its status names the link instead of showing the
    outside file as its log (before: the Log box showed it), and Resume refuses it, appending nothing to the
    outside file; a corpus with a wav linked from outside is refused before a job could prepare it."""
    from ui.runner import JobRecord, train_command
    from ui.style_tab import corpus_path
    from ui.train_tab import training_overrides

    ws = Workspace.create(app.root)
    secret = app.outside / "secret.log"
    secret.write_text(SECRET + "\n")
    create_dummy_corpus(app.root / "data" / "for_leaky", num_clips=3)
    run_dir = app.root / "runs" / "leaky"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").symlink_to(secret)
    (app.outside / "foreign.safetensors").write_bytes(b"not a checkpoint")
    (run_dir / "stage1_latest.safetensors").symlink_to(app.outside / "foreign.safetensors")
    command = train_command("1", "cpu", training_overrides(ws, "1", "for_leaky", "leaky", 1, 5, 2, 1e-3, FAST))
    JobRecord(name="leaky", stage="1", command=command, output_dir=str(run_dir), log_path=str(run_dir / "train.log"),
              pid=2 ** 22 + 13, create_time=0.0, started=time.time() - 60, ended=time.time() - 30,
              returncode=3).save()
    outputs = app.client.predict("leaky", None, api_name="/training_status")
    assert SECRET not in str(outputs)
    assert "runs/leaky/train.log leads outside the workspace" in outputs[0], outputs[0]
    form = dict(stage="1", run_name="leaky", preset="cpu", corpus="for_leaky", checkpoint="(none)", epochs=1,
                max_steps=5, batch_size=2, learning_rate=1e-3)
    try:
        with pytest.raises(AppError, match=r"run 'leaky' holds links that lead outside the workspace: "
                                           r"runs/leaky/stage1_latest\.safetensors \(to .*\), runs/leaky/train\.log"):
            app.client.predict(**form, api_name="/resume_training")
    finally:   # the old code started a job here: let it end (it fails on the foreign file)
        deadline = time.time() + 60
        while app.runner.active() is not None and time.time() < deadline:
            time.sleep(0.2)
    assert secret.read_text() == SECRET + "\n"

    corpus = create_dummy_corpus(app.root / "data" / "stray", num_clips=3)
    wav = sorted((corpus / "wavs").iterdir())[0]
    shutil.move(wav, app.outside / wav.name)
    wav.symlink_to(app.outside / wav.name)
    stray = rf"corpus 'stray' holds links that lead outside the workspace: data/stray/wavs/{wav.name}"
    # (a learning rate the config refuses: the old code refused that, instead of starting a job on the corpus)
    with pytest.raises(AppError, match=stray):
        app.client.predict(**{**form, "run_name": "on_stray", "corpus": "stray", "learning_rate": -1.0},
                           api_name="/start_training")
    with pytest.raises(WorkspaceError, match=stray):   # the Voice Style tab's search
        corpus_path(ws, "stray")


def test_a_job_record_naming_files_outside_the_workspace_is_not_followed(tmp_path: Path):
    """job.json is the app's own, but a hand-edited one is not followed out of the workspace: its config file is
    not read (before: Resume loaded it) and an output folder outside is refused before a job could write there."""
    from ira.config import load_config
    from ui.runner import JobRecord
    from ui.train_tab import check_job_paths, recipe_overrides, run_settings

    ws = Workspace.create(tmp_path / "ws")
    create_dummy_corpus(ws.data_dir / "small", num_clips=3)
    config = tmp_path / "outside.yaml"
    config.write_text((REPO / "configs" / "cpu_config.yaml").read_text())
    run_dir = ws.runs_dir / "edited"
    run_dir.mkdir()
    sets = recipe_overrides(ws, "small", "edited", [])
    for preset, expected in (("cpu", "cpu"), (str(config), None)):
        JobRecord(name="edited", stage="1", command=["python", "-m", "ira.cli", "train", "--stage", "1", "--config",
                                                     preset, *[a for item in sets for a in ("--set", item)]],
                  output_dir=str(run_dir), log_path=str(run_dir / "train.log"), pid=2 ** 22 + 17, create_time=0.0,
                  started=time.time(), ended=time.time(), returncode=3).save()
        settings = run_settings(ws, "edited")
        assert (settings.preset if settings else None) == expected
    check_job_paths(ws, "edited", load_config("cpu", sets))
    elsewhere = load_config("cpu", sets + [f"training.output_dir={tmp_path / 'elsewhere'}"])
    with pytest.raises(WorkspaceError, match=r"the output folder of run 'edited' \(training.output_dir\) "
                                             r".*elsewhere leads outside the workspace"):
        check_job_paths(ws, "edited", elsewhere)


def _plot_rows(plot: dict) -> list[dict]:
    """gradio_client returns a LinePlot as {"value": {"columns": [...], "data": [[...], ...]}, ...}."""
    value = plot.get("value", plot)
    return [dict(zip(value["columns"], row)) for row in value["data"]]


def test_share_without_network_keeps_serving_locally(tmp_path: Path, monkeypatch):
    # No internet here, and none allowed in tests: point every proxy at a closed local port, so the
    # share-link request fails at once the way it does offline, while 127.0.0.1 stays direct.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    demo = build_app(tmp_path / "ws", preset="cpu", overrides=FAST, runner=JobRunner(tmp_path / "ws" / "runs"),
                     hardware=HARDWARE)
    try:
        launched = launch_app(demo, port=free_port(), share=True, prevent_thread_lock=True, quiet=True)
        assert launched.share_url is None
        assert any("--share without --auth" in m for m in launched.messages)
        assert any("keeps running locally" in m for m in launched.messages)
        assert httpx.get(launched.local_url, trust_env=False).status_code == 200
    finally:
        demo.close()


def test_auth_protects_the_app(tmp_path: Path):
    assert parse_auth(["alice:s3:cret"]) == [("alice", "s3:cret")]
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth([bad])
    demo = build_app(tmp_path / "ws", preset="cpu", overrides=FAST, runner=JobRunner(tmp_path / "ws" / "runs"),
                     hardware=HARDWARE)
    try:
        launched = launch_app(demo, port=free_port(), auth=[("alice", "pw")], prevent_thread_lock=True, quiet=True)
        assert launched.messages == []
        assert httpx.get(launched.local_url + "config", trust_env=False).status_code == 401
        client = Client(launched.local_url, auth=("alice", "pw"), verbose=False, analytics_enabled=False)
        assert value(client.predict(None, api_name="/list_corpora")) is None
    finally:
        demo.close()


def test_uploads_and_served_clips_stay_inside_the_workspace(tmp_path: Path):
    """Gradio's own files (an upload, the copy of a clip it serves) are written under workspace/gradio_cache,
    not in the system's temporary folder (README: the app reads and writes only inside --workspace)."""
    ws_root = tmp_path / "ws"
    create_dummy_corpus(ws_root / "data" / "served", num_clips=2)
    demo = build_app(ws_root, preset="cpu", overrides=FAST, runner=JobRunner(ws_root / "runs"), hardware=HARDWARE)
    try:
        launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
        cache = (ws_root / "gradio_cache").resolve()
        clip = _tone(tmp_path / "upload.wav")
        with open(clip, "rb") as handle:
            uploaded = httpx.post(launched.local_url + "gradio_api/upload", files=[("files", handle)],
                                  trust_env=False).json()
        assert len(uploaded) == 1 and Path(uploaded[0]).is_relative_to(cache), uploaded
        client = Client(launched.local_url, verbose=False, analytics_enabled=False, download_files=False)
        served = client.predict("served", "dummy_0001", api_name="/clip_audio")
        assert Path(served["path"]).is_relative_to(cache), served
        assert httpx.get(served["url"], trust_env=False).status_code == 200
    finally:
        demo.close()


CLOSED_WITHOUT_LOGIN = [("GET", "openapi.json"), ("GET", "docs"), ("GET", "config"), ("GET", "gradio_api/info"),
                        ("GET", "gradio_api/openapi.json"), ("GET", "gradio_api/user"), ("GET", "gradio_api/token"),
                        ("GET", "gradio_api/app_id"), ("GET", "gradio_api/startup-events"),
                        ("GET", "gradio_api/heartbeat/abc"), ("POST", "gradio_api/cancel"),
                        ("POST", "gradio_api/reset"), ("GET", "gradio_api/runs"), ("POST", "gradio_api/upload"),
                        ("POST", "gradio_api/queue/join"), ("POST", "gradio_api/stream/abc"),
                        ("GET", "gradio_api/stream/abc/0/1/playlist.m3u8"), ("GET", "monitoring"),
                        ("GET", "gradio_api/run-history/buckets"), ("GET", "gradio_api/mcp/sse")]
"""Gradio's routes that need no data to answer: with --auth, none answers without a login (before, FastAPI's
/openapi.json listed every route, and cancel, reset, heartbeat, user, token, app_id and startup-events answered)."""


def test_with_auth_only_the_login_page_answers_without_a_login(tmp_path: Path):
    import re

    demo = build_app(tmp_path / "ws", preset="cpu", overrides=FAST, runner=JobRunner(tmp_path / "ws" / "runs"),
                     hardware=HARDWARE)
    try:
        url = launch_app(demo, port=free_port(), auth=[("alice", "pw")], prevent_thread_lock=True,
                         quiet=True).local_url
        anyone = httpx.Client(base_url=url, trust_env=False, timeout=10)

        def status(method: str, path: str) -> int:   # the status only: an open heartbeat would stream forever
            body = {"session_hash": "abc", "fn_index": 0, "event_id": "e", "data": []} if method == "POST" else None
            with anyone.stream(method, path, json=body) as answer:
                return answer.status_code

        answers = {f"{method} /{path}": status(method, path) for method, path in CLOSED_WITHOUT_LOGIN}
        assert all(code in (401, 404) for code in answers.values()), answers
        # the login page and its assets stay open; the page no longer carries the API's description
        page = anyone.get("/")
        assert page.status_code == 200 and '"auth_required":true' in page.text
        assert "build_corpus" not in page.text and "named_endpoints" in page.text
        assets = re.findall(r'(?:src|href)="\.?/?((?:assets|static)/[^"]+)"', page.text) + ["theme.css", "favicon.ico"]
        assert len(assets) >= 3 and all(anyone.get(asset).status_code == 200 for asset in assets), assets
        assert anyone.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400

        alice = httpx.Client(base_url=url, trust_env=False, timeout=10)
        assert alice.post("/login", data={"username": "alice", "password": "pw"}).status_code == 200
        assert "build_corpus" in alice.get("/").text   # signed in: the app as it always was
        assert alice.get("/config").status_code == 200 and alice.get("/gradio_api/user").json() == "alice"
        assert alice.post("/gradio_api/cancel", json={"session_hash": "abc", "fn_index": 0,
                                                      "event_id": "e"}).json() == {"success": True}
        client = Client(url, auth=("alice", "pw"), verbose=False, analytics_enabled=False)
        assert value(client.predict(None, api_name="/list_corpora")) is None
    finally:
        demo.close()


def test_app_cli_rejects_a_malformed_auth(capsys):
    spec = importlib.util.spec_from_file_location("ira_app_main", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--auth", "nopassword", "--workspace", "unused"]) == 2
    assert "user:password" in capsys.readouterr().err


def test_plots_have_numeric_axes_before_the_first_point():
    """An empty frame must still be typed: the browser keeps the first axis types it is sent."""
    import gradio as gr
    from ui.train_tab import metric_frames
    loss, metric, names = metric_frames([], "1", None)
    assert names == [] and len(loss) == 0
    sent = gr.LinePlot(x="step", y="value", color="series").postprocess(loss)
    assert sent.datatypes["step"] == "quantitative" and sent.datatypes["value"] == "quantitative"


def test_plots_draw_points_while_a_series_has_one_point():
    """A short run's first figures (one validation, one logged step) must be visible: as points until
    every series has two points, then as lines; nothing at all before the first point."""
    from ui.train_tab import metric_frames, plot_value
    rows = [{"stage": 1, "split": "train", "step": s, "loss": 3.0 - s / 10} for s in (1, 10, 20)]
    rows.append({"stage": 1, "split": "val", "step": 20, "loss": 2.9, "wer": 1.1})
    loss, metric, names = metric_frames(rows, "1", None)
    assert plot_value(loss)["mark"] == "point"               # val has one point
    assert plot_value(metric)["mark"] == "point" and names == ["wer"]
    rows.append({"stage": 1, "split": "val", "step": 40, "loss": 2.5, "wer": 0.9})
    loss, metric, _ = metric_frames(rows, "1", None)
    sent = plot_value(loss)
    assert sent["mark"] == "line" and plot_value(metric)["mark"] == "line"
    assert sent["datatypes"]["step"] == "quantitative" and len(sent["data"]) == 5
    assert plot_value(metric_frames([], "1", None)[0]) is None


def test_resume_and_reload_use_the_settings_the_run_was_started_with(app):
    """A reload during a run must not change its settings: the form shows the run's own numbers, and Resume
    continues with them even when the form says otherwise (issue: a 60-step run resumed toward 200)."""
    from ui.runner import JobRecord, train_command
    from ui.train_tab import run_settings, training_overrides

    ws = Workspace.create(app.root)
    create_dummy_corpus(app.root / "data" / "resumable", num_clips=3)
    started = training_overrides(ws, "1", "resumable", "resumable_run", 1, 60, 2, 1e-3, FAST)
    run_dir = app.root / "runs" / "resumable_run"
    run_dir.mkdir(parents=True)
    JobRecord(name="resumable_run", stage="1", command=train_command("1", "cpu", started), output_dir=str(run_dir),
              log_path=str(run_dir / "train.log"), pid=2 ** 22 + 7, create_time=0.0, started=time.time() - 60,
              ended=time.time() - 30, returncode=3).save()
    settings = run_settings(ws, "resumable_run")
    assert (settings.preset, settings.corpus, settings.max_steps, settings.batch_size, settings.learning_rate) == \
        ("cpu", "resumable", 60, 2, 1e-3)
    (run_dir / "stage1_latest.safetensors").write_bytes(b"not read by this test")
    form = dict(stage="1", run_name="resumable_run", preset="laptop", corpus="resumable", checkpoint="(none)",
                epochs=3, max_steps=200, batch_size=16, learning_rate=5e-2)
    status = app.client.predict(**form, api_name="/resume_training")[0]
    assert "with the settings it was started with" in status
    command = JobRecord.load(run_dir).command
    assert command[command.index("--config") + 1] == "cpu"
    assert "training.max_steps=60" in command and "training.batch_size=2" in command
    assert "training.max_steps=200" not in command and "training.batch_size=16" not in command
    assert command[-2:] == ["--resume_checkpoint", str(run_dir / "stage1_latest.safetensors")]
    deadline = time.time() + 60   # the child fails on the fake checkpoint; let it end before the next test
    while app.runner.active() is not None and time.time() < deadline:
        time.sleep(0.2)


def test_wrong_checkpoint_stage_and_oversized_batch_are_refused_before_launch(tmp_path: Path):
    import json as _json

    from ira.checkpoint import save_checkpoint
    from ui.train_tab import check_before_launch

    ws = Workspace.create(tmp_path / "ws")
    corpus = ws.data_dir / "small"
    create_dummy_corpus(corpus, num_clips=3)
    (corpus / "prepare_report.json").write_text(_json.dumps({"status": "done", "kept": 3, "train": 2, "val": 1}))
    style = save_checkpoint(ws.runs_dir / "s" / "style_latest.safetensors", {"w": {"x": torch.zeros(1)}},
                            stage="style", epoch=0, step=1, config={})
    with pytest.raises(ValueError, match="stage-style checkpoint .* but stage 2 starts from stage 1"):
        check_before_launch(ws, "2", "small", 2, style)
    with pytest.raises(ValueError, match="Batch size 16 is larger than corpus 'small' \\(2 training clips\\)"):
        check_before_launch(ws, "style", "small", 16, None)
    check_before_launch(ws, "1", "small", 2, style)   # a style encoder is what stage 1 starts from


def test_checkpoints_are_listed_run_by_run_with_best_and_latest_first(tmp_path: Path):
    ws = Workspace.create(tmp_path / "ws")
    t = time.time() - 1000

    def touch(rel: str, age: float) -> None:
        path = ws.runs_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (t + age, t + age))

    for i in range(1, 6):
        touch(f"old/stage1_step{i}.safetensors", i)
    touch("old/stage1_best.safetensors", 2)
    touch("old/stage1_latest.safetensors", 5)
    touch("new/stage2_step3.safetensors", 100)
    touch("new/stage2_latest.safetensors", 100)
    touch("new/stage2_best.safetensors", 90)
    assert ws.list_checkpoints() == [
        "runs/new/stage2_best.safetensors", "runs/new/stage2_latest.safetensors", "runs/new/stage2_step3.safetensors",
        "runs/old/stage1_best.safetensors", "runs/old/stage1_latest.safetensors",
        *[f"runs/old/stage1_step{i}.safetensors" for i in (5, 4, 3, 2, 1)]]


def test_checkpoints_reached_through_links_out_of_the_workspace_are_not_listed_or_read(tmp_path: Path):
    """A run folder, a checkpoint or a recipe that links outside: not in the Generate tab's list (before, its
    label showed the outside checkpoint's step and loss) nor offered as a recipe's final checkpoint."""
    from ira.checkpoint import save_checkpoint
    from ui.generate_tab import finished_recipe_checkpoint, speaking_checkpoints

    ws = Workspace.create(tmp_path / "ws")
    outside = tmp_path / "outside"
    foreign = save_checkpoint(outside / "stage1_best.safetensors", {"w": {"x": torch.zeros(1)}}, stage="1", epoch=0,
                              step=777, config={})
    from ira.training.recipe import RecipeState
    outside_run = _recipe_run(tmp_path, "outside", 12, ["done"] * 4)   # a finished recipe outside the workspace
    final = Path(RecipeState.load(outside_run / "recipe.json").final_checkpoint())
    final.parent.mkdir(parents=True)
    shutil.copy(foreign, final)
    (ws.runs_dir / "ext").symlink_to(outside, target_is_directory=True)
    (ws.runs_dir / "ext_recipe").symlink_to(tmp_path / "runs" / "outside", target_is_directory=True)
    (ws.runs_dir / "mine").mkdir()
    (ws.runs_dir / "mine" / "stage1_best.safetensors").symlink_to(foreign)
    own = save_checkpoint(ws.runs_dir / "own" / "stage1_latest.safetensors", {"w": {"x": torch.zeros(1)}}, stage="1",
                          epoch=0, step=5, config={})
    assert ws.list_checkpoints() == ["runs/own/stage1_latest.safetensors"]
    labels = [label for label, _ in speaking_checkpoints(ws)]
    assert labels == ["own/stage1_latest · stage 1 · step 5"], labels
    assert finished_recipe_checkpoint(ws) is None
    # a recipe inside the workspace whose recorded final checkpoint lies outside it: not offered either
    run = _recipe_run(ws.root, "whole", 12, ["done"] * 4)
    state = RecipeState.load(run / "recipe.json")
    state.stages[-1].checkpoint = str(foreign)
    state.save(run / "recipe.json")
    assert finished_recipe_checkpoint(ws) is None
    state.stages[-1].checkpoint = str(own)
    state.save(run / "recipe.json")
    assert finished_recipe_checkpoint(ws) == "runs/own/stage1_latest.safetensors"


def test_checkpoint_labels_say_stage_step_and_the_metric_the_run_keeps_its_best_by():
    import json as _json

    from ui.workspace import checkpoint_label

    metric = _json.dumps({"name": "val_choice_accuracy", "value": 0.71875, "step": 1200})
    assert checkpoint_label("runs/s2/stage2_best.safetensors", {"stage": "2", "step": "1200", "metric": metric}) \
        == "s2/stage2_best · stage 2 · step 1200 · choice accuracy 0.719"
    assert checkpoint_label("runs/s2/stage2_latest.safetensors", {"stage": "2", "step": "1300", "metric": metric}) \
        == "s2/stage2_latest · stage 2 · step 1300 · choice accuracy 0.719 (at step 1200)"
    # a checkpoint saved before any validation, or with an unreadable metric: stage and step only
    assert checkpoint_label("runs/a/stage1_step5.safetensors", {"stage": "1", "step": "5"}) == \
        "a/stage1_step5 · stage 1 · step 5"
    assert checkpoint_label("runs/a/stage1_step5.safetensors", {"stage": "1", "step": "5", "metric": "{oops"}) == \
        "a/stage1_step5 · stage 1 · step 5"


def _recipe_run(root: Path, name: str, minutes: float, statuses: list[str]) -> Path:
    """runs/<name> holding a recipe.json whose stages have `statuses` (checkpoints named for the done ones)."""
    from ira.training.recipe import plan

    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    state = plan("full", minutes, run_dir)
    for record, status in zip(state.stages, statuses):
        record.status = status
        if status != "pending":
            record.minutes_used = round(record.minutes / 2, 2)
        if status == "done":
            record.checkpoint = str(Path(record.folder) / f"stage{record.stage}_best.safetensors")
    state.save(run_dir / "recipe.json")
    return run_dir


def test_recipe_progress_shows_one_line_per_stage(tmp_path: Path):
    """Name, status, minutes used of the stage's budget, the checkpoint once done, and the running stage's
    step and ETA (the nearer of its steps' ETA and its time budget's end)."""
    import json as _json

    from ira.training.recipe import RecipeState
    from ui.runner import JobStatus
    from ui.runner import recipe_state
    from ui.train_tab import recipe_progress_markdown

    run_dir = _recipe_run(tmp_path, "r", 100, ["done", "running", "pending", "pending"])
    state = RecipeState.load(run_dir / "recipe.json")
    state.stages[1].started = 1000.0
    state.save(run_dir / "recipe.json")
    running = JobStatus(name="r", state="running", stage="recipe", step=40, total_steps=100000, eta_s=99999.0,
                        recipe_stage="1", training_started=1060.0)
    text = recipe_progress_markdown(recipe_state(run_dir), running, relative=lambda p: Path(p).name, now=1600.0)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 4
    assert lines[0] == "- voice style encoder · **done** · 2.5 / 5 min · `stagestyle_best.safetensors`"   # no file
    # one clock, the budget's: 25 min of an earlier run + 9 min of training in this one (its first minute got it
    # ready: not budget); the budget's 16 min left beat the steps' 27 h, and no step total of the epochs is shown
    assert lines[1] == ("- stage 1 (SpeechLM) · **running** · 34.0 / 50 min · step 40 · ETA 16 min 00 s · "
                        "+ 1.0 min getting ready")
    assert lines[2] == "- stage 2 (adapter) · **pending** · 0.0 / 30 min"
    assert "36.5 of 100 min used" in text and "5 / 50 / 30 / 15 %" in text
    # the recipe's ETA is the budget left: 16 min of stage 1, then stages 2 and 3's 30 + 15
    assert "ETA 1 h 01 min (the budget left" in text.splitlines()[0]
    from ui.train_tab import recipe_eta, status_markdown
    assert recipe_eta(recipe_state(run_dir), running, now=1600.0) == 61 * 60
    ws = Workspace.create(tmp_path / "ws")
    head = status_markdown(ws, running, eta_s=61 * 60).splitlines()[1]
    assert head == "**RUNNING** · full recipe · stage 1 (SpeechLM) · step 40 · ETA 1 h 01 min"
    # before its training begins a stage is getting ready: its budget waits, and the line says so
    ready = JobStatus(name="r", state="running", stage="recipe", recipe_stage="1")
    line = recipe_progress_markdown(recipe_state(run_dir), ready, now=1600.0).splitlines()[3]
    assert line.startswith("- stage 1 (SpeechLM) · **running** · 25.0 / 50 min · getting ready for 10.0 min")
    # a stage that ran past its share says why
    over = RecipeState.load(run_dir / "recipe.json")
    over.stages[0].minutes_used = 7.5
    over.save(run_dir / "recipe.json")
    text = recipe_progress_markdown(recipe_state(run_dir), running, now=1600.0)
    assert "voice style encoder · **done** · 7.5 / 5 min · over its share by 2.5 min: getting it ready" in text
    state.save(run_dir / "recipe.json")
    # its process ended without recipe.json saying so (killed): not shown as running
    ended = JobStatus(name="r", state="failed", stage="recipe", recipe_stage="1")
    assert "**stopped (its process ended)** · 25.0 / 50 min" in recipe_progress_markdown(recipe_state(run_dir),
                                                                                         ended, now=1600.0)
    # a done stage's checkpoint says the figure it was chosen by (its header, as the engine writes it)
    from torch import nn

    from ira.checkpoint import save_checkpoint
    from ira.config import load_config
    save_checkpoint(Path(state.stages[0].checkpoint), {"style": nn.Linear(2, 2)}, stage="style", epoch=1, step=90,
                    config=load_config("cpu"),
                    metadata={"metric": _json.dumps({"name": "val_top5", "value": 0.1093, "step": 80})})
    first = recipe_progress_markdown(recipe_state(run_dir), running, relative=lambda p: Path(p).name,
                                     now=1600.0).splitlines()[2]
    assert first.endswith("`stagestyle_best.safetensors` · top5 0.109 (at step 80)")
    (run_dir / "recipe.json").write_text(_json.dumps({"oops": 1}))
    assert recipe_progress_markdown(recipe_state(run_dir), running) == ""
    assert recipe_progress_markdown(recipe_state(tmp_path)) == ""


def test_recipe_cards_are_a_table_per_done_stage_and_their_audio_is_offered_to_the_player(tmp_path: Path):
    """Stage 1's card (ASR, no LLM), stage 2's (a relative path, as a job in the workspace records it; an LLM
    answer with markdown's characters), stage 3's failure; the style encoder and unfinished stages get none."""
    from ira.eval.card import Card, CardItem, write_card
    from ira.training.recipe import RecipeState
    from ui.runner import recipe_state
    from ui.train_tab import card_audio_choices, cards_markdown, stage_cards

    run_dir = _recipe_run(tmp_path, "r", 100, ["done", "done", "done", "done"])
    state = RecipeState.load(run_dir / "recipe.json")
    sentences = ["I left my umbrella on the bus.", "Could you turn it down?", "We are going out."]
    for record in state.stages[1:3]:
        folder = Path(record.folder) / "card"
        folder.mkdir(parents=True)
        items = [CardItem(sentence=s, wav=f"{i}.wav", seconds=2.0, asr_heard=s.lower().rstrip(".?"), wer=0.0,
                          llm_answered=None if record.stage == "1" else "a | b *c* <i>")
                 for i, s in enumerate(sentences, start=1)]
        card = Card(checkpoint=record.checkpoint, stage=record.stage, step=12, items=items, wer=0.0,
                    asr="tiny.en", llm_note="no adapter" if record.stage == "1" else "",
                    instruction=None if record.stage == "1" else "Repeat exactly what was said, word for word.")
        write_card(card, folder / "card.json")
        record.card = str((folder / "card.json").relative_to(tmp_path) if record.stage == "2" else folder / "card.json")
    state.stages[3].card_error = "CheckpointError: oops"
    state.save(run_dir / "recipe.json")

    cards = stage_cards(recipe_state(run_dir), resolve=lambda p: Path(p) if Path(p).is_absolute() else tmp_path / p)
    assert [(c.stage, c.card is not None) for c in cards] == [("1", True), ("2", True), ("3", False)]
    text = cards_markdown(cards, relative=lambda p: Path(p).name)
    assert "#### stage 1 (SpeechLM) · step 12 · ASR WER 0.00 · `stage1_best.safetensors`" in text
    assert "| # | sentence | what the ASR heard | what the LLM answered |" in text
    assert "| 1 | I left my umbrella on the bus. | i left my umbrella on the bus (WER 0.00) | — |" in text
    assert r"| 2 | Could you turn it down? | could you turn it down (WER 0.00) | a \| b \*c\* \<i\> |" in text
    assert "_no adapter_" in text
    assert "#### stage 3 (PPO)\n\n_no card: CheckpointError: oops_" in text
    assert "voice style encoder" not in text
    choices = card_audio_choices(cards)
    assert len(choices) == 6
    assert choices[0] == ("card · stage 1 (SpeechLM) · 1: I left my umbrella on the bus.",
                          str(Path(state.stages[1].folder) / "card" / "1.wav"))
    assert choices[3][1] == str(tmp_path / "runs" / "r" / "stage2" / "card" / "1.wav")

    (Path(state.stages[1].folder) / "card" / "card.json").write_text("{oops")   # unreadable: said, not raised
    assert "is not a readable card" in cards_markdown(stage_cards(recipe_state(run_dir)))
    assert stage_cards(recipe_state(tmp_path)) == [] and cards_markdown([]) == ""
    running = _recipe_run(tmp_path, "r2", 100, ["done", "running", "pending", "pending"])
    assert stage_cards(recipe_state(running)) == []


def test_a_recipe_job_is_watched_in_its_running_stage_and_its_settings_read_back(tmp_path: Path):
    """The runner reads the metrics of the stage running in the recipe's subfolder; the exit code says how the
    recipe ended; run_settings reads a recipe command back (Resume keeps its budget)."""
    import json as _json

    from ira.cli import EXIT_STOPPED
    from ira.training.recipe import RecipeState
    from ui.runner import JobRecord, recipe_command
    from ui.train_tab import recipe_overrides, run_settings

    ws = Workspace.create(tmp_path / "ws")
    create_dummy_corpus(ws.data_dir / "c", num_clips=3)
    run_dir = _recipe_run(ws.root, "r", 30, ["done", "running", "pending", "pending"])
    stage1 = Path(RecipeState.load(run_dir / "recipe.json").stages[1].folder)
    stage1.mkdir()
    t = time.time()
    (stage1 / "metrics.jsonl").write_text("\n".join(_json.dumps(row) for row in [
        {"time": t, "stage": "1", "event": "start", "step": 0, "total_steps": 50},
        {"time": t + 1, "stage": "1", "split": "train", "step": 7, "loss": 3.0, "lr": 1e-3},
        {"time": t + 2, "stage": "1", "event": "stopped", "step": 7, "message": "Stopped at step 7"}]) + "\n")
    command = recipe_command("cpu", 30, recipe_overrides(ws, "c", "r", FAST))
    assert command[3:9] == ["train", "--recipe", "full", "--minutes", "30.0", "--config"]
    JobRecord(name="r", stage="recipe", command=command, output_dir=str(run_dir), log_path=str(run_dir / "train.log"),
              pid=2 ** 22 + 9, create_time=0.0, started=t - 5, stop_requested=t, ended=t + 3,
              returncode=EXIT_STOPPED).save()
    runner = JobRunner(ws.runs_dir)
    assert runner.watched_folder("r") == stage1
    # the plots' stage picker: a stage that ran is read from its own folder; one still pending is not there to read
    style = Path(RecipeState.load(run_dir / "recipe.json").stages[0].folder)
    assert runner.watched_folder("r", "style") == style and runner.watched_folder("r", "2") == stage1
    status = runner.status("r")
    assert (status.state, status.stage, status.recipe_stage, status.step) == ("stopped", "recipe", "1", 7)
    assert "full recipe stopped in stage 1 (SpeechLM)" in status.message and "Resume continues it" in status.message
    settings = run_settings(ws, "r")
    assert (settings.stage, settings.preset, settings.corpus, settings.minutes) == ("recipe", "cpu", "c", 30.0)
    assert settings.start_checkpoint is None
    # ended while no app watched (exit code unknown): recipe.json says it finished
    _recipe_run(ws.root, "r", 30, ["done"] * 4)
    record = JobRecord.load(run_dir)
    record.returncode, record.stop_requested = None, None
    record.save()
    status = runner.status("r")
    assert (status.state, status.recipe_stage) == ("finished", "3") and "full recipe done" in status.message
    assert status.last_checkpoint.endswith("stage3/stage3_best.safetensors")


def test_full_recipe_start_resume_and_its_errors_through_the_api(app):
    """Start refuses a budget <= 0, naming what to enter (a corpus smaller than the preset's batches is not refused:
    the recipe fits its batches to it, tests/test_recipe.py);
    Resume continues a recipe with the budget and settings it was started with (here every stage is done
    already, so the child only checks recipe.json and exits)."""
    from ira.training.recipe import RecipeState
    from ui.runner import JobRecord, recipe_command
    from ui.train_tab import recipe_overrides

    import json as _json

    ws = Workspace.create(app.root)
    create_dummy_corpus(ws.data_dir / "small", num_clips=6)
    (ws.data_dir / "small" / "prepare_report.json").write_text(_json.dumps({"status": "done", "train": 5, "val": 1}))
    form = dict(stage="recipe", run_name="whole", preset="cpu", corpus="small", checkpoint="(none)", epochs=1,
                max_steps=0, batch_size=2, learning_rate=1e-3)
    with pytest.raises(AppError, match=r"Budget \(minutes\) must be more than 0 .* got 0"):
        app.client.predict(**form, budget_minutes=0, api_name="/start_training")
    with pytest.raises(AppError, match="run 'whole' has no full recipe to continue"):
        app.client.predict(**form, budget_minutes=5, api_name="/resume_training")

    run_dir = _recipe_run(app.root, "whole", 12, ["done"] * 4)
    started = recipe_command("cpu", 12, recipe_overrides(ws, "small", "whole", FAST))
    JobRecord(name="whole", stage="recipe", command=started, output_dir=str(run_dir),
              log_path=str(run_dir / "train.log"), pid=2 ** 22 + 11, create_time=0.0, started=time.time() - 60,
              ended=time.time() - 30, returncode=3).save()
    with pytest.raises(AppError, match="already holds a full recipe: press Resume"):
        app.client.predict(**form, budget_minutes=12, api_name="/start_training")
    status = app.client.predict(**{**form, "stage": "1", "preset": "laptop"}, budget_minutes=99,
                                api_name="/resume_training")[0]
    assert "Continued the full recipe in run `whole` (12 min" in status and "it was started with" in status
    assert JobRecord.load(run_dir).command == started
    deadline = time.time() + 120
    while app.runner.active() is not None and time.time() < deadline:
        time.sleep(0.2)
    outputs = app.client.predict("whole", None, api_name="/training_status")
    status = outputs[0]
    assert "FINISHED" in status and "full recipe done" in status, status
    final = RecipeState.load(run_dir / "recipe.json").stages[-1].checkpoint
    assert "- stage 3 (PPO) · **done** · 0.9 / 1.8 min" in status and Path(final).name in status
    # the child tried to make the cards of the done stages: their checkpoints here are names only, so each says why not
    cards = value(outputs[7])
    assert "#### stage 1 (SpeechLM)" in cards and "no card: CheckpointError: checkpoint not found" in cards, cards
    # a recipe's plots: a stage picker offers every stage that ran, first "the stage running now"
    picker = outputs[11]   # (the State among the outputs is not returned)
    assert picker["visible"] is True and picker["value"] == ""
    assert [value for _, value in picker["choices"]] == ["", "style", "1", "2", "3"]
    assert app.client.predict("whole", None, "1", False, api_name="/training_status")[11]["value"] == "1"


def test_a_plot_without_points_is_hidden_and_says_why(app):
    """No chart is shown empty: a stage that has logged no training step yet (here a recipe's stage 1 getting
    ready) hides both plots and says so in words; with points, both are shown and nothing is said."""
    import json as _json

    run_dir = _recipe_run(app.root, "unplotted", 20, ["done", "running", "pending", "pending"])
    (run_dir / "stage1").mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "stage1" / "metrics.jsonl"
    metrics.write_text(_json.dumps({"time": time.time(), "event": "start", "stage": "1", "step": 0,
                                    "total_steps": 100, "eval_every": 50}) + "\n")
    app.client.predict("unplotted", None, api_name="/training_status")   # offers the stages that ran in the picker
    outputs = app.client.predict("unplotted", None, "1", False, api_name="/training_status")
    loss, metric_plot, note = outputs[1], outputs[3], outputs[12]
    assert loss["visible"] is False and metric_plot["visible"] is False
    assert note == "No curves for stage 1 (SpeechLM): it logged no training step."
    with metrics.open("a") as handle:
        for step in (1, 2):
            handle.write(_json.dumps({"time": time.time(), "stage": "1", "split": "train", "step": step,
                                      "loss": 3.0 / step, "ce_cb0": 2.0 / step, "lr": 1e-3}) + "\n")
    outputs = app.client.predict("unplotted", None, "1", False, api_name="/training_status")
    assert outputs[1]["visible"] is True and outputs[3]["visible"] is True and outputs[12] == ""


def test_the_plots_note_names_what_the_chosen_stage_has_not_logged():
    from ui.train_tab import RECIPE, plots_note

    assert plots_note("3", True, True, True) == "" and plots_note(None, False, False, False) == ""
    assert plots_note("3", False, False, True) == "No curves for stage 3 (PPO) yet: they begin with its first " \
                                                  "training steps."
    assert plots_note(RECIPE, False, False, True).startswith("No curves for the full recipe yet")
    assert plots_note("style", False, True, False) == "Voice style encoder logs no loss: only its other figures " \
                                                      "are plotted."
    assert plots_note("1", True, False, False) == "Stage 1 (SpeechLM) logs no other figure: only its loss is plotted."


def test_each_stage_plots_its_quality_figure_first():
    """The figure a stage is judged by comes first in the metric choice when its run logs it, whatever the
    order of the log's keys (the style encoder logs its loss and top-1 before its top-5)."""
    from ui.train_tab import default_metric
    assert default_metric(["lr", "loss", "top1", "top5", "desc_match"], "style") == "top5"
    assert default_metric(["lr", "loss", "cer", "wer"], "1") == "wer"
    assert default_metric(["lr", "judge_margin", "choice_accuracy"], "2") == "choice_accuracy"
    assert default_metric(["lr", "kl", "reward_semantic"], "3") == "reward_semantic"
    assert default_metric(["lr", "loss", "top1"], "style") == "loss"   # no top-5 logged yet: the first of its own


def test_the_app_opens_on_a_quick_start_and_the_train_tab_on_the_full_recipe(tmp_path: Path):
    """The way in without the README: 1 -> 2 -> 3 above the tabs, and the Train tab's default is the full recipe
    (its budget shown; the single-stage start checkpoint and numbers hidden)."""
    from ui.train_tab import RECIPE

    demo = build_app(tmp_path / "ws", preset="cpu", overrides=FAST, hardware=HARDWARE)
    components = demo.get_config_file()["components"]
    text = "\n".join(str(c["props"].get("value")) for c in components if c["type"] == "markdown")
    assert "Quick start" in text
    assert text.index("1. **Data**") < text.index("2. **Train**") < text.index("3. **Generate**")
    by_label = {c["props"].get("label"): c["props"] for c in components if c["props"].get("label")}
    assert by_label["Stage"]["value"] == RECIPE and by_label["Run name"]["value"] == "recipe"
    assert by_label["Budget (minutes)"]["visible"] is True
    assert by_label["Start from checkpoint (the previous stage)"]["visible"] is False
    assert by_label["Batch size"]["value"] >= 1   # in the hidden row of one stage's numbers
    plots = [c["props"] for c in components if c["type"] == "nativeplot" and c["props"].get("x") == "step"]
    assert len(plots) == 2 and all(p["y_axis_format"] == ".4~g" for p in plots)   # no six-decimal ticks
    buttons = {c["props"].get("value"): c["props"] for c in components if c["type"] == "button"}
    assert buttons["Start"]["interactive"] is not False
    assert buttons["Stop"]["interactive"] is False and buttons["Resume from the run's latest checkpoint"][
        "interactive"] is False
    demo.close()


def test_the_data_tab_preselects_the_quick_small_corpus_and_labels_the_big_one(tmp_path: Path):
    """A new user's first build is the quick start's step 1, the dummy corpus (seconds); the synthetic corpus a model
    needs to speak new text stays one click away, labelled with the preset's size and about how long it takes."""
    from ira.config import load_config

    demo = build_app(tmp_path / "ws", preset="cpu", overrides=FAST, hardware=HARDWARE)
    components = demo.get_config_file()["components"]
    by_label = {c["props"].get("label"): c["props"] for c in components if c["props"].get("label")}
    source = by_label["Source"]
    assert source["value"] == "dummy" and by_label["Corpus name"]["value"] == "dummy"
    assert by_label["Number of utterances"]["value"] == 12
    labels = {value: label for label, value in source["choices"]}
    clips = load_config("cpu", FAST).data.synth_num_utterances
    assert labels["synth"] == (f"Synthetic multi-voice corpus (eSpeak NG, offline): {clips:,} clips, about 10 min "
                               "on 2 CPU cores")
    assert labels["dummy"] == "Dummy corpus (a few clips, seconds)"   # the label the browser tests click
    demo.close()


def test_the_packages_messages_are_shown_in_the_words_of_the_page(tmp_path: Path):
    """What `ira` says for a terminal (a flag file, --resume_checkpoint, a config key, absolute paths) is said on
    the page as its buttons say it; a message with none of those is left as it is."""
    from ui.page_words import page_words

    root = tmp_path / "ws"
    stopped = (f"Stopped at step 7 (flag file {root}/runs/a/STOP); checkpoint {root}/runs/a/stage1_latest.safetensors."
               f" Continue with --resume_checkpoint {root}/runs/a/stage1_latest.safetensors")
    assert page_words(stopped, root) == ("Stopped at step 7 (Stop was pressed); checkpoint "
                                         "runs/a/stage1_latest.safetensors. Press Resume to continue it.")
    assert page_words("too short after trimming silence (0.31 s < data.min_duration=0.4)") == \
        "too short after trimming silence (0.31 s < 0.4 s, the shortest clip kept)"
    assert page_words("transcript of 900 characters is over data.max_text_chars=400") == \
        "transcript of 900 characters is over the 400 characters a transcript may have"
    assert page_words("Finished 12 steps (2.00 epochs).") == "Finished 12 steps (2.00 epochs)."


def test_metrics_are_offered_by_name_and_the_raw_ones_behind_more():
    """The plot's choice names what each figure means; approx_kl, memory.rss_mb and the like come only with
    "more", by their raw names."""
    from ui.train_tab import METRIC_LABELS, metric_choices

    names = ["approx_kl", "kl", "lr", "memory.rss_mb", "reward", "reward_semantic"]
    offered = metric_choices(names)
    assert [name for _, name in offered] == ["reward", "reward_semantic", "kl", "lr"]
    assert offered[-1] == ("learning rate", "lr") and all(label != name for label, name in offered)
    every = metric_choices(names, every=True)
    assert [name for _, name in every] == ["reward", "reward_semantic", "kl", "lr", "approx_kl", "memory.rss_mb"]
    assert every[-1] == ("memory.rss_mb", "memory.rss_mb")
    assert "wer" in METRIC_LABELS and "top5" in METRIC_LABELS and "choice_accuracy" in METRIC_LABELS


def test_the_samples_player_says_when_the_first_samples_come():
    """A stage-1 run without samples yet says at which step its next validation (which speaks them) comes and, at
    its pace, about when, from the engine's start event; a run whose end comes first (its time budget) gets them at
    its end; a run stopped before it says so. Once there are samples, for a stage whose validations write no audio,
    or when nothing runs, it says nothing."""
    from ui.runner import JobStatus, _progress_from
    from ui.train_tab import samples_note

    def running(budget_minutes=None) -> JobStatus:
        status = JobStatus(name="r", state="running", stage="1")
        _progress_from([{"time": 10.0, "event": "start", "step": 0, "total_steps": 999, "eval_every": 100,
                         "max_minutes": budget_minutes},
                        {"time": 140.0, "split": "train", "step": 130, "loss": 1.0, "lr": 1e-3}], status, since=0.0,
                       running=True)
        return status

    status = running()
    assert (status.eval_every, status.step, status.training_started, status.steps_per_s) == (100, 130, 10.0, 1.0)
    assert samples_note(status, False) == ("none yet: they come with the validation at step 200, in about 1 min 10 s "
                                           "at this pace (one every 100 steps, and one at the run's end)")
    assert samples_note(status, True) == ""
    # a 3-minute budget ends 50 s from now, before step 200: its last validation speaks them
    assert samples_note(running(budget_minutes=3), False) == ("none yet: they come with the validation at the run's "
                                                              "end, in about 50 s (it ends before step 200)")
    assert samples_note(JobStatus(name="r", state="stopped", stage="1", step=130, eval_every=100), False) == \
        "none: the run stopped at step 130, before the validation at step 200 that speaks them; Resume goes on to it"
    assert samples_note(JobStatus(name="r", state="finished", stage="1", step=130, eval_every=100), False) == ""
    assert samples_note(JobStatus(name="r", state="running", stage="1", step=3), False) == \
        "none yet: they come with the first validation"
    assert samples_note(JobStatus(name="r", state="running", stage="1"), False) == \
        "none yet: they come with its first validation, once its training has begun"
    # a recipe's stage 1 speaks samples; its stage 2 writes the LLM's replies, no audio
    recipe = JobStatus(name="r", state="running", stage="recipe", recipe_stage="1", step=130, eval_every=100)
    assert samples_note(recipe, False) == ("none yet: they come with the validation at step 200 (one every 100 "
                                           "steps, and one at the run's end)")
    assert samples_note(JobStatus(name="r", state="running", stage="2", step=130, eval_every=100), False) == ""


def test_a_timed_run_has_the_eta_of_its_budget_not_of_its_epochs_steps():
    """A single stage with a time budget (training.max_minutes, in the engine's start event) ends when the budget
    is spent: its ETA is the budget left when that comes before the steps' end (1 minute of 2, not 100,000 steps
    at 10 a minute); without a budget, the steps' ETA."""
    from ui.runner import JobStatus, _progress_from

    rows = [{"time": 100.0, "event": "start", "step": 0, "total_steps": 100_000, "max_minutes": 2},
            {"time": 160.0, "split": "train", "step": 10, "loss": 1.0, "lr": 1e-3}]
    timed = JobStatus(name="r", state="running")
    _progress_from(rows, timed, since=0.0, running=True)
    assert timed.eta_s == 60.0
    untimed = JobStatus(name="r", state="running")
    _progress_from([{**rows[0], "max_minutes": None}, rows[1]], untimed, since=0.0, running=True)
    assert untimed.eta_s == (100_000 - 10) * 6.0
