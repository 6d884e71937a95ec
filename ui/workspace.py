"""The UI's workspace: the one folder it reads and writes.

    workspace/data/<name>/    corpora (docs/data_layout.md)
    workspace/runs/<name>/    training runs: checkpoints, metrics.jsonl, train.log, job.json
    workspace/runs/<name>/<stage folder>/    a full recipe's stages (style/, stage1/, ...; recipe.json above)
    workspace/generated/      the Generate tab's speech
    workspace/gradio_cache/   Gradio's files: uploads and recordings, and the copies of the files it serves

Every path a user types goes through :meth:`Workspace.resolve`, which refuses anything that lands
outside the workspace once `..` and symlinks are resolved, so a shared demo link cannot be used to
read or overwrite other files on the machine. The paths the app finds itself (a corpus's metadata.csv
and wavs, a run's checkpoints, logs, samples and cards, the paths a job recorded) go through
:meth:`Workspace.checked` and :meth:`Workspace.check_folder`: a link that leaves the workspace is refused
and named, one that stays inside is followed. This module is the one place that decides.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ira.checkpoint import checkpoint_figure
from ira.data.corpus import METADATA
from ira.training.recipe import STATE_FILE as RECIPE_STATE

DATA = "data"
RUNS = "runs"
GRADIO_FILES = "gradio_cache"
GRADIO_TEMP_DIR = "GRADIO_TEMP_DIR"
"""The variable Gradio 6 reads for the folder of its uploads and of the copies of the files it serves
(`gradio.utils.get_upload_folder`; without it, `<system temp>/gradio`)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHOWN_LINKS = 5
"""How many links out of the workspace an error names (the first ones found)."""


class WorkspaceError(ValueError):
    """A path or name the UI refuses; the message says what is allowed."""


def real_path(path: str | Path) -> Path | None:
    """Where `path` really is (every link followed, `..` collapsed); None for a link loop."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):   # RuntimeError: pathlib's "Symlink loop" (Python < 3.13)
        return None


def is_inside(root: Path, path: str | Path) -> bool:
    """True when `path`, once every link is followed, lies in the folder `root` (itself resolved)."""
    real = real_path(path)
    return real is not None and real.is_relative_to(root)


def gradio_folder(root: str | Path) -> Path:
    """Where Gradio's files go for the workspace folder `root` (made or not)."""
    return Path(root).expanduser().resolve() / GRADIO_FILES


def keep_gradio_files_in(ws: "Workspace") -> Path:
    """Make Gradio write its uploads, recordings and served copies in workspace/gradio_cache (created here).

    Gradio reads the folder from GRADIO_TEMP_DIR when a component or its server is made (a few routes it never
    serves here read it at `import gradio`: `python app.py` sets it before that import). The variable is the
    process's, so one process serves one workspace: the last call wins."""
    folder = ws.checked(ws.root / GRADIO_FILES, "Gradio's folder")
    folder.mkdir(exist_ok=True)
    os.environ[GRADIO_TEMP_DIR] = str(folder)
    return folder


def check_name(name: str, what: str = "name") -> str:
    """A corpus or run name: letters, digits, '.', '_', '-', starting with a letter or digit."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise WorkspaceError(f"{what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (it becomes a folder name)")
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "Workspace":
        """Make (if needed) and open the workspace folder; `root` is resolved once here."""
        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"workspace {path} exists and is not a folder; choose another --workspace")
        for sub in (DATA, RUNS):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def data_dir(self) -> Path:
        return self.root / DATA

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS

    def resolve(self, user_path: str | Path, must_exist: bool = False) -> Path:
        """A user-given path (relative to the workspace, or absolute) as an absolute path inside it.

        Raises WorkspaceError when it escapes the workspace (through `..`, an absolute path or a
        symlink pointing outside) or, with `must_exist`, when it does not exist.
        """
        text = str(user_path).strip()
        if not text:
            raise WorkspaceError("no path given; type a path inside the workspace, e.g. data/my_corpus")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()  # follows every symlink, collapses '..'
        if not resolved.is_relative_to(self.root):
            raise WorkspaceError(f"{text!r} is outside the workspace {self.root} (it resolves to {resolved}); "
                                 "the app only reads and writes files inside its workspace, and a link that "
                                 "points outside it is not followed. Copy the files into the workspace first")
        if must_exist and not resolved.exists():
            raise WorkspaceError(f"{text!r} does not exist (looked for {resolved})")
        return resolved

    def _absolute(self, path: str | Path) -> Path:
        """A relative path is the workspace's (as for a job, which runs in the workspace folder)."""
        return self.root / Path(path).expanduser()   # an absolute path stays itself

    def inside(self, path: str | Path) -> bool:
        """True when `path` (links followed; a relative one: in the workspace) lies inside the workspace."""
        return is_inside(self.root, self._absolute(path))

    def shown(self, path: str | Path) -> str:
        """`path` as the page names it: relative to the workspace as written (links not followed), so that a
        link is named by its own name, not by where it leads."""
        path = Path(path)
        if path.is_absolute() and path.is_relative_to(self.root):
            return str(path.relative_to(self.root))
        return str(path)

    def checked(self, path: str | Path, what: str = "file") -> Path:
        """`path`, a file or folder the app found (listed in a folder, recorded by a job), resolved, after
        checking that it stays inside the workspace. A link that leads outside is a WorkspaceError that names
        it (`what` says what it is, e.g. "the run's log"). A relative path is the workspace's."""
        real = real_path(self._absolute(path))
        if real is None or not real.is_relative_to(self.root):
            where = f"to {real}" if real is not None else "in a loop of links"
            raise WorkspaceError(f"{what} {self.shown(path)} leads outside the workspace ({where}); the app only "
                                 f"reads and writes files inside its workspace {self.root} and never follows a link "
                                 "out of it: copy the file into the workspace instead of linking it")
        return real

    def links_leaving(self, folder: str | Path, limit: int = SHOWN_LINKS) -> list[tuple[Path, Path | None]]:
        """(entry, where it leads; None for a loop) for the first `limit` entries under `folder`, the folder
        itself included, that lead outside the workspace, in a breadth-first walk in name order (the folder's
        own files, e.g. metadata.csv, before those of its subfolders). Links that stay inside are followed,
        each real folder once; only links cost a resolve, so a folder of 20,000 wavs is one directory read."""
        start = self._absolute(folder)
        real = real_path(start)
        if real is None or not real.is_relative_to(self.root):
            return [(start, real)]
        found: list[tuple[Path, Path | None]] = []
        queue, seen = deque([(start, real)]), set()
        while queue and len(found) < limit:
            shown, real_dir = queue.popleft()
            if real_dir in seen:
                continue
            seen.add(real_dir)
            try:
                entries = sorted(os.scandir(real_dir), key=lambda entry: entry.name)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for entry in entries:
                here = shown / entry.name
                if entry.is_symlink():
                    target = real_path(entry.path)
                    if target is None or not target.is_relative_to(self.root):
                        found.append((here, target))
                        if len(found) >= limit:
                            break
                    elif target.is_dir():
                        queue.append((here, target))
                elif entry.is_dir(follow_symlinks=False):
                    queue.append((here, Path(entry.path)))
        return found

    def check_folder(self, folder: str | Path, what: str) -> Path:
        """`folder` resolved, after checking that nothing under it leads outside the workspace (see
        `links_leaving`); else a WorkspaceError naming the first such links and what to do."""
        real = self.checked(folder, what)   # the folder itself: "... leads outside the workspace"
        links = self.links_leaving(folder, SHOWN_LINKS + 1)
        if links:
            named = ", ".join(f"{self.shown(link)} (to {target})" if target is not None else
                              f"{self.shown(link)} (a loop of links)" for link, target in links[:SHOWN_LINKS])
            more = " and more" if len(links) > SHOWN_LINKS else ""
            raise WorkspaceError(f"{what} holds links that lead outside the workspace: {named}{more}. The app only "
                                 f"reads and writes files inside its workspace {self.root} and never follows a link "
                                 "out of it: copy those files into the workspace instead of linking them, then try "
                                 "again")
        return real

    def corpus_dir(self, name: str) -> Path:
        return self.resolve(Path(DATA) / check_name(name, "corpus name"))

    def existing_corpus(self, name: str) -> Path:
        """workspace/data/<name> to read or prepare: it must hold a metadata.csv, and nothing in it may lead
        outside the workspace (checked before any of its files is read or handed to the package)."""
        corpus = self.corpus_dir(name)
        if not (corpus / METADATA).is_file():
            raise WorkspaceError(f"there is no corpus '{name}' in {self.relative(self.data_dir)}/ (no {METADATA}); "
                                 "build it in the Data tab")
        return self.check_folder(corpus, f"corpus '{name}'")

    def run_dir(self, name: str) -> Path:
        return self.resolve(Path(RUNS) / check_name(name, "run name"))

    def relative(self, path: str | Path) -> str:
        """`path` relative to the workspace root (for display); the path itself if outside."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def list_corpora(self) -> list[str]:
        """Names of the folders under data/ that hold a metadata.csv and stay inside the workspace (a link
        to another folder of the workspace is followed; one that points outside is not listed, since
        every use of it would be refused: `links_outside` names them)."""
        return sorted(p.name for p in self.data_dir.iterdir()
                      if p.is_dir() and (p / METADATA).is_file() and _NAME.match(p.name) and self.inside(p))

    def links_outside(self) -> list[str]:
        """Names under data/ that are links pointing outside the workspace (not listed, never followed)."""
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_symlink() and not self.inside(p))

    def list_runs(self) -> list[str]:
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and _NAME.match(p.name))

    def checkpoint_headers(self) -> list[tuple[str, dict[str, str]]]:
        """(relative path, metadata) of every readable IRA checkpoint under runs/, newest first; only
        the headers are read, so listing stays cheap however large the checkpoints are."""
        from ira.checkpoint import CheckpointError, read_metadata

        headers = []
        for rel in self.list_checkpoints():
            try:
                headers.append((rel, read_metadata(self.root / rel)))
            except CheckpointError:
                continue
        return headers

    def distinct_checkpoints(self, keep: Callable[[dict[str, str]], bool] = lambda meta: True
                             ) -> list[tuple[str, str]]:
        """(label, relative path): one line per distinct save whose header `keep` accepts, grouped by run folder
        (the run written to last first, as `list_checkpoints`) and, within a run, best first by the figure the run
        keeps its best by (`checkpoint_order`). A save reached by several names (stage1_best, stage1_latest and
        stage1_step16 hold the same checkpoint_id) is one line, under its most telling name, whose label names
        the others ("also stage1_latest")."""
        runs: dict[str, list[tuple[str, dict[str, str]]]] = {}
        for rel, meta in self.checkpoint_headers():
            if keep(meta):
                runs.setdefault(str(Path(rel).parent), []).append((rel, meta))
        lines: list[tuple[str, str]] = []
        for headers in runs.values():
            saves: dict[str, list[tuple[str, dict[str, str]]]] = {}
            for rel, meta in headers:   # best, latest, then the others: the first name of a save is its best one
                saves.setdefault(meta.get("checkpoint_id") or rel, []).append((rel, meta))
            for names in sorted(saves.values(), key=lambda names: checkpoint_order(*names[0])):
                rel, meta = names[0]
                also = [Path(other).name.removesuffix(".safetensors") for other, _ in names[1:]]
                label = checkpoint_label(rel, meta) + (f" · also {', '.join(also)}" if also else "")
                lines.append((label, rel))
        return lines

    def list_checkpoints(self) -> list[str]:
        """Every `*.safetensors` under runs/ (relative to the workspace), run by run (the run written to last
        first) and, within a run, its best, then its latest, then the others newest first: the checkpoint a
        user wants is at the top, not after twenty step saves. A run folder or a checkpoint that links outside
        the workspace is not listed (nor read)."""
        found: list[Path] = []
        for run in sorted(p for p in self.runs_dir.iterdir() if p.is_dir() and self.inside(p)):
            # a full recipe's stages write to subfolders of its run (runs/<name>/stage1/...): listed as runs too
            nested = run.glob("*/*.safetensors") if (run / RECIPE_STATE).is_file() else []
            found += [p for p in [*run.glob("*.safetensors"), *nested]
                      if not p.name.startswith(".") and ".tmp" not in p.name and self.inside(p)]
        mtime = {p: p.stat().st_mtime for p in found}
        run_time: dict[Path, float] = {}
        for p in found:
            run_time[p.parent] = max(run_time.get(p.parent, 0.0), mtime[p])

        def rank(p: Path) -> tuple:
            kind = 0 if p.stem.endswith("_best") else 1 if p.stem.endswith("_latest") else 2
            return (-run_time[p.parent], p.parent.name, kind, -mtime[p])
        return [self.relative(p) for p in sorted(found, key=rank)]


def pick_choice(current: Optional[str], choices: Sequence[str] | Sequence[tuple[str, str]]) -> Optional[str]:
    """`current` if it is one of a dropdown's choice values (plain, or the value of a (label, value) pair),
    else the first value (None when there is none)."""
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    return current if current in values else (values[0] if values else None)


HIGHER_IS_BETTER = ("accuracy", "top1", "top5", "match", "reward")
"""Words in a metric's name that mean larger is better (choice accuracy, top-5, rewards); the others (WER, CER,
losses, errors) are better small. Only for headers written before the engine recorded the run's direction."""


def checkpoint_order(rel: str, meta: Mapping[str, str]) -> tuple:
    """Sort key of a run's checkpoints, best first: by the figure the run keeps its best by (its direction read from
    the metric's name), saves without one after those with one; then the higher step; then the name."""
    try:
        metric = json.loads(meta.get("metric") or "null")
        value = float(metric["value"])
        higher = (metric["mode"] == "max" if "mode" in metric   # the run's own direction (engine's header)
                  else any(word in str(metric.get("name", "")) for word in HIGHER_IS_BETTER))
        figure = (0, -value if higher else value) if math.isfinite(value) else (1, 0.0)
    except (ValueError, TypeError, KeyError):
        figure = (1, 0.0)
    try:
        step = int(meta.get("step", -1))
    except ValueError:
        step = -1
    return (*figure, -step, rel)


def checkpoint_label(rel: str, meta: Mapping[str, str]) -> str:
    """What a checkpoint is, in one line: "s2/stage2_best · stage 2 · step 1200 · choice accuracy 0.719"
    (the metric is the one its run keeps the best checkpoint by, at the validation before the save)."""
    name = rel.removeprefix(f"{RUNS}/").removesuffix(".safetensors")
    parts = [name] + [f"{key} {meta[key]}" for key in ("stage", "step") if meta.get(key)]
    figure = checkpoint_figure(meta)
    return " · ".join(parts + ([figure] if figure else []))
