"""The frozen sentence encoder's vector of every description of a corpus split, computed once per corpus and
kept in DIR/cache/description-vectors/ (`ira.tensor_cache`).

The style stage embeds a batch's descriptions at every step, and stage 1's style table embeds every clip's: on
the `cpu` preset's 20,000-clip corpus that is ~74,000 distinct descriptions, more than the encoder's LRU cache
holds, ~15 minutes on two cores, paid by the style stage's start (for a 1.5-minute budget), again by stage 1's
start, and again by every resume. The encoder is frozen, so a description's vector depends on the text and the
encoder's name only: the first of them computes the split's vectors, every later one reads the file and lends
them to the encoder (`SentenceEncoder.pinned`) while it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ira import tensor_cache
from ira.models.text_encoder import MAX_TOKENS, SentenceEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
FOLDER = "description-vectors"


def kept_vectors(encoder: SentenceEncoder, texts: Iterable[str], data_dir: str | Path,
                 split: str) -> tuple[list[str], torch.Tensor]:
    """(the distinct non-blank `texts`, whitespace collapsed, sorted; their vectors [N, dim]), read from the corpus's cache when it
    holds this encoder's vectors of exactly these texts, else computed and kept there (superseding the split's
    earlier file)."""
    texts = sorted({" ".join(t.split()) for t in texts if t.strip()})   # as StyleEncoder.embed_text passes them
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    key = json.dumps([FORMAT_VERSION, encoder.name, MAX_TOKENS, split, digest, len(texts)])
    path = tensor_cache.cache_file(Path(data_dir) / "cache" / FOLDER, split, key)
    found = tensor_cache.read(path, key)
    if found is not None and found.get("vectors") is not None and found["vectors"].shape == (len(texts), encoder.dim):
        return texts, found["vectors"]
    log.info("embedding the %d distinct descriptions of the %s clips with the frozen sentence encoder (once per "
             "corpus: kept in %s)", len(texts), split, path.parent)
    vectors = encoder.embed(texts)
    tensor_cache.write(path, {"vectors": vectors}, key, family=split)
    return texts, vectors


@contextmanager
def descriptions_pinned(encoder: SentenceEncoder, texts: Iterable[str], data_dir: str | Path,
                        split: str) -> Iterator[None]:
    """Within: `encoder` answers the split's descriptions from the kept vectors (`kept_vectors`)."""
    kept, vectors = kept_vectors(encoder, texts, data_dir, split)
    with encoder.pinned(kept, vectors):
        yield
