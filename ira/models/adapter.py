"""The adapter: a Perceiver resampler from SpeechLM hidden states to N soft tokens for the LLM.

    features [B, T, in_dim] --LayerNorm, Linear--> frames [B, T, dim] + sinusoidal positions
    latents  [N, dim] (learned) --n_layers x (cross-attn -> self-attn -> MLP)--> [B, N, dim]
    --LayerNorm, Linear--> [B, N, out_dim] --fixed-norm scaling--> soft tokens of the LLM's size

Whatever the clip's length, the LLM reads N vectors (Flamingo's resampler). In each layer the
latents cross-attend to the frames and to themselves (keys/values = [frames; latents], as in
Flamingo), then attend among themselves, then go through an MLP; all pre-norm residual blocks. With
`adapter.reach` > 0 a latent reads only the frames near its window and no other latent: its reading
rests on its own stretch of speech, not on the sentence around it.

Positions: the SpeechLM uses rotary embeddings, so its features carry order only relatively, yet
the latents must lay the words out in order. A fixed sinusoidal table is added to the projected
frames: every position has a meaningful code from the first step (a learned table leaves the
rarely-seen late positions untrained on a small corpus), and it costs no parameters. Its size is
`adapter.max_audio_frames`, which the config keeps >= speech_lm.max_audio_frames.

Padding: padded frames are zeroed and masked out of every attention, so a sample's output does not
depend on what it is batched with.

Output (`adapter.output`): "free" hands the LLM the N soft tokens; "vocabulary" hands it what the
adapter's VocabularyReader hears in them, one LLM-embedding mixture per word piece (a list of [n_i, H],
n_i varying by clip; ira/models/vocabulary_reader.py). `ira.models.splice` takes either.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ira.checkpoint import Checkpoint, CheckpointError, as_checkpoint
from ira.config import AdapterConfig, section_from_dict
from ira.models.phoneme_speller import PhonemeSpeller
from ira.models.splice import SoftTokens
from ira.models.vocabulary_reader import VocabularyReader


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """[length, dim] sin/cos position codes (Transformer / Whisper), timescales 1 .. 10000."""
    half = (dim + 1) // 2
    inv_timescales = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :dim]


class Attention(nn.Module):
    """Multi-head attention of queries x [B, N, dim] over a context [B, S, dim] with a key mask."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias: an additive score [B, N, S] (every head), -inf where context_valid is False."""
        batch, n, dim = x.shape
        q = self.q(x).view(batch, n, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if context_valid is None else context_valid[:, None, None, :]  # True = attend
        if bias is not None:
            valid = torch.ones_like(bias, dtype=torch.bool) if context_valid is None else context_valid[:, None, :]
            mask = bias.to(q.dtype).masked_fill(~valid, float("-inf"))[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, n, dim))


class ResamplerLayer(nn.Module):
    """Cross-attention to the frames, self-attention among the latents, MLP. With `adapter.reach` > 0 the
    latents read only the frames in their reach and not each other (no self-attention)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        d = cfg.dim
        self.local = cfg.reach > 0
        self.norm_latents, self.norm_frames = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = Attention(d, cfg.n_heads, cfg.dropout)
        if not self.local:
            self.norm_self = nn.LayerNorm(d)
            self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def residual_projections(self) -> list[torch.Tensor]:
        return [self.cross.proj.weight, self.mlp[2].weight] + ([] if self.local else [self.self_attn.proj.weight])

    def forward(self, latents: torch.Tensor, frames: torch.Tensor, frames_valid: torch.Tensor,
                window: torch.Tensor | None = None) -> torch.Tensor:
        """window: the reading prior [B, N, T] over the frames (see `window_bias`; -inf out of reach), or None."""
        q = self.norm_latents(latents)
        if self.local:
            latents = latents + self.drop(self.cross(q, self.norm_frames(frames), frames_valid, window))
            return latents + self.drop(self.mlp(self.norm_mlp(latents)))
        context = torch.cat([self.norm_frames(frames), q], dim=1)
        valid = torch.cat([frames_valid, frames_valid.new_ones(q.shape[:2])], dim=1)
        bias = None if window is None else torch.cat([window, window.new_zeros(q.shape[0], q.shape[1], q.shape[1])], 2)
        latents = latents + self.drop(self.cross(q, context, valid, bias))
        h = self.norm_self(latents)
        latents = latents + self.drop(self.self_attn(h, h, None))
        return latents + self.drop(self.mlp(self.norm_mlp(latents)))


class FrameLayer(nn.Module):
    """Pre-norm self-attention (padding masked) and MLP over the frames: context before the latents read."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        d = cfg.dim
        self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(frames)
        frames = frames + self.drop(self.attn(h, h, valid))
        return frames + self.drop(self.mlp(self.norm_mlp(frames)))


def stack_frames(x: torch.Tensor, mask: torch.Tensor, stack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, D] (padding zeroed) -> [B, ceil(T / stack), stack * D]; a stacked frame is real when any of
    its frames is (the tail of the last one is zeros, as padding is, so batching changes nothing)."""
    if stack == 1:
        return x, mask
    batch, frames, dim = x.shape
    stacked = -(-frames // stack)
    x = F.pad(x, (0, 0, 0, stacked * stack - frames)).reshape(batch, stacked, stack * dim)
    lengths = -(-mask.sum(1) // stack)
    return x, torch.arange(stacked, device=x.device)[None] < lengths[:, None]


def window_bias(valid: torch.Tensor, n_latents: int, width: float) -> torch.Tensor:
    """The monotonic reading prior [B, N, T]: latent i's score for frame t is -(r_t - c_i)^2 / (2 s^2), with
    r_t = (t + 0.5) / length the frame's relative position, c_i = (i + 0.5) / N and s = width / N.

    Latent i thus starts out reading the i-th N-th of the clip, whatever its length, in order, as a
    transcript is laid out: the alignment is given, not searched for (the stage-1 alignment heads' idea).
    """
    lengths = valid.sum(1, keepdim=True).clamp(min=1).float()
    r = (torch.arange(valid.shape[1], device=valid.device)[None].float() + 0.5) / lengths       # [B, T]
    c = (torch.arange(n_latents, device=valid.device).float() + 0.5) / n_latents                # [N]
    s = width / n_latents
    return -((r[:, None, :] - c[None, :, None]) ** 2) / (2 * s * s)


def within_reach(window: torch.Tensor, valid: torch.Tensor, reach: float) -> torch.Tensor:
    """`window_bias` [B, N, T] with -inf at the frames farther than `reach` window widths from each latent's
    centre (|r_t - c_i| > reach * s, i.e. bias < -reach^2 / 2). A latent with no real frame in reach (a
    clip of fewer frames than latents) keeps every real frame, so that it reads its nearest ones."""
    inside = (window >= -0.5 * reach * reach) & valid[:, None, :]
    inside = inside | (valid[:, None, :] & ~inside.any(-1, keepdim=True))
    return window.masked_fill(~inside, float("-inf"))


class PerceiverAdapter(nn.Module):
    """SpeechLM features [B, T, in_dim] + mask [B, T] -> soft tokens [B, n_latents, out_dim].

    Output scale: each soft token is RMS-normalised and multiplied by target_norm / sqrt(out_dim)
    and a learned scalar gain (initially 1), so its L2 norm is gain * target_norm, target_norm being
    the LLM's mean input-embedding norm. The LLM thus sees vectors of the size it was trained on
    from the first step (an out-of-scale input swamps or vanishes next to the prompt's embeddings),
    training only has to find directions, and the gain can still move the overall size if the LLM
    prefers. The result is float32; the caller casts it to the LLM's dtype.
    """

    def __init__(self, cfg: AdapterConfig, in_dim: int, out_dim: int, target_norm: float,
                 reader: VocabularyReader | None = None):
        super().__init__()
        if cfg.output == "vocabulary" and (reader is None or not reader.trainable):
            raise ValueError("adapter.output is 'vocabulary': give the adapter a trainable VocabularyReader "
                             "over the LLM's embedding rows (stage 2 builds it from the corpus's transcripts)")
        if reader is not None and cfg.output != "vocabulary":
            raise ValueError(f"a VocabularyReader is part of the adapter only when adapter.output is "
                             f"'vocabulary' (got {cfg.output!r})")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if int(value) <= 0:
                raise ValueError(f"PerceiverAdapter: {name} must be > 0, got {value!r}")
        if not (math.isfinite(target_norm) and target_norm > 0):
            raise ValueError(f"PerceiverAdapter: target_norm must be a positive number (the LLM's mean "
                             f"embedding norm), got {target_norm!r}")
        self.cfg = cfg
        self.in_dim, self.out_dim, self.target_norm = int(in_dim), int(out_dim), float(target_norm)
        d = cfg.dim
        self.in_norm = nn.LayerNorm(self.in_dim * cfg.frame_stack)
        self.in_proj = nn.Linear(self.in_dim * cfg.frame_stack, d)
        self.register_buffer("positions", sinusoids(cfg.max_audio_frames, d), persistent=False)
        self.encoder = nn.ModuleList(FrameLayer(cfg) for _ in range(cfg.encoder_layers))
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, d) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, self.out_dim)
        self.gain = nn.Parameter(torch.ones(()))
        # the cue: learned vectors after the heard speech (prompt tuning), at the LLM's embedding norm until
        # stage 2 starts them as LLM embeddings (`start_cue`)
        self.cue = (nn.Parameter(torch.randn(cfg.cue_tokens, self.out_dim) * (self.target_norm / math.sqrt(self.out_dim)))
                    if cfg.cue_tokens else None)
        self._init_weights()
        self.reader = reader  # after the init: its directions are the LLM's rows
        if reader is not None:
            reader.blank_penalty = cfg.blank_penalty

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        depth = sum(len(layer.residual_projections()) for layer in self.layers) + 2 * self.cfg.encoder_layers
        for layer in self.layers:  # GPT-2: residual projections scaled down with depth
            for weight in layer.residual_projections():
                nn.init.normal_(weight, std=0.02 / math.sqrt(depth))
        for frame_layer in self.encoder:
            for weight in (frame_layer.attn.proj.weight, frame_layer.mlp[2].weight):
                nn.init.normal_(weight, std=0.02 / math.sqrt(depth))

    # -- construction and metadata ---------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description that `from_config_dict` rebuilds the same architecture from."""
        data = {"adapter": dataclasses.asdict(self.cfg), "in_dim": self.in_dim, "out_dim": self.out_dim,
                "target_norm": self.target_norm}
        if self.reader is not None:
            data["vocabulary_size"] = len(self.reader.vocab_ids)
            if self.reader.speller is not None:
                speller = self.reader.speller
                data["speller"] = {"length": speller.length, "n_phonemes": speller.n_phonemes,
                                   "dim": speller.bag.embedding_dim}
        return data

    @classmethod
    def from_config_dict(cls, data: Mapping[str, Any]) -> "PerceiverAdapter":
        missing = [k for k in ("adapter", "in_dim", "out_dim", "target_norm") if k not in data]
        if missing:
            raise ValueError(f"adapter metadata lacks {', '.join(missing)}; was it written by config_dict()?")
        cfg = section_from_dict("adapter", dict(data["adapter"]), source="adapter metadata")
        reader = None
        if cfg.output == "vocabulary":  # the shapes only: the checkpoint's state fills in ids and rows
            if "vocabulary_size" not in data:
                raise ValueError("adapter metadata lacks vocabulary_size (adapter.output is 'vocabulary')")
            size = int(data["vocabulary_size"])
            speller = None
            if "speller" in data:
                s = data["speller"]
                speller = PhonemeSpeller(torch.zeros(size, int(s["length"]), dtype=torch.long), int(s["n_phonemes"]),
                                         int(data["out_dim"]), dim=int(s["dim"]))
            reader = VocabularyReader(torch.zeros(size, int(data["out_dim"])), range(size), trainable=True,
                                      speller=speller)
        return cls(cfg, int(data["in_dim"]), int(data["out_dim"]), float(data["target_norm"]), reader)

    @classmethod
    def from_checkpoint(cls, checkpoint: "Checkpoint | str | Path", device: str | torch.device = "cpu") -> "PerceiverAdapter":
        """The trained adapter of a stage-2 or stage-3 checkpoint, frozen, in eval mode."""
        ckpt = as_checkpoint(checkpoint)
        if "adapter" not in ckpt.modules or "adapter" not in ckpt.metadata:
            raise CheckpointError(f"{ckpt.path} (stage {ckpt.stage}) holds no adapter; understanding speech needs "
                                  f"a stage-2 checkpoint (`ira train --stage 2 --resume_checkpoint <stage 1>`)")
        adapter = cls.from_config_dict(ckpt.json_metadata("adapter"))
        ckpt.load_into("adapter", adapter)
        for p in adapter.parameters():
            p.requires_grad_(False)
        return adapter.to(device).eval()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- forward ---------------------------------------------------------------------------------

    def _check(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"adapter features must have shape [B, T, {self.in_dim}] (the SpeechLM's "
                             f"d_model), got {tuple(features.shape)}")
        if tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(f"adapter mask must have shape [B, T] = {tuple(features.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        if features.shape[1] > self.cfg.max_audio_frames:
            raise ValueError(f"{features.shape[1]} audio frames, more than adapter.max_audio_frames "
                             f"({self.cfg.max_audio_frames}); crop the clips or raise that setting")
        mask = mask.to(device=features.device, dtype=torch.bool)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"samples {empty} of the batch have no valid audio frame (all-False mask); "
                             f"the adapter needs at least one frame per clip")
        return mask

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> SoftTokens:
        """features [B, T, in_dim], mask BoolTensor[B, T] (True = real frame) -> what the LLM reads:
        [B, n_latents + cue_tokens, out_dim] ("free"), or per clip [n_i + cue_tokens, out_dim] ("vocabulary")."""
        return self.heard(self.read(*self.encode_frames(features, mask)))

    def heard(self, soft_tokens: torch.Tensor) -> SoftTokens:
        """The soft tokens of `read` -> what the LLM reads of them (see `forward`): the speech, then the cue."""
        return self.cued(self.spoken(soft_tokens))

    def spoken(self, soft_tokens: torch.Tensor) -> SoftTokens:
        """What the LLM reads of the speech itself: the soft tokens ("free"), or one vector per word piece
        the reader hears ("vocabulary")."""
        return soft_tokens if self.reader is None else self.reader.heard(soft_tokens)

    def cued(self, spoken: SoftTokens) -> SoftTokens:
        """`spoken` with the cue vectors after each clip's (unchanged without a cue)."""
        if self.cue is None:
            return spoken
        cue = self.cue.float()
        if isinstance(spoken, torch.Tensor):
            return torch.cat([spoken, cue.expand(spoken.shape[0], -1, -1)], dim=1)
        return [torch.cat([clip, cue]) for clip in spoken]

    @torch.no_grad()
    def start_cue(self, embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Start the cue as randomly chosen rows of the LLM's input embeddings `[V, out_dim]` (prompt tuning
        learns faster from real token vectors than from noise)."""
        if self.cue is None:
            return
        rows = torch.randint(0, embeddings.shape[0], (self.cue.shape[0],), generator=generator)
        self.cue.copy_(embeddings[rows].to(self.cue.dtype))

    def encode_frames(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames the latents read: ([B, T', dim] after stacking, projection and the frame encoder,
        their mask [B, T']). Stage 2's phoneme CTC reads them too."""
        mask = self._check(features, mask)
        x = features.masked_fill(~mask[..., None], 0.0)  # padding is never read; this keeps NaN/inf out too
        x, mask = stack_frames(x, mask, self.cfg.frame_stack)
        frames = self.in_proj(self.in_norm(x)) + self.positions[: x.shape[1]].to(x.dtype)
        for frame_layer in self.encoder:
            frames = frame_layer(frames, mask)
        return frames, mask

    def read(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoded frames -> the soft tokens [B, n_latents, out_dim] (float32, fixed norm)."""
        window, latents = None, self.latents.expand(frames.shape[0], -1, -1)
        if self.cfg.window > 0:
            window = window_bias(mask, self.cfg.n_latents, self.cfg.window)
            if self.cfg.reach > 0:
                window = within_reach(window, mask, self.cfg.reach)
            # each latent starts as its window's average of the frames: clip-dependent from the first step
            weights = window.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
            latents = latents + weights.to(frames.dtype) @ frames
        for layer in self.layers:
            latents = layer(latents, frames, mask, window)
        y = self.out(self.norm(latents)).float()
        scale = self.gain.float() * (self.target_norm / math.sqrt(self.out_dim))
        return y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * scale
