"""The package's messages in the words of the page: what `ira` says for a terminal (flag files, command-line
options, config keys) is said as the app's buttons and fields say it. The messages stay the package's own
for the command line; only the app translates them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\(flag file [^)]*STOP\)"), "(Stop was pressed)"),
    (re.compile(r"\(signal SIGTERM\)"), "(the app asked it to end)"),
    (re.compile(r"\(signal SIGINT\)"), "(interrupted)"),
    (re.compile(r"\s*Continue with --resume_checkpoint \S+"), " Press Resume to continue it."),
    (re.compile(r"run the same (?:recipe )?command again"), "press Resume"),
    (re.compile(r"<\s*data\.min_duration=([\d.]+)"), r"< \1 s, the shortest clip kept"),
    (re.compile(r">\s*data\.max_duration=([\d.]+)"), r"> \1 s, the longest clip kept"),
    (re.compile(r"over data\.max_text_chars=(\d+)"), r"over the \1 characters a transcript may have"),
)


def page_words(message: str, workspace: Optional[str | Path] = None) -> str:
    """`message` with the command line's words replaced by the page's, and paths under `workspace` shown
    relative to it (as every path on the page is)."""
    for pattern, words in _RULES:
        message = pattern.sub(words, message)
    if workspace is not None:
        root = str(Path(workspace).resolve()).rstrip("/") + "/"
        message = message.replace(root, "")
    return message
