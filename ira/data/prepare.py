"""`ira data prepare`: validate, trim, annotate, describe, fit the codec (MelCodec) and cache tokens.

Runs once per corpus and codec. Every clip that cannot be used is dropped *and reported* (unreadable,
silent, too short, too long, empty or over-long text) in DIR/prepare_report.json, so nothing is lost
silently. Re-running on unchanged data and codec settings is a no-op (the cache is fresh).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ira.audio import AudioError, load_audio, rms_db, trim_silence
from ira.codec import build_codec, mel_codec_path, resolve_codec_name
from ira.codec.base import Codec
from ira.codec.mel import SAMPLE_RATE as MEL_SAMPLE_RATE
from ira.codec.mel import MelCodec
from ira.config import IRAConfig
from ira.data.annotate import annotate_clip, fit_annotation_stats
from ira.data.cache_only import has_wavs, token_cache_problem, wavless_error
from ira.data.corpus import Clip, read_labels, read_metadata
from ira.data.descriptions import describe
from ira.data.token_cache import SPLITS, is_fresh, read_split_metadata, record_metadata, split_path, write_split
from ira.models.reading_rate import IMPLAUSIBLE_CHARS_PER_SECOND, min_seconds_for
from ira.text_tokenizer import TextNotReadableError, build_text_tokenizer

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
SILENCE_DB = -55.0
DESCRIPTIONS_PER_CLIP = 4
SPLIT_RULE = "split-by-sentence-v1"
"""Part of the data hash: a cache made under another train/val rule (by clip id, before) is stale."""
WAV_MEMO_BYTES = 2 * 2**30
PARALLEL_FROM = 1000
"""Corpora of at least this many clips are checked and encoded in worker processes."""   # keep trimmed clips in memory up to this size (a 600-clip corpus is ~170 MB)


@dataclass
class PrepareResult:
    data_dir: Path
    codec: Codec
    cache_files: dict[str, Path]
    kept: int = 0
    dropped: list[dict] = field(default_factory=list)
    total_seconds: float = 0.0
    rebuilt: bool = True
    elapsed_s: float = 0.0

    def summary(self) -> str:
        state = "built" if self.rebuilt else "already fresh"
        return (f"{self.data_dir}: {self.kept} clips kept ({self.total_seconds / 60:.1f} min), "
                f"{len(self.dropped)} dropped; token cache {state} with {self.codec.describe()}")


def sentence_key(text: str) -> str:
    """What makes two transcripts the same sentence for the split: lowercase words, no punctuation."""
    return " ".join(re.findall(r"[\w']+", text.lower()))


def split_of(text: str, val_fraction: float) -> str:
    """Deterministic split from the normalised sentence alone: every clip of a sentence lands on the same
    side (validation then measures speaking text never trained on), and adding clips never moves old ones."""
    bucket = int(hashlib.sha1(sentence_key(text).encode("utf-8")).hexdigest(), 16) % 10_000
    return "val" if bucket < val_fraction * 10_000 else "train"


def data_hash(data_dir: Path, cfg: IRAConfig) -> str:
    """Hash of everything the cache depends on besides the codec: files and preprocessing settings."""
    return _corpus_hash(data_dir, cfg, with_wavs=True)


def text_hash(data_dir: Path, cfg: IRAConfig) -> str:
    """`data_hash` without the wavs: metadata.csv, labels.jsonl and the settings. Each cache file records it, so
    that a corpus copied without its wavs (to a device machine) can still tell whether its cache is its own."""
    return _corpus_hash(data_dir, cfg, with_wavs=False)


def _corpus_hash(data_dir: Path, cfg: IRAConfig, with_wavs: bool) -> str:
    h = hashlib.sha1(SPLIT_RULE.encode())
    for name in ("metadata.csv", "labels.jsonl"):
        path = data_dir / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    wavs = data_dir / "wavs"
    if with_wavs and wavs.is_dir():
        for entry in sorted(os.scandir(wavs), key=lambda e: e.name):
            stat = entry.stat()
            h.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    d = cfg.data
    h.update(json.dumps([d.min_duration, d.max_duration, d.val_fraction, d.max_text_chars,
                         d.trim_silence_db, SILENCE_DB, IMPLAUSIBLE_CHARS_PER_SECOND]).encode())
    if cfg.speech_lm.text_tokenizer.split(":")[0] == "phoneme":   # it decides which transcripts are kept
        h.update(json.dumps([cfg.speech_lm.text_tokenizer, cfg.speech_lm.max_text_tokens]).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str) -> Any:
    return build_text_tokenizer(name)


def _text_problem(text: str, cfg: IRAConfig) -> str | None:
    """Why the SpeechLM could not read this transcript (None: it can): the phoneme tokenizer cannot read
    it (another script, emoji), or it is longer than speech_lm.max_text_tokens."""
    if cfg.speech_lm.text_tokenizer.split(":")[0] != "phoneme":
        return None     # characters and BPE read anything; their length is checked when training
    try:
        n_tokens = len(_tokenizer(cfg.speech_lm.text_tokenizer).encode(text))
    except TextNotReadableError as exc:
        return f"unreadable transcript: {exc}"
    if n_tokens > cfg.speech_lm.max_text_tokens:
        return (f"transcript of {n_tokens} phonemes is over speech_lm.max_text_tokens="
                f"{cfg.speech_lm.max_text_tokens}")
    return None


def _check_clip(clip: Clip, cfg: IRAConfig, sample_rate: int) -> tuple[torch.Tensor | None, str | None]:
    """Load and trim one clip; return (waveform, None) or (None, reason it was dropped)."""
    text = clip.normalized_text.strip()
    if not text:
        return None, "empty transcript"
    if len(text) > cfg.data.max_text_chars:
        return None, f"transcript of {len(text)} characters is over data.max_text_chars={cfg.data.max_text_chars}"
    problem = _text_problem(text, cfg)
    if problem:
        return None, problem
    try:
        wav = load_audio(clip.wav_path, sample_rate)
    except AudioError as exc:
        return None, f"unreadable audio: {exc}"
    if rms_db(wav) < SILENCE_DB:
        return None, f"silent (RMS {rms_db(wav):.0f} dBFS)"
    wav = trim_silence(wav, sample_rate, top_db=cfg.data.trim_silence_db)
    seconds = wav.numel() / sample_rate
    if seconds < cfg.data.min_duration:
        return None, f"too short after trimming silence ({seconds:.2f} s < data.min_duration={cfg.data.min_duration})"
    if seconds > cfg.data.max_duration:
        return None, f"too long ({seconds:.1f} s > data.max_duration={cfg.data.max_duration})"
    if seconds < min_seconds_for(text):
        return None, (f"too short for its transcript ({seconds:.2f} s after trimming silence for {len(text)} characters: "
                      f"{len(text) / seconds:.0f} characters a second, faster than any speech reads "
                      f"({IMPLAUSIBLE_CHARS_PER_SECOND:g}); is the audio cut, or the transcript another clip's?)")
    return wav, None


class _TrimmedClips:
    """Checked, trimmed waveforms at one sample rate, remembered while they fit in WAV_MEMO_BYTES.

    Preparation reads each clip up to three times (annotate, fit the codec, encode); for corpora that
    fit in memory this reads and resamples each file once.
    """

    def __init__(self, cfg: IRAConfig, sample_rate: int):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.memo: dict[str, torch.Tensor] = {}
        self.bytes = 0

    def get(self, clip: Clip) -> tuple[torch.Tensor | None, str | None]:
        if clip.id in self.memo:
            return self.memo[clip.id], None
        wav, reason = _check_clip(clip, self.cfg, self.sample_rate)
        if wav is not None and self.bytes + wav.numel() * 4 <= WAV_MEMO_BYTES:
            self.memo[clip.id] = wav
            self.bytes += wav.numel() * 4
        return wav, reason


# -- the per-clip passes, in worker processes for large corpora ---------------------------------------
# Each clip is checked, trimmed and annotated (pass 1), then encoded (pass 2) on its own: the result is
# the same whether it runs here or in a worker, so a corpus gets the same cache for any worker count.

_worker: dict = {}


def _init_worker(cfg: IRAConfig, data_dir: Path | None, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    _worker.clear()
    _worker.update(cfg=cfg, data_dir=data_dir, codec=None)


def _annotate_one(clip: Clip, labels: dict | None) -> tuple[dict | None, str | None]:
    """Pass 1 for one clip: (annotation, None) or (None, why it is dropped)."""
    wav, reason = _check_clip(clip, _worker["cfg"], MEL_SAMPLE_RATE)
    if wav is None:
        return None, reason
    ann = annotate_clip(wav, MEL_SAMPLE_RATE, clip.normalized_text, labels)
    ann.update({"id": clip.id, "text": clip.normalized_text})
    return ann, None


def _encode_one(clip: Clip) -> tuple[np.ndarray, float]:
    """Pass 2 for one clip: (codes [K, T] int16, seconds) with the corpus's codec. A numpy array, not a
    tensor: torch sends tensors between processes through shared-memory file descriptors, one per
    tensor, and a corpus of 20,000 clips ran out of them."""
    if _worker["codec"] is None:
        _worker["codec"] = build_codec(_worker["cfg"].codec, _worker["data_dir"])
    codec = _worker["codec"]
    wav, reason = _check_clip(clip, _worker["cfg"], codec.sample_rate)
    if wav is None:
        raise RuntimeError(f"{clip.id}: usable in the first pass but not now ({reason}); did the file change?")
    with torch.inference_mode():
        codes = codec.encode(wav, codec.sample_rate)
    return codes.to(torch.int16).numpy(), wav.numel() / codec.sample_rate


def _star(args: tuple) -> Any:
    fn, rest = args[0], args[1:]
    return fn(*rest)


def _map_clips(fn: Callable, items: list[tuple], cfg: IRAConfig, data_dir: Path, workers: int,
               on_done: Callable[[int], None]) -> list:
    """[fn(*item) for item in items], in order, in `workers` processes (here when 1); `on_done(i)` after each."""
    if workers <= 1:
        _init_worker(cfg, data_dir, torch.get_num_threads())
        out = []
        for i, item in enumerate(items):
            out.append(fn(*item))
            on_done(i)
        return out
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(cfg, data_dir)) as pool:
        out = []
        for i, result in enumerate(pool.map(_star, [(fn, *item) for item in items], chunksize=32)):
            out.append(result)
            on_done(i)
        return out


def prepare_workers(n_clips: int) -> int:
    """Worker processes for the per-clip passes: one per CPU core (at most 4) for corpora large enough to
    pay for starting them (~3 s each), else none (1 = in this process, which also remembers the trimmed
    audio between passes)."""
    return min(4, os.cpu_count() or 1) if n_clips >= PARALLEL_FROM else 1


def _emit(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def _write_json_atomic(path: Path, payload: object, jsonl: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if jsonl:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in payload))  # type: ignore[union-attr]
    else:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _mel_codec_is_current(data_dir: Path, cfg: IRAConfig, digest: str | None, encoding: bool = False) -> bool:
    """Whether the corpus's fitted MelCodec can be kept: it exists with today's codec settings.

    A corpus that grew or changed since the fit KEEPS its codec (the clips are re-encoded with it): a refit
    would change the codec's fingerprint and so make every checkpoint trained on this corpus unresumable.
    `ira data prepare --force` refits on the clips as they are now. `encoding`: the caller is about to encode
    the clips, so a codec kept for a changed corpus is said (a freshness check says nothing: a cache already
    re-encoded with the kept codec is used as it is, at every later run).
    """
    stamp = mel_codec_path(data_dir).with_suffix(".json")
    if not (mel_codec_path(data_dir).is_file() and stamp.is_file()):
        return False
    try:
        info = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    c = cfg.codec
    settings = {"n_codebooks": c.mel_n_codebooks, "codebook_size": c.mel_codebook_size, "n_mels": c.mel_n_mels}
    if any(info.get(key) != value for key, value in settings.items()):
        return False
    if encoding and digest is not None and info.get("data_hash") != digest:
        log.info("%s changed since its MelCodec was fitted: keeping that codec (fingerprint unchanged, so "
                 "checkpoints trained on this corpus still resume) and re-encoding the clips with it; "
                 "`ira data prepare --force` refits it", data_dir)
    return True


def _fit_mel_codec(data_dir: Path, cfg: IRAConfig, kept: list[tuple[Clip, str]], digest: str,
                   clips: _TrimmedClips, progress: Progress | None) -> None:
    """Fit the MelCodec on (a seeded subset of) the training clips and save it next to the corpus."""
    train = [clip for clip, split in kept if split == "train"] or [clip for clip, _ in kept]
    rng = random.Random(cfg.data.split_seed)
    rng.shuffle(train)
    budget = cfg.codec.mel_max_fit_frames / 75.0  # seconds of audio the fit can use

    def wavs():
        used = 0.0
        for clip in train:
            if used >= budget:
                break
            wav, _ = clips.get(clip)
            if wav is not None:
                used += wav.numel() / MEL_SAMPLE_RATE
                yield wav

    codec = MelCodec.fit(wavs(), cfg.codec, seed=cfg.data.split_seed,
                         progress=lambda f, m: _emit(progress, 0.35 + 0.25 * f, f"fitting MelCodec: {m}"))
    codec.save(mel_codec_path(data_dir))
    c = cfg.codec
    _write_json_atomic(mel_codec_path(data_dir).with_suffix(".json"),
                       {"data_hash": digest, "n_codebooks": c.mel_n_codebooks,
                        "codebook_size": c.mel_codebook_size, "n_mels": c.mel_n_mels})


def cache_only_problem(cfg: IRAConfig, data_dir: str | Path | None = None) -> str | None:
    """For a corpus without its wavs: why its token cache cannot be used as built (None: it can). Its codec (the
    fitted MelCodec travels beside the cache) must be the configured one, and its cache must record the text
    hash of this metadata.csv, labels.jsonl and these settings (ira/data/cache_only.py)."""
    data_dir = Path(data_dir or cfg.data.dir)
    if resolve_codec_name(cfg.codec) == "mel" and not _mel_codec_is_current(data_dir, cfg, None):
        return (f"it has no MelCodec fitted with these codec settings ({mel_codec_path(data_dir)} and its .json "
                f"stamp are missing, or were fitted with other codec.mel_* settings)")
    try:
        codec = build_codec(cfg.codec, data_dir)
    except Exception as exc:   # noqa: BLE001 - any reason the codec cannot be built is the answer
        return f"its codec cannot be built ({exc})"
    return token_cache_problem(data_dir, codec.fingerprint, text_hash(data_dir, cfg))


def cache_is_fresh(cfg: IRAConfig, data_dir: str | Path | None = None) -> bool:
    """True when the token cache of `data_dir` matches its data and the configured codec (for a corpus without
    its wavs: when it can be used as built, `cache_only_problem`)."""
    data_dir = Path(data_dir or cfg.data.dir)
    if not has_wavs(data_dir):
        return cache_only_problem(cfg, data_dir) is None
    digest = data_hash(data_dir, cfg)
    if resolve_codec_name(cfg.codec) == "mel" and not _mel_codec_is_current(data_dir, cfg, digest):
        return False
    try:
        codec = build_codec(cfg.codec, data_dir)
    except Exception:
        return False
    return all(is_fresh(split_path(data_dir, codec.fingerprint, s), codec.fingerprint, digest) for s in SPLITS)


def prepare_corpus(cfg: IRAConfig, data_dir: str | Path | None = None, progress: Progress | None = None,
                   force: bool = False) -> PrepareResult:
    """Validate, annotate and encode the corpus in `data_dir` (default cfg.data.dir); idempotent."""
    start = time.time()
    data_dir = Path(data_dir or cfg.data.dir)
    clips = read_metadata(data_dir)
    labels = read_labels(data_dir)
    if not has_wavs(data_dir):
        return _use_as_built(cfg, data_dir, force, progress, start)
    digest = data_hash(data_dir, cfg)
    codec_name = resolve_codec_name(cfg.codec)

    if not force and cache_is_fresh(cfg, data_dir):
        result = _fresh_result(cfg, data_dir, progress, start)
        _record_text_hash(result, text_hash(data_dir, cfg))
        return result

    # Pass 1: validate, trim and annotate every clip.
    sample_rate = MEL_SAMPLE_RATE  # both codecs run at 24 kHz
    trimmed = _TrimmedClips(cfg, sample_rate)
    workers = prepare_workers(len(clips))

    def checked(i: int) -> None:
        if i % 10 == 0 or i == len(clips) - 1:
            _emit(progress, 0.35 * (i + 1) / len(clips), f"checking and annotating clips {i + 1}/{len(clips)}")

    if workers > 1:
        results = _map_clips(_annotate_one, [(clip, labels.get(clip.id)) for clip in clips], cfg, data_dir,
                             workers, checked)
    else:   # here, remembering the trimmed audio for the codec fit and the encoding
        results = []
        for i, clip in enumerate(clips):
            wav, reason = trimmed.get(clip)
            if wav is not None:
                ann = annotate_clip(wav, sample_rate, clip.normalized_text, labels.get(clip.id))
                ann.update({"id": clip.id, "text": clip.normalized_text})
                results.append((ann, None))
            else:
                results.append((None, reason))
            checked(i)
    annotations: list[dict] = []
    kept: list[tuple[Clip, str]] = []
    dropped: list[dict] = []
    for clip, (ann, reason) in zip(clips, results):
        if ann is None:
            dropped.append({"id": clip.id, "file": str(clip.wav_path), "reason": reason})
            log.warning("dropping %s: %s", clip.id, reason)
        else:
            annotations.append(ann)
            kept.append((clip, split_of(clip.normalized_text, cfg.data.val_fraction)))
    if not kept:
        raise RuntimeError(f"{data_dir}: no usable clip among {len(clips)} (see {data_dir / 'prepare_report.json'}); "
                           f"first problem: {dropped[0]['id']}: {dropped[0]['reason']}" if dropped else
                           f"{data_dir}: metadata.csv lists no clips")
    _write_json_atomic(data_dir / "prepare_report.json",
                       {"kept": len(kept), "dropped": dropped, "status": "annotating"})
    if cfg.data.val_fraction > 0 and len(kept) >= 2 and not any(s == "val" for _, s in kept):
        # A tiny corpus may hash no sentence into val: move the sentence closest to the threshold (all its
        # clips, so no sentence is on both sides), unless that would leave nothing to train on.
        def key(j: int) -> str:
            return hashlib.sha1(sentence_key(kept[j][0].normalized_text).encode()).hexdigest()
        chosen = key(min(range(len(kept)), key=key))
        moved = [(clip, "val" if key(j) == chosen else split) for j, (clip, split) in enumerate(kept)]
        if any(split == "train" for _, split in moved):
            kept = moved

    # Descriptions, relative to this corpus.
    stats = fit_annotation_stats(annotations)
    for ann in annotations:
        rng = random.Random(f"{cfg.data.split_seed}:{ann['id']}")
        ann["descriptions"] = describe(ann, stats, rng, n=DESCRIPTIONS_PER_CLIP)
    _write_json_atomic(data_dir / "annotations.jsonl", annotations, jsonl=True)
    _write_json_atomic(data_dir / "annotation_stats.json", stats)

    # The codec: fit MelCodec on this corpus when needed.
    if codec_name == "mel" and (force or not _mel_codec_is_current(data_dir, cfg, digest, encoding=True)):
        _emit(progress, 0.35, "fitting MelCodec on the training clips")
        _fit_mel_codec(data_dir, cfg, kept, digest, trimmed, progress)
    codec = build_codec(cfg.codec, data_dir)
    if codec.sample_rate != trimmed.sample_rate:
        trimmed = _TrimmedClips(cfg, codec.sample_rate)

    # Pass 2: encode every kept clip once.
    def encoded(i: int) -> None:
        if i % 10 == 0 or i == len(kept) - 1:
            _emit(progress, 0.6 + 0.38 * (i + 1) / len(kept), f"encoding clips {i + 1}/{len(kept)}")

    if workers > 1:
        coded = [(torch.from_numpy(codes), seconds) for codes, seconds in
                 _map_clips(_encode_one, [(clip,) for clip, _ in kept], cfg, data_dir, workers, encoded)]
    else:
        coded = []
        for i, (clip, _) in enumerate(kept):
            wav, _ = trimmed.get(clip)
            assert wav is not None  # it passed the same check in pass 1
            with torch.inference_mode():
                coded.append((codec.encode(wav, codec.sample_rate), wav.numel() / codec.sample_rate))
            encoded(i)
    by_split: dict[str, dict[str, list]] = {s: {"codes": [], "ids": [], "texts": [], "desc": []} for s in SPLITS}
    total_seconds = 0.0
    for (clip, split), ann, (codes, seconds) in zip(kept, annotations, coded):
        total_seconds += seconds
        part = by_split[split]
        part["codes"].append(codes)
        part["ids"].append(clip.id)
        part["texts"].append(clip.normalized_text)
        part["desc"].append(ann["descriptions"])

    files = {}
    texts_digest = text_hash(data_dir, cfg)
    for split in SPLITS:
        part = by_split[split]
        files[split] = write_split(split_path(data_dir, codec.fingerprint, split), part["codes"], part["ids"],
                                   part["texts"], part["desc"], codec.fingerprint, digest, split,
                                   text_hash=texts_digest)
    voices = sorted({str(a.get("speaker") or a.get("voice")) for a in annotations if a.get("speaker") or a.get("voice")})
    _write_json_atomic(data_dir / "prepare_report.json", {
        "status": "done", "kept": len(kept), "dropped": dropped, "total_seconds": round(total_seconds, 2),
        "train": len(by_split["train"]["ids"]), "val": len(by_split["val"]["ids"]), "voices": voices,
        "codec": codec.fingerprint, "data_hash": digest,
    })
    _emit(progress, 1.0, "done")
    return PrepareResult(data_dir, codec, files, kept=len(kept), dropped=dropped, total_seconds=total_seconds,
                         rebuilt=True, elapsed_s=time.time() - start)


def _fresh_result(cfg: IRAConfig, data_dir: Path, progress: Progress | None, start: float) -> PrepareResult:
    """The result of a preparation that finds the cache fresh: the codec, the cache files, the last report."""
    codec = build_codec(cfg.codec, data_dir)
    report = json.loads((data_dir / "prepare_report.json").read_text()) \
        if (data_dir / "prepare_report.json").is_file() else {}
    _emit(progress, 1.0, "token cache is fresh")
    return PrepareResult(data_dir, codec, {s: split_path(data_dir, codec.fingerprint, s) for s in SPLITS},
                         kept=report.get("kept", 0), dropped=report.get("dropped", []),
                         total_seconds=report.get("total_seconds", 0.0), rebuilt=False,
                         elapsed_s=time.time() - start)


def _record_text_hash(result: PrepareResult, digest: str) -> None:
    """A fresh cache built before caches recorded their text hash gets it now (no encoding), so that the corpus
    can travel without its wavs (ira/data/cache_only.py)."""
    for path in result.cache_files.values():
        if read_split_metadata(path).get("text_hash") != digest:
            record_metadata(path, {"text_hash": digest})
            log.info("%s: recorded its text hash (the corpus can now travel without its wavs)", path)


def _use_as_built(cfg: IRAConfig, data_dir: Path, force: bool, progress: Progress | None,
                  start: float) -> PrepareResult:
    """A corpus without its wavs (a copy made by `ira data pack`): its token cache as built, or a clear error
    (nothing can be encoded without the audio)."""
    problem = "--force asks to rebuild its token cache" if force else cache_only_problem(cfg, data_dir)
    if problem:
        raise wavless_error(data_dir, problem)
    if data_dir.resolve() not in _SAID_AS_BUILT:
        _SAID_AS_BUILT.add(data_dir.resolve())
        log.warning("%s has no wavs: using its token cache as built (it records this metadata.csv, labels.jsonl "
                    "and these settings; the clips cannot be checked or encoded again here)", data_dir)
    return _fresh_result(cfg, data_dir, progress, start)


_SAID_AS_BUILT: set[Path] = set()
"""Corpora this process has already said it uses as built (every stage prepares the corpus again)."""


def ensure_prepared(cfg: IRAConfig, progress: Progress | None = None, wait_s: float = 6 * 3600) -> PrepareResult:
    """What every training command calls first: build the cache when it is missing or stale.

    Under DDP (torchrun / accelerate launch set RANK) only rank 0 builds; the other ranks wait for a
    fresh cache instead of encoding the same corpus at the same time.
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        deadline = time.time() + wait_s
        while not cache_is_fresh(cfg, cfg.data.dir):
            if time.time() > deadline:
                raise RuntimeError(f"rank {rank}: rank 0 did not finish preparing {cfg.data.dir} within "
                                   f"{wait_s:.0f} s; run `ira data prepare --dir {cfg.data.dir}` first")
            time.sleep(2.0)
    return prepare_corpus(cfg, cfg.data.dir, progress=progress)
