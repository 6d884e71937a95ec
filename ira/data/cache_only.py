"""A corpus that travels without its wavs: its token cache is used as built.

A device machine receives at most 64 MiB, and the 20,000-clip corpus's wavs alone are ~2.6 GB; what travels
is metadata.csv, labels.jsonl, the annotations, the fitted codec and the token cache (`ira data pack`,
ira/data/pack.py). The cache's freshness hash covers the wav files (names, sizes, times), so it cannot be
recomputed there; each cache file therefore also records `text_hash`, the same hash without the wavs
(metadata.csv, labels.jsonl and the preprocessing settings), and a corpus without wavs whose text hash and
codec match uses its cache as built. Anything else is a `WavlessCorpusError` saying where to build the cache:
nothing can be re-encoded without the audio.
"""

from __future__ import annotations

from pathlib import Path

from ira.data.corpus import WAVS, CorpusError, read_metadata, wav_path
from ira.data.token_cache import FORMAT_VERSION, SPLITS, CacheError, read_split_metadata, split_path


class WavlessCorpusError(CorpusError):
    """A corpus without its wavs whose token cache cannot be used as built; the fix is on the machine with the
    wavs."""


def has_wavs(data_dir: Path) -> bool:
    """Whether DIR/wavs/ holds the wav of at least one clip of metadata.csv. True also when metadata.csv cannot
    be read: preparation then reports what is wrong with it, as for any corpus."""
    if not (data_dir / WAVS).is_dir():
        return False
    try:
        clips = read_metadata(data_dir)
    except CorpusError:
        return True
    return any(wav_path(data_dir, clip.id).is_file() for clip in clips)


def token_cache_problem(data_dir: Path, fingerprint: str, text_digest: str) -> str | None:
    """Why the token cache of `data_dir` for codec `fingerprint` is not this corpus's, judged without the wavs
    (`text_digest`: `ira.data.prepare.text_hash` of the corpus as it is here); None when it is."""
    for split in SPLITS:
        path = split_path(data_dir, fingerprint, split)
        if not path.is_file():
            return f"it has no token cache for the codec {fingerprint} ({path} is missing)"
        try:
            meta = read_split_metadata(path)
        except CacheError as exc:
            return str(exc)
        if meta.get("format_version") != FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
            return f"{path} is a token cache of another format or codec ({meta.get('fingerprint')!r})"
        if not meta.get("text_hash"):
            return (f"{path} was built before caches recorded their text hash (`ira data prepare` where the "
                    f"wavs are adds it without encoding again)")
        if meta["text_hash"] != text_digest:
            return (f"{path} was built from another metadata.csv or labels.jsonl, or under other data settings "
                    f"(data.min_duration, max_duration, val_fraction, max_text_chars, trim_silence_db, "
                    f"speech_lm.text_tokenizer, max_text_tokens)")
    return None


def wavless_error(data_dir: Path, problem: str) -> WavlessCorpusError:
    """The error of a corpus without wavs whose cache cannot be used: what is wrong, and the two commands that
    build and copy the cache on the machine where the wavs are."""
    return WavlessCorpusError(
        f"{data_dir} has no wavs ({data_dir / WAVS} holds none of the clips of metadata.csv), so its token cache "
        f"must be used as built, but {problem}. Build the cache where the wavs are, with this run's config "
        f"(the same --config and --set): `ira data prepare --dir CORPUS --config PRESET`, then copy it without "
        f"the wavs: `ira data pack --dir CORPUS --out DEST --config PRESET`")
