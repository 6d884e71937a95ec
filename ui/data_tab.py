"""The Data tab: build a corpus (source + `prepare_corpus`) in workspace/data/<name> and look at it.

API endpoints (gradio_client): /build_corpus, /show_corpus, /prepare_corpus, /clip_audio, /list_corpora.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from ira.config import load_config
from ira.data.corpus import corpus_summary, read_metadata, read_source, wav_path
from ira.data.prepare import prepare_corpus
from ui.page_words import page_words
from ui.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]

SOURCES = (
    ("Dummy corpus (a few clips, seconds)", "dummy"),
    ("Synthetic multi-voice corpus (eSpeak NG, offline)", "synth"),
    ("LJSpeech-1.1 download (2.6 GB, one female voice)", "ljspeech"),
    ("A folder inside the workspace (LJSpeech layout)", "folder"),
)
DEFAULT_SOURCE = "dummy"
"""What a new user builds first (the quick start's step 1): the dummy corpus tries the whole path in seconds; the
synthetic corpus a model needs to speak new text takes minutes, so it is chosen, not preselected."""
DEFAULT_NAMES = {"synth": "synth", "ljspeech": "LJSpeech-1.1", "folder": "my_corpus", "dummy": "dummy"}
DEFAULT_COUNTS = {"synth": 20_000, "dummy": 12}
"""The synthetic corpus's size is the preset's `data.synth_num_utterances` (this is its fallback)."""
SYNTH_BUILD_S_PER_CLIP = 10 * 60 / 20_000
"""Building the synthetic corpus (speaking and preparing it) on a 2-core CPU: about 10 minutes for 20,000 clips."""
SHOWN_CLIPS = 12
CLIP_COLUMNS = ["id", "text", "seconds", "voice", "accent", "description"]
CLIP_COLUMN_WIDTHS = ["12%", "30%", "7%", "10%", "9%", "32%"]
"""The long columns (text, description) get the room: with equal widths the description was cut."""
PROBLEM_COLUMNS = ["id", "reason", "file"]


@dataclass
class CorpusView:
    """Everything the tab shows about one corpus."""
    name: str
    summary: str                 # markdown
    clips: pd.DataFrame          # a few clips with their text and descriptions
    problems: pd.DataFrame       # dropped clips and why
    clip_ids: list[str]          # every playable clip
    audio: str | None            # the first clip's wav


def synth_label(clips: int) -> str:
    """The synthetic source's choice, with the size the preset builds and about how long that takes."""
    minutes = max(1, round(clips * SYNTH_BUILD_S_PER_CLIP / 60))
    return f"Synthetic multi-voice corpus (eSpeak NG, offline): {clips:,} clips, about {minutes} min on 2 CPU cores"


def source_choices(synth_clips: int) -> list[tuple[str, str]]:
    """(label, source) of the Source radio: the synthetic corpus labelled with its size and build time."""
    return [(synth_label(synth_clips) if value == "synth" else label, value) for label, value in SOURCES]


def scaled(progress: Progress, lo: float, hi: float) -> Progress:
    """`progress` with its fractions mapped onto [lo, hi] (one phase of a longer bar)."""
    return lambda fraction, message: progress(lo + (hi - lo) * max(0.0, min(1.0, fraction)), message)


def fetch_source(ws: Workspace, source: str, name: str, num: int, folder: str, seed: int,
                 progress: Progress) -> Path:
    """Run a data source into workspace/data/<name> (LJSpeech: data/LJSpeech-1.1); returns the folder."""
    out = ws.corpus_dir(DEFAULT_NAMES["ljspeech"] if source == "ljspeech" else name)
    if out.exists():   # a build reads what is there (its source.json, its metadata.csv) and adds to it
        ws.check_folder(out, f"corpus folder '{out.name}'")
    if source == "ljspeech":
        from ira.data.ljspeech import download_ljspeech
        return download_ljspeech(ws.data_dir, progress=progress, keep_archive=False)
    if source == "synth":
        from ira.data.synth import synthesize_corpus
        synthesize_corpus(out, num_utterances=int(num), seed=int(seed), progress=progress)
    elif source == "dummy":
        from ira.data.dummy import create_dummy_corpus
        progress(0.0, "writing the dummy clips")
        create_dummy_corpus(out, num_clips=int(num), seed=int(seed))
    elif source == "folder":
        from ira.data.folder import import_folder
        src = ws.check_folder(ws.resolve(folder, must_exist=True), f"folder '{folder.strip()}'")
        import_folder(src, out, progress=progress)
    else:
        raise WorkspaceError(f"unknown source {source!r}; choose one of {', '.join(v for _, v in SOURCES)}")
    return out


def build_corpus(ws: Workspace, preset: str, overrides: list[str], source: str, name: str, num: int,
                 folder: str, seed: int, progress: Progress, force: bool = False) -> CorpusView:
    """Source, then `prepare_corpus` (validate, annotate, fit the codec, cache the tokens)."""
    cfg = load_config(preset, overrides)   # first: a config mistake costs nothing
    corpus = fetch_source(ws, source, name, num, folder, seed, scaled(progress, 0.0, 0.4))
    ws.check_folder(corpus, f"corpus '{corpus.name}'")   # what the package prepares stays inside the workspace
    result = prepare_corpus(cfg, corpus, progress=scaled(progress, 0.4, 1.0), force=force)
    return corpus_view(ws, corpus.name, codec_text=result.codec.describe())


def prepare_existing(ws: Workspace, preset: str, overrides: list[str], name: str, force: bool,
                     progress: Progress) -> CorpusView:
    cfg = load_config(preset, overrides)
    result = prepare_corpus(cfg, ws.existing_corpus(name), progress=progress, force=force)
    return corpus_view(ws, name, codec_text=result.codec.describe())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _read_annotations(corpus: Path) -> list[dict[str, Any]]:
    path = corpus / "annotations.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def _counts(values: list[Any], limit: int = 12) -> str:
    counter = Counter(str(v) for v in values if v not in (None, ""))
    if not counter:
        return "-"
    shown = ", ".join(f"{k} ×{n}" for k, n in counter.most_common(limit))
    more = f", and {len(counter) - limit} more" if len(counter) > limit else ""
    return f"{len(counter)}: {shown}{more}"


def corpus_view(ws: Workspace, name: str, codec_text: str | None = None) -> CorpusView:
    """What is on disk for workspace/data/<name>: prepare_report.json, annotations.jsonl, the wavs."""
    corpus = ws.existing_corpus(name)
    report = _read_json(corpus / "prepare_report.json") or {}
    annotations = _read_annotations(corpus) if report.get("status") == "done" else []
    source = read_source(corpus) or {}
    lines = [f"### Corpus `{name}`", f"- **Folder**: `{ws.relative(corpus)}`"]
    if source:
        settings = ", ".join(f"{k} {v}" for k, v in source.items() if k in ("engine", "seed", "num_utterances",
                                                                          "num_clips", "from"))
        lines.append(f"- **Source**: {source.get('source', '?')}" + (f" ({settings})" if settings else ""))

    if annotations:
        seconds = float(report.get("total_seconds") or sum(float(a.get("duration", 0)) for a in annotations))
        lines += [
            f"- **Size**: {len(annotations)} clips kept, {seconds / 60:.1f} min ({seconds:.0f} s); "
            f"train {report.get('train', '?')} / validation {report.get('val', '?')}",
            f"- **Voices** {_counts([a.get('speaker') or a.get('voice') for a in annotations])}",
            f"- **Accents** {_counts([a.get('accent') for a in annotations])}",
            f"- **Genders** {_counts([a.get('gender') for a in annotations])}",
            f"- **Codec**: {codec_text or report.get('codec', '?')}",
        ]
        clip_ids = [str(a["id"]) for a in annotations]
        rows = [[a["id"], a.get("text", ""), round(float(a.get("duration", 0.0)), 2),
                 a.get("speaker") or a.get("voice") or "", a.get("accent") or "",
                 (a.get("descriptions") or [""])[0]] for a in annotations[:SHOWN_CLIPS]]
    else:
        summary = corpus_summary(corpus)
        state = ("preparation did not finish" if report else "not prepared yet") + \
            " (no annotations or token cache): press **Prepare** below, or **Build** again"
        lines += [f"- **Size**: {summary['n_clips']} clips listed, {summary['total_duration_s'] / 60:.1f} min",
                  f"- **Voices** {_counts(list(summary['voices']))}",
                  f"- **Accents** {_counts(list(summary['accents']))}",
                  f"- **Status**: {state}"]
        missing = set(summary["missing_wavs"]) | set(summary["unreadable_wavs"])
        clip_ids = [c for c in _metadata_ids(corpus) if c not in missing]
        rows = [[c, "", None, "", "", ""] for c in clip_ids[:SHOWN_CLIPS]]

    dropped = report.get("dropped") or []
    lines.append(f"- **Problems**: {len(dropped)} clip(s) dropped, listed below" if dropped
                 else "- **Problems**: none found")
    problems = pd.DataFrame([[d.get("id", ""), page_words(str(d.get("reason", ""))), ws.relative(d.get("file", ""))]
                             for d in dropped], columns=PROBLEM_COLUMNS)
    first = clip_audio_path(ws, name, clip_ids[0]) if clip_ids else None
    return CorpusView(name, "\n".join(lines), pd.DataFrame(rows, columns=CLIP_COLUMNS), problems, clip_ids, first)


def _metadata_ids(corpus: Path) -> list[str]:
    return [clip.id for clip in read_metadata(corpus)]


def clip_audio_path(ws: Workspace, name: str, clip_id: str) -> str | None:
    """The wav of one clip (inside the workspace), or None when it is not there."""
    if not clip_id:
        return None
    path = ws.resolve(wav_path(ws.corpus_dir(name), clip_id))
    return str(path) if path.is_file() else None


# ------------------------------------------------------------------------------------- the tab


def guarded(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn`; any failure becomes a gr.Error that names `what` (the UI stays up)."""
    try:
        return fn(*args, **kwargs)
    except gr.Error:
        raise
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("%s failed: %s", what, exc)
        raise gr.Error(f"{what} failed: {exc}", title=what, print_exception=False) from exc
    except Exception as exc:  # an unexpected bug: keep the app alive, show it, log the traceback
        log.exception("%s failed", what)
        raise gr.Error(f"{what} failed with {type(exc).__name__}: {exc}", title=what,
                       print_exception=False) from exc


@dataclass
class DataTab:
    corpus: gr.Dropdown           # the list of corpora (the Train tab reads the same list)
    built: Any                    # the dependency of the Build event, for `.then(...)`
    refresh: Any                  # fn(current corpus) -> the dropdown with today's corpora (page load, ↻)


def outside_links_note(ws: Workspace) -> str:
    """Say which links under data/ are not listed (they point outside the workspace) instead of hiding them."""
    links = ws.links_outside()
    if not links:
        return ""
    names = ", ".join(f"`{name}`" for name in links[:5]) + (" ..." if len(links) > 5 else "")
    return (f"\n\nNot listed: {names} under `{ws.relative(ws.data_dir)}/` link outside the workspace, which the "
            "app never follows; copy those corpora into the workspace to use them.")


def build_data_tab(ws: Workspace, preset: str, overrides: list[str]) -> DataTab:
    """Lay out the Data tab inside the current gr.Tab and wire its events."""
    corpora = ws.list_corpora()
    counts = {**DEFAULT_COUNTS, "synth": load_config(preset, overrides).data.synth_num_utterances}
    gr.Markdown("Build a corpus: its clips are checked, trimmed, annotated (pitch, rate, loudness -> "
                "voice descriptions) and encoded once by the codec of the "
                f"**{preset}** preset. Everything lands in `{ws.relative(ws.data_dir)}/` of the workspace."
                + outside_links_note(ws))
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Radio(source_choices(counts["synth"]), value=DEFAULT_SOURCE, label="Source")
            folder = gr.Textbox(label="Folder (inside the workspace)", visible=False,
                                placeholder="e.g. uploads/my_recordings (holding metadata.csv and wavs/)")
        with gr.Column(scale=1):
            name = gr.Textbox(value=DEFAULT_NAMES[DEFAULT_SOURCE], label="Corpus name",
                              info="becomes workspace/data/<name>")
            num = gr.Number(value=counts[DEFAULT_SOURCE], precision=0, minimum=1, maximum=100_000,
                            label="Number of utterances",
                            info=f"the synthetic corpus's {counts['synth']:,} is what a model needs to speak new text")
            seed = gr.Number(value=0, precision=0, label="Seed")
    build = gr.Button("Build corpus", variant="primary")
    with gr.Row():
        # Custom values are allowed (API callers, folders made outside the app): the handlers check them.
        corpus = gr.Dropdown(corpora, value=corpora[0] if corpora else None, label="Corpora in the workspace",
                             allow_custom_value=True, scale=3)
        refresh = gr.Button("↻ Refresh", scale=0, min_width=100)
        force = gr.Checkbox(False, label="rebuild even if fresh", scale=0, min_width=160)
        prepare = gr.Button("Prepare", scale=0, min_width=100)
    summary = gr.Markdown("Build a corpus, or pick one above.")
    clips = gr.Dataframe(headers=CLIP_COLUMNS, label=f"A few clips (first {SHOWN_CLIPS})", interactive=False,
                         wrap=True, max_height=400, column_widths=CLIP_COLUMN_WIDTHS)
    with gr.Row():
        clip = gr.Dropdown([], label="Clip to play", allow_custom_value=True, scale=1)
        audio = gr.Audio(type="filepath", label="Clip", interactive=False, scale=2)
    problems = gr.Dataframe(headers=PROBLEM_COLUMNS, label="Problems found (dropped clips and why)",
                            interactive=False, wrap=True, max_height=300)

    def view_outputs(view: CorpusView) -> tuple:
        return (view.summary, view.clips, view.problems,
                gr.Dropdown(choices=view.clip_ids, value=view.clip_ids[0] if view.clip_ids else None),
                view.audio)

    def on_source(choice: str) -> tuple:
        return (gr.Textbox(visible=choice == "folder"),
                gr.Textbox(value=DEFAULT_NAMES.get(choice, choice), interactive=choice != "ljspeech"),
                gr.Number(value=counts[choice], visible=True) if choice in counts
                else gr.Number(visible=False))

    def on_build(source: str, name: str, num: float, folder: str, seed: float, force: bool,
                 progress: gr.Progress = gr.Progress()) -> tuple:
        report = lambda fraction, message: progress(fraction, desc=message)  # noqa: E731
        view = guarded("Building the corpus", build_corpus, ws, preset, overrides, source, name,
                        int(num or 0), folder or "", int(seed or 0), report, force=bool(force))
        _warn_about(ws, view)
        choices = ws.list_corpora()
        return (gr.Dropdown(choices=choices, value=view.name), *view_outputs(view))

    def on_show(name: str | None) -> tuple:
        if not name:
            return ("Build a corpus, or pick one above.", None, None, gr.Dropdown(choices=[], value=None), None)
        return view_outputs(guarded("Reading the corpus", corpus_view, ws, name))

    def on_prepare(name: str | None, force: bool, progress: gr.Progress = gr.Progress()) -> tuple:
        if not name:
            raise gr.Error("Pick a corpus to prepare first.")
        report = lambda fraction, message: progress(fraction, desc=message)  # noqa: E731
        view = guarded("Preparing the corpus", prepare_existing, ws, preset, overrides, name, bool(force), report)
        _warn_about(ws, view)
        return view_outputs(view)

    def on_clip(name: str | None, clip_id: str | None) -> str | None:
        if not name or not clip_id:
            return None
        return guarded("Loading the clip", clip_audio_path, ws, name, clip_id)

    def on_table_select(name: str | None, evt: gr.SelectData) -> tuple:
        row = evt.row_value or []
        clip_id = str(row[0]) if row else None
        return gr.Dropdown(value=clip_id), on_clip(name, clip_id)

    def on_refresh(current: str | None) -> gr.Dropdown:
        choices = ws.list_corpora()
        return gr.Dropdown(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    source.change(on_source, source, [folder, name, num], api_visibility="private")
    view_out = [summary, clips, problems, clip, audio]
    # one progress bar, on the summary, not one on each of the six outputs
    built = build.click(on_build, [source, name, num, folder, seed, force], [corpus, *view_out],
                        api_name="build_corpus", concurrency_limit=1, concurrency_id="corpus_build",
                        show_progress_on=summary)
    corpus.input(on_show, corpus, view_out, api_name="show_corpus")
    prepare.click(on_prepare, [corpus, force], view_out, api_name="prepare_corpus",
                  concurrency_limit=1, concurrency_id="corpus_build", show_progress_on=summary)
    clip.input(on_clip, [corpus, clip], audio, api_name="clip_audio")
    clips.select(on_table_select, corpus, [clip, audio], api_visibility="private")
    refresh.click(on_refresh, corpus, corpus, api_name="list_corpora")
    return DataTab(corpus=corpus, built=built, refresh=on_refresh)


def _warn_about(ws: Workspace, view: CorpusView) -> None:
    """Non-fatal things a person should know after a build (shown as a yellow toast)."""
    source = read_source(ws.corpus_dir(view.name)) or {}
    if source.get("engine") == "tones":
        gr.Warning("eSpeak NG could not load: the dummy corpus is made of tones, not speech "
                   "(reinstall espeakng-loader for spoken clips).")
    if len(view.problems):
        gr.Warning(f"{len(view.problems)} clip(s) were dropped; the table at the bottom says why.")
