"""One run per folder, and nothing written over an earlier run.

A training run holds a lock on its `training.output_dir` (the file `<output_dir>/LOCK`, locked with the
operating system's advisory lock and holding the holder's process id) from its start to its end: a second run
into the same folder, started at the same time or later, is refused with an error that names the holder's pid.
The operating system drops the lock when its process ends, however it ends, so a lock left by a run killed
with `kill -9` is taken over by the next run (its file still names the dead pid; `RunFolderLock.stale_pid`
says which). A full recipe holds its own folder the same way while each stage holds the stage's subfolder.

A fresh run (nothing to resume) into a folder that already holds checkpoints of its stage is refused too:
it would replace `stage<N>_best` and `stage<N>_latest` and prune the earlier run's step files. The error says
how to continue that run and where to start a new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ira.checkpoint import SUFFIX, CheckpointError, read_metadata, stage_checkpoints

try:   # POSIX: flock(2), released by the kernel when the holder's process ends
    import fcntl
except ImportError:   # Windows: msvcrt's byte-range lock, released the same way
    fcntl = None
    import msvcrt

LOCK_FILE = "LOCK"
_WINDOWS_LOCK_OFFSET = 1 << 20   # Windows locks a byte far past the pid, so the pid stays readable
_held: dict[Path, "RunFolderLock"] = {}   # the folders this process holds (a second claim is a conflict too)


class RunFolderError(ValueError):
    """A run refused its output folder: the message names the folder, the holder or the checkpoints, and what to
    do instead."""


def check_output_dir(folder: str | Path) -> Path:
    """`training.output_dir` must be a folder or a new name (made later), not an existing file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"training.output_dir={folder} is a file, not a folder: a run writes its checkpoints, "
                             f"metrics and samples into a folder; set training.output_dir to a new folder name "
                             f"(or to the folder of the run to continue)")
    return folder


def _try_lock(fd: int) -> bool:
    """Take the lock of open file `fd` without waiting; False when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:   # BlockingIOError (EWOULDBLOCK), EACCES, Windows' "Permission denied"
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_pid(fd: int) -> Optional[int]:
    """The pid written in an open lock file (None when it holds none: a holder that has not written it yet)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


def _busy_message(folder: Path, pid: Optional[int]) -> str:
    holder = ("this process" if pid == os.getpid() else f"process {pid}") if pid is not None else "another process"
    return (f"{folder} is in use: a training run ({holder}) holds its lock file {folder / LOCK_FILE}. Two runs in one "
            f"folder would write over each other's checkpoints and metrics: wait for that run to end (or stop it: a "
            f"file {folder / 'STOP'}), or set training.output_dir to another folder")


class RunFolderLock:
    """The lock of one run folder: `acquire()` or refuse, `release()` on every exit (use it as a context manager)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None
        self.stale_pid: Optional[int] = None   # the pid of a holder that died without releasing (after acquire)

    def acquire(self) -> "RunFolderLock":
        """Lock the folder (made when missing) or raise RunFolderError naming the holder's pid."""
        folder = check_output_dir(self.folder)
        key = folder.resolve()
        if key in _held:
            raise RunFolderError(_busy_message(folder, os.getpid()))
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):   # another process may unlink the file between our open and our lock: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                pid = _read_pid(fd)
                os.close(fd)
                raise RunFolderError(_busy_message(folder, pid))
            if self._is_current(fd):
                break
            os.close(fd)
        else:
            raise RunFolderError(f"{self.path} keeps changing under this run; is another program deleting it?")
        previous = _read_pid(fd)
        self.stale_pid = previous if previous not in (None, os.getpid()) else None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held[key] = self
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether the open file `fd` is still the folder's lock file (not one a releasing holder just removed)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then unlock; a no-op when not held."""
        if self.fd is None:
            return
        _held.pop(self.folder.resolve(), None)
        try:
            os.unlink(self.path)   # while still locked: a waiting opener then sees that its file is gone
        except OSError:            # Windows cannot remove an open file: it stays, empty and unlocked
            os.ftruncate(self.fd, 0)
        try:
            _unlock(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(folder: str | Path) -> Optional[int]:
    """The pid of the run that holds `folder` now (0 when its pid is not written yet), or None when it is free.
    A look only: the lock is not kept."""
    folder = Path(folder)
    if folder.resolve() in _held:
        return os.getpid()
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        pid = _read_pid(fd)
        return pid if pid is not None else 0
    finally:
        os.close(fd)


def check_not_held(folder: str | Path) -> None:
    """Raise RunFolderError when a run holds `folder` now (the look before starting one)."""
    pid = lock_holder(folder)
    if pid is not None:
        raise RunFolderError(_busy_message(Path(folder), pid or None))


def check_fresh_run(folder: str | Path, stage: str, resume_from: Optional[str | Path]) -> None:
    """A run of `stage` into `folder` may not write over an earlier run's checkpoints of that stage.

    `resume_from` is the checkpoint of this stage the run continues (None: a fresh run, which includes a stage
    started from the previous stage's checkpoint). A fresh run needs a folder without `stage<N>_*` checkpoints;
    a resumed one continues the run of the folder it comes from, so a folder holding another run is refused too.
    """
    folder = Path(folder)
    found = stage_checkpoints(folder, stage)
    if not found:
        return
    if resume_from is not None and _same_folder(Path(resume_from).parent, folder):
        return
    latest = folder / f"stage{stage}_latest{SUFFIX}"
    newest = latest if latest in found else found[0]
    names = ", ".join(_describe(p) for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    doing = (f"continuing {resume_from} (a checkpoint of another folder) there" if resume_from is not None
             else "a new run there")
    raise RunFolderError(
        f"{folder} already holds a stage-{stage} run ({names}); {doing} would write over its checkpoints. To "
        f"continue that run: --resume_checkpoint {newest} (for a full recipe, run the same recipe command again). "
        f"To start a new run, set training.output_dir to another folder (e.g. --set training.output_dir="
        f"{_unused_sibling(folder)}).")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _describe(path: Path) -> str:
    """"stage1_best.safetensors (step 46)"."""
    try:
        return f"{path.name} (step {read_metadata(path).get('step', '?')})"
    except CheckpointError:
        return path.name


def _unused_sibling(folder: Path) -> Path:
    """`<folder>-2` (or -3, ...): a name beside `folder` that does not exist yet."""
    n = 2
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}-{n}")


def claim_run_folder(folder: str | Path, stage: str, resume_from: Optional[str | Path]) -> RunFolderLock:
    """Lock `folder` for a run of `stage`, then check that the run writes over nothing (released if it would)."""
    lock = RunFolderLock(folder).acquire()
    try:
        check_fresh_run(folder, stage, resume_from)
    except BaseException:
        lock.release()
        raise
    return lock
