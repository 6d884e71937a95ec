"""The corpus folder every data source ends in (see docs/data_layout.md).

``DIR/wavs/<id>.wav``, ``DIR/metadata.csv`` (LJSpeech format: ``id|text|normalized``, split on
``|`` only, never CSV-quoted) and an optional ``DIR/labels.jsonl`` of known voice labels.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ira.atomic_text import atomic_write_text
from ira.audio import AudioError, audio_info

METADATA = "metadata.csv"
LABELS = "labels.jsonl"
WAVS = "wavs"
SOURCE = "source.json"
"""Provenance written by the sources of this package (which source, with which settings)."""

Progress = Callable[[float, str], None]


class CorpusError(ValueError):
    """A corpus folder or file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Clip:
    id: str
    text: str
    normalized_text: str
    wav_path: Path


def wav_path(corpus_dir: str | Path, clip_id: str) -> Path:
    return Path(corpus_dir) / WAVS / f"{clip_id}.wav"


def _check_id(clip_id: str) -> str | None:
    """What is wrong with an id as a file name, or None."""
    if not clip_id:
        return "the id (first column) is empty"
    if "/" in clip_id or "\\" in clip_id or clip_id in (".", "..") or clip_id.startswith("."):
        return f"the id {clip_id!r} is not a plain file name (no slashes, no leading dot)"
    return None


def read_metadata(corpus_dir: str | Path) -> list[Clip]:
    """Parse DIR/metadata.csv exactly as LJSpeech does.

    Each non-blank line is ``id|text|normalized text`` or ``id|text`` (then the text is also the
    normalized text; an empty normalized column falls back to the text too). Fields are split on
    ``|`` only; quotes are ordinary characters. An id may be written with its ``.wav`` extension.
    """
    path = Path(corpus_dir) / METADATA
    if not path.is_file():
        raise CorpusError(f"{path}: no such file; a corpus folder needs metadata.csv with one "
                          "'id|transcript|normalized transcript' line per clip in wavs/<id>.wav "
                          "(see docs/data_layout.md)")
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from exc

    clips: list[Clip] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) not in (2, 3):
            raise CorpusError(f"{path}:{number}: expected 2 or 3 '|'-separated columns "
                              f"(id|transcript|normalized transcript), found {len(fields)}: {line[:80]!r}; "
                              "a '|' cannot appear inside a transcript")
        clip_id = fields[0].strip()
        if clip_id.lower().endswith(".wav"):
            clip_id = clip_id[:-4]
        problem = _check_id(clip_id)
        if problem:
            raise CorpusError(f"{path}:{number}: {problem}; the first column names wavs/<id>.wav")
        text = fields[1].strip()
        if not text:
            raise CorpusError(f"{path}:{number}: the transcript of {clip_id!r} is empty; "
                              "write what is said, or remove the line")
        normalized = fields[2].strip() if len(fields) == 3 else ""
        if clip_id in seen:
            raise CorpusError(f"{path}:{number}: duplicate id {clip_id!r} (first on line {seen[clip_id]}); "
                              "every clip needs its own id")
        seen[clip_id] = number
        clips.append(Clip(clip_id, text, normalized or text, wav_path(corpus_dir, clip_id)))
    if not clips:
        raise CorpusError(f"{path}: no clips (the file is empty); add 'id|transcript' lines")
    return clips


def write_metadata(corpus_dir: str | Path, clips: Iterable[Clip]) -> Path:
    """Write DIR/metadata.csv (3 columns, UTF-8, atomically)."""
    path = Path(corpus_dir) / METADATA
    lines = []
    for clip in clips:
        problem = _check_id(clip.id)
        if problem:
            raise CorpusError(f"{path}: cannot write clip {clip.id!r}: {problem}")
        for name, value in (("id", clip.id), ("text", clip.text), ("normalized_text", clip.normalized_text)):
            if "|" in value or "\n" in value or "\r" in value:
                raise CorpusError(f"{path}: cannot write clip {clip.id!r}: its {name} contains '|' or a "
                                  "line break, which the LJSpeech format cannot hold")
        if not clip.text.strip():
            raise CorpusError(f"{path}: cannot write clip {clip.id!r}: its transcript is empty")
        lines.append(f"{clip.id}|{clip.text}|{clip.normalized_text or clip.text}\n")
    atomic_write_text(path, "".join(lines))
    return path


def read_labels(corpus_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Parse DIR/labels.jsonl -> {id: the line's object (with its "id")}; {} when there is none."""
    path = Path(corpus_dir) / LABELS
    if not path.is_file():
        return {}
    labels: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each line "
                              'must be one JSON object like {"id": "clip1", "gender": "female"}') from exc
        if not isinstance(obj, dict):
            raise CorpusError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        clip_id = obj.get("id")
        if not isinstance(clip_id, str) or not clip_id:
            raise CorpusError(f"{path}:{number}: the object has no string \"id\" naming its clip")
        if clip_id in labels:
            raise CorpusError(f"{path}:{number}: duplicate id {clip_id!r}; merge its labels into one line")
        labels[clip_id] = obj
    return labels


def write_labels(corpus_dir: str | Path, labels: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write DIR/labels.jsonl atomically: one ``{"id": ..., **labels}`` object per line."""
    path = Path(corpus_dir) / LABELS
    lines = [json.dumps({"id": clip_id, **{k: v for k, v in values.items() if k != "id"}},
                        ensure_ascii=False) + "\n"
             for clip_id, values in labels.items()]
    atomic_write_text(path, "".join(lines))
    return path


def read_source(corpus_dir: str | Path) -> dict[str, Any] | None:
    """DIR/source.json (which source made the folder, with which settings), or None."""
    path = Path(corpus_dir) / SOURCE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def write_source(corpus_dir: str | Path, info: Mapping[str, Any]) -> None:
    atomic_write_text(Path(corpus_dir) / SOURCE, json.dumps(dict(info), indent=2) + "\n")


def claim_corpus_dir(out_dir: str | Path, source: str) -> dict[str, Any] | None:
    """Refuse to write into a folder that holds a corpus made by something else.

    Returns the folder's source.json (None when there is none).
    """
    out_dir = Path(out_dir)
    info = read_source(out_dir)
    if (out_dir / METADATA).exists() and (info is None or info.get("source") != source):
        made_by = f"the '{info.get('source')}' source" if info else "another tool"
        raise CorpusError(f"{out_dir} already holds a corpus made by {made_by} (metadata.csv); "
                          f"choose an empty folder for the {source} corpus, or delete that one first")
    return info


def corpus_summary(corpus_dir: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Counts from metadata.csv, labels.jsonl and the wav headers (no audio is decoded).

    Keys: dir, source (from source.json, or None), n_clips, total_duration_s, sample_rates
    ({Hz: clips}), missing_wavs and unreadable_wavs (ids), n_labelled, voices ({speaker: clips})
    and accents ({accent: clips}).
    """
    corpus_dir = Path(corpus_dir)
    clips = read_metadata(corpus_dir)
    labels = read_labels(corpus_dir)
    total, missing, unreadable = 0.0, [], []
    rates: Counter[int] = Counter()
    for i, clip in enumerate(clips):
        if not clip.wav_path.is_file():
            missing.append(clip.id)
        else:
            try:
                sr, seconds = audio_info(clip.wav_path)
            except AudioError:
                unreadable.append(clip.id)
            else:
                rates[sr] += 1
                total += seconds
        if progress and (i % 200 == 0 or i == len(clips) - 1):
            progress((i + 1) / len(clips), f"reading headers {i + 1}/{len(clips)}")
    known = [labels[c.id] for c in clips if c.id in labels]
    speakers = Counter(str(v.get("speaker", v.get("voice"))) for v in known if "speaker" in v or "voice" in v)
    accents = Counter(str(v["accent"]) for v in known if "accent" in v)
    source = read_source(corpus_dir)
    return {
        "dir": str(corpus_dir),
        "source": source.get("source") if source else None,
        "n_clips": len(clips),
        "total_duration_s": round(total, 3),
        "sample_rates": dict(rates),
        "missing_wavs": missing,
        "unreadable_wavs": unreadable,
        "n_labelled": len(known),
        "voices": dict(speakers.most_common()),
        "accents": dict(accents.most_common()),
    }
