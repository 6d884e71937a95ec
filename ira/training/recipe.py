"""The full recipe: the voice style encoder, stage 1, stage 2 and stage 3 in order, each started from the
previous stage's best checkpoint, within one wall-clock budget (`ira train --recipe full --minutes M`).

Each stage writes to its own folder under the recipe's `training.output_dir` (`style/`, `stage1/`, ...)
with its share of the budget as its time limit. What has happened is kept in `<output_dir>/recipe.json`
(rewritten atomically after every change), so that running the same command again continues the recipe:
finished stages are skipped, and the stage that was stopped resumes exactly from its own latest
checkpoint, its time budget counting the minutes it already ran.

A stop of the recipe is the flag file `<output_dir>/STOP` (what the app's Stop writes): every stage watches
it besides its own folder's STOP (`training.stop_file`), stops cleanly at the end of its step and the
recipe ends with that stage "stopped"; between two stages the recipe checks it before starting the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

import psutil

from ira import peak_memory
from ira.checkpoint import CheckpointError, best_path, checkpoint_figure, find_latest, read_metadata
from ira.config import STAGE_SECTIONS, IRAConfig
from ira.eval.card import CARD_DIR, SPEAKING_STAGES
from ira.training.run_folder import RunFolderLock
from ira.training.stop import STOP_FILE, drop_stale_flags

log = logging.getLogger("ira")
Progress = Callable[[float, str], None]

RECIPES = ("full",)
RECIPE_STAGES = ("style", "1", "2", "3")
STAGE_NAMES = {"style": "voice style encoder", "1": "stage 1 (SpeechLM)", "2": "stage 2 (adapter)",
               "3": "stage 3 (PPO)"}
BUDGET_SHARES = {"style": 0.05, "1": 0.50, "2": 0.30, "3": 0.15}
"""Share of the recipe's minutes per stage. Stage 1 needs the most: on the `cpu` preset its held-out WER
was still falling after 2 hours; stage 2 reaches most of its figure in ~50 minutes, the style encoder in ~5
(docs/decisions.md)."""
DEFAULT_MINUTES = 100.0
"""The default budget of the full recipe (the app's Train tab starts with it): the one run end to end from an
empty folder on a 2-core CPU for the README's quickstart, 128 minutes in all (the budget counts the stages'
training; speaking and preparing the corpus and the stages' caches add the rest on a first run). Its stage 1
(50 minutes) reached the validation WER that 90 minutes had reached on a busier day (docs/decisions.md)."""
STATE_FILE = "recipe.json"
FORMAT_VERSION = 1


class RecipeError(ValueError):
    """A recipe that cannot run or continue as asked (names the file or value and what to do)."""


@dataclass
class StageRecord:
    stage: str
    minutes: float
    folder: str
    status: str = "pending"         # pending | running | done | stopped | failed
    start_from: Optional[str] = None
    checkpoint: Optional[str] = None
    minutes_used: float = 0.0
    started: Optional[float] = None    # when its current run began (time.time()): the app shows live minutes
    card: Optional[str] = None      # card.json of its handed-over checkpoint (ira/eval/card.py), once made
    card_error: Optional[str] = None   # why no card could be made (the recipe went on without it)
    peak_memory_mb: Optional[float] = None   # the stage's peak resident memory (ira/peak_memory.py)


@dataclass
class RecipeState:
    recipe: str
    minutes: float
    stages: list[StageRecord] = field(default_factory=list)
    version: int = FORMAT_VERSION

    @classmethod
    def load(cls, path: Path) -> "RecipeState":
        try:
            data = json.loads(path.read_text())
            stages = [StageRecord(**s) for s in data.pop("stages")]
            return cls(**data, stages=stages)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise RecipeError(f"{path} is not a readable recipe state ({e}); move it away to start the "
                              f"recipe afresh in that folder") from e

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)

    def record(self, stage: str) -> StageRecord:
        return next(s for s in self.stages if s.stage == stage)

    def current(self) -> Optional[StageRecord]:
        """The stage running now, else the last one that ran (None before the first has started)."""
        running = [s for s in self.stages if s.status == "running"]
        ran = [s for s in self.stages if s.status != "pending"]
        return (running or ran or [None])[-1]

    def final_checkpoint(self) -> Optional[str]:
        """The last stage's handed-over checkpoint once every stage is done, else None."""
        if self.stages and all(s.status == "done" for s in self.stages):
            return self.stages[-1].checkpoint
        return None


def plan(recipe: str, minutes: float, output_dir: Path) -> RecipeState:
    """The stages of `recipe` with their minutes and folders."""
    if recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r}; the recipes are: {', '.join(RECIPES)}")
    if not minutes > 0:
        raise RecipeError(f"--minutes must be > 0 (the whole recipe's wall-clock budget), got {minutes!r}")
    return RecipeState(recipe, float(minutes), [
        StageRecord(stage, round(minutes * BUDGET_SHARES[stage], 2), str(output_dir / stage_folder(stage)))
        for stage in RECIPE_STAGES])


def stage_folder(stage: str) -> str:
    return "style" if stage == "style" else f"stage{stage}"


def stage_config(cfg: IRAConfig, record: StageRecord) -> IRAConfig:
    """The recipe's config for one stage: its own output folder and its share of the minutes as the time
    limit, also in the stage's own section where that has a time budget (`align`, `ppo`), which its run reads
    over `training`'s."""
    overrides = [f"training.output_dir={record.folder}", f"training.max_minutes={record.minutes}",
                 f"training.stop_file={json.dumps(str(Path(record.folder).parent / STOP_FILE))}"]
    section = STAGE_SECTIONS.get(record.stage)
    if section is not None and hasattr(getattr(cfg, section), "max_minutes"):
        overrides.append(f"{section}.max_minutes={record.minutes}")
    return cfg.with_overrides(overrides)


def handed_over(record: StageRecord) -> Optional[str]:
    """The checkpoint a finished stage hands to the next: its best, else its latest."""
    best = best_path(record.folder, record.stage)
    if best.is_file():
        return str(best)
    latest = find_latest(record.folder, record.stage)
    return str(latest) if latest is not None else None


def has_corpus(cfg: IRAConfig) -> bool:
    """Whether `data.dir` holds a corpus (its metadata.csv is written last: a corpus stopped half-way has none)."""
    return (Path(cfg.data.dir) / "metadata.csv").is_file()


def ensure_corpus(cfg: IRAConfig, say: Callable[[str], None] = print,
                  progress: Optional[Callable[[float, str], None]] = None) -> Optional[float]:
    """From nothing: when `data.dir` holds no corpus yet and the preset's `data.source` is "synth", speak it
    first (what `ira data synth` does: eSpeak NG, offline, resumable), so that one command goes from an empty
    folder to every stage. Returns the minutes it took, or None when the corpus was there. Other sources
    need their own command first (a download or the user's recordings): a clear error names it."""
    data_dir = Path(cfg.data.dir)
    if has_corpus(cfg):
        return None
    if cfg.data.source != "synth":
        command = {"ljspeech": "ira data ljspeech --root data", "folder": "ira data folder DIR",
                   "dummy": f"ira data dummy --out {data_dir}"}[cfg.data.source]
        raise RecipeError(f"{data_dir} holds no corpus (no metadata.csv) and data.source is "
                          f"{cfg.data.source!r}: make it first with `{command}`, or set data.dir to a corpus")
    from ira.data.synth import synthesize_corpus

    start = time.time()
    say(f"corpus: {data_dir} holds none; speaking the preset's synthetic corpus first "
        f"({cfg.data.synth_num_utterances} clips, eSpeak NG)")
    synthesize_corpus(data_dir, num_utterances=cfg.data.synth_num_utterances, seed=cfg.data.synth_seed,
                      progress=progress)
    minutes = (time.time() - start) / 60.0
    say(f"corpus: {data_dir} spoken in {minutes:.1f} min")
    return minutes


MIN_CLIPS = 2
"""The fewest training clips a recipe runs on: the voice style encoder contrasts the clips of a batch."""


def training_clips(data_dir: str | Path) -> Optional[int]:
    """The training split's size of a prepared corpus (its prepare_report.json); None before it is prepared."""
    try:
        return int(json.loads((Path(data_dir) / "prepare_report.json").read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fit_to_corpus(cfg: IRAConfig, train_clips: int) -> tuple[IRAConfig, list[str]]:
    """The recipe's config with every stage's batch no larger than the corpus's `train_clips`, and one note per
    lowered batch. The presets are sized for the 20,000-clip corpus; a small one (the Data tab's dummy corpus has
    11 training clips) would otherwise end the recipe in its first stage (the style encoder drops a last, short
    batch and gets none; PPO refuses fewer prompts than its batch). PPO's batch stays a multiple of its group
    (advantage "group") and its minibatch divides it. Fewer than MIN_CLIPS clips, or than one PPO group, is a
    RecipeError saying to build a larger corpus."""
    if train_clips < MIN_CLIPS:
        raise RecipeError(f"corpus {cfg.data.dir} has {train_clips} training clip(s); the full recipe needs at "
                          f"least {MIN_CLIPS}: build a larger corpus (the Data tab's dummy corpus has 11)")
    ppo = cfg.ppo
    current = {"style.batch_size": cfg.style.batch_size, "training.batch_size": cfg.training.batch_size,
               "align.batch_size": cfg.align.batch_size, "ppo.batch_size": ppo.batch_size,
               "ppo.minibatch_size": ppo.minibatch_size}
    wanted = {key: train_clips for key in ("style.batch_size", "training.batch_size", "align.batch_size")
              if current[key] > train_clips}
    if ppo.batch_size > train_clips:
        group = ppo.group_size if ppo.advantage == "group" else 1
        batch = train_clips - train_clips % group
        if batch < max(group, 1):
            raise RecipeError(f"corpus {cfg.data.dir} has {train_clips} training clips, fewer than one PPO group "
                              f"(ppo.group_size={group}): build a larger corpus for the full recipe")
        wanted["ppo.batch_size"] = batch
        minibatch = math.gcd(ppo.minibatch_size, batch)
        if minibatch != ppo.minibatch_size:
            wanted["ppo.minibatch_size"] = minibatch
    if not wanted:
        return cfg, []
    notes = [f"{key} {current[key]} -> {value}" for key, value in wanted.items()]
    fitted = cfg.with_overrides([f"{key}={value}" for key, value in wanted.items()])
    return fitted, [f"the corpus has {train_clips} training clips, fewer than the preset's batches: "
                    + ", ".join(notes)]


def prepare_for_recipe(cfg: IRAConfig, say: Callable[[str], None] = print,
                       progress_bar: Optional[Callable[[str], ContextManager[Progress]]] = None) -> IRAConfig:
    """The recipe's one-time preparation, before its first stage and with its own progress bar (`progress_bar(
    title)` opens one; none: no bar): check, annotate and encode the corpus (every stage would otherwise do it
    silently at its start), then fit the batches to its training split (`fit_to_corpus`, each change said)."""
    from ira.data.prepare import cache_is_fresh, ensure_prepared

    data_dir = Path(cfg.data.dir)
    if not cache_is_fresh(cfg, data_dir):
        start = time.time()
        say(f"preparing the corpus {data_dir} once: checking and annotating the clips, fitting the codec, "
            f"caching the tokens (not counted in the recipe's budget)")
        with progress_bar(PREPARING) if progress_bar else contextlib.nullcontext() as progress:
            ensure_prepared(cfg, progress=progress)
        say(f"corpus prepared in {(time.time() - start) / 60:.1f} min")
    clips = training_clips(data_dir)
    if clips is None:
        return cfg
    fitted, notes = fit_to_corpus(cfg, clips)
    for note in notes:
        say(note)
    return fitted


PREPARING = "preparing the corpus (one-time)"
SPEAKING = "speaking the corpus (one-time)"
"""The titles of the recipe's one-time phases' progress bars (the terminal's, and the app's log)."""


RunStage = Callable[[str, IRAConfig, Optional[str]], str]
MakeCard = Callable[[str, IRAConfig], str]
"""(handed-over checkpoint, the stage's config) -> the path of the card.json it wrote."""


def stage_card(checkpoint: str, stage_cfg: IRAConfig) -> str:
    """The card of a stage's checkpoint in `<stage folder>/card/`: three held-out sentences spoken, heard by the
    offline ASR and (stage 2 and 3) repeated by the LLM (ira/eval/card.py)."""
    from ira.eval.card import make_card

    card_dir = Path(stage_cfg.training.output_dir) / CARD_DIR
    return str(make_card(checkpoint, card_dir, max_new_tokens=stage_cfg.llm.max_new_tokens))


def write_stage_card(record: StageRecord, stage_cfg: IRAConfig, make_card: MakeCard,
                     say: Callable[[str], None]) -> None:
    """Make the card of a done stage and record it; a failure is logged and recorded in `record.card_error`,
    never raised: a card is a look at the checkpoint, not a reason to stop the recipe."""
    name = STAGE_NAMES[record.stage]
    start = time.perf_counter()
    try:
        record.card, record.card_error = make_card(record.checkpoint, stage_cfg), None
    except Exception as exc:   # noqa: BLE001 - any failure of the card leaves the recipe going
        record.card, record.card_error = None, f"{type(exc).__name__}: {exc}"
        log.warning("%s: no card of %s", name, record.checkpoint, exc_info=True)
        say(f"{name}: no card ({record.card_error}); the recipe goes on")
        return
    say(f"{name}: card in {record.card} ({time.perf_counter() - start:.0f} s)")


def needs_card(record: StageRecord) -> bool:
    """A done stage that speaks and has neither a card nor a recorded failure to make one (a recipe.json
    written before cards existed, or a run killed while making it)."""
    return (record.status == "done" and record.stage in SPEAKING_STAGES and record.checkpoint is not None
            and record.card is None and record.card_error is None)


def run_recipe(cfg: IRAConfig, recipe: str, minutes: float, run_stage: RunStage,
               say: Callable[[str], None] = print, make_card: Optional[MakeCard] = stage_card) -> str:
    """Run (or continue) the recipe in `cfg.training.output_dir`; returns "done", "stopped" or "failed".

    `run_stage(stage, cfg, resume_from)` runs one stage and returns "done", "stopped" or "failed".
    `make_card(checkpoint, stage_cfg)` makes the card of each speaking stage once it is done, before the next
    stage starts (None: no cards). The recipe holds its folder's lock while it runs (a second recipe there is
    refused, naming this one's pid); each stage holds its own subfolder's."""
    with RunFolderLock(cfg.training.output_dir):
        return _run_recipe_here(cfg, recipe, minutes, run_stage, say, make_card)


def _run_recipe_here(cfg: IRAConfig, recipe: str, minutes: float, run_stage: RunStage,
                     say: Callable[[str], None], make_card: Optional[MakeCard]) -> str:
    """`run_recipe` in the folder it holds."""
    output_dir = Path(cfg.training.output_dir)
    state_path = output_dir / STATE_FILE
    stop_flag = output_dir / STOP_FILE
    # flags older than this process were left by an earlier run (a stage killed before clearing its own)
    drop_stale_flags([stop_flag, *(output_dir / stage_folder(s) / STOP_FILE for s in RECIPE_STAGES)],
                     since=psutil.Process().create_time())
    if state_path.exists():
        state = RecipeState.load(state_path)
        if state.recipe != recipe or abs(state.minutes - float(minutes)) > 1e-6:
            raise RecipeError(f"{state_path} holds the {state.recipe!r} recipe of {state.minutes:g} minutes; "
                              f"run it with --recipe {state.recipe} --minutes {state.minutes:g} to continue it, "
                              f"or choose another training.output_dir for a new one")
        say(f"continuing the {recipe} recipe in {output_dir}")
    else:
        state = plan(recipe, minutes, output_dir)
        state.save(state_path)
    previous: Optional[str] = None
    for record in state.stages:
        name = STAGE_NAMES[record.stage]
        if record.status == "done":
            previous = record.checkpoint
            say(f"{name}: done earlier ({record.minutes_used:.1f} min) -> {record.checkpoint}")
            if make_card is not None and needs_card(record):
                write_stage_card(record, stage_config(cfg, record), make_card, say)
                state.save(state_path)
            continue
        own_latest = find_latest(record.folder, record.stage)
        resume_from = str(own_latest) if own_latest is not None else previous   # previous: None only for style
        if stop_flag.exists():   # a stop that came between two stages: the next one does not start
            stop_flag.unlink(missing_ok=True)
            record.status = "stopped"
            state.save(state_path)
            say(f"{name}: stopped before it started; run the same command again to continue the recipe here")
            return "stopped"
        record.status, record.start_from, record.started = "running", resume_from, time.time()
        state.save(state_path)
        say(f"{name}: {record.minutes:g} min budget" + (f", from {resume_from}" if resume_from else ""))
        peak_memory.give_back()   # what the stages before freed goes back first: this stage's peak starts from what they left
        own_peak = peak_memory.reset()
        try:
            stage_cfg = stage_config(cfg, record)
            outcome = run_stage(record.stage, stage_cfg, resume_from)
        except BaseException as exc:   # recorded, so that recipe.json never says "running" for a dead stage
            outcome = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            raise
        finally:
            record.minutes_used = round(record.minutes_used + (time.time() - record.started) / 60.0, 2)
            record.checkpoint = handed_over(record)
            record.status = outcome if outcome in ("done", "stopped") else "failed"
            record.peak_memory_mb = round(max(peak_memory.peak_mb(), record.peak_memory_mb or 0.0), 1)
            state.save(state_path)
        if record.status != "done":
            say(f"{name}: {record.status}; run the same command again to continue the recipe here")
            return record.status
        if record.checkpoint is None:
            record.status = "failed"
            state.save(state_path)
            raise RecipeError(f"{name} finished without a checkpoint in {record.folder}")
        previous = record.checkpoint
        try:
            figure = checkpoint_figure(read_metadata(record.checkpoint))
        except CheckpointError:   # said by its card below; the hand-over goes on
            figure = ""
        say(f"{name}: done in {record.minutes_used:.1f} min -> {record.checkpoint}" + (f" ({figure})" if figure else "")
            + f"; peak memory {record.peak_memory_mb / 1024:.1f} GB" + ("" if own_peak else " (of the whole process)"))
        if make_card is not None and needs_card(record):
            write_stage_card(record, stage_cfg, make_card, say)
            state.save(state_path)
    return "done"
