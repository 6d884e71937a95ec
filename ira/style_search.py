"""Search a corpus by voice description: the clips a style encoder hears as nearest a description.

A `StyleIndex` holds the audio-tower embeddings of a corpus's clips for one style encoder (one
checkpoint). Embedding every clip is the slow part (reading and resampling each wav), so the index
is cached in the corpus folder, `DIR/cache/style_index/style_index-<key>.safetensors`, where the key
hashes what the embeddings depend on: the checkpoint's style encoder (`encoder_fingerprint`: its own
tensors, settings and sentence encoder, not the rest of the file, so that every checkpoint of stages
1-3, which carry the encoder they started from unchanged, shares the index of the style checkpoint it
came from), the corpus's metadata.csv and annotations.jsonl (modification time and size), and the
clip cap. A cache whose key, shapes or values do not check out is ignored and
rebuilt; files are written to a temporary name and renamed, so a crash never leaves half a cache.
Changing a wav without touching metadata.csv is not noticed (as for the token cache's quick checks,
re-preparing the corpus rewrites annotations.jsonl and so refreshes the index).

`nearest` ranks the clips by cosine similarity to a query vector (a description's `embed_text`, or
a clip's `embed_audio`); `style_map` projects clips and queries onto the corpus's two principal axes
for a scatter plot; `compare` is the cosine similarity of two descriptions in the style space.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ira.audio import AudioError, load_audio
from ira.codec.mel import SAMPLE_RATE, log_mel
from ira.data.corpus import METADATA, read_metadata, wav_path
from ira.models.style import FRAME_RATE, StyleEncoder, log_mel_input
from ira.checkpoint import atomic_write, read_metadata as read_checkpoint_metadata

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]

DEFAULT_MAX_CLIPS = 2000
EMBED_BATCH = 32
INDEX_FORMAT = "ira-style-index"
INDEX_VERSION = 2   # 2: keyed by the style encoder's weights, not by the checkpoint file and save
CACHE_DIR = Path("cache") / "style_index"
ANNOTATIONS = "annotations.jsonl"
MIN_AXIS_VARIANCE = 1e-12
"""An axis along which the clips vary less than this (unit vectors) is left out of the map."""


class Neighbour(NamedTuple):
    """One clip of a `nearest` answer."""

    clip_id: str
    description: str
    similarity: float
    wav_path: str


@dataclass
class StyleIndex:
    """The clips of one corpus as one style encoder hears them.

    `embeddings[i]` is the unit audio-tower vector of clip `ids[i]`; `descriptions[i]` its first
    voice description from preparation ("" when the corpus is not prepared). `skipped` lists the
    clips that could not be embedded (missing, unreadable or silent wav) with the reason;
    `total_clips` counts every clip of metadata.csv, before the `max_clips` cap.
    """

    corpus_dir: Path
    ids: list[str]
    descriptions: list[str]
    embeddings: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    total_clips: int = 0
    from_cache: bool = False

    @property
    def wav_paths(self) -> list[Path]:
        return [wav_path(self.corpus_dir, clip_id) for clip_id in self.ids]

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StyleMap:
    """2-D coordinates on the corpus's first two principal axes (see `style_map`)."""

    clips: torch.Tensor           # [N, 2]
    queries: torch.Tensor         # [Q, 2]
    explained: torch.Tensor       # [2] share of the clips' variance along each axis


# ------------------------------------------------------------------------------------ building

def _noop(fraction: float, message: str) -> None:
    return None


def read_descriptions(corpus_dir: str | Path) -> dict[str, str]:
    """Clip id -> its first non-blank description in DIR/annotations.jsonl (empty when unprepared).

    Unreadable lines are skipped: descriptions only label the search results.
    """
    path = Path(corpus_dir) / ANNOTATIONS
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "id" not in row:
            continue
        texts = [d for d in row.get("descriptions") or [] if isinstance(d, str) and d.strip()]
        found[str(row["id"])] = texts[0] if texts else ""
    return found


def clip_mel(path: Path, n_mels: int, max_frames: int) -> torch.Tensor:
    """A wav as the style encoder's audio tower reads it (mono 24 kHz, trimmed, log-mel, cut).

    The same steps as `StyleEncoder.embed_audio` on a waveform, done per clip so that one silent or
    broken file is skipped instead of failing its whole batch. Raises AudioError naming the file.
    """
    wav = load_audio(path, SAMPLE_RATE)
    try:
        wav = log_mel_input(wav, SAMPLE_RATE)
    except AudioError as exc:
        raise AudioError(f"{path}: {exc}") from exc
    mel = log_mel(wav, SAMPLE_RATE, n_mels)[:, :max_frames]
    if mel.shape[1] == 0:
        raise AudioError(f"{path}: no audio left after trimming silence")
    return mel


def compute_style_index(encoder: StyleEncoder, corpus_dir: str | Path, max_clips: int = DEFAULT_MAX_CLIPS,
                        progress: Optional[Progress] = None, batch_size: int = EMBED_BATCH) -> StyleIndex:
    """Embed the first `max_clips` clips of metadata.csv with `encoder`'s audio tower (no cache)."""
    if max_clips < 1:
        raise ValueError(f"max_clips must be at least 1, got {max_clips}")
    progress = progress or _noop
    corpus_dir = Path(corpus_dir)
    clips = read_metadata(corpus_dir)
    chosen = clips[:max_clips]
    descriptions = read_descriptions(corpus_dir)
    max_frames = int(encoder.cfg.max_audio_seconds * FRAME_RATE)
    ids: list[str] = []
    vectors: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    progress(0.0, f"embedding the clips of {corpus_dir.name}: 0/{len(chosen)} (once per style encoder, then "
                  "cached)")
    for start in range(0, len(chosen), batch_size):
        batch_ids, mels = [], []
        for clip in chosen[start:start + batch_size]:
            try:
                mels.append(clip_mel(clip.wav_path, encoder.cfg.n_mels, max_frames))
                batch_ids.append(clip.id)
            except AudioError as exc:
                skipped.append((clip.id, str(exc)))
        if mels:
            with torch.no_grad():
                vectors.append(encoder.embed_audio(mels).float().cpu())
            ids += batch_ids
        done = min(start + batch_size, len(chosen))
        progress(done / len(chosen), f"embedding the clips of {corpus_dir.name}: {done}/{len(chosen)} (once per "
                                     "style encoder, then cached)")
    if not ids:
        reasons = "; ".join(reason for _, reason in skipped[:3])
        raise ValueError(f"no clip of {corpus_dir} could be embedded ({len(skipped)} tried: {reasons}); "
                         f"check the wavs in {corpus_dir / 'wavs'}")
    if skipped:
        log.warning("style index of %s: %d clip(s) skipped, e.g. %s", corpus_dir, len(skipped), skipped[0][1])
    return StyleIndex(corpus_dir=corpus_dir, ids=ids, descriptions=[descriptions.get(i, "") for i in ids],
                      embeddings=torch.cat(vectors), skipped=skipped, total_clips=len(clips))


# ------------------------------------------------------------------------------------ the cache

def _stat(path: Path) -> Optional[list[int]]:
    if not path.is_file():
        return None
    st = path.stat()
    return [st.st_mtime_ns, st.st_size]


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}
"""encoder_fingerprint's answers by (resolved path, mtime, size): a search asks once per query."""


def encoder_fingerprint(checkpoint_path: str | Path) -> str:
    """What the clip embeddings depend on in a checkpoint: its style encoder's own tensors (names, dtypes, shapes,
    bytes), its settings and the sentence encoder it was trained with; not the rest of the file. Stages 1-3 carry
    the encoder they were started from unchanged, so a stage-3 checkpoint has the fingerprint of the style
    checkpoint it came from and finds the index that one built (embedding 2,000 clips took minutes on a busy
    2-core CPU; reading the 2.4 MB of style tensors of a 79 MB stage-3 checkpoint takes a tenth of a second)."""
    path = Path(checkpoint_path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_mtime_ns, stat.st_size)
    if memo not in _FINGERPRINTS:
        meta = read_checkpoint_metadata(path)
        digest = hashlib.sha1(json.dumps([meta.get("style_config"), meta.get("text_encoder")]).encode())
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(k for k in f.keys() if k.partition(".")[0] == "style"):
                tensor = f.get_tensor(name).contiguous()
                digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        _FINGERPRINTS[memo] = digest.hexdigest()
    return _FINGERPRINTS[memo]


def index_key(checkpoint_path: str | Path, corpus_dir: str | Path, max_clips: int = DEFAULT_MAX_CLIPS) -> str:
    """The hash naming the cached index of this checkpoint's style encoder (`encoder_fingerprint`) on this corpus
    state."""
    corpus_dir = Path(corpus_dir)
    metadata = _stat(corpus_dir / METADATA)
    if metadata is None:
        raise FileNotFoundError(f"{corpus_dir / METADATA} is missing: {corpus_dir} is not a corpus folder "
                                f"(see docs/data_layout.md)")
    parts = [INDEX_FORMAT, INDEX_VERSION, encoder_fingerprint(checkpoint_path), metadata,
             _stat(corpus_dir / ANNOTATIONS), int(max_clips)]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def index_cache_path(corpus_dir: str | Path, key: str) -> Path:
    return Path(corpus_dir) / CACHE_DIR / f"style_index-{key}.safetensors"


def save_index(index: StyleIndex, path: Path, key: str, checkpoint_path: str | Path) -> Path:
    """Write `index` to `path` atomically (temporary file, fsync, rename)."""
    meta = {"format": INDEX_FORMAT, "format_version": str(INDEX_VERSION), "key": key,
            "checkpoint": str(Path(checkpoint_path).resolve()), "ids": json.dumps(index.ids),
            "descriptions": json.dumps(index.descriptions), "skipped": json.dumps(index.skipped),
            "total_clips": str(index.total_clips)}
    tensors = {"embeddings": index.embeddings.detach().float().cpu().contiguous()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_index(path: Path, key: str, corpus_dir: str | Path, dim: int) -> Optional[StyleIndex]:
    """The cached index at `path`, or None when it is missing, stale or damaged (then rebuild)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        if meta.get("format") != INDEX_FORMAT or meta.get("key") != key:
            raise ValueError("written for another checkpoint or corpus state")
        ids = json.loads(meta["ids"])
        descriptions = json.loads(meta["descriptions"])
        skipped = [(str(a), str(b)) for a, b in json.loads(meta.get("skipped", "[]"))]
        total = int(meta.get("total_clips", len(ids)))
        if (not ids or len(descriptions) != len(ids) or tuple(embeddings.shape) != (len(ids), dim)
                or not torch.isfinite(embeddings).all()):
            raise ValueError(f"inconsistent content (embeddings {tuple(embeddings.shape)}, {len(ids)} ids, "
                             f"style dimension {dim})")
    except Exception as exc:  # a truncated or foreign file: safetensors and json raise their own types
        log.warning("ignoring the style index cache %s (%s); rebuilding it", path, exc)
        return None
    return StyleIndex(corpus_dir=Path(corpus_dir), ids=[str(i) for i in ids],
                      descriptions=[str(d) for d in descriptions], embeddings=embeddings.float(),
                      skipped=skipped, total_clips=total, from_cache=True)


def _remove_older_caches(keep: Path, checkpoint_path: Path) -> None:
    """Delete the other index files this checkpoint file built (its earlier saves' encoders) in the same folder;
    those other checkpoints built are kept. A later stage's checkpoint that still carries such an earlier encoder
    builds its index again: the folder does not fill up with one file per save."""
    for other in keep.parent.glob("style_index-*.safetensors"):
        if other == keep:
            continue
        try:
            with safe_open(str(other), framework="pt", device="cpu") as f:
                owner = (f.metadata() or {}).get("checkpoint")
        except Exception:   # damaged: nobody can use it
            owner = str(checkpoint_path)
        if owner == str(checkpoint_path):
            other.unlink(missing_ok=True)


def style_index(encoder: StyleEncoder, checkpoint_path: str | Path, corpus_dir: str | Path,
                max_clips: int = DEFAULT_MAX_CLIPS, progress: Optional[Progress] = None,
                use_cache: bool = True) -> StyleIndex:
    """The index of `corpus_dir` for the encoder of `checkpoint_path`: from the disk cache when it is
    fresh, else computed and cached. `encoder` must be the one loaded from `checkpoint_path`."""
    progress = progress or _noop
    corpus_dir = Path(corpus_dir)
    key = index_key(checkpoint_path, corpus_dir, max_clips)
    path = index_cache_path(corpus_dir, key)
    if use_cache:
        progress(0.0, f"looking for this style encoder's clip embeddings in the cache of {corpus_dir.name}")
        cached = load_index(path, key, corpus_dir, encoder.embed_dim)
        if cached is not None:
            progress(1.0, f"read {len(cached)} clip embeddings from the cache")
            return cached
    index = compute_style_index(encoder, corpus_dir, max_clips, progress)
    if use_cache:
        save_index(index, path, key, checkpoint_path)
        _remove_older_caches(path, Path(checkpoint_path).resolve())
    return index


# ------------------------------------------------------------------------------------ queries

def _unit_query(index: StyleIndex, query: torch.Tensor) -> torch.Tensor:
    query = torch.as_tensor(query).detach().float().cpu().flatten()
    if query.numel() != index.dim:
        raise ValueError(f"the query vector has {query.numel()} values but the index's style space has "
                         f"{index.dim}: use the style encoder the index was built with")
    if not torch.isfinite(query).all() or float(query.norm()) == 0.0:
        raise ValueError("the query vector is zero or not finite")
    return F.normalize(query, dim=0)


def similarities(index: StyleIndex, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N] of every clip with `query` [D]."""
    return index.embeddings.float() @ _unit_query(index, query)


def nearest(index: StyleIndex, query: torch.Tensor, k: int = 10) -> list[Neighbour]:
    """The `k` clips most similar to `query` (cosine), best first; ties keep the corpus order."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    sims = similarities(index, query)
    order = torch.sort(sims, descending=True, stable=True).indices[:k].tolist()
    paths = index.wav_paths
    return [Neighbour(index.ids[i], index.descriptions[i], float(sims[i]), str(paths[i])) for i in order]


def style_map(index: StyleIndex, query_vectors: torch.Tensor | Sequence[torch.Tensor] = ()) -> StyleMap:
    """Clips and queries on the first two principal axes of the clips' embeddings.

    Exact PCA (an SVD of the centred [N, D] embeddings, in float64), not the randomised
    `torch.pca_lowrank`, so the same index always gives the same map. An axis's sign is fixed so
    that its loading of largest magnitude is positive. Queries are projected with the clips' mean
    and axes, so they land where the corpus would put them. With fewer than 2 informative
    directions (one clip, identical clips) the missing coordinates are 0.
    """
    if isinstance(query_vectors, torch.Tensor):
        query_vectors = list(query_vectors.reshape(1, -1) if query_vectors.dim() == 1 else query_vectors)
    queries = torch.stack([_unit_query(index, q).double() for q in query_vectors]) if len(query_vectors) \
        else torch.zeros(0, index.dim, dtype=torch.float64)
    clips = index.embeddings.double()
    mean = clips.mean(dim=0)
    centred = clips - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = torch.zeros(2, index.dim, dtype=torch.float64)
    explained = torch.zeros(2, dtype=torch.float64)
    variance = singular.pow(2) / len(clips)
    for i in range(min(2, len(singular))):
        if float(variance[i]) < MIN_AXIS_VARIANCE:   # no spread left: numerical noise, not an axis
            break
        axis = vh[i]
        axes[i] = axis if axis[axis.abs().argmax()] >= 0 else -axis
        explained[i] = variance[i] / variance.sum()
    return StyleMap(clips=(centred @ axes.T).float(), queries=((queries - mean) @ axes.T).float(),
                    explained=explained.float())


def compare(encoder: StyleEncoder, a: str, b: str) -> float:
    """Cosine similarity of two descriptions in the style space (1: the encoder hears the same voice)."""
    for name, text in (("first", a), ("second", b)):
        if text is None or not str(text).strip():
            raise ValueError(f"the {name} description is empty; type a voice description, e.g. "
                             f"'a slow, deep voice with a British accent'")
    with torch.no_grad():
        pair = encoder.embed_text([a, b]).float()
    return float(pair[0] @ pair[1])
