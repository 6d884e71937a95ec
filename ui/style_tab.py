"""The Voice Style tab: what a trained style encoder makes of a voice description.

Type a description: the tab shows its embedding, the corpus clips whose audio the encoder places
nearest (play them), and a 2-D map (PCA) of the corpus with the description on it; or compare two
descriptions. Encoders and corpus indexes are kept in memory per checkpoint save, and each index is
also cached on disk in the corpus folder (`ira.style_search`). API endpoints (gradio_client):
/style_search, /style_compare, /style_clip_audio, /style_lists.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import gradio as gr
import pandas as pd
import torch

from ira.models.style import StyleEncoder
from ira.eval.quality import BASELINE_DESCRIPTIONS, Note, checkpoint_quality, compare_note, nearest_note
from ira.style_search import (DEFAULT_MAX_CLIPS, Neighbour, Progress, StyleIndex, compare, index_key,
                              nearest, similarities, style_index, style_map)
from ira.checkpoint import checkpoint_modules, load_checkpoint, read_metadata
from ira.models.hub import style_encoder_from_checkpoint
from ui.data_tab import clip_audio_path, guarded, scaled
from ui.workspace import Workspace, pick_choice

DEFAULT_DESCRIPTION = "a slow, deep voice with a British accent"
DEFAULT_K = 10
MAX_K = 100
SHOWN_VALUES = 6
TABLE_COLUMNS = ["id", "description", "similarity"]
MAP_COLUMNS = ["x", "y", "series", "clip", "description"]
SERIES = ("corpus clip", "nearest clip", "your description")
MAP_COLORS = {"corpus clip": "#9ca3af", "nearest clip": "#2563eb", "your description": "#dc2626"}
MAX_ENCODERS = 2
MAX_INDEXES = 4
ENCODER_SHARE = 0.05
"""The progress bar's share for reading the style encoder (a second or two); the corpus's clips take the rest."""
EMPTY_TABLE = pd.DataFrame([], columns=TABLE_COLUMNS)
NO_CHECKPOINT = ("Choose a checkpoint with a style encoder above first (train the style stage in the Train tab, then "
                 "press ↻ Refresh).")


# ------------------------------------------------------------------------------- pure helpers


def style_checkpoints(ws: Workspace) -> list[tuple[str, str]]:
    """(label, path) of the workspace checkpoints that hold a style encoder (any stage): one line per distinct save,
    grouped by run (the run written to last first), best first within a run (`Workspace.distinct_checkpoints`)."""
    return ws.distinct_checkpoints(lambda meta: "style" in checkpoint_modules(meta))


def checkpoint_path(ws: Workspace, rel: Optional[str]) -> Path:
    """The chosen checkpoint inside the workspace, checked to hold a style encoder."""
    if not rel or not str(rel).strip():
        raise ValueError("choose a checkpoint with a style encoder (train the style stage in the Train tab, "
                         "then press ↻ Refresh)")
    path = ws.resolve(rel, must_exist=True)
    meta = read_metadata(path)
    modules = checkpoint_modules(meta)
    if "style" not in modules:
        raise ValueError(f"{rel} (stage {meta.get('stage', '?')}) holds no style encoder (modules: "
                         f"{', '.join(modules) or 'none'}); choose a checkpoint of the style stage, or of a "
                         f"stage 1-3 run started from one")
    return path


def corpus_path(ws: Workspace, name: Optional[str]) -> Path:
    if not name or not str(name).strip():
        raise ValueError("choose a corpus to search (build one in the Data tab, then press ↻ Refresh)")
    return ws.existing_corpus(name)   # its metadata.csv and wavs stay inside the workspace


def check_description(text: Optional[str], what: str = "the voice description") -> str:
    if text is None or not str(text).strip():
        raise ValueError(f"{what} is empty; type one, e.g. '{DEFAULT_DESCRIPTION}'")
    return str(text)


def encoder_note(path: Path) -> Note:
    """What the checkpoint's style encoder was measured to do (ira/eval/quality.py), from its header."""
    return checkpoint_quality(read_metadata(path)).style


def baseline_similarities(encoder: StyleEncoder) -> list[float]:
    """The cosine similarity of every pair of `BASELINE_DESCRIPTIONS` (varied voices) with this encoder: what it
    gives two descriptions of different voices, against which a comparison is read."""
    with torch.no_grad():
        vectors = encoder.embed_text(list(BASELINE_DESCRIPTIONS)).float().cpu()
    sims = vectors @ vectors.T
    return [float(sims[i, j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]


def embedding_readout(vector: torch.Tensor, index: StyleIndex, corpus: str, loaded: bool, seconds: float) -> str:
    """Markdown: dimension and first values of the description's vector, and where the index came from
    (`loaded`: this query loaded or built it, in `seconds`; else it was in memory)."""
    values = ", ".join(f"{v:+.3f}" for v in vector[:SHOWN_VALUES].tolist())
    more = ", …" if vector.numel() > SHOWN_VALUES else ""
    if not loaded:
        source = "index in memory"
    elif index.from_cache:
        source = f"index read from the disk cache in {seconds:.1f} s"
    else:
        source = f"clips embedded in {seconds:.1f} s (cached for next time)"
    capped = f" (the first {len(index) + len(index.skipped)} of {index.total_clips})" \
        if index.total_clips > len(index) + len(index.skipped) else ""
    lines = [f"**The description's voice**, as the style encoder places it among {vector.numel()} directions "
             f"(clips are compared by how close their own place is): [{values}{more}]",
             f"**Corpus** `{corpus}`: {len(index)} clips{capped}, {source}"]
    if index.skipped:
        lines.append(f"**Skipped**: {len(index.skipped)} clip(s) that could not be read, "
                     f"e.g. {index.skipped[0][0]}: {index.skipped[0][1]}")
    return "  \n".join(lines)


def map_frame(index: StyleIndex, neighbours: list[Neighbour], query: torch.Tensor, description: str
              ) -> tuple[pd.DataFrame, torch.Tensor]:
    """Rows for the scatter plot (every clip, the nearest ones as their own series, the description)
    and the share of variance along each axis."""
    projected = style_map(index, [query])
    close = {n.clip_id for n in neighbours}
    rows = [[float(x), float(y), SERIES[1] if clip_id in close else SERIES[0], clip_id, text]
            for (x, y), clip_id, text in zip(projected.clips.tolist(), index.ids, index.descriptions)]
    qx, qy = projected.queries[0].tolist()
    rows.append([float(qx), float(qy), SERIES[2], "", description])
    frame = pd.DataFrame(rows, columns=MAP_COLUMNS).astype({"x": "float64", "y": "float64"})
    return frame, projected.explained


class StyleModels:
    """Loaded style encoders and corpus indexes, per checkpoint save (path + checkpoint_id), so that
    a second query on the same checkpoint and corpus costs one text embedding."""

    def __init__(self, device: str = "cpu", max_encoders: int = MAX_ENCODERS, max_indexes: int = MAX_INDEXES):
        self.device = device
        self.max_encoders, self.max_indexes = max_encoders, max_indexes
        self._encoders: dict[tuple[str, str], StyleEncoder] = {}
        self._indexes: dict[str, StyleIndex] = {}
        self._encoder_lock = threading.Lock()
        self._index_lock = threading.Lock()   # one index build at a time; waiters then find it cached

    def encoder(self, path: Path) -> StyleEncoder:
        key = (str(path), read_metadata(path).get("checkpoint_id", ""))
        with self._encoder_lock:
            if key not in self._encoders:
                # only the style tensors: a stage-3 checkpoint's SpeechLM and adapter are not read (item 5 of issue 37)
                model = style_encoder_from_checkpoint(load_checkpoint(path, modules=("style",)), self.device)
                while len(self._encoders) >= self.max_encoders:
                    self._encoders.pop(next(iter(self._encoders)))
                self._encoders[key] = model
            return self._encoders[key]

    def index(self, path: Path, corpus: Path, max_clips: int, progress: Progress) -> tuple[StyleIndex, bool]:
        """(the index, whether this call loaded or built it rather than finding it in memory)."""
        key = index_key(path, corpus, max_clips)
        with self._index_lock:
            if key in self._indexes:
                return self._indexes[key], False
            built = style_index(self.encoder(path), path, corpus, max_clips, progress)
            while len(self._indexes) >= self.max_indexes:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[key] = built
            return built, True


@dataclass
class SearchResult:
    readout: str                 # markdown
    table: pd.DataFrame          # the nearest clips
    clip_ids: list[str]
    audio: Optional[str]         # the nearest clip's wav
    map: pd.DataFrame            # scatter plot rows
    explained: torch.Tensor      # [2] share of variance along the map's axes


def search(ws: Workspace, models: StyleModels, rel: Optional[str], corpus: Optional[str],
           description: Optional[str], k: int, max_clips: int, progress: Progress) -> SearchResult:
    """Embed `description`, rank the corpus clips by it and place it on the corpus map."""
    description = check_description(description)
    path = checkpoint_path(ws, rel)
    corpus_dir = corpus_path(ws, corpus)
    if int(k) < 1 or int(max_clips) < 1:
        raise ValueError(f"the number of clips to list ({k}) and to index ({max_clips}) must be at least 1")
    progress(0.0, f"reading the style encoder from {path.name} (its style part only)")
    encoder = models.encoder(path)
    start = time.perf_counter()
    index, loaded = models.index(path, corpus_dir, int(max_clips), scaled(progress, ENCODER_SHARE, 1.0))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        vector = encoder.embed_description(description).float().cpu()
    found = nearest(index, vector, min(int(k), MAX_K))
    reading = nearest_note([n.similarity for n in found], similarities(index, vector).tolist())
    table = pd.DataFrame([[n.clip_id, n.description, round(n.similarity, 4)] for n in found],
                         columns=TABLE_COLUMNS)
    frame, explained = map_frame(index, found, vector, description)
    ids = [n.clip_id for n in found]
    audio = clip_audio_path(ws, corpus_dir.name, ids[0]) if ids else None
    notes = f"**These results**: {reading.text}  \n**This encoder**: {encoder_note(path).text}  \n"
    return SearchResult(notes + embedding_readout(vector, index, corpus_dir.name, loaded, seconds), table, ids, audio,
                        frame, explained)


def compare_descriptions(ws: Workspace, models: StyleModels, rel: Optional[str], a: Optional[str],
                         b: Optional[str]) -> str:
    """Markdown: the cosine similarity of two descriptions, read against what the same encoder gives descriptions of
    different voices (`compare_note`), and what the encoder was measured to do."""
    a = check_description(a, "the first description")
    b = check_description(b, "the second description")
    path = checkpoint_path(ws, rel)
    encoder = models.encoder(path)
    cos = compare(encoder, a, b)
    reading = compare_note(cos, baseline_similarities(encoder))
    return f"**Cosine similarity {cos:+.3f}**: {reading.text}  \n**This encoder**: {encoder_note(path).text}"


# ------------------------------------------------------------------------------------- the tab


@dataclass
class StyleTab:
    checkpoint: gr.Dropdown
    corpus: gr.Dropdown
    refresh_lists: Callable[..., tuple[gr.Dropdown, gr.Dropdown]]   # (checkpoint, corpus) -> both updated


def build_style_tab(ws: Workspace, preset: str, overrides: list[str], device: str = "cpu",
                    models: Optional[StyleModels] = None) -> StyleTab:
    """Lay out the Voice Style tab inside the current gr.Tab and wire its events.

    `preset` and `overrides` are not used (the encoder's settings come from its checkpoint); they keep
    the call shape of the other tabs. `device` is where encoders run ("cpu", "cuda", "mps").
    """
    models = models or StyleModels(device)
    checkpoints, corpora = style_checkpoints(ws), ws.list_corpora()
    gr.Markdown("Explore a trained **voice style encoder**: the space where voice descriptions and voice "
                "recordings meet. Type a description to see the corpus clips the encoder hears as closest, "
                "and where it falls on a map of the corpus.")
    with gr.Row():
        checkpoint = gr.Dropdown(checkpoints, value=pick_choice(None, checkpoints), allow_custom_value=True, scale=3,
                                 label="Checkpoint with a style encoder (workspace/runs; best first in each run)")
        corpus = gr.Dropdown(corpora, value=pick_choice(None, corpora), allow_custom_value=True, scale=2,
                             label="Corpus to search")
        refresh = gr.Button("↻ Refresh", scale=0, min_width=100)
    with gr.Row():
        description = gr.Textbox(DEFAULT_DESCRIPTION, label="Voice description", scale=4,
                                 placeholder=DEFAULT_DESCRIPTION)
        search_button = gr.Button("Find voices", variant="primary", scale=1)
    with gr.Accordion("Search settings", open=False):
        with gr.Row():
            k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="Clips to list")
            max_clips = gr.Number(DEFAULT_MAX_CLIPS, precision=0, minimum=1, label="Clips to index (at most)",
                                  info="the first clips of metadata.csv; indexed once per checkpoint and cached")
    readout = gr.Markdown("")
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Dataframe(headers=TABLE_COLUMNS, label="Nearest clips (cosine similarity of the clip's "
                                 "audio embedding to the description)", interactive=False, wrap=True,
                                 max_height=420, column_widths=["20%", "62%", "18%"])
            with gr.Row():
                clip = gr.Dropdown([], label="Clip to play", allow_custom_value=True, scale=1)
                audio = gr.Audio(type="filepath", label="Clip", interactive=False, scale=2)
        with gr.Column(scale=2):
            plot = gr.ScatterPlot(x="x", y="y", color="series", color_map=MAP_COLORS, title="Style map (PCA)",
                                  tooltip=["clip", "description", "series"], height=420,
                                  x_title="principal axis 1", y_title="principal axis 2",
                                  caption="The clips' audio embeddings on their two main directions (PCA). "
                                          "Distances here are approximate: the search uses every dimension.")
    gr.Markdown("### Compare two descriptions")
    with gr.Row():
        first = gr.Textbox("a slow, deep male voice", label="Description A", scale=2)
        second = gr.Textbox("a deep, slow-speaking man", label="Description B", scale=2)
        compare_button = gr.Button("Compare", scale=0, min_width=120)
    compared = gr.Markdown("")

    def on_search(rel: Optional[str], name: Optional[str], text: Optional[str], k_value: float,
                  max_value: float, progress: gr.Progress = gr.Progress()) -> tuple:
        if not rel or not str(rel).strip():   # said in the readout, not as an error badge on each output
            gr.Warning(NO_CHECKPOINT)
            return NO_CHECKPOINT, EMPTY_TABLE, gr.Dropdown(choices=[], value=None), None, None
        report = lambda fraction, message: progress(fraction, desc=message)  # noqa: E731
        result = guarded("Searching the voices", search, ws, models, rel, name, text, int(k_value or DEFAULT_K),
                         int(max_value or DEFAULT_MAX_CLIPS), report)
        share = [f"{100 * float(v):.0f} %" for v in result.explained]
        return (result.readout, result.table,
                gr.Dropdown(choices=result.clip_ids, value=result.clip_ids[0] if result.clip_ids else None),
                result.audio,
                gr.ScatterPlot(value=result.map, x_title=f"principal axis 1 ({share[0]} of the variance)",
                               y_title=f"principal axis 2 ({share[1]})"))

    def on_compare(rel: Optional[str], a: Optional[str], b: Optional[str]) -> str:
        if not rel or not str(rel).strip():
            gr.Warning(NO_CHECKPOINT)
            return NO_CHECKPOINT
        return guarded("Comparing the descriptions", compare_descriptions, ws, models, rel, a, b)

    def on_clip(name: Optional[str], clip_id: Optional[str]) -> Optional[str]:
        if not name or not clip_id:
            return None
        return guarded("Loading the clip", clip_audio_path, ws, name, clip_id)

    def on_table_select(name: Optional[str], evt: gr.SelectData) -> tuple:
        row = evt.row_value or []
        clip_id = str(row[0]) if row else None
        return gr.Dropdown(value=clip_id), on_clip(name, clip_id)

    def refresh_lists(current_checkpoint: Optional[str] = None, current_corpus: Optional[str] = None
                      ) -> tuple[gr.Dropdown, gr.Dropdown]:
        found, names = style_checkpoints(ws), ws.list_corpora()
        return (gr.Dropdown(choices=found, value=pick_choice(current_checkpoint, found)),
                gr.Dropdown(choices=names, value=pick_choice(current_corpus, names)))

    search_inputs = [checkpoint, corpus, description, k, max_clips]
    search_outputs = [readout, table, clip, audio, plot]

    def on_checkpoint(rel: Optional[str]) -> tuple:
        """Another encoder: the previous one's results and comparison are not this one's, so they go."""
        return "", EMPTY_TABLE, gr.Dropdown(choices=[], value=None), None, None, ""

    search_button.click(on_search, search_inputs, search_outputs, api_name="style_search", show_progress_on=[readout])
    description.submit(on_search, search_inputs, search_outputs, api_visibility="private", show_progress_on=[readout])
    compare_button.click(on_compare, [checkpoint, first, second], compared, api_name="style_compare")
    checkpoint.change(on_checkpoint, checkpoint, [*search_outputs, compared], api_visibility="private")
    clip.input(on_clip, [corpus, clip], audio, api_name="style_clip_audio")
    table.select(on_table_select, corpus, [clip, audio], api_visibility="private")
    refresh.click(refresh_lists, [checkpoint, corpus], [checkpoint, corpus], api_name="style_lists")
    return StyleTab(checkpoint=checkpoint, corpus=corpus, refresh_lists=refresh_lists)
