"""The style vectors stage 1 conditions on: every clip's description vectors and its audio vector, computed
once by the frozen style encoder and kept in DIR/cache/style-table/ (`ira.tensor_cache`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ira import tensor_cache
from ira.audio import load_audio
from ira.data.token_cache import TokenSplit
from ira.training.feature_cache import weights_digest

FORMAT_VERSION = "1"
FOLDER = "style-table"


class StyleTable:
    """Style vectors of every clip of a split, computed once by the frozen style encoder.

    `text` [N, D, E]: the text-tower vectors of each clip's D descriptions (a clip with fewer repeats
    its own); `audio` [N, E]: the audio-tower vector of the clip itself.
    """

    def __init__(self, text: torch.Tensor, audio: torch.Tensor):
        self.text, self.audio = text, audio

    @classmethod
    def compute(cls, encoder: Any, split: TokenSplit, data_dir: Path, sample_rate: int) -> "StyleTable":
        per_clip = [list(d) or [""] for d in split.descriptions]
        width = max(len(d) for d in per_clip)
        flat = [d[i % len(d)] for d in per_clip for i in range(width)]
        with torch.inference_mode():
            unique = sorted(set(t for t in flat if t.strip()))
            vectors = dict(zip(unique, encoder.embed_text(unique))) if unique else {}
            zero = torch.zeros(encoder.embed_dim)
            text = torch.stack([vectors.get(t, zero) for t in flat]).reshape(len(per_clip), width, -1)
            wavs = [load_audio(data_dir / "wavs" / f"{clip_id}.wav", sample_rate) for clip_id in split.ids]
            audio = torch.cat([encoder.embed_audio(wavs[i:i + 32], sr=sample_rate)
                               for i in range(0, len(wavs), 32)]) if wavs else torch.zeros(0, encoder.embed_dim)
        return cls(text, audio)

    @classmethod
    def cached(cls, encoder: Any, split: TokenSplit, name: str, data_dir: Path, sample_rate: int) -> "StyleTable":
        """`compute`, once per style encoder and corpus: kept in DIR/cache/style-table/ (on the 20k-clip corpus
        it takes ~6 minutes, which every start and every resume of stage 1 paid). The key names the encoder
        (its weights, its settings, its frozen sentence encoder), the split's data and its descriptions."""
        content = hashlib.sha256(json.dumps([split.ids, split.descriptions]).encode()).hexdigest()[:16]
        key = json.dumps([FORMAT_VERSION, weights_digest(encoder), encoder.metadata(), split.data_hash, content,
                          sample_rate], sort_keys=True)
        path = tensor_cache.cache_file(Path(data_dir) / "cache" / FOLDER, name, key)
        found = tensor_cache.read(path, key)
        n, width = len(split), max((len(d) or 1 for d in split.descriptions), default=1)
        if (found is not None and found["text"].shape[:2] == (n, width) and found["audio"].shape[0] == n):
            return cls(found["text"], found["audio"])
        table = cls.compute(encoder, split, data_dir, sample_rate)
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
