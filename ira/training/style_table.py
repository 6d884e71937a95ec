"""The style vectors stage 1 conditions on: every clip's description vectors and its audio vector, computed
once by the frozen style encoder and kept in DIR/cache/style-table/ (`ira.tensor_cache`).

The audio vectors are embedded from the log-mels the style stage trained on (`ira.data.style_mels`: kept
beside the token cache, and decoded from the tokens for a corpus that travelled without its wavs), not from
the wavs: the table then needs no audio, and the encoder hears each clip exactly as in its own training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ira import tensor_cache
from ira.codec.base import Codec
from ira.data.style_mels import MelSettings, mel_source, split_mels
from ira.data.token_cache import TokenSplit
from ira.training.description_vectors import descriptions_pinned
from ira.training.feature_cache import weights_digest

FORMAT_VERSION = "2"   # 2: audio vectors from the style-mel cache (1: from the wavs)
EMBED_BATCH = 32
FOLDER = "style-table"


class StyleTable:
    """Style vectors of every clip of a split, computed once by the frozen style encoder.

    `text` [N, D, E]: the text-tower vectors of each clip's D descriptions (a clip with fewer repeats
    its own); `audio` [N, E]: the audio-tower vector of the clip itself.
    """

    def __init__(self, text: torch.Tensor, audio: torch.Tensor):
        self.text, self.audio = text, audio

    @classmethod
    def compute(cls, encoder: Any, split: TokenSplit, mels: dict[str, torch.Tensor]) -> "StyleTable":
        """The table of `split`'s clips; `mels`: each clip's log-mel [n_mels, T] by id (`split_mels`)."""
        per_clip = [list(d) or [""] for d in split.descriptions]
        width = max(len(d) for d in per_clip)
        flat = [d[i % len(d)] for d in per_clip for i in range(width)]
        with torch.inference_mode():
            unique = sorted(set(t for t in flat if t.strip()))
            vectors = dict(zip(unique, encoder.embed_text(unique))) if unique else {}
            zero = torch.zeros(encoder.embed_dim)
            text = torch.stack([vectors.get(t, zero) for t in flat]).reshape(len(per_clip), width, -1)
            clips = [mels[clip_id] for clip_id in split.ids]
            batches = [clips[i:i + EMBED_BATCH] for i in range(0, len(clips), EMBED_BATCH)]
            audio = (torch.cat([encoder.embed_audio(batch) for batch in batches]) if clips
                     else torch.zeros(0, encoder.embed_dim))
        return cls(text, audio)

    @classmethod
    def cached(cls, encoder: Any, split: TokenSplit, name: str, data_dir: Path, codec: Codec,
               trim_db: float) -> "StyleTable":
        """`compute`, once per style encoder and corpus: kept in DIR/cache/style-table/ (on the 20k-clip corpus
        it took ~6 minutes, which every start and every resume of stage 1 paid). The key names the encoder
        (its weights, its settings, its frozen sentence encoder), the split's data and its descriptions, and
        what its log-mels were made from (`name`: the split, "train" / "val"; `codec` and `trim_db`
        (`data.trim_silence_db`): how the mels are made when they are not kept yet)."""
        settings = MelSettings.of(encoder.cfg, trim_db)
        content = hashlib.sha256(json.dumps([split.ids, split.descriptions]).encode()).hexdigest()[:16]
        key = json.dumps([FORMAT_VERSION, weights_digest(encoder), encoder.metadata(), split.data_hash, content,
                          settings.key(), mel_source(data_dir, name, split, codec, settings)], sort_keys=True)
        path = tensor_cache.cache_file(Path(data_dir) / "cache" / FOLDER, name, key)
        found = tensor_cache.read(path, key)
        n, width = len(split), max((len(d) or 1 for d in split.descriptions), default=1)
        if (found is not None and found["text"].shape[:2] == (n, width) and found["audio"].shape[0] == n):
            return cls(found["text"], found["audio"])
        descriptions = (d for clip in split.descriptions for d in clip)
        with descriptions_pinned(encoder.sentence_encoder, descriptions, data_dir, name):
            table = cls.compute(encoder, split, split_mels(data_dir, name, split, codec, settings).mels)
        tensor_cache.write(path, {"text": table.text, "audio": table.audio}, key, family=name)
        return table

    def to(self, device: torch.device) -> "StyleTable":
        self.text, self.audio = self.text.to(device), self.audio.to(device)
        return self

    def sample(self, clips: torch.Tensor, audio_prob: float) -> torch.Tensor:
        """A random description's vector per clip, or (with `audio_prob`) the clip's audio vector."""
        choice = torch.randint(0, self.text.shape[1], (len(clips),), device=clips.device)
        vectors = self.text[clips, choice]
        use_audio = torch.rand(len(clips), device=clips.device) < audio_prob
        return torch.where(use_audio[:, None], self.audio[clips], vectors)
