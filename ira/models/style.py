"""The CLIP-style voice style encoder: voice descriptions and voice audio in one space.

    text  -> frozen all-MiniLM-L6-v2 (mean pooled, 384-d) -> trained linear map (or MLP) -> L2 norm
    audio -> log-mel (75 frames/s) -> 2 strided convs (4x down) -> transformer -> attention pooling
          -> linear -> L2 norm
    score = cosine(text, audio)

Trained with a symmetric InfoNCE loss (CLIP): logits = s * cos(text_i, audio_j), with a learned
log scale s (initial temperature 0.07) clamped at 100 as in CLIP, so the logits cannot grow
without bound. The SpeechLM's style token is a projection of a vector of this space: a typed
description (`embed_text`) or a reference clip (`embed_audio`) sets the voice.

False negatives. A description names a few attributes ("a fast male voice"), and several clips
of a batch often fit it. Plain InfoNCE would push those clips away from the text as negatives.
With `style.soft_targets` (the default), the target of text i is spread uniformly over every clip
j of the batch that has the levels description i mentions (`description_targets`), and the
target of audio j over every description it fits; the diagonal is always a positive. The levels a
description mentions are read back from its words by the data side (stage_style), and an audio clip
is matched by its measured levels and labels. Matching on mentioned attributes, rather than on
"same description string" or "all levels equal", is what removes the false negatives: two
clips rarely share every level, but often the two or three a description names.

Measured on the 600-clip eSpeak corpus (cpu preset, 600 steps; held-out wordings, i.e. the
`family="heldout"` vocabulary never seen in training): soft targets and plain InfoNCE were within
noise of each other (desc-match on the 564 training clips 0.18 vs 0.15, on the 36 val clips
0.20 vs 0.23); soft targets are kept because they are the correct objective, not for a measured gain.

Text projection. `style.text_hidden: 0` (the presets) makes it a single linear map. Held-out
wordings ("brisk", "rumbling", "Voice profile: ...") sit far from the training wordings in the
sentence encoder's space (cosine 0.57 to the same clip's training description, 0.47 to other
clips'); a linear map keeps that space's geometry: desc-match 0.18 vs 0.12 for a 256-wide MLP on
the training clips with held-out wordings (same run length). Gaussian noise on the sentence
embeddings did not help.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ira.audio import AudioError, prepare_waveform, rms_db, trim_silence
from ira.codec.mel import SAMPLE_RATE, log_mel
from ira.checkpoint import Checkpoint, CheckpointError, as_checkpoint
from ira.config import StyleConfig, section_from_dict
from ira.models.text_encoder import SentenceEncoder, load_sentence_encoder

FRAME_RATE = 75                # log-mel frames per second (ira.codec.mel)
INIT_TEMPERATURE = 0.07        # CLIP's initial temperature
MAX_LOGIT_SCALE = 100.0        # CLIP's clamp on exp(log_scale)
TRIM_DB = 40.0                 # silence trimming of raw waveforms, as in data preparation
SILENCE_DB = -55.0             # quieter clips are refused, as in data preparation
STYLE_EVAL_KEY = "style_eval"
"""Checkpoint metadata: the encoder's retrieval figures (JSON), see `StyleEncoder.measured` (the app reads them
through ira/eval/quality.py, which names the key too: models never import evaluation)."""


# ------------------------------------------------------------------------------------------ loss

def contrastive_loss(text: torch.Tensor, audio: torch.Tensor, logit_scale: torch.Tensor,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised `text` [N, D] and `audio` [N, D] (pair i = row i).

    `targets` [N, N] (bool or weights): entry (i, j) says text i fits audio j; None is the identity.
    Rows are normalised into the text->audio target distributions, columns into audio->text ones.
    """
    logits = logit_scale.float() * text.float() @ audio.float().T
    n = logits.shape[0]
    if targets is None:
        labels = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    weights = targets.to(device=logits.device, dtype=torch.float32)
    weights = torch.maximum(weights, torch.eye(n, device=logits.device))  # a pair always fits itself
    t2a = weights / weights.sum(dim=1, keepdim=True)
    a2t = weights.T / weights.T.sum(dim=1, keepdim=True)
    return 0.5 * (-(t2a * logits.log_softmax(dim=1)).sum(1).mean()
                  - (a2t * logits.T.log_softmax(dim=1)).sum(1).mean())


def description_targets(mentioned: Sequence[Mapping[str, str]], levels: Sequence[Mapping[str, str]],
                        owners: Sequence[int] | None = None) -> torch.Tensor:
    """Bool [Q, N]: description q fits clip j when clip j has every level description q mentions.

    `mentioned[q]`: attribute -> level named by description q (e.g. {"rate": "fast", "gender":
    "male"}; empty for "A voice.", which fits every clip); `levels[j]`: the levels of clip j
    (`ira.data.descriptions.attribute_levels`). Description q always fits the clip it was written
    for, `owners[q]` (default: q, for a batch of pairs).
    """
    q, n = len(mentioned), len(levels)
    if owners is None:
        if q != n:
            raise ValueError(f"description_targets: {q} descriptions but {n} clips; pass owners")
        owners = range(n)
    fits = torch.zeros(q, n, dtype=torch.bool)
    fits[torch.arange(q), torch.as_tensor(list(owners), dtype=torch.long)] = True
    attrs = sorted({a for m in mentioned for a in m})
    if not attrs:
        return torch.ones(q, n, dtype=torch.bool)
    vocab: dict[str, int] = {}
    want = torch.tensor([[vocab.setdefault(m[a], len(vocab)) if a in m else -1 for a in attrs]
                         for m in mentioned])                       # -1: not mentioned
    have = torch.tensor([[vocab.setdefault(lv[a], len(vocab)) if lv.get(a) is not None else -2
                          for a in attrs] for lv in levels])         # -2: unknown for this clip
    ok = (want[:, None, :] == have[None, :, :]) | (want[:, None, :] == -1)
    return fits | ok.all(dim=-1)


# ------------------------------------------------------------------------------------ audio tower

def _sinusoids(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[length, dim] sine/cosine position codes (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return codes


class AttentionPool(nn.Module):
    """One learned query attends over the frames (multi-head), ignoring padding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], mask [B, T] True on real frames -> [B, dim]."""
        query = self.query.expand(x.shape[0], -1, -1)
        out, _ = self.attn(query, x, x, key_padding_mask=~mask, need_weights=False)
        return out.squeeze(1)


class AudioTower(nn.Module):
    """Log-mel [B, n_mels, T] -> style features [B, out_dim] (not normalised)."""

    def __init__(self, cfg: StyleConfig):
        super().__init__()
        d = cfg.audio_dim
        # Per-band statistics of the training clips (set by the training task; saved with the model).
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))
        self.convs = nn.ModuleList([            # 75 -> 18.75 frames/s: ~53 ms per token
            nn.Conv1d(cfg.n_mels, d, kernel_size=3, stride=2, padding=1),
            nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1),
        ])
        layer = nn.TransformerEncoderLayer(d, cfg.audio_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.audio_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, cfg.audio_heads)
        self.proj = nn.Linear(d, cfg.embed_dim)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = (mels.float() - self.mel_mean[:, None]) / self.mel_std[:, None]
        lengths = lengths.to(x.device)
        for conv in self.convs:
            mask = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
            x = F.gelu(conv(x * mask[:, None, :]))           # padding never leaks into real frames
            lengths = (lengths + conv.stride[0] - 1) // conv.stride[0]
        x = x.transpose(1, 2)                                 # [B, T', d]
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        x = x + _sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype)
        x = self.blocks(x, src_key_padding_mask=~mask)
        return self.proj(self.pool(self.norm(x), mask))


# ------------------------------------------------------------------------------------ the model

class StyleEncoder(nn.Module):
    """Text and audio towers over one space; see the module docstring.

    The frozen sentence encoder is held outside the module tree: it is not in `state_dict()`
    (checkpoints record its name in `metadata()`), not in `parameters()`, and it follows the
    module's device on first use.
    """

    def __init__(self, cfg: StyleConfig, sentence_encoder: SentenceEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self._sentences = (sentence_encoder or load_sentence_encoder(cfg.text_encoder),)
        text_dim = self.sentence_encoder.dim
        if cfg.text_hidden:
            self.text_proj = nn.Sequential(
                nn.Linear(text_dim, cfg.text_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                nn.Linear(cfg.text_hidden, cfg.embed_dim))
        else:  # a linear map keeps the sentence encoder's geometry (synonyms stay close)
            self.text_proj = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(text_dim, cfg.embed_dim))
        self.audio = AudioTower(cfg)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))
        self.measured: Optional[dict[str, float]] = None
        """Its retrieval figures at the style stage's last validation (top5, chance_top5, n_queries, step...):
        saved as the checkpoint's `style_eval` and carried by every later stage's checkpoint with the encoder, so
        the app can say how well a stage-3 checkpoint's encoder finds a described voice (ira/eval/quality.py)."""

    @classmethod
    def from_checkpoint(cls, checkpoint: "Checkpoint | str | Path", device: str | torch.device = "cpu") -> "StyleEncoder":
        """The frozen-text-tower style encoder stored as module "style" (any stage), frozen, in eval mode."""
        ckpt = as_checkpoint(checkpoint)
        if "style" not in ckpt.modules:
            raise CheckpointError(f"{ckpt.path} (stage {ckpt.stage}) holds no style encoder (modules: "
                                  f"{', '.join(ckpt.modules)}); train one with `ira train --stage style`")
        cfg = section_from_dict("style", ckpt.json_metadata("style_config"), source=f"{ckpt.path} (style metadata)")
        model = cls(cfg)
        recorded = ckpt.metadata.get("text_encoder")
        if recorded and recorded != model.sentence_encoder.name:
            raise CheckpointError(f"{ckpt.path} was trained on the sentence encoder {recorded!r}, but this machine "
                                  f"loads {model.sentence_encoder.name!r}; the projection only fits the former")
        ckpt.load_into("style", model)
        model.measured = _measured(ckpt.metadata.get(STYLE_EVAL_KEY))
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device).eval()

    # -------------------------------------------------------------- basics

    @property
    def sentence_encoder(self) -> SentenceEncoder:
        return self._sentences[0]

    @property
    def device(self) -> torch.device:
        return self.log_scale.device

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def logit_scale(self) -> torch.Tensor:
        """exp(log_scale), at most MAX_LOGIT_SCALE (no gradient past the clamp, as in CLIP)."""
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def set_mel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-band mean and standard deviation of the training log-mels (saved with the model)."""
        self.audio.mel_mean.copy_(mean.to(self.audio.mel_mean))
        self.audio.mel_std.copy_(std.clamp_min(1e-3).to(self.audio.mel_std))

    def metadata(self) -> dict[str, str]:
        """Checkpoint metadata of the module "style" (string values)."""
        meta = {"embed_dim": str(self.cfg.embed_dim), "text_encoder": self.sentence_encoder.name,
                "style_config": json.dumps(asdict(self.cfg))}
        if self.measured is not None:
            meta[STYLE_EVAL_KEY] = json.dumps(self.measured)
        return meta

    # -------------------------------------------------------------- text tower

    def sentence_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """The frozen tower's [N, 384] unit vectors, on this module's device (no gradient)."""
        if self.sentence_encoder.device != self.device:
            self.sentence_encoder.to(self.device)
        return self.sentence_encoder.encode(texts).to(self.device)

    def text_features(self, sentence_emb: torch.Tensor) -> torch.Tensor:
        """Frozen sentence embeddings [N, 384] -> unit vectors [N, embed_dim] (trainable part)."""
        return F.normalize(self.text_proj(sentence_emb).float(), dim=-1)

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Descriptions -> [N, embed_dim] unit vectors. Blank descriptions are an error here: use
        `embed_description`, which answers None for them (no style condition)."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of descriptions; for one, use embed_description(text)")
        texts = list(texts)
        blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if blank:
            raise ValueError(f"embed_text: description(s) at {blank[:5]} are empty; drop the style "
                             f"condition for those samples instead (embed_description returns None)")
        return self.text_features(self.sentence_embeddings([" ".join(t.split()) for t in texts]))

    def embed_description(self, text: str | None) -> torch.Tensor | None:
        """One description -> [embed_dim], or None when it is empty (the caller drops the style)."""
        if text is None or not text.strip():
            return None
        return self.embed_text([text])[0]

    # -------------------------------------------------------------- audio tower

    def audio_features(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Log-mel batch [B, n_mels, T] with frame counts [B] -> unit vectors [B, embed_dim]."""
        if mels.dim() != 3 or mels.shape[1] != self.cfg.n_mels:
            raise ValueError(f"expected log-mels [B, {self.cfg.n_mels}, T], got {tuple(mels.shape)}")
        return F.normalize(self.audio(mels.to(self.device), lengths).float(), dim=-1)

    def embed_audio(self, audio: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
                    sr: int = SAMPLE_RATE, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Clips -> [N, embed_dim] unit vectors.

        `audio`: one waveform [T]; a list of waveforms (1-D, at `sr`; trimmed of silence like the
        training clips); a list of log-mels [n_mels, T] (`ira.codec.mel.log_mel` of 24 kHz audio);
        or a padded log-mel batch [B, n_mels, T] with `lengths`. At most `style.max_audio_seconds`
        of each clip is used.
        """
        if isinstance(audio, (torch.Tensor, np.ndarray)) and torch.as_tensor(audio).dim() == 3:
            mels = torch.as_tensor(audio)
            if lengths is None:
                lengths = torch.full((mels.shape[0],), mels.shape[-1], dtype=torch.long)
            items = [mels[i, :, : int(n)] for i, n in enumerate(lengths)]
        else:
            if isinstance(audio, (torch.Tensor, np.ndarray)) and torch.as_tensor(audio).dim() == 1:
                audio = [audio]
            items = [self._as_mel(torch.as_tensor(a), sr, i) for i, a in enumerate(audio)]
        if not items:
            return torch.zeros(0, self.cfg.embed_dim, device=self.device)
        mels, lengths = pad_mels(items, max_frames=int(self.cfg.max_audio_seconds * FRAME_RATE))
        return self.audio_features(mels, lengths)

    def match_scores(self, texts: Sequence[str], audio: torch.Tensor | Sequence[torch.Tensor],
                     sr: int = SAMPLE_RATE, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarity [N] of description i with clip i (the PPO style reward, for example)."""
        return (self.embed_text(texts) * self.embed_audio(audio, sr, lengths)).sum(dim=-1)

    def _as_mel(self, item: torch.Tensor, sr: int, index: int) -> torch.Tensor:
        if item.dim() == 2 and item.shape[0] == self.cfg.n_mels:
            return item.float()
        if item.dim() == 1:
            wav = log_mel_input(item, sr)
            return log_mel(wav, SAMPLE_RATE, self.cfg.n_mels)
        raise ValueError(f"embed_audio: item {index} has shape {tuple(item.shape)}; expected a mono "
                         f"waveform [T] or a log-mel [{self.cfg.n_mels}, T]")

    # -------------------------------------------------------------- training

    def forward(self, sentence_emb: torch.Tensor, mels: torch.Tensor, lengths: torch.Tensor,
                targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Contrastive loss of a batch of (description embedding, clip) pairs, and diagnostics."""
        text = self.text_features(sentence_emb)
        audio = self.audio_features(mels, lengths)
        scale = self.logit_scale()
        loss = contrastive_loss(text, audio, scale, targets)
        with torch.no_grad():
            sims = text @ audio.T
            hits = sims.argmax(dim=1) == torch.arange(len(sims), device=sims.device)
            if targets is not None:
                fit = targets.to(sims.device).bool() | torch.eye(len(sims), dtype=torch.bool, device=sims.device)
                hits = fit.gather(1, sims.argmax(dim=1, keepdim=True)).squeeze(1)
        return {"loss": loss, "logit_scale": scale.detach(), "batch_top1": hits.float().mean()}


def log_mel_input(wav: torch.Tensor, sr: int) -> torch.Tensor:
    """A raw waveform as the style model sees it: mono 24 kHz, leading/trailing silence trimmed."""
    wav = prepare_waveform(wav, sr, SAMPLE_RATE)
    if rms_db(wav) < SILENCE_DB:
        raise AudioError(f"embed_audio: the clip is silent (RMS {rms_db(wav):.0f} dBFS); "
                         f"give a clip with speech in it")
    return trim_silence(wav, SAMPLE_RATE, top_db=TRIM_DB)


def pad_mels(items: Sequence[torch.Tensor], max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad log-mels [n_mels, T_i] (each cut to `max_frames`) -> ([B, n_mels, T], lengths [B])."""
    cut = [m[:, :max_frames] if max_frames else m for m in items]
    lengths = torch.tensor([m.shape[1] for m in cut], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise AudioError("a clip has no log-mel frames (empty audio)")
    batch = cut[0].new_zeros(len(cut), cut[0].shape[0], int(lengths.max()))
    for i, m in enumerate(cut):
        batch[i, :, : m.shape[1]] = m
    return batch, lengths


def _measured(text: Optional[str]) -> Optional[dict[str, float]]:
    """A checkpoint's `style_eval` entry as a dict; None when it has none (older checkpoints) or it is unreadable
    (the figures only inform the app: a bad entry is dropped, not an error)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def load_style_encoder(path: str | Path, device: str | torch.device = "cpu") -> StyleEncoder:
    """The style encoder of any IRA checkpoint that holds a "style" module, frozen, in eval mode."""
    return StyleEncoder.from_checkpoint(path, device)
