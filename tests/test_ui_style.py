"""The Voice Style tab through the app's API (gradio_client), on a workspace with a tiny corpus and a
style encoder trained for a few steps on it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import TINY_STYLE, free_port  # noqa: E402
from ira.config import load_config  # noqa: E402
from ira.data.dummy import create_dummy_corpus  # noqa: E402
from ira.hardware import detect_hardware  # noqa: E402
from ira.models.style import load_style_encoder  # noqa: E402
from ira.style_search import index_key, nearest, style_index  # noqa: E402
from ira.training.checkpoint import save_checkpoint  # noqa: E402
from ira.training.stage_style import run_style_training  # noqa: E402
from ui.app import build_app, launch_app  # noqa: E402

N_CLIPS = 9
K = 4
QUERY = "a slow, deep voice with a British accent"



def _value(output):
    """A component returned as an update ({"__type__": "update", "value": ...}) -> its value."""
    return output.get("value") if isinstance(output, dict) and output.get("__type__") == "update" else output


def _plot_rows(plot: dict) -> list[dict]:
    value = _value(plot)
    value = value.get("value", value)
    return [dict(zip(value["columns"], row)) for row in value["data"]]


@pytest.fixture(scope="module")
def style_app(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("workspace")
    corpus = create_dummy_corpus(root / "data" / "tiny", num_clips=N_CLIPS, seed=0)
    cfg = load_config("cpu", TINY_STYLE + [f"data.dir={corpus}", f"training.output_dir={root / 'runs' / 'voice'}"])
    trained = run_style_training(cfg, cpu=True)
    assert trained.ok, trained.message
    # A checkpoint without a style encoder, and a style checkpoint outside the workspace.
    other = save_checkpoint(root / "runs" / "other" / "stage2_latest.safetensors", {"adapter": torch.nn.Linear(2, 2)},
                            stage="2", epoch=0, step=0, config=cfg)
    outside = tmp_path_factory.mktemp("outside") / "stolen.safetensors"
    shutil.copy(trained.last_checkpoint, outside)

    demo = build_app(root, preset="cpu", hardware=detect_hardware())
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(launched.local_url, verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    yield SimpleNamespace(root=Path(root), client=client, corpus=corpus, checkpoint=Path(trained.last_checkpoint),
                          rel=str(Path(trained.last_checkpoint).relative_to(root)),
                          other=str(other.relative_to(root)), outside=outside)
    demo.close()
    torch.set_num_threads(before)


def _search(app, description: str = QUERY, checkpoint=None, corpus: str = "tiny", k: int = K, max_clips: int = 2000):
    return app.client.predict(checkpoint or app.rel, corpus, description, k, max_clips, api_name="/style_search")


def test_lists_hold_the_style_checkpoints_and_the_corpora(style_app):
    checkpoint, corpus = style_app.client.predict(None, None, api_name="/style_lists")
    choices = {c[1] if isinstance(c, (list, tuple)) else c for c in checkpoint["choices"]}
    # one line per distinct save: a file reached by another name (best, latest) is named in that line's label
    named = set()
    for label, path in checkpoint["choices"]:
        named |= {Path(path).stem, *(label.split(" · also ")[1].split(", ") if " · also " in label else [])}
    files = (style_app.root / "runs" / "voice").glob("*.safetensors")
    assert named == {p.stem for p in files} and len(choices) == len(checkpoint["choices"])
    assert style_app.other not in choices and len(choices) >= 1
    assert checkpoint["value"] in choices
    assert corpus["value"] == "tiny"


def test_search_finds_the_nearest_clips_and_maps_the_description(style_app):
    readout, table, clip, audio, plot = _search(style_app)
    assert "among 16 directions" in readout and "unit vector" not in readout and f"{N_CLIPS} clips" in readout and "embedded" in readout
    # what the results and the encoder are worth, beside them: a two-step encoder is near random or unmeasured
    assert "**These results**: " in readout and "**This encoder**: " in readout
    encoder = readout.split("**This encoder**: ")[1]
    assert encoder.startswith(("near random", "not measured")), readout
    assert table["headers"] == ["id", "description", "similarity"] and len(table["data"]) == K
    sims = [row[2] for row in table["data"]]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)
    assert all(row[1] for row in table["data"])                        # every clip has its description

    # The same answer as the library on the same checkpoint.
    model = load_style_encoder(style_app.checkpoint)
    index = style_index(model, style_app.checkpoint, style_app.corpus)
    assert index.from_cache                                            # the app cached it in the corpus
    expected = nearest(index, model.embed_description(QUERY), K)
    assert [row[0] for row in table["data"]] == [n.clip_id for n in expected]
    assert sims == pytest.approx([n.similarity for n in expected], abs=1e-3)

    assert _value(clip) == table["data"][0][0]
    assert Path(audio).name == f"{table['data'][0][0]}.wav"
    rows = _plot_rows(plot)
    series = [r["series"] for r in rows]
    assert series.count("corpus clip") + series.count("nearest clip") == N_CLIPS
    assert series.count("nearest clip") == K and series.count("your description") == 1
    assert {r["clip"] for r in rows if r["series"] == "nearest clip"} == {row[0] for row in table["data"]}
    assert all(isinstance(r["x"], float) and isinstance(r["y"], float) for r in rows)

    # A second query reuses the encoder and the index kept in memory.
    again, table2, *_ = _search(style_app, "a fast, high-pitched voice")
    assert "index in memory" in again and len(table2["data"]) == K
    played = style_app.client.predict("tiny", table["data"][-1][0], api_name="/style_clip_audio")
    assert Path(played).name == f"{table['data'][-1][0]}.wav"
    cache = style_app.corpus / "cache" / "style_index"
    assert [p.name for p in cache.iterdir()] == [f"style_index-{index_key(style_app.checkpoint, style_app.corpus)}"
                                                  ".safetensors"]


def test_compare_two_descriptions(style_app):
    same = style_app.client.predict(style_app.rel, QUERY, f"  {QUERY} ", api_name="/style_compare")
    assert "Cosine similarity +1.000" in same and "nearly the same voice" in same
    assert "pairs of different descriptions score" in same and "**This encoder**: " in same   # read against them
    other = style_app.client.predict(style_app.rel, QUERY, "a fast, squeaky child", api_name="/style_compare")
    assert "Cosine similarity" in other and "+1.000" not in other
    with pytest.raises(AppError, match="second description is empty"):
        style_app.client.predict(style_app.rel, QUERY, "   ", api_name="/style_compare")


def test_bad_inputs_are_clear_errors(style_app):
    with pytest.raises(AppError, match="voice description is empty"):
        _search(style_app, "  ")
    # no checkpoint chosen: said in the readout, not as a red error badge on each output
    assert "Choose a checkpoint" in style_app.client.predict(None, "tiny", QUERY, K, 2000, api_name="/style_search")[0]
    assert "Choose a checkpoint" in style_app.client.predict(None, "a", "b", api_name="/style_compare")
    with pytest.raises(AppError, match="holds no style encoder"):
        _search(style_app, checkpoint=style_app.other)
    with pytest.raises(AppError, match="outside the workspace"):
        _search(style_app, checkpoint=str(style_app.outside))
    with pytest.raises(AppError, match="outside the workspace"):
        _search(style_app, checkpoint="../" + style_app.outside.parent.name + "/" + style_app.outside.name)
    with pytest.raises(AppError, match="no corpus 'missing'"):
        _search(style_app, corpus="missing")
    with pytest.raises(AppError, match="not allowed"):
        _search(style_app, corpus="../tiny")
    with pytest.raises(AppError, match="holds no style encoder"):
        style_app.client.predict(style_app.other, "a", "b", api_name="/style_compare")
    readout, *_ = _search(style_app)                                   # still serving
    assert "among 16 directions" in readout


def test_a_first_search_names_its_phases_and_a_later_stage_reuses_the_style_index(style_app):
    """The issue: a first search with a stage-3 checkpoint sat at 'loading the style encoder - 0.0%' for 208 s. Its
    progress now comes in named phases (reading the style encoder, its part only; the cache; the clips embedded N/M),
    and a later stage's checkpoint carrying the style checkpoint's encoder unchanged reads the index that one built."""
    from ira.checkpoint import load_checkpoint, read_metadata
    from ui.style_tab import StyleModels, search
    from ui.workspace import Workspace

    ws = Workspace.create(style_app.root)
    seen: list[tuple[float, str]] = []
    first = search(ws, StyleModels("cpu"), style_app.rel, "tiny", QUERY, K, 5, lambda f, m: seen.append((f, m)))
    messages = [m for _, m in seen]
    assert messages[0] == f"reading the style encoder from {style_app.checkpoint.name} (its style part only)"
    assert messages[1] == "looking for this style encoder's clip embeddings in the cache of tiny"
    assert messages[-1] == "embedding the clips of tiny: 5/5 (once per style encoder, then cached)"
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "clips embedded in" in first.readout

    meta = read_metadata(style_app.checkpoint)
    later = style_app.root / "runs" / "later"
    try:
        save_checkpoint(later / "stage3_best.safetensors",
                        {"style": load_checkpoint(style_app.checkpoint, modules=("style",)).tensors["style"],
                         "speech_lm": {"w": torch.ones(3)}}, stage="3", epoch=0, step=5, config=load_config("cpu"),
                        metadata={key: meta[key] for key in ("style_config", "text_encoder")})
        seen.clear()
        again = search(ws, StyleModels("cpu"), "runs/later/stage3_best.safetensors", "tiny", QUERY, K, 5,
                       lambda f, m: seen.append((f, m)))
        assert not any(m.startswith("embedding") for _, m in seen) and "read from the disk cache" in again.readout
        assert again.clip_ids == first.clip_ids
    finally:
        shutil.rmtree(later, ignore_errors=True)
