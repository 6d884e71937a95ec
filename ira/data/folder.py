"""A user's own folder in LJSpeech layout: validate it, and optionally copy it into the workspace."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ira.data.corpus import (LABELS, METADATA, WAVS, Clip, CorpusError, Progress, claim_corpus_dir, read_labels,
                             read_metadata, wav_path, write_labels, write_metadata, write_source)

_SHOWN = 10


def check_folder(src: str | Path) -> list[Clip]:
    """Parse `src`'s metadata.csv (and labels.jsonl) and check every clip's wav exists."""
    src = Path(src)
    if not src.is_dir():
        raise CorpusError(f"{src}: no such folder; give a folder holding metadata.csv and wavs/")
    if not (src / WAVS).is_dir():
        raise CorpusError(f"{src}: no wavs/ folder; put the clips in {src / WAVS}/<id>.wav, one per "
                          "metadata.csv line (the LJSpeech layout)")
    clips = read_metadata(src)
    read_labels(src)
    missing = [c for c in clips if not c.wav_path.is_file()]
    if missing:
        shown = ", ".join(str(c.wav_path.name) for c in missing[:_SHOWN])
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise CorpusError(f"{src / METADATA} lists {len(missing)} clip(s) of {len(clips)} whose wav is "
                          f"missing from {src / WAVS}: {shown}{more}; add the files or remove those lines")
    return clips


def check_outside_wavs(src: Path, out_dir: Path) -> None:
    """The copy may not go into the source's own wavs/ folder: its metadata.csv and wavs/ would sit among the
    clips it copies (and a later import of the source would read them as clips)."""
    wavs = (src / WAVS).resolve()
    if out_dir.resolve() == wavs or out_dir.resolve().is_relative_to(wavs):
        raise CorpusError(f"{out_dir} is inside {src / WAVS}, the folder of the clips it would copy; choose a folder "
                          f"outside it (e.g. {src.parent / (src.name + '-copy')}), or leave out --out to use "
                          f"{src} in place")


def _same_file(src: Path, dst: Path) -> bool:
    """dst is src's hard link or a copy with its size and modification time."""
    if not dst.is_file():
        return False
    a, b = src.stat(), dst.stat()
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk space) where the file system allows it, else copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    tmp.replace(dst)


def import_folder(src: str | Path, out_dir: str | Path | None = None,
                  progress: Progress | None = None) -> Path:
    """Validate a folder in LJSpeech layout; with `out_dir`, link or copy it there. Returns the corpus dir.

    Only the clips metadata.csv lists are brought over, as hard links where possible (nothing in
    ira rewrites a wav in place, so the originals are safe); a re-import skips wavs already
    there. `out_dir` must be empty or hold an earlier import.
    """
    src = Path(src)
    clips = check_folder(src)
    if out_dir is None or Path(out_dir).resolve() == src.resolve():
        if progress:
            progress(1.0, f"{len(clips)} clips in {src} are ready")
        return src
    out_dir = Path(out_dir)
    check_outside_wavs(src, out_dir)
    claim_corpus_dir(out_dir, "folder")
    (out_dir / WAVS).mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips):
        dst = wav_path(out_dir, clip.id)
        if not _same_file(clip.wav_path, dst):
            _link_or_copy(clip.wav_path, dst)
        if progress and (i % 100 == 0 or i == len(clips) - 1):
            progress((i + 1) / len(clips), f"imported {i + 1}/{len(clips)} clips")
    write_metadata(out_dir, [Clip(c.id, c.text, c.normalized_text, wav_path(out_dir, c.id)) for c in clips])
    labels = read_labels(src)
    if labels:
        write_labels(out_dir, labels)
    elif (out_dir / LABELS).exists():
        (out_dir / LABELS).unlink()
    write_source(out_dir, {"source": "folder", "from": str(src.resolve()), "n_clips": len(clips)})
    return out_dir
