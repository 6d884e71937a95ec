"""The Train tab: start, stop and resume a training stage, or the full recipe (every stage in order in one
time budget), in a child process, and watch it live (a recipe: one progress line per stage).

Every handler returns at once: training runs in the job runner's child process, and a gr.Timer
reads its metrics.jsonl, train.log and job.json every two seconds (any browser tab, after a reload
or an app restart, shows the same run). API endpoints: /start_training, /resume_training,
/stop_training, /training_status, /training_lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import pandas as pd

from ira.config import PRESETS, STAGE_SECTIONS, ConfigError, IRAConfig, load_config
from ira.cli import TRAIN_STAGES
from ira.checkpoint import CheckpointError, checkpoint_figure, latest_path, read_header, read_metadata
from ira.eval.card import SPEAKING_STAGES, Card, CardError, read_card, wav_path
from ira.training.recipe import (BUDGET_SHARES, DEFAULT_MINUTES, PREPARING, SPEAKING, STAGE_NAMES, STATE_FILE,
                                 RecipeState)
from ira.training.recipe import training_clips as corpus_training_clips
from ui.data_tab import guarded
from ui.page_words import page_words
from ui.runner import (JOB_FILE, RECIPE_STAGE, JobError, JobRecord, JobRunner, JobStatus, format_eta,
                       recipe_command, shell_quote, train_command)
from ui.workspace import Workspace, WorkspaceError, check_name


ALL_STAGES = (("Voice style encoder", "style"), ("1 · SpeechLM pre-training", "1"),
              ("2 · Adapter alignment (distillation)", "2"), ("3 · Behaviour alignment (PPO)", "3"))
STAGES = tuple((label, stage) for label, stage in ALL_STAGES if stage in TRAIN_STAGES)
"""The stages `ira train` offers in this version."""
RECIPE = RECIPE_STAGE
RECIPE_CHOICE = ("Full recipe · every stage in order, in one time budget", RECIPE)
"""The Stage radio's last entry: `ira train --recipe full` (style encoder, 1, 2, 3, each from the one before)."""
RECIPE_RUN = "recipe"
FOLLOW = ("the stage running now", "")
"""The stage picker's first choice: a recipe's plots follow its running stage (else the last that ran)."""
PREREQUISITE = {"1": "style", "2": "1", "3": "2"}
"""The stage whose checkpoint a stage starts from (optional for stage 1, required for 2 and 3)."""
REQUIRED = ("2", "3")
NONE = "(none)"
REFRESH_S = 2.0
LOG_LINES = 12
MAX_POINTS = 1500
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg"}
NOT_PLOTTED = {"time", "step", "epoch", "stage", "split", "event"}
PLOT_COLUMNS = ["step", "value", "series"]
AXIS_FORMATS = {"x_axis_format": ".6~g", "y_axis_format": ".4~g"}
"""d3 formats of the plots' ticks: at most 4 significant digits, trailing zeros trimmed (a single point's axis
spans a tiny range, which the default labels with six decimals)."""
_PLOT_FORMAT = gr.LinePlot(x="step", y="value", color="series", render=False)   # formats frames for plot_value


# ------------------------------------------------------------------------------- pure helpers


def form_defaults(cfg: IRAConfig, stage: str) -> tuple[int, int, int, float]:
    """(epochs, max steps (0: by epochs), batch size, learning rate) the form starts with for `stage`."""
    section = STAGE_SECTIONS.get(stage)
    tc = cfg.training
    if section is not None:
        own = getattr(cfg, section)
        return tc.num_epochs, own.max_steps or 0, own.batch_size, own.learning_rate
    return tc.num_epochs, tc.max_steps or 0, tc.batch_size, tc.learning_rate


def training_overrides(ws: Workspace, stage: str, corpus: str, run: str, epochs: float, max_steps: float,
                       batch_size: float, learning_rate: float, base: list[str]) -> list[str]:
    """The `--set` list for a run: corpus, output folder and the form's numbers (paths as YAML strings)."""
    steps = int(max_steps or 0)
    section = STAGE_SECTIONS.get(stage, "training")
    items = [*recipe_overrides(ws, corpus, run, base),
             f"training.num_epochs={int(epochs or 0)}",
             f"{section}.batch_size={int(batch_size or 0)}",
             f"{section}.learning_rate={float(learning_rate or 0)!r}"]
    if section == "training":
        items.append(f"training.max_steps={steps if steps > 0 else 'null'}")
    elif steps > 0:   # a stage with its own section: 0 keeps the preset's step budget (or its clock)
        items.append(f"{section}.max_steps={steps}")
    return items


def recipe_overrides(ws: Workspace, corpus: str, run: str, base: list[str]) -> list[str]:
    """The `--set` list of a full recipe (and the start of a stage's): the corpus and the run's folder; every
    other number is the preset's, per stage."""
    if not corpus:
        raise ValueError("choose a corpus (build one in the Data tab first)")
    corpus_dir = ws.existing_corpus(corpus)
    return [*base, f"data.dir={json.dumps(str(corpus_dir))}",
            f"training.output_dir={json.dumps(str(ws.run_dir(run)))}"]


def recipe_minutes(value: Optional[float]) -> float:
    """The form's 'Budget (minutes)' as the recipe's budget; a missing or non-positive one is a clear error."""
    if value is None or not float(value) > 0:
        raise ValueError(f"Budget (minutes) must be more than 0 (the whole recipe's wall-clock time, split "
                         f"across its stages), got {value!r}: enter e.g. {DEFAULT_MINUTES:g}")
    return float(value)


STARTS_FROM = {"1": ("style", "1"), "2": ("1", "2", "3"), "3": ("2", "3")}
"""The checkpoints a run of a stage can start from: what `ira train --resume_checkpoint` accepts (the previous
stage's, or the same stage's to continue it), checked before launching."""


def check_job_paths(ws: Workspace, run_name: str, cfg: IRAConfig) -> None:
    """What a job will read and write stays inside the workspace: its corpus (`data.dir`, which a stage prepares
    first), its run folder (log, job record, the checkpoint Resume continues from) and its output folder
    (`training.output_dir`, the same unless a job record says otherwise: metrics, checkpoints, samples); a link
    out of the workspace in any of them is refused before the job starts, and named."""
    corpus = Path(cfg.data.dir)
    ws.check_folder(corpus, f"corpus '{corpus.name}'")
    ws.check_folder(ws.run_dir(run_name), f"run '{run_name}'")
    ws.check_folder(cfg.training.output_dir, f"the output folder of run '{run_name}' (training.output_dir)")


def check_before_launch(ws: Workspace, stage: str, corpus: str, batch_size: float, start_checkpoint: Optional[Path]
                        ) -> None:
    """The mistakes that would otherwise surface only in the child's log ("FAILED · exit code 1"): a
    checkpoint of the wrong stage, a batch larger than the prepared corpus's training split."""
    if start_checkpoint is not None and stage in STARTS_FROM:
        try:
            found = read_header(start_checkpoint).stage
        except CheckpointError as exc:
            raise ValueError(f"'Start from checkpoint': {exc}") from exc
        if found not in STARTS_FROM[stage]:
            wanted = " or ".join(f"stage {s}" if s != "style" else "the voice style encoder" for s in STARTS_FROM[stage])
            raise ValueError(f"'Start from checkpoint' is a stage-{found} checkpoint ({ws.relative(start_checkpoint)}), "
                             f"but stage {stage} starts from {wanted}: pick one of those")
    train_clips = training_clips(ws, corpus)
    if train_clips is not None and int(batch_size or 0) > train_clips:
        raise ValueError(f"Batch size {int(batch_size)} is larger than corpus '{corpus}' ({train_clips} training "
                         f"clips): set Batch size to {train_clips} or less, or build a larger corpus")


def training_clips(ws: Workspace, corpus: str) -> Optional[int]:
    """The training split's size of a prepared corpus; None before it is prepared (training prepares it and
    checks the batch itself)."""
    return corpus_training_clips(ws.corpus_dir(corpus))


@dataclass
class RunSettings:
    """What a run was started with (its job record's command): the form shows it on re-attach, and Resume
    continues with it, never with whatever the form holds then."""
    stage: str
    preset: str
    sets: list[str]             # every --set of the command, the app's own overrides included
    corpus: Optional[str]
    epochs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    start_checkpoint: Optional[str]
    minutes: Optional[float] = None   # a full recipe's budget


def run_settings(ws: Workspace, run_name: str) -> Optional[RunSettings]:
    """The settings run `run_name` was started with, read from `runs/<name>/job.json`; None without a record."""
    try:
        ws.checked(ws.run_dir(run_name) / JOB_FILE, "the job record")
        record = JobRecord.load(ws.run_dir(run_name))
    except (JobError, ValueError):   # a WorkspaceError too: a job.json linked from outside is not read
        return None
    if record is None or "--config" not in record.command:
        return None
    command = record.command
    preset = command[command.index("--config") + 1]
    sets = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--set"]
    start = command[command.index("--resume_checkpoint") + 1] if "--resume_checkpoint" in command else None
    try:
        if preset not in PRESETS:   # a config file (the app records preset names): read only inside the workspace
            ws.checked(preset, "the run's config file")
        cfg = load_config(preset, sets)
        minutes = float(command[command.index("--minutes") + 1]) if "--minutes" in command else None
    except (ConfigError, ValueError, IndexError):   # a WorkspaceError too
        return None
    epochs, steps, batch, lr = form_defaults(cfg, record.stage)
    data_dir = Path(cfg.data.dir)
    corpus = data_dir.name if data_dir.parent == ws.data_dir else None
    return RunSettings(stage=record.stage, preset=preset, sets=sets, corpus=corpus, epochs=epochs, max_steps=steps,
                       batch_size=batch, learning_rate=lr, minutes=minutes,
                       start_checkpoint=ws.relative(start) if start and Path(start).name.startswith(
                           f"stage{PREREQUISITE.get(record.stage, '')}_") else None)


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric values by dotted name; validation rows' `val_` prefix is dropped (val_loss -> loss),
    so that a metric's train and val curves share one name and one plot."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key in NOT_PLOTTED:
            continue
        if not prefix and row.get("split") == "val" and key.startswith("val_"):
            key = key[len("val_"):]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _thin(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """At most MAX_POINTS per series (every k-th point, and always the last)."""
    if len(points) <= MAX_POINTS:
        return points
    k = -(-len(points) // MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def plot_value(frame: pd.DataFrame) -> Optional[dict[str, Any]]:
    """What a training plot is sent for `frame` (columns PLOT_COLUMNS): None while it has no point (a plot
    first sent an empty frame never draws the lines of later updates in Gradio 6), drawn as points while a
    series has a single one (Vega-Lite draws no line through one point: a short run's first validation
    would be an empty box), else as lines. A dict passes through the LinePlot's postprocess as it is."""
    if not len(frame):
        return None
    data = _PLOT_FORMAT.postprocess(frame).model_dump()
    if (frame["series"].value_counts() == 1).any():
        data["mark"] = "point"
    return data


def metric_frames(rows: list[dict[str, Any]], stage: Optional[str], metric: Optional[str]
                  ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(loss vs step for train and val, `metric` vs step, every other metric name) from metrics rows."""
    series: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for row in rows:
        if "event" in row or row.get("split") not in ("train", "val") or not isinstance(row.get("step"), int):
            continue
        if stage is not None and str(row.get("stage")) != str(stage):
            continue
        for key, value in _flatten(row).items():
            series.setdefault((key, row["split"]), []).append((row["step"], value, row["split"]))
    names = sorted({key for key, _ in series if key != "loss"})
    if metric not in names:
        metric = default_metric(names, stage)

    def frame(key: Optional[str]) -> pd.DataFrame:
        points = [p for split in ("train", "val") for p in _thin(series.get((key, split), []))]
        # Typed even when empty: an untyped empty frame is sent as "nominal" axes, and the browser's
        # plot keeps those axis types after the first points arrive (no line, labels as categories).
        return pd.DataFrame(points, columns=PLOT_COLUMNS).astype({"step": "int64", "value": "float64"})

    return frame("loss"), frame(metric), names


def plots_note(stage: Optional[str], has_loss: bool, has_metric: bool, active: bool) -> str:
    """What stands in for a plot with no point: a chart is shown only with data of the chosen stage (an empty
    "reward" chart after a recipe or a stage-1 run read as a broken plot), and this says why one is missing; ""
    when both have points, or when no stage is known (no run yet: the status says so)."""
    if has_loss and has_metric or stage is None:
        return ""
    name = STAGE_NAMES.get(str(stage)) or ("the full recipe" if stage == RECIPE else f"stage {stage}")
    if not has_loss and not has_metric:
        if active:
            return f"No curves for {name} yet: they begin with its first training steps."
        return f"No curves for {name}: it logged no training step."
    missing, shown = ("loss", "other figures are") if not has_loss else ("other figure", "loss is")
    return f"{name[0].upper()}{name[1:]} logs no {missing}: only its {shown} plotted."


QUALITY_METRICS = {"style": "top5", "1": "wer", "2": "choice_accuracy", "3": "reward_semantic"}
"""The figure each stage is judged by, plotted first when the run logs it (the style encoder: held-out
clips found among their description's five nearest; stage 1: the held-out word
error rate heard by the offline ASR; stage 2: the LLM's 4-way choice accuracy from audio alone; stage 3:
the judge's semantic reward, on the rollouts and on held-out texts)."""


METRIC_LABELS = {
    "top5": "voices found among the 5 nearest (held-out, top-5)", "top1": "voices found first (held-out, top-1)",
    "desc_match": "descriptions matched (held-out)", "attr_match": "voice attributes matched (held-out)",
    "wer": "word error rate heard by the ASR (held-out)", "cer": "character error rate heard by the ASR (held-out)",
    "length_rel_error": "length error of the speech (held-out)",
    "choice_accuracy": "the LLM's 4-way choice from audio alone (accuracy)",
    "repeat_cer": "the LLM repeating what was said (character error rate)",
    "judge_margin": "the judge's margin for the right text", "kd_loss": "distillation loss (KL to the teacher)",
    "ce_loss": "transcript cross-entropy",
    "reward": "reward (the sum PPO maximises)", "reward_semantic": "reward: the LLM judge",
    "reward_asr": "reward: the ASR", "reward_phonemes": "reward: the phoneme reader", "reward_style": "reward: the voice",
    "asr_wer": "word error rate heard by the evaluation ASR (held-out)", "kl": "KL to the reference model",
    "lr": "learning rate", "grad_norm": "gradient norm",
}
"""The metrics named in words in the plot's choice, in this order; every other logged figure (approx_kl,
memory.rss_mb, ce_cb0...) is listed by its raw name behind "more"."""


def metric_choices(names: list[str], every: bool = False) -> list[tuple[str, str]]:
    """(label, name) of the metrics to offer: the named ones that were logged, in METRIC_LABELS's order, then with
    `every` the others by their raw names."""
    named = [(label, key) for key, label in METRIC_LABELS.items() if key in names]
    raw = [(name, name) for name in names if name not in METRIC_LABELS] if every else []
    return named + raw


def default_metric(names: list[str], stage: Optional[str] = None) -> Optional[str]:
    """The stage's quality figure when logged, else the first stage-specific metric (not lr, grad norm,
    throughput or memory), else lr."""
    if QUALITY_METRICS.get(str(stage)) in names:
        return QUALITY_METRICS[str(stage)]
    generic = ("lr", "grad_norm", "throughput.", "memory.")
    specific = [n for n in names if not n.startswith(generic) and n not in generic]
    return specific[0] if specific else ("lr" if "lr" in names else (names[0] if names else None))


def status_markdown(ws: Workspace, status: JobStatus, eta_s: Optional[float] = None) -> str:
    """The run's headline (state, stage, step, ETA, learning rate), its message and last checkpoint. A full
    recipe's ETA is `eta_s` (`recipe_eta`: the budget left), and its step has no total (its time budget ends each
    stage, not a step count)."""
    parts = [f"**{status.state.upper()}**"]
    recipe = status.stage == RECIPE
    if recipe:
        parts.append("full recipe")
        if status.recipe_stage:
            parts.append(STAGE_NAMES[status.recipe_stage])
    elif status.stage:
        parts.append(f"stage {status.stage}")
    if status.step is not None:
        total = f" / {status.total_steps}" if status.total_steps and not recipe else ""
        percent = f" ({100 * status.step / status.total_steps:.0f} %)" if total else ""
        parts.append(f"step {status.step}{total}{percent}")
    if status.active:
        parts.append(f"ETA {format_eta(eta_s if recipe else status.eta_s)}")
    if status.lr is not None:
        parts.append(f"lr {status.lr:.2e}")
    lines = [f"### Run `{status.name}`", " · ".join(parts), "", page_words(status.message, ws.root)]
    if status.last_checkpoint:
        lines.append(f"\nLast checkpoint: `{ws.relative(status.last_checkpoint)}`")
    return "\n".join(lines)


READY_WORDS = "getting it ready (data, models, caches) and its final validation are not counted in its budget"


@dataclass
class StageClock:
    """One recipe stage's minutes as its budget counts them."""
    used: float                  # minutes of its budget spent (a running stage: of training since it began)
    left_s: Optional[float]      # seconds of it left while it runs or waits; None once it ended
    getting_ready: bool = False  # running, but its training has not begun (loading, caches): its clock waits
    ready_min: float = 0.0       # minutes this run of it spent getting ready (not in `used`)


def stage_clock(record: Any, status: Optional[JobStatus], running: bool, now: float) -> StageClock:
    """The budget clock of a recipe stage (`record`, a StageRecord). A stage's time budget counts from its
    training's start (the engine's clock), so the minutes spent getting it ready are shown apart, not as budget
    spent; a running stage's steps may end it before its budget does (the nearer ETA wins)."""
    if not running:
        left = max(0.0, record.minutes - record.minutes_used) * 60.0 if record.status in ("pending", "stopped") \
            else None
        return StageClock(record.minutes_used, left)
    here = status is not None and status.recipe_stage == record.stage
    begun = status.training_started if here else None
    started = record.started or now
    if begun is None or begun < started - 1.0:   # no training yet in this run of it: getting ready
        return StageClock(record.minutes_used, max(0.0, record.minutes - record.minutes_used) * 60.0,
                          getting_ready=True, ready_min=max(0.0, now - started) / 60.0)
    used = record.minutes_used + max(0.0, now - begun) / 60.0
    left = max(0.0, (record.minutes - used) * 60.0)
    if here and status.eta_s is not None:
        left = min(left, status.eta_s)
    return StageClock(used, left, ready_min=max(0.0, begun - started) / 60.0)


def recipe_eta(state: Optional[RecipeState], status: Optional[JobStatus] = None, now: Optional[float] = None
               ) -> Optional[float]:
    """Seconds of budget the recipe has left: the running stage's and every stage still to run (getting each
    ready adds to it); None without a state."""
    if state is None:
        return None
    now = time.time() if now is None else now
    active = status is None or status.active or status.state == "idle"
    left = [stage_clock(r, status, r.status == "running" and active, now).left_s for r in state.stages]
    return sum(x for x in left if x is not None)


def recipe_progress_markdown(state: Optional[RecipeState], status: Optional[JobStatus] = None,
                             relative: Callable[[str], str] = str, now: Optional[float] = None,
                             resolve: Callable[[str], Path] = Path) -> str:
    """One line per stage of a recipe from its recipe.json: its name, status, minutes used of its budget (one
    clock: `stage_clock`), its handed-over checkpoint once done with the figure it was chosen by (read from the
    file's header at `resolve(path)`) and, for the stage running now, its step and the ETA its budget gives, or
    that it is getting ready. A stage past its share says why. "" without a state (`ui.runner.recipe_state`: not
    a recipe, or unreadable).

    A stage recipe.json still calls "running" after the app's job ended (killed) is shown as stopped."""
    if state is None:
        return ""
    now = time.time() if now is None else now
    active = status is None or status.active or status.state == "idle"   # idle: no job record here to ask
    used_total = 0.0
    lines = []
    for record in state.stages:
        running = record.status == "running" and active
        clock = stage_clock(record, status, running, now)
        used_total += clock.used
        word = record.status if record.status != "running" or active else "stopped (its process ended)"
        parts = [STAGE_NAMES[record.stage], f"**{word}**", f"{clock.used:.1f} / {record.minutes:g} min"]
        if running and clock.getting_ready:
            parts.append(f"getting ready for {clock.ready_min:.1f} min (data, models, caches: its budget starts "
                         "with its training)")
        elif running:
            if status is not None and status.step is not None:
                parts.append(f"step {status.step}")
            parts.append(f"ETA {format_eta(clock.left_s)}")
            if clock.ready_min >= 0.1:
                parts.append(f"+ {clock.ready_min:.1f} min getting ready")
        elif record.status == "done" and record.minutes_used > record.minutes + 0.05:
            parts.append(f"over its share by {record.minutes_used - record.minutes:.1f} min: {READY_WORDS}")
        if record.status == "done" and record.checkpoint:
            parts.append(f"`{relative(record.checkpoint)}`")
            try:
                figure = checkpoint_figure(read_metadata(resolve(record.checkpoint)))
            except (CheckpointError, WorkspaceError):   # moved, deleted or linked outside: the line says what it can
                figure = ""
            if figure:
                parts.append(figure)
        lines.append("- " + " · ".join(parts))
    shares = " / ".join(f"{100 * BUDGET_SHARES[r.stage]:.0f}" for r in state.stages)
    head = (f"**Full recipe** · {used_total:.1f} of {state.minutes:g} min used (split {shares} % across the "
            f"stages)")
    if active and any(r.status != "done" for r in state.stages):
        head += f" · ETA {format_eta(recipe_eta(state, status, now))} (the budget left; getting each stage ready adds to it)"
    if used_total > state.minutes + 0.05:
        head += (f" · over the budget by {used_total - state.minutes:.1f} min: each stage's budget counts its "
                 "training; getting it ready (data, models, caches) and its final validation come on top")
    return "\n".join([head, "", *lines])


ONE_TIME_PHASES = (SPEAKING, PREPARING)


def one_time_markdown(log: str) -> str:
    """What a recipe does before its first stage (no recipe.json yet): speaking the corpus, then preparing it
    (checking, annotating, fitting the codec, caching the tokens), with the newest progress line of that phase
    from its log; its minutes are not part of the budget."""
    lines = [line.strip() for line in log.splitlines() if line.strip().startswith(ONE_TIME_PHASES)]
    now = f": {lines[-1]}" if lines else ""
    return (f"**Full recipe** · one-time preparation before its first stage (not counted in the budget){now}")


@dataclass
class StageCard:
    """A done speaking stage of a recipe and its card (or why there is none to show)."""
    stage: str
    path: Optional[Path]          # card.json
    card: Optional[Card]
    problem: str = ""


def stage_cards(state: Optional[RecipeState], resolve: Callable[[str], Path] = Path) -> list[StageCard]:
    """The cards of a recipe's done speaking stages, in stage order, from its state and each stage's
    card.json (files only: the timer calls it). [] without a state (not a recipe).
    `resolve` turns a path recorded in recipe.json into one to open (a relative one is the job's)."""
    if state is None:
        return []
    cards = []
    for record in state.stages:
        if record.status != "done" or record.stage not in SPEAKING_STAGES:
            continue
        if record.card_error:
            cards.append(StageCard(record.stage, None, None, f"no card: {record.card_error}"))
        elif not record.card:
            cards.append(StageCard(record.stage, None, None, "no card yet: it is made right after the stage "
                                                             "(Resume makes a missing one)"))
        else:
            try:
                path = resolve(record.card)
            except WorkspaceError as exc:   # a card outside the workspace is not read
                cards.append(StageCard(record.stage, None, None, str(exc)))
                continue
            try:
                cards.append(StageCard(record.stage, path, read_card(path)))
            except CardError as exc:
                cards.append(StageCard(record.stage, path, None, str(exc)))
    return cards


def _cell(text: Optional[str], empty: str = "—") -> str:
    """Text as one markdown table cell: on one line, with markdown's and the table's characters escaped
    (an LLM's answer may hold `|`, `*` or `<`)."""
    if text is None:
        return empty
    text = " ".join(text.split())
    if not text:
        return "(nothing)"
    return "".join("\\" + ch if ch in "\\`*_[]<>|#~" else ch for ch in text)


def card_markdown(entry: StageCard, relative: Callable[[str], str] = str) -> str:
    """One stage's card: a heading (stage, step, the ASR's WER), a table sentence | what the ASR heard |
    what the LLM answered, and the card's notes (no ASR here, no adapter in stage 1...)."""
    head = f"#### {STAGE_NAMES[entry.stage]}"
    card = entry.card
    if card is None:
        return f"{head}\n\n_{_cell(entry.problem)}_"
    wer = f" · ASR WER {card.wer:.2f}" if card.wer is not None else ""
    lines = [f"{head} · step {card.step}{wer} · `{relative(card.checkpoint)}`", "",
             "| # | sentence | what the ASR heard | what the LLM answered |", "|---|---|---|---|"]
    for i, item in enumerate(card.items, start=1):
        heard = _cell(item.asr_heard)
        if item.wer is not None:
            heard += f" (WER {item.wer:.2f})"
        lines.append(f"| {i} | {_cell(item.sentence)} | {heard} | {_cell(item.llm_answered)} |")
    notes = [card.asr_note, card.llm_note, *(f"{i}: {item.note}" for i, item in enumerate(card.items, 1)
                                             if item.note)]
    lines += [f"\n_{_cell(note)}_" for note in notes if note]
    return "\n".join(lines)


def cards_markdown(cards: list[StageCard], relative: Callable[[str], str] = str) -> str:
    """The cards of a recipe's done stages, or "" when there is none (not a recipe, no stage done yet)."""
    if not cards:
        return ""
    intro = ("### What each stage's checkpoint says\nThree held-out sentences spoken by the checkpoint each "
             "stage handed over: what the offline ASR heard and, from stage 2 on, what the LLM answered when "
             "asked to repeat the same audio word for word. Play them in \"Audio samples\".")
    return "\n\n".join([intro, *(card_markdown(entry, relative) for entry in cards)])


def card_audio_choices(cards: list[StageCard]) -> list[tuple[str, str]]:
    """(label, wav path) of every card's audio, labelled with its stage and sentence, for the samples player."""
    choices = []
    for entry in cards:
        if entry.card is None or entry.path is None:
            continue
        for i, item in enumerate(entry.card.items, start=1):
            path = wav_path(entry.path, item)
            if path is not None:
                choices.append((f"card · {STAGE_NAMES[entry.stage]} · {i}: {item.sentence}", str(path)))
    return choices


AUDIO_SAMPLE_STAGES = ("1",)
"""The stages whose validations write audio samples (stage 2 writes the LLM's replies, stage 3 the judge's, the
style encoder nothing): the samples player's note speaks of these only."""


def samples_note(status: JobStatus, have_samples: bool) -> str:
    """When a stage-1 run's audio samples come, in words: each validation speaks them, every `eval_every` steps
    (the engine's start event) and at the run's end, so the note names the step of the next one and, at the run's
    pace, about when; a run whose end (its steps or its time budget) comes first gets them at its end. A run that
    stopped before its next validation says so. "" once there are samples, for a stage that writes none, or while
    nothing is known."""
    stage = status.recipe_stage or status.stage
    if have_samples or stage not in AUDIO_SAMPLE_STAGES:
        return ""
    every, step = status.eval_every, status.step
    if step is None:
        return "none yet: they come with its first validation, once its training has begun" if status.active else ""
    next_step = (step // every + 1) * every if every else None
    if not status.active:
        if status.state != "stopped" or next_step is None:
            return ""
        return (f"none: the run stopped at step {step}, before the validation at step {next_step} that speaks "
                "them; Resume goes on to it")
    if next_step is None:
        return "none yet: they come with the first validation"
    wait = (next_step - step) / status.steps_per_s if status.steps_per_s else None
    if status.eta_s is not None and (wait is None or status.eta_s <= wait):
        return (f"none yet: they come with the validation at the run's end, in about {format_eta(status.eta_s)} "
                f"(it ends before step {next_step})")
    when = f", in about {format_eta(wait)} at this pace" if wait is not None else ""
    return (f"none yet: they come with the validation at step {next_step}{when} (one every {every} steps, and one "
            "at the run's end)")


def resumable(ws: Workspace, run_name: str) -> bool:
    """Whether run `run_name` has something Resume continues from: a full recipe's recipe.json, or a stage's
    latest checkpoint (checked inside the workspace: a link out of it is not offered)."""
    try:
        run_dir = ws.run_dir(run_name)
    except (WorkspaceError, ValueError):
        return False
    return ((run_dir / STATE_FILE).is_file() or any(run_dir.glob("stage*_latest.safetensors"))) and ws.inside(run_dir)


def prerequisite_choices(ws: Workspace) -> list[tuple[str, str]]:
    """(label, path) of every readable checkpoint, after (none)."""
    return [(NONE, NONE), *ws.distinct_checkpoints()]


def default_prerequisite(ws: Workspace, stage: str) -> str:
    """The best checkpoint of the newest run of the stage `stage` needs (stages 2 and 3), or (none): a line of the
    checkpoint list (`Workspace.distinct_checkpoints`)."""
    wanted = PREREQUISITE.get(stage)
    if wanted is None or stage not in REQUIRED:
        return NONE
    for _, path in ws.distinct_checkpoints():   # newest run first, its best first
        if Path(path).name.startswith(f"stage{wanted}_"):
            return path
    return NONE


# ------------------------------------------------------------------------------------- the tab


@dataclass
class TrainTab:
    stage: gr.Radio
    corpus: gr.Dropdown
    prerequisite: gr.Dropdown
    refresh_lists: Any           # fn(corpus, prerequisite, stage) -> (corpus dropdown, prerequisite dropdown)


def build_train_tab(demo: gr.Blocks, ws: Workspace, runner: JobRunner, preset: str,
                    overrides: list[str]) -> TrainTab:
    """Lay out the Train tab inside the current gr.Tab and wire its events."""
    n_epochs, n_steps, n_batch, lr = form_defaults(load_config(preset, overrides), "1")
    corpora = ws.list_corpora()
    with gr.Row():
        # the full recipe first: a newcomer's way from a corpus to every stage (the quick start's step 2)
        stage = gr.Radio([*STAGES, RECIPE_CHOICE], value=RECIPE, label="Stage", scale=3)
        run = gr.Textbox(value=RECIPE_RUN, label="Run name", info="output in workspace/runs/<name>", scale=1)
        preset_dd = gr.Dropdown(list(PRESETS), value=preset, label="Preset", scale=1)
    with gr.Row():
        # Custom values are allowed (API callers, files made outside the app): the handlers check them.
        corpus = gr.Dropdown(corpora, value=corpora[0] if corpora else None, label="Corpus (from the Data tab)",
                             allow_custom_value=True)
        prerequisite = gr.Dropdown(prerequisite_choices(ws), value=NONE, visible=False,
                                   label="Start from checkpoint (the previous stage)", allow_custom_value=True)
        # no minimum: a budget <= 0 gets the handler's message, which says what to enter
        budget = gr.Number(DEFAULT_MINUTES, label="Budget (minutes)", visible=True,
                           info="the whole recipe's time, split 5/50/30/15 % across the style encoder and "
                                "stages 1, 2, 3 (each with the preset's settings)")
        refresh = gr.Button("↻ Refresh lists", scale=0, min_width=120)
    with gr.Row(visible=False) as numbers_row:
        epochs = gr.Number(n_epochs, precision=0, minimum=1, label="Epochs")
        max_steps = gr.Number(n_steps, precision=0, minimum=0, label="Max steps (0: by epochs / the preset's)")
        batch_size = gr.Number(n_batch, precision=0, minimum=1, label="Batch size")
        learning_rate = gr.Number(lr, label="Learning rate")
    with gr.Row():
        # each enabled only when it can act (the status timer sets them: `button_states`)
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop", variant="stop", interactive=False)
        resume = gr.Button("Resume from the run's latest checkpoint", interactive=False)
    notice_md = gr.Markdown("")   # what the last Start / Resume did: the timer leaves it alone
    status_md = gr.Markdown("No run selected.")
    with gr.Accordion("The same run in a terminal", open=False):
        command_md = gr.Markdown("")
    with gr.Row():
        # a full recipe: whose curves to show (the stage running now unless one is picked); hidden otherwise
        shown_stage = gr.Dropdown([FOLLOW], value=FOLLOW[1], label="Plots of the stage", visible=False, scale=1)
        metric = gr.Dropdown([], label="Other metric", allow_custom_value=True, scale=2)
        every = gr.Checkbox(False, label="more: every logged figure, by its raw name", scale=1)
    plots_md = gr.Markdown("")   # says why a plot is hidden (`plots_note`): no chart is shown empty
    with gr.Row():   # shown by the status timer once they have points
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", x_title="step",
                                y_title="loss", height=300, visible=False, **AXIS_FORMATS)
        metric_plot = gr.LinePlot(x="step", y="value", color="series", x_title="step", height=300, visible=False,
                                  **AXIS_FORMATS)
    log_box = gr.Textbox(label="Log (train.log, last lines)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False,
                         autoscroll=True)
    with gr.Row():
        sample = gr.Dropdown([], label="Audio samples (latest validation; a recipe's cards)", allow_custom_value=True,
                             scale=1, info="")
        sample_audio = gr.Audio(type="filepath", label="Sample", interactive=False, scale=2)
    replies = gr.Dataframe(label="What the LLM answered (latest validation: stage 2's replies, stage 3's judge)",
                           visible=False, wrap=True, interactive=False)
    cards_md = gr.Markdown("")   # a full recipe: the card of each done stage (ira/eval/card.py)
    last_seen = gr.State(None)
    timer = gr.Timer(REFRESH_S)

    def refresh_lists(current_corpus: Optional[str] = None, current_prereq: Optional[str] = None,
                      stage_value: str = "1") -> tuple:
        names = ws.list_corpora()
        checkpoints = prerequisite_choices(ws)
        corpus_value = current_corpus if current_corpus in names else (names[0] if names else None)
        listed = [path for _, path in checkpoints]
        prereq_value = current_prereq if current_prereq in listed and current_prereq != NONE \
            else default_prerequisite(ws, stage_value)
        return (gr.Dropdown(choices=names, value=corpus_value),
                gr.Dropdown(choices=checkpoints, value=prereq_value))

    def launch_recipe(run_name: str, preset_value: str, corpus_name: str, minutes: Optional[float],
                      started: Optional[RunSettings], resume_run: bool) -> tuple[str, str, str]:
        """Start (or continue) the full recipe in runs/<run_name>: `ira train --recipe full` in the runner."""
        run_dir = ws.run_dir(run_name)
        state_path = run_dir / STATE_FILE
        if resume_run and not state_path.is_file():
            raise ValueError(f"run '{run_name}' has no full recipe to continue (no {STATE_FILE}); press Start "
                             "to begin it")
        if started is not None and started.minutes is not None:   # continue it as it was started
            preset_value, cfg_overrides, minutes = started.preset, started.sets, started.minutes
        else:
            if resume_run:   # a recipe started outside the app: its own budget, this form's corpus and preset
                minutes = RecipeState.load(state_path).minutes
            cfg_overrides = recipe_overrides(ws, corpus_name, run_name, overrides)
        minutes = recipe_minutes(minutes)
        cfg = load_config(preset_value, cfg_overrides)   # a bad value is a clear error now, not in the log
        check_job_paths(ws, run_name, cfg)
        if not resume_run:
            if state_path.is_file():
                raise ValueError(f"run '{run_name}' already holds a full recipe: press Resume to continue it where "
                                 "it stopped, or choose a new run name (nothing is overwritten)")
            if any(run_dir.glob("*.safetensors")):
                raise ValueError(f"run '{run_name}' holds a single-stage run: choose a new run name for the "
                                 "full recipe")
        command = recipe_command(preset_value, minutes, cfg_overrides)
        record = runner.start(run_name, RECIPE, command)
        verb = "Continued" if resume_run else "Started"
        kept = " with the settings it was started with" if started is not None else ""
        return (f"{verb} the full recipe in run `{run_name}` ({minutes:g} min, pid {record.pid}){kept}.",
                f"```\n{shell_quote(command)}\n```", run_name)

    def launch(stage_value: str, run_name: str, preset_value: str, corpus_name: str, prereq: str,
               n_epochs: float, steps: float, batch: float, lr: float, minutes: Optional[float],
               resume_run: bool) -> tuple[str, str, str]:
        run_dir = ws.run_dir(run_name)
        started = run_settings(ws, run_name) if resume_run else None
        recipe_run = (run_dir / STATE_FILE).is_file()
        if (started.stage == RECIPE if started is not None else stage_value == RECIPE or (resume_run and recipe_run)):
            return launch_recipe(run_name, preset_value, corpus_name, minutes, started, resume_run)
        if recipe_run:
            raise ValueError(f"run '{run_name}' holds a full recipe: choose 'Full recipe' to continue it, or a new "
                             "run name for one stage")
        if started is not None:   # Resume continues the run as it was started, whatever the form shows now
            stage_value, preset_value, cfg_overrides = started.stage, started.preset, started.sets
        else:
            cfg_overrides = training_overrides(ws, stage_value, corpus_name, run_name, n_epochs, steps, batch, lr,
                                               overrides)
        check_job_paths(ws, run_name, load_config(preset_value, cfg_overrides))   # bad values: clear errors now
        latest = latest_path(run_dir, stage_value)
        init = None
        if resume_run:
            if not latest.is_file():
                have = ", ".join(p.name for p in sorted(run_dir.glob("*.safetensors"))) or "no checkpoints"
                raise ValueError(f"run '{run_name}' has no {latest.name} to resume from ({have}); "
                                 "press Start to begin it")
        else:
            if latest.is_file():
                raise ValueError(f"run '{run_name}' already has {latest.name}: press Resume to continue it, "
                                 "or choose a new run name (nothing is overwritten)")
            if prereq and prereq != NONE:
                init = str(ws.resolve(prereq, must_exist=True))
            elif stage_value in REQUIRED:
                raise ValueError(f"stage {stage_value} starts from a stage-{PREREQUISITE[stage_value]} checkpoint: "
                                 "choose one in 'Start from checkpoint' (train that stage first)")
            check_before_launch(ws, stage_value, corpus_name, batch, Path(init) if init else None)
        command = train_command(stage_value, preset_value, cfg_overrides,
                                resume_checkpoint=str(latest) if resume_run else None, init_checkpoint=init)
        record = runner.start(run_name, stage_value, command)
        verb = "Resumed" if resume_run else "Started"
        kept = " with the settings it was started with" if started is not None else ""
        return (f"{verb} run `{run_name}` (stage {stage_value}, pid {record.pid}){kept}.",
                f"```\n{shell_quote(command)}\n```", run_name)

    def on_start(stage: str, run_name: str, preset: str, corpus: str, checkpoint: str, epochs: float,
                 max_steps: float, batch_size: float, learning_rate: float,
                 budget_minutes: Optional[float] = DEFAULT_MINUTES) -> tuple:
        return guarded("Starting training", launch, stage, run_name, preset, corpus, checkpoint, epochs,
                       max_steps, batch_size, learning_rate, budget_minutes, False)

    def on_resume(stage: str, run_name: str, preset: str, corpus: str, checkpoint: str, epochs: float,
                  max_steps: float, batch_size: float, learning_rate: float,
                  budget_minutes: Optional[float] = DEFAULT_MINUTES) -> tuple:
        return guarded("Resuming training", launch, stage, run_name, preset, corpus, checkpoint, epochs,
                       max_steps, batch_size, learning_rate, budget_minutes, True)

    def on_stop(run_name: str) -> str:
        """Stop the run's job; with none running, say so (a toast) and show the run as it is, never an error: the
        button is disabled then, so only a call through the API or a click racing the job's end gets here."""
        try:
            check_name(run_name, "run name")
            record = runner.record(run_name)
            if record is None or not runner.is_running(record):
                gr.Info(f"Nothing to stop: run '{run_name}' has no training running.")
                status = runner.status(run_name)
            else:
                status = runner.stop(run_name)
                gr.Info(f"Stop requested: run '{run_name}' finishes its step, writes a checkpoint and exits.")
            state = runner.recipe_state(ws.run_dir(run_name))
        except (JobError, ValueError) as exc:   # a WorkspaceError too: a run linked from outside
            raise gr.Error(str(exc), title="Stop", print_exception=False) from exc
        return with_recipe_progress(status, state)

    def button_states(run_name: str, status: Optional[JobStatus]) -> tuple[bool, bool, bool]:
        """(Start, Stop, Resume) enabled only when each can act: Start while no job runs, Stop while this run's job
        runs (not yet stopping), Resume while no job runs and this run has a checkpoint or a recipe to go on from."""
        busy = runner.active() is not None
        running = status is not None and status.state == "running"
        return not busy, running, not busy and resumable(ws, run_name)

    def with_recipe_progress(status: JobStatus, state: Optional[RecipeState]) -> str:
        """The status, and below it one line per stage when the run is a full recipe (`state`)."""
        text = status_markdown(ws, status, eta_s=recipe_eta(state, status))
        progress = recipe_progress_markdown(state, status, relative=workspace_path, resolve=job_path)
        if not progress and status.stage == RECIPE and status.active:
            progress = one_time_markdown(status.log_tail)
        return f"{text}\n\n{progress}" if progress else text

    def workspace_path(path: str) -> str:
        """A recipe.json path as the workspace shows it (a relative one is relative to the job's folder, the
        workspace root)."""
        return ws.relative(ws.root / path)

    def job_path(path: str) -> Path:
        """A path recorded by a job (recipe.json) to open (a relative one is relative to the workspace root),
        checked to be inside the workspace: else a WorkspaceError naming it."""
        return ws.checked(path, "the recipe's file")

    def on_tick(run_name: str, metric_name: Optional[str], seen: Any, shown: Optional[str] = FOLLOW[1],
                every_metric: bool = False) -> tuple:
        try:
            check_name(run_name, "run name")
        except ValueError:   # half-typed: nothing to show yet
            return (gr.skip(),) * len(tick_outputs)
        try:
            ws.run_dir(run_name)   # a run folder linked from outside the workspace is refused, and named
            status = runner.status(run_name)
            state = runner.recipe_state(run_name)   # read once a tick: the progress lines and the cards
            ran = [r.stage for r in state.stages if r.status != "pending"] if state is not None else []
            shown = shown if shown in ran else FOLLOW[1]
            rows = runner.metrics(run_name, stage=shown or None)
        except (JobError, WorkspaceError) as exc:   # a job.json, log or metrics file linked from outside: not read
            return unreadable_run(run_name, exc, seen)
        text = with_recipe_progress(status, state)
        buttons = button_states(run_name, status)
        cards = stage_cards(state, resolve=job_path)
        cards_text = cards_markdown(cards, relative=workspace_path)
        inside = [s for s in status.samples if ws.inside(s)]
        card_choices = [(label, path) for label, path in card_audio_choices(cards) if ws.inside(path)]
        note = samples_note(status, bool(inside or card_choices))
        key = [run_name, metric_name, shown, bool(every_metric), ran, len(rows), text, status.log_tail[-2000:],
               cards_text, buttons, [inside, card_choices, note]]
        if key == seen:
            return (gr.skip(),) * len(tick_outputs)
        watched = shown or status.recipe_stage or status.stage   # a recipe: its running stage unless one is picked
        loss_df, metric_df, names = metric_frames(rows, watched, metric_name)
        chosen = metric_name if metric_name in names else default_metric(names, watched)
        offered = metric_choices(names, bool(every_metric))
        if chosen is not None and chosen not in [name for _, name in offered]:   # a raw default: offered too
            offered.append((chosen, chosen))
        title = METRIC_LABELS.get(chosen or "", chosen or "metric")
        loss_value, metric_value = plot_value(loss_df), plot_value(metric_df)
        stage_choices = [FOLLOW, *((STAGE_NAMES[stage], stage) for stage in ran)]
        samples = [s for s in inside if Path(s).suffix.lower() in AUDIO_SUFFIXES]   # the player plays audio only
        texts = [s for s in inside if Path(s).suffix == ".jsonl"]
        # the latest validation's samples, then the cards' audio of a recipe's done stages
        sample_choices = [(Path(s).name, s) for s in samples] + card_choices
        seen_samples = seen[-1] if isinstance(seen, list) else None
        changed = [inside, card_choices, note] != seen_samples
        sample_update = (gr.Dropdown(choices=sample_choices, value=sample_choices[0][1] if sample_choices else None,
                                     info=note) if changed else gr.skip())
        replies_update = (gr.Dataframe(value=replies_table(texts[0]) if texts else None, visible=bool(texts))
                          if changed else gr.skip())
        note = plots_note(watched, loss_value is not None, metric_value is not None, status.active)
        return (text, gr.LinePlot(value=loss_value, visible=loss_value is not None),
                gr.Dropdown(choices=offered, value=chosen),
                gr.LinePlot(value=metric_value, title=title, y_title=chosen or "", visible=metric_value is not None),
                last_lines(status.log_tail, LOG_LINES), sample_update, replies_update, cards_text, key, gr.skip(),
                gr.skip(), gr.skip(), gr.Dropdown(choices=stage_choices, value=shown, visible=state is not None),
                note, *(gr.Button(interactive=on) for on in buttons))

    def unreadable_run(run_name: str, problem: Exception, seen: Any) -> tuple:
        """The tick's outputs for a run the app cannot read: the reason in the status, nothing else shown."""
        text = f"### Run `{run_name}`\n\n{problem}"
        busy = runner.active() is not None
        key = [run_name, text, busy]
        if key == seen:
            return (gr.skip(),) * len(tick_outputs)
        return (text, gr.LinePlot(value=None, visible=False), gr.Dropdown(choices=[], value=None),
                gr.LinePlot(value=None, visible=False), "",
                gr.Dropdown(choices=[], value=None), gr.Dataframe(value=None, visible=False), "", key, gr.skip(),
                gr.skip(), gr.skip(), gr.Dropdown(choices=[FOLLOW], value=FOLLOW[1], visible=False), "",
                gr.Button(interactive=not busy), gr.Button(interactive=False), gr.Button(interactive=False))

    def on_sample(path: Optional[str]) -> Optional[str]:
        return path if path and ws.inside(path) and Path(path).is_file() else None

    def on_load(stage_value: str, run_name: str) -> tuple:
        """A page load re-attaches to the running job, else shows the run started last, with the settings
        that run was started with (preset, corpus, checkpoint and numbers), not the form's defaults."""
        latest = runner.active() or runner.latest()
        if latest is not None:
            stage_value, run_name = latest.stage, latest.name
        return (stage_value, run_name, *started_form(run_name, stage_value, latest is not None))

    def started_form(run_name: str, stage_value: str, has_job: bool = True) -> tuple:
        """(corpus, checkpoint, preset, epochs, max steps, batch, learning rate, budget) as run `run_name` was
        started (skips where it has no job record): what the form shows on re-attach and after a Resume."""
        started = run_settings(ws, run_name) if has_job else None
        corpus_dd, prereq_dd = refresh_lists(started.corpus if started else None,
                                             started.start_checkpoint if started else None, stage_value)
        if started is None:
            return (corpus_dd, prereq_dd, *(gr.skip(),) * 6)
        return (corpus_dd, prereq_dd, started.preset, started.epochs, started.max_steps,
                started.batch_size, started.learning_rate,
                started.minutes if started.minutes is not None else gr.skip())

    def after_launch(run_name: str) -> tuple:
        """After a Start or Resume that launched: the form shows the settings the job runs with (Resume keeps those
        it was started with, whatever the form held), and the buttons what can be done now."""
        started = run_settings(ws, run_name)
        stage_value = started.stage if started is not None else gr.skip()
        buttons = button_states(run_name, runner.status(run_name))
        return (stage_value, *started_form(run_name, started.stage if started else RECIPE),
                *(gr.Button(interactive=on) for on in buttons))

    def on_stage(stage_value: str, run_name: str, preset_value: str) -> tuple:
        """A new stage: its run name (if still a default), checkpoint and form numbers; the full recipe keeps
        the form's numbers (it trains every stage with the preset's)."""
        defaults = {f"stage{s}" for _, s in STAGES} | {RECIPE_RUN}
        name = run_name if run_name not in defaults else RECIPE_RUN if stage_value == RECIPE else f"stage{stage_value}"
        if stage_value == RECIPE:
            return (name, gr.skip(), *(gr.skip(),) * 4)
        cfg = guarded("Loading the preset", load_config, preset_value, overrides)
        return (name, gr.Dropdown(value=default_prerequisite(ws, stage_value)),
                *form_defaults(cfg, stage_value))

    def on_mode(stage_value: str) -> tuple:
        """The full recipe has a budget and no start checkpoint or per-stage numbers (on any change of the
        Stage radio, a page load's re-attach to a recipe included)."""
        recipe = stage_value == RECIPE
        return gr.Dropdown(visible=not recipe), gr.Number(visible=recipe), gr.Row(visible=not recipe)

    def on_preset(stage_value: str, preset_value: str) -> tuple:
        if stage_value == RECIPE:
            return (gr.skip(),) * 4
        return form_defaults(guarded("Loading the preset", load_config, preset_value, overrides), stage_value)

    form = [stage, run, preset_dd, corpus, prerequisite, epochs, max_steps, batch_size, learning_rate, budget]
    numbers = [epochs, max_steps, batch_size, learning_rate]
    launched_form = [stage, corpus, prerequisite, preset_dd, *numbers, budget, start, stop, resume]
    start.click(on_start, form, [notice_md, command_md, run], api_name="start_training", concurrency_limit=1,
                concurrency_id="training_jobs").success(after_launch, run, launched_form, api_visibility="private",
                                                        show_progress="hidden")
    resume.click(on_resume, form, [notice_md, command_md, run], api_name="resume_training", concurrency_limit=1,
                 concurrency_id="training_jobs").success(after_launch, run, launched_form, api_visibility="private",
                                                         show_progress="hidden")
    stop.click(on_stop, run, status_md, api_name="stop_training", concurrency_limit=1,
               concurrency_id="training_jobs")
    # command_md, run and notice_md are outputs of the tick (always skipped) so that each tick gives them a fresh
    # status: a rejected Start's red "Error" badge on them then clears within one refresh instead of staying
    tick_outputs = [status_md, loss_plot, metric, metric_plot, log_box, sample, replies, cards_md, last_seen,
                    command_md, run, notice_md, shown_stage, plots_md, start, stop, resume]
    timer.tick(on_tick, [run, metric, last_seen, shown_stage, every], tick_outputs, api_name="training_status",
               concurrency_limit=None, show_progress="hidden")
    for picker in (metric, shown_stage, every):   # a new choice redraws at once (not at the next tick)
        picker.input(lambda r, m, shown, more: on_tick(r, m, None, shown, more), [run, metric, shown_stage, every],
                     tick_outputs, api_visibility="private", show_progress="hidden")
    sample.change(on_sample, sample, sample_audio, api_visibility="private")
    refresh.click(refresh_lists, [corpus, prerequisite, stage], [corpus, prerequisite], api_name="training_lists")
    stage.input(on_stage, [stage, run, preset_dd], [run, prerequisite, *numbers], api_visibility="private")
    stage.change(on_mode, stage, [prerequisite, budget, numbers_row], api_visibility="private",
                 show_progress="hidden")
    preset_dd.input(on_preset, [stage, preset_dd], numbers, api_visibility="private")
    demo.load(on_load, [stage, run], [stage, run, corpus, prerequisite, preset_dd, *numbers, budget],
              api_visibility="private")
    return TrainTab(stage=stage, corpus=corpus, prerequisite=prerequisite, refresh_lists=refresh_lists)


def last_lines(text: str, n: int) -> str:
    """The last `n` lines: the box shows exactly what fits, so the newest line ("Stopped at step 64") is in view
    without scrolling (a longer value left the browser's box scrolled to its top)."""
    return "\n".join(text.splitlines()[-n:])


def replies_table(path: str, limit: int = 20) -> Optional[pd.DataFrame]:
    """A samples .jsonl (stage 2's replies, stage 3's judgements) as a table of its first `limit` rows."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= limit:
                    break
    except (OSError, ValueError):
        return None
    table = pd.DataFrame(rows)
    for column in table.columns:   # floats rounded for reading
        if table[column].dtype.kind == "f":
            table[column] = table[column].round(3)
    return table

