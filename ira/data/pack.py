"""`ira data pack`: a copy of a prepared corpus that travels to a device machine without its wavs.

A device machine receives at most 64 MiB; the 20,000-clip corpus's wavs are ~2.6 GB. What travels is what
the recipe reads besides the audio: metadata.csv, labels.jsonl, source.json, the annotations and their
statistics, prepare_report.json, the fitted MelCodec and the token cache (ira/data/cache_only.py says how
the device trusts that cache), and on request the style stage's log-mels made from the wavs (else the
device decodes them from the tokens, ira/data/style_mels.py). Nothing the device computes for itself (the
speech-feature, style-table and teacher caches) travels.

The copy is a folder, or a gzip'd tar archive when DEST ends in .tgz or .tar.gz (about a third of the size:
the MelCodec's int16 tokens and the JSON compress well); `scripts/gpu_recipe.sh` takes either as CORPUS.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ira.codec import mel_codec_path, resolve_codec_name
from ira.config import IRAConfig
from ira.data.corpus import LABELS, METADATA, SOURCE
from ira.data.prepare import prepare_corpus
from ira.data.style_mels import MelSettings, split_mels
from ira.data.token_cache import SPLITS, load_split

TRAVEL_BUDGET_BYTES = 64 * 2**20
"""What a device machine receives (the repository's working tree travels in the same 64 MiB)."""
NEEDED = (METADATA, "annotations.jsonl", "annotation_stats.json", "prepare_report.json")
OPTIONAL = (LABELS, SOURCE)
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz")


class PackError(RuntimeError):
    """A travelling copy that cannot be made (over the budget, or a destination that is not free)."""


@dataclass
class PackResult:
    out: Path
    files: list[str]          # paths relative to the corpus folder
    bytes: int                # what travels: the folder's files, or the archive
    raw_bytes: int            # the files before compression
    clips: int

    def summary(self) -> str:
        mib, per_clip = self.bytes / 2**20, self.bytes / max(self.clips, 1) / 1024
        raw = f" ({self.raw_bytes / 2**20:.1f} MiB before compression)" if self.raw_bytes != self.bytes else ""
        return (f"{self.out}: {len(self.files)} files, {mib:.1f} MiB{raw} for {self.clips} clips "
                f"({per_clip:.2f} KiB a clip), within the {TRAVEL_BUDGET_BYTES / 2**20:.0f} MiB a device receives")


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


def travelling_files(cfg: IRAConfig, data_dir: Path, style_mels: bool = False) -> tuple[list[Path], int]:
    """The files of `data_dir` that travel (absolute paths) and the number of clips, after preparing the corpus
    with `cfg` (a no-op when its cache is fresh; it records the cache's text hash when missing). With
    `style_mels`, the style stage's log-mels are made from the wavs first (minutes on a large corpus)."""
    prepared = prepare_corpus(cfg, data_dir)
    missing = [name for name in NEEDED if not (data_dir / name).is_file()]
    if missing:
        raise PackError(f"{data_dir} lacks {', '.join(missing)} after preparation; run `ira data prepare --dir "
                        f"{data_dir} --force` where the wavs are")
    files = [data_dir / name for name in NEEDED + OPTIONAL if (data_dir / name).is_file()]
    if resolve_codec_name(cfg.codec) == "mel":
        files += [mel_codec_path(data_dir), mel_codec_path(data_dir).with_suffix(".json")]
    files += [prepared.cache_files[split] for split in SPLITS]
    if style_mels:
        settings = MelSettings.of(cfg.style, cfg.data.trim_silence_db)
        for split in SPLITS:
            tokens = load_split(prepared.cache_files[split], prepared.codec.fingerprint)
            files.append(split_mels(data_dir, split, tokens, prepared.codec, settings).path)
    return files, prepared.kept


def _check_destination(data_dir: Path, out: Path) -> None:
    if out.resolve() == data_dir.resolve() or data_dir.resolve() in out.resolve().parents:
        raise PackError(f"{out}: the travelling copy cannot be written inside the corpus {data_dir}")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise PackError(f"{out} already exists and is not an empty folder; remove it or name another")


def _over_budget(what: str, size: int, budget: int, files: list[Path], archive: bool) -> PackError:
    largest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:3]
    shown = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in largest)
    hint = "leave out --style-mels, or use a smaller corpus" if archive else \
        "write a .tgz archive instead (about a third of the size), or leave out --style-mels"
    return PackError(f"{what} is {size / 2**20:.1f} MiB, over the {budget / 2**20:.0f} MiB a device machine "
                     f"receives (largest: {shown}); {hint}")


def pack_corpus(cfg: IRAConfig, data_dir: str | Path, out: str | Path, style_mels: bool = False,
                budget: int = TRAVEL_BUDGET_BYTES) -> PackResult:
    """Copy what travels of the prepared corpus `data_dir` (without its wavs) to `out`: a new folder, or an
    archive when `out` ends in .tgz / .tar.gz. PackError, and nothing left at `out`, when it is over `budget`."""
    data_dir, out = Path(data_dir), Path(out)
    _check_destination(data_dir, out)
    files, clips = travelling_files(cfg, data_dir, style_mels)
    names = [str(p.relative_to(data_dir)) for p in files]
    raw = sum(p.stat().st_size for p in files)
    if is_archive(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                for path, name in zip(files, names):
                    tar.add(path, arcname=name)
            size = tmp.stat().st_size
            if size > budget:
                raise _over_budget(f"the archive {out}", size, budget, files, archive=True)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return PackResult(out, names, size, raw, clips)
    if raw > budget:
        raise _over_budget(f"the copy of {data_dir} without its wavs", raw, budget, files, archive=False)
    for path, name in zip(files, names):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / name)
    return PackResult(out, names, raw, raw, clips)
