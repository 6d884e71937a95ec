"""The replies stage 2 distils: what the LLM answers when it reads the transcript, made once and cached.

For each clip and instruction the teacher (the frozen LLM with the transcript in place of the audio)
answers greedily; stage 2 then trains the adapter so that the LLM, hearing the audio instead, gives the
same next-token distributions along that reply. "repeat" needs no teacher: its reply is the transcript.

The cache is a JSONL file under `<data.dir>/teacher/`, named by a hash of everything that decides the
replies (LLM, instructions, token budget), so changing one of them starts a new file instead of reusing
stale replies. Replies are appended to `<name>.partial` as they come, so an interrupted build resumes,
and the file is renamed into place only when complete. Under DDP only rank 0 generates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ira.models.splice import REPEAT_INSTRUCTION

Progress = Callable[[float, str], None]

TASK_INSTRUCTIONS: dict[str, str] = {
    "repeat": REPEAT_INSTRUCTION,
    "summarise": "Summarise what was said in one short sentence.",
    "question": "What is the speaker talking about? Answer in a few words.",
}
"""The instructions of stage 2, by task name (`align.tasks` picks among them)."""
GROUND_TRUTH_TASKS = frozenset({"repeat"})
"""Tasks whose reply is the transcript itself (trained with cross-entropy as well as KD)."""
CACHE_VERSION = 1


def parse_tasks(value: str) -> list[str]:
    """'repeat,summarise' -> ['repeat', 'summarise']; an unknown name is a clear error."""
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_INSTRUCTIONS]
    if unknown or not tasks:
        raise ValueError(f"align.tasks={value!r}: {'unknown task ' + ', '.join(unknown) if unknown else 'empty'}; "
                         f"choose from {', '.join(TASK_INSTRUCTIONS)} (comma-separated)")
    return list(dict.fromkeys(tasks))


def cache_path(data_dir: str | Path, llm_name: str, tasks: Sequence[str], max_new_tokens: int) -> Path:
    key = json.dumps({"llm": llm_name, "instructions": {t: TASK_INSTRUCTIONS[t] for t in sorted(tasks)},
                      "max_new_tokens": max_new_tokens, "version": CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(data_dir) / "teacher" / f"responses-{digest}.jsonl"


def _read_lines(path: Path) -> dict[tuple[str, str], str]:
    """Complete JSON lines of a (possibly partial) cache file; a torn last line is ignored."""
    replies: dict[tuple[str, str], str] = {}
    if not path.is_file():
        return replies
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            replies[(str(row["id"]), str(row["task"]))] = str(row["response"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return replies


def build_teacher_responses(llm: Any, clips: Sequence[tuple[str, str]], tasks: Sequence[str], path: Path,
                            max_new_tokens: int, batch_size: int = 16,
                            progress: Optional[Progress] = None) -> dict[tuple[str, str], str]:
    """Generate the missing replies for (clip id, transcript) x tasks into `path`; returns them all."""
    from ira.models.splice import build_teacher_inputs, generate_reply

    partial = path.with_name(path.name + ".partial")

    def missing(known: dict[tuple[str, str], str]) -> list[tuple[str, str, str]]:
        return [(clip_id, text, task) for clip_id, text in clips for task in tasks
                if task not in GROUND_TRUTH_TASKS and (clip_id, task) not in known]

    if path.is_file():
        replies = _read_lines(path)
        if not missing(replies):
            return replies
        path.replace(partial)            # new clips: keep the replies made so far, add the rest
    replies = _read_lines(partial)
    todo = missing(replies)
    path.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            if progress:
                progress(start / max(1, len(todo)), f"teacher replies {start}/{len(todo)}")
            with torch.no_grad():
                batch = build_teacher_inputs(llm, [TASK_INSTRUCTIONS[t] for _, _, t in chunk],
                                             [text for _, text, _ in chunk], None)
                answers = generate_reply(llm, batch, max_new_tokens=max_new_tokens)
            for (clip_id, _, task), answer in zip(chunk, answers):
                replies[(clip_id, task)] = answer.strip()
                handle.write(json.dumps({"id": clip_id, "task": task, "response": answer.strip()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    partial.replace(path)
    if progress:
        progress(1.0, f"teacher replies: {len(todo)} generated")
    return replies


def wait_for_responses(path: Path, wait_s: float = 6 * 3600) -> dict[tuple[str, str], str]:
    """Ranks other than 0 under DDP: wait for rank 0's complete cache file."""
    deadline = time.time() + wait_s
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f} s for rank 0 to write {path}")
        time.sleep(2.0)
    return _read_lines(path)


def load_or_build(llm: Any, clips: Sequence[tuple[str, str]], tasks: Sequence[str], path: Path,
                  max_new_tokens: int, batch_size: int = 16,
                  progress: Optional[Progress] = None) -> dict[tuple[str, str], str]:
    """What stage 2 calls: rank 0 builds (or reads) the cache, other ranks wait for it."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return wait_for_responses(path)
    return build_teacher_responses(llm, clips, tasks, path, max_new_tokens, batch_size, progress)


def reply_for(replies: dict[tuple[str, str], str], clip_id: str, task: str, transcript: str) -> str:
    """The reply stage 2 trains on for one clip and task."""
    return transcript if task in GROUND_TRUTH_TASKS else replies[(clip_id, task)]
