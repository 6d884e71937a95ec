"""SpeechLM: a decoder-only transformer over codec frames, conditioned on a voice style and a text.

One sample is one sequence:

    [style] [t0 t1 ... tn] [BOS] [col 0] [col 1] ... [col S-2]
    '----- prefix -------' '---------- audio steps ----------'

* style: Linear(style_dim -> d_model) of a style vector, or a learned "no style" embedding.
* text: one embedding per text token (absent when the text is dropped).
* audio steps: the input at a step is the sum of K codebook embeddings of one column of the delayed
  grid (see `delay_pattern.py`); BOS is the all-fill column. The output at step s goes through K heads
  that predict column s of the grid: K x (codebook_size values + EOS).

Length head: the BOS step's output (it has seen the style and the text, nothing of the audio) also
predicts log(frames per text token), trained by squared error where the text is present. It is how a
described speaking rate reaches the output reliably: `generate(length_tolerance=0.2)` keeps each
sample's end within +-20% of the predicted length (EOS forbidden before, forced after), instead of
leaving the rate to a per-step EOS decision that a small model learns last.

Frames per step (`speech_lm.frames_per_step` F, default 1): a step may carry F frames as K x F streams
(`frame_stacking.py`); the delay pattern, the embeddings and the heads then run over the streams, and
every public method still takes and returns frames [K, T] (lengths, `max_frames`, `align_frames` and the
length head count frames; a generated sample's length is a multiple of F).

Special audio ids, per codebook: 0..V-1 are codec values, V = EOS (also the head's last class),
V + 1 = fill (BOS, delay fill, after the end, padding; input only, never predicted).

End of speech: codebook k's EOS sits at step T + k. Generation lets codebook 0 decide: when it
samples EOS at step T, the sample is T frames long; later steps still sample codebooks k > 0 until
their last frame (step T + k - 1), then write their EOS by force, so the delayed codebooks are flushed.
Codebooks k > 0 never sample EOS (their EOS logit is masked), and fill is never sampled at all.

Batches: the prefix is LEFT-padded so BOS and the audio steps line up, with a key-padding mask, and
RoPE positions count only real tokens (cumsum of the mask): a padded sample sees exactly the
positions and keys it would see alone. Audio is right-padded (causal attention makes that free).

Attention: the audio steps (BOS included) are causal: each sees the whole prefix and the steps before
it. The prefix reads itself causally too by default; `speech_lm.text_attention: bidirectional` lets
every real prefix token (style and text, not BOS) see every real prefix token, before and after it (a
prefix-LM mask), so a phoneme's state knows the word it is in. The prefix is complete before the first
audio step, so the cached generation computes it once in its prefill with that mask; each later step
is one causal query over the cache, the same in both modes.

The batch dict (what a collator builds, `forward_batch(batch)`):
    text_ids      LongTensor[B, L]   text tokens, padded anywhere (usually on the right)
    text_mask     BoolTensor[B, L]   True on real tokens
    style         FloatTensor[B, style_dim] or absent/None (no style for anyone)
    codes         LongTensor[B, K, T] codec frames, undelayed, right-padded (any padding value)
    codes_lengths LongTensor[B]      frames per sample
    drop_text, drop_style (optional) BoolTensor[B]: drop this condition for these samples.
Other keys (ids, texts, ...) are ignored by `forward_batch`.

Condition dropping (training mode, when neither drop mask is given): per sample, with probability
`cond_drop_prob` both text and style are dropped, with `text_drop_prob` the text alone, with
`style_drop_prob` the style alone (disjoint events). Dropping both gives the unconditional model for
classifier-free guidance and the "audio with no text" reading that `audio_features` uses; dropping one
alone teaches each condition to work without the other. Pass explicit drop masks (e.g. all False) to
turn the randomness off in training mode (PPO log-probs, evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ira.checkpoint import Checkpoint, as_checkpoint
from ira.config import SpeechLMConfig, section_from_dict
from ira.hardware import compiled_cpu_kernels_enabled
from ira.models import alignment
from ira.models.delay_pattern import apply_delay, delay_masks, undo_delay
from ira.models.frame_stacking import stack_frames, steps_for, unstack_frames
from ira.models.kv_cache import StaticKVCache

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Transformer parts


class Rotary(nn.Module):
    """Rotary position embedding; positions are given per token, so padded samples keep theirs."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim]: both halves' factors, sin signed for
        `apply_rotary` (first half -sin, second half +sin)."""
        angles = positions.float()[..., None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1[i], x2[i]) of x = [x1, x2] by its angle: [x1 cos - x2 sin, x2 cos + x1 sin].

    Written as x * cos + roll(x) * sin (roll swaps the halves) because at one token per step the
    chunk/cat form's eight small ops per call were a visible part of a generation step.
    """
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def make_norm(cfg: SpeechLMConfig) -> nn.Module:
    return nn.RMSNorm(cfg.d_model, eps=1e-6) if cfg.norm == "rms" else nn.LayerNorm(cfg.d_model)


class Attention(nn.Module):
    def __init__(self, cfg: SpeechLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.align_heads = cfg.align_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.attn_dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: StaticKVCache | None, layer: int, causal: bool = True,
                align: torch.Tensor | None = None) -> torch.Tensor:
        """mask: bool [B, 1, T, keys] (True = attend), or None: plain causal from position 0 when
        `causal`, else every query sees every key (one new token over a cache without padding).
        align: the additive float mask [B, 1, T, keys] of the first `align_heads` heads (alignment.py)."""
        batch, n, width = x.shape
        qkv = self.qkv(x).view(batch, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(qkv[:2], *rope)   # one call rotates queries and keys
        v = qkv[2]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        a = self.align_heads if align is not None else 0
        y = F.scaled_dot_product_attention(q[:, a:], k[:, a:], v[:, a:], attn_mask=mask,
                                           is_causal=mask is None and causal, dropout_p=dropout)
        if a:
            y_align = F.scaled_dot_product_attention(q[:, :a], k[:, :a], v[:, :a], attn_mask=align.to(q.dtype),
                                                     dropout_p=dropout)
            y = torch.cat([y_align, y], dim=1)
        return self.proj(y.transpose(1, 2).reshape(batch, n, width))


class MLP(nn.Module):
    def __init__(self, cfg: SpeechLMConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:  # 2/3 of the width keeps the parameter count of a GELU MLP
            hidden = 8 * math.ceil(2 * cfg.ffn_mult * cfg.d_model / 3 / 8)
            self.up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        else:
            hidden = int(cfg.ffn_mult * cfg.d_model)
            self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: SpeechLMConfig):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, layer, causal=True, align=None):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache, layer, causal, align))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_mask(key_valid: torch.Tensor, start: int, n_queries: int, n_bidirectional: int = 0) -> torch.Tensor:
    """Causal + key padding: bool [B, 1, n_queries, keys] for queries at start .. start + n - 1.

    n_bidirectional: positions 0 .. n - 1 (the prefix, with `text_attention: bidirectional`) also see
    each other forwards; every later query stays causal. Every query also sees itself, so a padding query
    still has one key (no NaN); its output is never used, and no real query attends to a padding key.
    """
    keys = torch.arange(key_valid.shape[1], device=key_valid.device).view(1, -1)
    queries = torch.arange(start, start + n_queries, device=key_valid.device).view(-1, 1)
    visible = keys <= queries
    if n_bidirectional:
        visible = visible | ((keys < n_bidirectional) & (queries < n_bidirectional))
    mask = visible[None] & key_valid[:, None, :]
    return (mask | (keys == queries)[None])[:, None]


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, C] -> ids [N]. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    ids = None
    if 0 < top_k < logits.shape[-1]:   # sample among the k best only: draw over k, not all
        logits, ids = logits.topk(top_k, dim=-1, sorted=top_p < 1.0)   # top-p needs them most likely first
    if top_p < 1.0:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # the most likely id always stays
        logits = logits.masked_fill(outside, float("-inf"))
    # Gumbel-max: argmax(logits + G), G = -log(-log U) with U uniform, is a draw from softmax(logits), in a
    # few small operations (softmax + multinomial took 25 us over top-50 and 200 us over 8 x 1025 per
    # step). U = 0 gives G = -inf: that id is just not drawn.
    uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    choice = (logits - uniform.log_().neg_().log_()).argmax(dim=-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class SpeechLMOutput:
    """Audio step s of a sample predicts column s of its delayed grid (s = 0 .. T + K - 1).

    loss: mean over codebooks of each codebook's mean cross-entropy (masked).
    loss_per_codebook [K], tokens_per_codebook [K] (long): targets counted per codebook.
    logits [B, K, S, V + 1]; targets [B, K, S] (delayed grid; fill where not a target);
    target_mask [B, K, S] (True on real values and EOS); hidden [B, S, d] (final-norm output over the
    audio steps) when asked for. length_loss: mean squared error of the length head on samples with
    text (log frames per text token); log_frames_per_token [B]: its prediction.
    """

    loss: torch.Tensor
    loss_per_codebook: torch.Tensor
    tokens_per_codebook: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    hidden: torch.Tensor | None = None
    length_loss: torch.Tensor | None = None
    log_frames_per_token: torch.Tensor | None = None


class SpeechLM(nn.Module):
    BATCH_KEYS = ("text_ids", "text_mask", "style", "codes", "codes_lengths", "drop_text", "drop_style",
                  "align_frames")

    def __init__(self, cfg: SpeechLMConfig, n_codebooks: int, codebook_size: int, text_vocab_size: int):
        super().__init__()
        for name, value in (("n_codebooks", n_codebooks), ("codebook_size", codebook_size),
                            ("text_vocab_size", text_vocab_size)):
            if int(value) <= 0:
                raise ValueError(f"SpeechLM: {name} must be > 0, got {value!r}")
        self.cfg = cfg
        self.n_codebooks = int(n_codebooks)
        self.codebook_size = int(codebook_size)
        self.text_vocab_size = int(text_vocab_size)
        self.eos_id = self.codebook_size
        self.fill_id = self.codebook_size + 1
        self.frames_per_step = int(cfg.frames_per_step)
        self.n_streams = self.n_codebooks * self.frames_per_step   # values per step: K x F
        d = cfg.d_model

        self.text_emb = nn.Embedding(self.text_vocab_size, d)
        self.style_proj = nn.Linear(cfg.style_dim, d)
        self.null_style = nn.Parameter(torch.zeros(d))
        self.audio_emb = nn.ModuleList(nn.Embedding(self.codebook_size + 2, d) for _ in range(self.n_streams))
        self.rope = Rotary(d // cfg.n_heads, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.recompute = False
        """Passes with gradients keep only each block's input and recompute the block in the backward pass
        (activation checkpointing; `recomputing`): the same gradient, a block's activations never held."""
        self.norm = make_norm(cfg)
        # the K (x F) stream heads as one matrix (rows j*(V+1) .. (j+1)*(V+1) are stream j's): one matmul
        # per generation step instead of K small ones
        self.heads = nn.Linear(d, self.n_streams * (self.codebook_size + 1), bias=False)
        self.length_head = nn.Linear(d, 1)
        self._init_weights()
        self._register_load_state_dict_pre_hook(self.upgrade_state_dict)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_style, std=0.02)
        for block in self.blocks:  # GPT-2: residual projections scaled down with depth
            for weight in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    # -- construction and metadata ---------------------------------------------------------------

    @staticmethod
    def upgrade_state_dict(state_dict: dict, prefix: str = "", *args: Any) -> None:
        """Rename, in place, what older checkpoints saved in another layout: `heads.{k}.weight` (one
        head per codebook, before they were fused) become rows of `heads.weight`, in codebook order.
        Runs as a load_state_dict hook and from `Checkpoint.load_into` before its key check."""
        per_codebook = re.compile(re.escape(prefix + "heads.") + r"(\d+)\.weight")
        found = sorted((int(m.group(1)), m.group(0)) for m in map(per_codebook.fullmatch, list(state_dict)) if m)
        if found:
            state_dict[prefix + "heads.weight"] = torch.cat([state_dict.pop(key) for _, key in found], dim=0)

    @classmethod
    def from_parts(cls, cfg: SpeechLMConfig, codec: Any, tokenizer: Any) -> "SpeechLM":
        """Sized for a codec (n_codebooks, codebook_size) and a text tokenizer (vocab_size)."""
        return cls(cfg, codec.n_codebooks, codec.codebook_size, tokenizer.vocab_size)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description that `from_config_dict` rebuilds the same architecture from."""
        return {"speech_lm": dataclasses.asdict(self.cfg), "n_codebooks": self.n_codebooks,
                "codebook_size": self.codebook_size, "text_vocab_size": self.text_vocab_size}

    @classmethod
    def from_config_dict(cls, data: Mapping[str, Any]) -> "SpeechLM":
        missing = [k for k in ("speech_lm", "n_codebooks", "codebook_size", "text_vocab_size") if k not in data]
        if missing:
            raise ValueError(f"SpeechLM metadata lacks {', '.join(missing)}; was it written by config_dict()?")
        stored = dict(data["speech_lm"])
        stored.setdefault("align_heads", 0)   # saved before alignment heads existed: a model without them
        stored.setdefault("text_attention", "causal")   # saved before the setting: causal, whatever the default
        stored.setdefault("frames_per_step", 1)          # saved before the setting: one frame per step
        cfg = section_from_dict("speech_lm", stored, source="SpeechLM metadata")
        return cls(cfg, int(data["n_codebooks"]), int(data["codebook_size"]), int(data["text_vocab_size"]))

    @classmethod
    def from_checkpoint(cls, checkpoint: "Checkpoint | str | Path", device: str | torch.device = "cpu",
                        module: str = "speech_lm") -> "SpeechLM":
        """The SpeechLM of an IRA checkpoint (a loaded `Checkpoint` or a path), shaped from its metadata,
        weights loaded, in eval mode. `module="reference"` gives a stage-3 checkpoint's frozen stage-2 model."""
        ckpt = as_checkpoint(checkpoint)
        model = cls.from_config_dict(ckpt.json_metadata("speech_lm"))
        ckpt.load_into(module, model)
        return model.to(device).eval()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.null_style.device

    # -- building the sequence -------------------------------------------------------------------

    def _drops(self, batch: int, drop_text: Any, drop_style: Any, no_text: bool,
               no_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device
        if drop_text is None and drop_style is None and self.training:
            c = self.cfg
            u = torch.rand(batch, device=device)
            both = u < c.cond_drop_prob
            text_only = (u >= c.cond_drop_prob) & (u < c.cond_drop_prob + c.text_drop_prob)
            style_only = ((u >= c.cond_drop_prob + c.text_drop_prob)
                          & (u < c.cond_drop_prob + c.text_drop_prob + c.style_drop_prob))
            drop_text, drop_style = both | text_only, both | style_only

        def as_mask(value: Any, name: str) -> torch.Tensor:
            if value is None:
                return torch.zeros(batch, dtype=torch.bool, device=device)
            mask = torch.as_tensor(value, device=device).bool()
            if mask.dim() == 0:
                mask = mask.expand(batch)
            if mask.shape != (batch,):
                raise ValueError(f"{name} must be a bool tensor of shape [{batch}], got {tuple(mask.shape)}")
            return mask

        drop_text, drop_style = as_mask(drop_text, "drop_text"), as_mask(drop_style, "drop_style")
        if no_text:
            drop_text = torch.ones_like(drop_text)
        if no_style:
            drop_style = torch.ones_like(drop_style)
        return drop_text, drop_style

    def _prefix(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                style: torch.Tensor | None, drop_text: torch.Tensor,
                drop_style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[style] [text] per sample, left-padded: (embeddings [B, P, d], valid [B, P])."""
        batch, d = drop_text.shape[0], self.cfg.d_model
        if style is None:  # still run the projection (all rows dropped) so DDP sees every parameter used
            style = torch.zeros(batch, self.cfg.style_dim, device=self.device, dtype=self.null_style.dtype)
            drop_style = torch.ones_like(drop_style)
        if style.shape != (batch, self.cfg.style_dim):
            raise ValueError(f"style must have shape [{batch}, {self.cfg.style_dim}] "
                             f"(speech_lm.style_dim), got {tuple(style.shape)}")
        # zero the dropped rows first: a NaN there would poison the gradient of style_proj
        style = style.to(self.null_style.dtype).masked_fill(drop_style[:, None], 0.0)
        projected = self.style_proj(style)
        null = self.null_style.to(projected.dtype).expand(batch, d)
        style_tok = torch.where(drop_style[:, None], null, projected)
        seq, valid = style_tok[:, None], torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        if text_ids is not None:
            if text_ids.dim() != 2 or text_ids.shape[0] != batch:
                raise ValueError(f"text_ids must have shape [{batch}, L], got {tuple(text_ids.shape)}")
            text_mask = torch.ones_like(text_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
            text_valid = text_mask & ~drop_text[:, None]
            n_text = text_valid.sum(dim=1)
            if text_ids.shape[1] and int(n_text.max()) > self.cfg.max_text_tokens:
                raise ValueError(f"a text has {int(n_text.max())} tokens, more than speech_lm.max_text_tokens "
                                 f"({self.cfg.max_text_tokens}); shorten it or raise that setting")
            bad = text_valid & ((text_ids < 0) | (text_ids >= self.text_vocab_size))
            if bool(bad.any()):
                raise ValueError(f"text_ids hold values outside [0, {self.text_vocab_size}) (the text "
                                 "tokenizer's vocab_size): the tokenizer does not match this model")
            tokens = self.text_emb(text_ids.masked_fill(~text_valid, 0))
            seq = torch.cat([seq.to(tokens.dtype), tokens], dim=1)
            valid = torch.cat([valid, text_valid], dim=1)
            # left-align: a stable sort puts each row's padding first and keeps its tokens in order
            order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
            seq = seq.gather(1, order[..., None].expand(-1, -1, d))
            valid = valid.gather(1, order)
            width = int(valid.sum(dim=1).max())
            seq, valid = seq[:, -width:], valid[:, -width:]
        return seq, valid

    def _embed_audio(self, columns: torch.Tensor) -> torch.Tensor:
        """Delayed-grid columns [B, K x F, S] -> [B, S, d]: the sum of the stream embeddings."""
        return sum(emb(columns[:, k]) for k, emb in enumerate(self.audio_emb))

    def _bos(self, batch: int) -> torch.Tensor:
        return torch.full((batch, self.n_streams, 1), self.fill_id, dtype=torch.long, device=self.device)

    @contextlib.contextmanager
    def recomputing(self, enabled: bool = True) -> Iterator[None]:
        """Inside, passes with gradients recompute each block's activations in the backward pass instead of
        keeping them (`recompute`); as before after."""
        before, self.recompute = self.recompute, enabled
        try:
            yield
        finally:
            self.recompute = before

    def _transformer(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None,
                     cache: StaticKVCache | None = None, align: torch.Tensor | None = None,
                     n_blocks: int | None = None, n_prefix: int = 0) -> torch.Tensor:
        """x [B, T, d] at RoPE `positions` [B, T]; key_valid [B, keys so far + T], or None when no key
        is padding (then no mask is built: one new token sees all keys, more are causal from 0);
        align: the alignment heads' mask (`_align_bias`), needed when the model has them.
        n_prefix: the (padded) prefix length when x starts with the prefix (the first pass); its
        tokens see each other both ways with `text_attention: bidirectional`. Pass it wherever x holds
        the prefix: every path (training, prefill, uncached steps) must build the same mask.
        Returns the final-norm output, or with `n_blocks` (no cache) the residual stream after that
        many blocks."""
        if self.cfg.align_heads and align is None:
            raise ValueError("this SpeechLM has alignment heads: pass their mask (align=...)")
        start = cache.length if cache is not None else 0
        # a prefix of one token (the style alone) is the same either way: keep the causal fast path
        n_bidirectional = n_prefix if self.cfg.text_attention == "bidirectional" and n_prefix > 1 else 0
        if n_bidirectional and start > 0:
            raise ValueError("the prefix is read in the first pass only (start 0), not after a filled cache")
        if key_valid is not None and cache is None and not n_bidirectional and bool(key_valid.all()):
            key_valid = None  # plain causal: lets SDPA pick its fastest kernel
        if key_valid is None and n_bidirectional:   # the prefix's both-ways block needs an explicit mask
            key_valid = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        mask, causal = None, x.shape[1] > 1
        if key_valid is not None:
            mask = attention_mask(key_valid, start, x.shape[1], n_bidirectional)
        elif causal and start > 0:
            raise ValueError("several new tokens after a filled cache need key_valid (the causal mask is offset)")
        rope = self.rope(positions)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            if n_blocks is not None and layer == n_blocks:
                return x
            if self.recompute and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, layer, causal, align,
                                                      use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, layer, causal, align)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def _align_bias(self, prefix_valid: torch.Tensor, n_frames: torch.Tensor | None,
                    n_audio: int) -> torch.Tensor | None:
        """The alignment heads' mask for a pass over the prefix and `n_audio` audio steps from BOS
        (None when the model has none). n_frames [B]: the T the prior spreads the text over."""
        if not self.cfg.align_heads:
            return None
        if n_frames is None:
            n_frames = torch.ones(prefix_valid.shape[0], device=prefix_valid.device)
        return alignment.attention_bias(prefix_valid, n_frames.to(prefix_valid.device), n_audio,
                                        self.cfg.align_sigma,
                                        bidirectional_prefix=self.cfg.text_attention == "bidirectional")

    def _run(self, prefix: torch.Tensor, prefix_valid: torch.Tensor, columns: torch.Tensor,
             n_frames: torch.Tensor | None = None, n_blocks: int | None = None) -> torch.Tensor:
        """Full (uncached) pass over prefix + audio input columns [B, K, S] -> audio hidden [B, S, d].
        n_frames [B]: the frame count the alignment heads' prior spreads the text over."""
        audio = self._embed_audio(columns)
        x = torch.cat([prefix.to(audio.dtype), audio], dim=1)
        valid = torch.cat([prefix_valid, torch.ones(audio.shape[:2], dtype=torch.bool, device=self.device)], 1)
        positions = _positions(prefix_valid, audio.shape[1])
        align = self._align_bias(prefix_valid, n_frames, audio.shape[1])
        return self._transformer(x, positions, valid, align=align, n_blocks=n_blocks,
                                 n_prefix=prefix.shape[1])[:, prefix.shape[1]:]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, d] -> [B, K x F, S, V + 1]."""
        batch, steps = hidden.shape[:2]
        logits = self.heads(hidden).view(batch, steps, self.n_streams, self.codebook_size + 1)
        return logits.transpose(1, 2).contiguous()

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last step's float logits: [B, S, d] -> [B, K x F, V + 1]."""
        return self._logits(hidden[:, -1:])[:, :, 0].float()

    def _log_frames_per_token(self, bos_hidden: torch.Tensor) -> torch.Tensor:
        """The length head on the BOS step's output [B, d] -> [B] (fp32)."""
        return self.length_head(bos_hidden).squeeze(-1).float()

    def _check_codes(self, codes: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if codes.dim() != 3 or codes.shape[1] != self.n_codebooks:
            raise ValueError(f"codes must have shape [B, {self.n_codebooks}, T] (this model has "
                             f"{self.n_codebooks} codebooks), got {tuple(codes.shape)}")
        batch, _, n_frames = codes.shape
        if n_frames > self.cfg.max_audio_frames:
            raise ValueError(f"codes have {n_frames} frames, more than speech_lm.max_audio_frames "
                             f"({self.cfg.max_audio_frames}); crop the clips or raise that setting")
        codes = codes.long()
        if lengths is None:
            lengths = torch.full((batch,), n_frames, dtype=torch.long, device=codes.device)
        lengths = torch.as_tensor(lengths, device=codes.device).long()
        if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > n_frames).any()):
            raise ValueError(f"codes_lengths must be [{batch}] values in [0, {n_frames}], got {lengths.tolist()}")
        real = torch.arange(n_frames, device=codes.device)[None, None] < lengths[:, None, None]
        if bool((real & ((codes < 0) | (codes >= self.codebook_size))).any()):
            raise ValueError(f"codes hold values outside [0, {self.codebook_size}) (this model's codebook_size): "
                             "the token cache comes from another codec than the one the model was built for")
        return codes, lengths

    def _steps_of(self, frames: torch.Tensor) -> torch.Tensor:
        """A frame count (float, e.g. the length head's) as the steps that carry it: frames / F."""
        frames = torch.as_tensor(frames, device=self.device)
        return frames if self.frames_per_step == 1 else frames.float() / self.frames_per_step

    # -- training --------------------------------------------------------------------------------

    def forward(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                style: torch.Tensor | None, codes: torch.Tensor, codes_lengths: torch.Tensor | None,
                drop_text: torch.Tensor | None = None, drop_style: torch.Tensor | None = None,
                return_hidden: bool = False, align_frames: torch.Tensor | None = None) -> SpeechLMOutput:
        """Teacher-forced next-column prediction over the delayed grid; see the module docstring.

        align_frames [B]: the frame count the alignment heads spread the text over; default the clips'
        lengths. PPO passes the count the samples were generated with (the length head's prediction).
        With F frames per step, logits / targets / target_mask are over the K x F streams' grid, and
        loss_per_codebook / tokens_per_codebook add each codebook's F streams."""
        codes, lengths = self._check_codes(codes, codes_lengths)
        batch, n_codebooks, n_frames = codes.shape
        drop_text, drop_style = self._drops(batch, drop_text, drop_style, text_ids is None, style is None)
        prefix, prefix_valid = self._prefix(text_ids, text_mask, style, drop_text, drop_style)

        streams, steps = stack_frames(codes, lengths, self.frames_per_step)            # [B, K x F, T'], [B]
        delayed = apply_delay(streams, self.fill_id, steps, eos_id=self.eos_id)        # [B, K x F, T' + K x F]
        inputs = torch.cat([self._bos(batch), delayed[:, :, :-1]], dim=2)
        align_steps = steps if align_frames is None else self._steps_of(align_frames)
        hidden = self._run(prefix, prefix_valid, inputs, align_steps)
        logits = self._logits(hidden)

        n_text = prefix_valid.sum(dim=1) - 1                                           # minus the style token
        log_rate = self._log_frames_per_token(hidden[:, 0])
        has_length = (n_text > 0) & (lengths > 0)
        target = (lengths.float() / n_text.clamp(min=1).float()).clamp(min=1e-3).log()
        squared = (log_rate - target).pow(2) * has_length
        length_loss = squared.sum() / has_length.sum().clamp(min=1)

        real, eos = delay_masks(steps, self.n_streams, delayed.shape[2])
        target_mask = real | eos
        ce = F.cross_entropy(logits.float().flatten(0, 2), delayed.masked_fill(~target_mask, IGNORE_INDEX).flatten(),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(delayed)
        # per codebook: its F streams together (stream j = k * F + f)
        tokens = target_mask.sum(dim=(0, 2)).view(n_codebooks, self.frames_per_step).sum(dim=1)
        loss_per_codebook = ce.sum(dim=(0, 2)).view(n_codebooks, self.frames_per_step).sum(dim=1) / tokens.clamp(min=1)
        return SpeechLMOutput(loss=loss_per_codebook.mean(), loss_per_codebook=loss_per_codebook,
                              tokens_per_codebook=tokens, logits=logits, targets=delayed,
                              target_mask=target_mask, hidden=hidden if return_hidden else None,
                              length_loss=length_loss, log_frames_per_token=log_rate)

    def forward_batch(self, batch: Mapping[str, Any], return_hidden: bool = False) -> SpeechLMOutput:
        """`forward` on a collator's dict (keys in BATCH_KEYS; others ignored)."""
        if "codes" not in batch:
            raise KeyError(f"the batch has no 'codes' (keys: {sorted(batch)}); expected {self.BATCH_KEYS}")
        return self(**{key: batch.get(key) for key in self.BATCH_KEYS}, return_hidden=return_hidden)

    def audio_features(self, codes: torch.Tensor, lengths: torch.Tensor | None = None, layer: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states over the audio alone (text AND style dropped): ([B, T, d], mask BoolTensor[B, T]).

        layer: 0 = the final (normed) output; k = the residual stream after block k, and only k blocks run
        (a middle layer holds more of what was said and less of the next frame's detail).

        Feature t is the step whose input holds frame t's last codebook (step t + K), so it has seen
        every codebook of frame t (and the coarse codebooks of up to K - 1 frames after it). With F frames
        per step, the F frames of a step share its feature (the step that holds their last stream). Call
        `model.eval()` first for deterministic features (dropout).
        """
        codes, lengths = self._check_codes(codes, lengths)
        batch, _, n_frames = codes.shape
        all_dropped = torch.ones(batch, dtype=torch.bool, device=self.device)
        prefix, prefix_valid = self._prefix(None, None, None, all_dropped, all_dropped)
        streams, steps = stack_frames(codes, lengths, self.frames_per_step)
        delayed = apply_delay(streams, self.fill_id, steps, eos_id=self.eos_id)
        if not 0 <= layer <= len(self.blocks):
            raise ValueError(f"layer must be 0 (the output) or a block number 1..{len(self.blocks)}, got {layer}")
        hidden = self._run(prefix, prefix_valid, torch.cat([self._bos(batch), delayed[:, :, :-1]], dim=2),
                           n_blocks=layer or None)
        hidden = hidden[:, self.n_streams:self.n_streams + streams.shape[2]]
        if self.frames_per_step > 1:   # one row per frame: a step's state for each of its F frames
            hidden = hidden.repeat_interleave(self.frames_per_step, dim=1)[:, :n_frames]
        mask = torch.arange(n_frames, device=codes.device)[None] < lengths[:, None]
        return hidden, mask

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *,
                 texts: list[str] | None = None, tokenizer: Any = None, style: torch.Tensor | None = None,
                 batch_size: int | None = None, max_frames: int | None = None, min_frames: int = 0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 use_cache: bool = True, length_tolerance: float | None = None,
                 align_frames: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Sample speech for a batch: a list of LongTensor[K, T_i] (undelayed, EOS and fill removed, CPU).

        Text: `text_ids` [B, L] + `text_mask`, or `texts` + `tokenizer`; neither = no text. style
        [B, style_dim] or None (no style). With neither, `batch_size` samples (default 1) of free speech.
        max_frames defaults to speech_lm.max_audio_frames: a sample that reaches it without EOS ends
        there; min_frames forbids EOS before that many frames. cfg_scale None: no guidance; a number s
        runs the conditional and the unconditional (text and style dropped) rows together and samples
        from uncond + s * (cond - uncond) (s = 1 gives the conditional model back; 1.5-3 is usual).
        length_tolerance t (e.g. 0.2): each sample with text ends within (1 -+ t) x the length head's
        prediction (inside min_frames..max_frames); None leaves the end to sampled EOS alone.
        temperature 0 = greedy; top_k 0 / top_p 1 = off. use_cache False recomputes the whole sequence
        at every step (the naive baseline, for benchmarks). align_frames [B]: the frame count the
        alignment heads spread each text over (and the length the tolerance is taken around); default
        the length head's prediction (`predicted_frames`). The model is in eval mode meanwhile.
        """
        last = None
        for last in self._decode(text_ids, text_mask, texts, tokenizer, style, batch_size, max_frames,
                                 min_frames, _sampler(temperature, top_k, top_p, generator, seed, self.device),
                                 cfg_scale, use_cache, length_tolerance=length_tolerance,
                                 align_frames=align_frames):
            pass
        columns, n_cols, ends, _ = last
        grid = columns[:, :, :n_cols].cpu()
        return [unstack_frames(undo_delay(grid[i:i + 1], int(ends[i])), self.frames_per_step)[0]
                for i in range(grid.shape[0])]

    @torch.no_grad()
    def stream(self, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *,
               texts: list[str] | None = None, tokenizer: Any = None, style: torch.Tensor | None = None,
               chunk_frames: int = 15, max_frames: int | None = None, min_frames: int = 0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float | None = None,
               generator: torch.Generator | None = None, seed: int | None = None,
               use_cache: bool = True, length_tolerance: float | None = None) -> Iterator[torch.Tensor]:
        """`generate` for one sample, yielding LongTensor[K, t] (CPU) as frames complete.

        Frame t is complete once its last codebook is out (K - 1 steps after its first). Chunks hold
        `chunk_frames` frames (rounded up to whole steps of F frames), the last one the rest; their
        concatenation equals `generate`'s output for the same arguments and seed.
        """
        if chunk_frames <= 0:
            raise ValueError(f"chunk_frames must be > 0, got {chunk_frames}")
        n_streams, emitted = self.n_streams, 0          # counted in steps (F frames each)
        chunk_steps = -(-chunk_frames // self.frames_per_step)
        for columns, n_cols, ends, done in self._decode(
                text_ids, text_mask, texts, tokenizer, style, None, max_frames, min_frames,
                _sampler(temperature, top_k, top_p, generator, seed, self.device), cfg_scale, use_cache,
                single=True, length_tolerance=length_tolerance):
            complete = min(n_cols - n_streams + 1, int(ends[0]))
            while complete - emitted >= chunk_steps or (bool(done[0]) and complete > emitted):
                stop = min(emitted + chunk_steps, complete)
                window = columns[:, :, emitted:stop + n_streams - 1]
                yield unstack_frames(undo_delay(window, stop - emitted), self.frames_per_step)[0].cpu()
                emitted = stop

    def _conditions(self, text_ids, text_mask, texts, tokenizer, style, batch_size):
        """Resolve generate()'s ways of giving the conditions into (text_ids, text_mask, style, batch)."""
        if texts is not None:
            if tokenizer is None:
                raise ValueError("generate(texts=...) needs the text tokenizer the model was trained with")
            if text_ids is not None:
                raise ValueError("give either texts or text_ids, not both")
            text_ids, text_mask = tokenizer.batch_encode(list(texts))
        if text_ids is not None:
            text_ids = text_ids.to(self.device)
            text_mask = None if text_mask is None else text_mask.to(self.device)
        if style is not None:
            style = style.to(self.device)
        sizes = {n for n in (None if text_ids is None else text_ids.shape[0],
                             None if style is None else style.shape[0], batch_size) if n is not None}
        if len(sizes) > 1:
            raise ValueError(f"text, style and batch_size disagree on the batch size: {sorted(sizes)}")
        return text_ids, text_mask, style, (sizes.pop() if sizes else 1)

    def _decode(self, text_ids, text_mask, texts, tokenizer, style, batch_size, max_frames, min_frames,
                sample, cfg_scale, use_cache, single: bool = False, length_tolerance: float | None = None,
                align_frames: torch.Tensor | None = None):
        """Yield (columns [B, K x F, max steps + K x F], columns written, ends [B], done [B]) after each step.

        ends[b] is the sample's step count once it has ended (its last allowed step until then; F frames
        a step); done[b] once its last stream's EOS is written.
        """
        text_ids, text_mask, style, batch = self._conditions(text_ids, text_mask, texts, tokenizer, style,
                                                             batch_size)
        if single and batch != 1:
            raise ValueError(f"stream() generates one sample at a time, got a batch of {batch}")
        max_frames = self.cfg.max_audio_frames if max_frames is None else int(max_frames)
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if length_tolerance is not None and not 0.0 <= length_tolerance < 1.0:
            raise ValueError(f"length_tolerance must be in [0, 1) (or None = off), got {length_tolerance}")
        device, n_streams, per_step = self.device, self.n_streams, self.frames_per_step
        max_steps = min(-(-max_frames // per_step), max(self.cfg.max_audio_frames // per_step, 1))
        was_training = self.training
        self.eval()
        try:
            drop_text, drop_style = self._drops(batch, None, None, text_ids is None, style is None)
            guided = cfg_scale is not None
            if guided:  # conditional rows first, then the same samples with both conditions dropped
                if text_ids is not None:
                    text_ids = text_ids.repeat(2, 1)
                    text_mask = None if text_mask is None else text_mask.repeat(2, 1)
                style = None if style is None else style.repeat(2, 1)
                ones = torch.ones_like(drop_text)
                drop_text, drop_style = torch.cat([drop_text, ones]), torch.cat([drop_style, ones])
            prefix, prefix_valid = self._prefix(text_ids, text_mask, style, drop_text, drop_style)
            rows, n_prefix = prefix.shape[0], prefix.shape[1]
            n_cols_max = max_steps + n_streams
            columns = torch.full((batch, n_streams, n_cols_max), self.fill_id, dtype=torch.long, device=device)
            ended = torch.zeros(batch, dtype=torch.bool, device=device)

            if use_cache:  # prefill: the prefix and BOS in one pass
                cache = StaticKVCache(self.cfg.n_layers, rows, self.cfg.n_heads,
                                      self.cfg.d_model // self.cfg.n_heads, n_prefix + n_cols_max)
                key_valid = None  # no mask at all unless some prefix is left-padded (checked once, not per step)
                if not bool(prefix_valid.all()):
                    key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(rows, n_cols_max)], dim=1)

                def keys_valid(n: int) -> torch.Tensor | None:
                    return None if key_valid is None else key_valid[:, :n]

                bos_position = prefix_valid.sum(dim=1, keepdim=True)
                x = torch.cat([prefix, self._embed_audio(self._bos(rows)).to(prefix.dtype)], dim=1)
                # the BOS step's prior sits at the text's start whatever T is: the prediction comes after
                hidden = self._transformer(x, _positions(prefix_valid, 1), keys_valid(n_prefix + 1), cache,
                                           align=self._align_bias(prefix_valid, None, 1), n_prefix=n_prefix)
            else:
                hidden = self._run(prefix, prefix_valid, self._bos(rows))
            expected = self._expected_frames(hidden[:batch, -1], prefix_valid[:batch], align_frames)
            first, last = self.length_bounds(expected, prefix_valid[:batch].sum(dim=1) > 1, min_frames, max_frames,
                                             length_tolerance)
            if per_step > 1:   # frames -> steps: no end before ceil(first / F) steps, the end at ceil(last / F)
                first = steps_for(first, per_step).clamp(max=max_steps)
                last = torch.maximum(steps_for(last, per_step).clamp(max=max_steps), first)
            frames_rows = expected.repeat(2) if guided else expected   # the unconditional rows have no text
            steps_rows = self._steps_of(frames_rows)
            if use_cache:
                from ira.models.cached_step import cached_step_for   # it builds on this module's parts
                prior = (alignment.StepPrior(prefix_valid, steps_rows, self.cfg.align_sigma)
                         if self.cfg.align_heads else None)
                cached_step = cached_step_for(self, cache, prior)
            ends = last.clone()
            logits = self._last_logits(hidden)

            for step in range(n_cols_max):
                if guided:
                    cond, uncond = logits[:batch], logits[batch:]
                    logits = uncond + cfg_scale * (cond - uncond)
                column, ends, ended = self._next_column(logits, step, ends, ended, first, last, sample)
                columns[:, :, step] = column
                done = ended & (step >= ends + n_streams - 1)
                yield columns, step + 1, ends, done
                if bool(done.all()):
                    return
                if use_cache:  # one step: this column in, the next column's logits out
                    step_in = column.repeat(2, 1) if guided else column
                    logits = cached_step(step_in, bos_position + step + 1, cache, keys_valid(cache.length + 1))
                else:
                    inputs = torch.cat([self._bos(batch), columns[:, :, :step + 1]], dim=2)
                    hidden = self._run(prefix, prefix_valid, inputs.repeat(2, 1, 1) if guided else inputs,
                                       steps_rows)
                    logits = self._last_logits(hidden)
        finally:
            self.train(was_training)

    def _expected_frames(self, bos_hidden: torch.Tensor, prefix_valid: torch.Tensor,
                         given: torch.Tensor | None = None) -> torch.Tensor:
        """The frame count each sample is expected to take [B] (float): `given`, else the length head's
        prediction (frames per text token x text tokens; at least 1)."""
        if given is not None:
            given = torch.as_tensor(given, dtype=torch.float32, device=bos_hidden.device).reshape(-1)
            if given.shape[0] != bos_hidden.shape[0] or bool((given <= 0).any()):
                raise ValueError(f"align_frames must hold {bos_hidden.shape[0]} positive frame counts, "
                                 f"got {given.tolist()}")
            return given
        n_text = prefix_valid.sum(dim=1) - 1
        return (self._log_frames_per_token(bos_hidden).exp() * n_text.float()).clamp(min=1.0)

    @torch.no_grad()
    def predicted_frames(self, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *,
                         texts: list[str] | None = None, tokenizer: Any = None,
                         style: torch.Tensor | None = None) -> torch.Tensor:
        """The length head's frame count for each text [B] (float): what `generate` spreads the text
        over by default. Pass it back as `align_frames` to score samples as they were generated."""
        text_ids, text_mask, style, batch = self._conditions(text_ids, text_mask, texts, tokenizer, style, None)
        was_training = self.training
        self.eval()
        try:
            drop_text, drop_style = self._drops(batch, None, None, text_ids is None, style is None)
            prefix, prefix_valid = self._prefix(text_ids, text_mask, style, drop_text, drop_style)
            hidden = self._run(prefix, prefix_valid, self._bos(batch))
            return self._expected_frames(hidden[:, -1], prefix_valid)
        finally:
            self.train(was_training)

    @staticmethod
    def length_bounds(expected: torch.Tensor, has_text: torch.Tensor, min_frames: int, max_frames: int,
                      tolerance: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (no EOS before, end at the latest) in `generate`: min/max_frames, narrowed around the
        expected frame count [B] when a tolerance is given and the sample has text [B]. A sample whose length
        is its `last` was ended there; a shorter one chose its end-of-speech."""
        batch, device = expected.shape[0], expected.device
        first = torch.full((batch,), min(min_frames, max_frames), dtype=torch.long, device=device)
        last = torch.full((batch,), max_frames, dtype=torch.long, device=device)
        if tolerance is None:
            return first, last
        lo = torch.floor(expected * (1.0 - tolerance)).long()
        hi = torch.ceil(expected * (1.0 + tolerance)).long()
        has_text = has_text.to(device)
        first = torch.where(has_text, torch.maximum(first, lo).clamp(max=max_frames), first)
        last = torch.where(has_text, torch.minimum(last, torch.maximum(hi, first)), last)
        return first, last

    def _next_column(self, logits, step, ends, ended, min_frames: torch.Tensor, max_frames: torch.Tensor,
                     sample: Sampler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample column `step` of the delayed grid, forcing fill and EOS where the pattern fixes them.

        min_frames / max_frames [B]: no EOS before, and the end at the latest, per sample. In the middle
        of a generation (every codebook on a frame, no sample ended) the sampled column is used as is:
        that skips ~15 small operations per step, a visible share of a CPU step."""
        if sample.compiled_top_k(logits):
            return self._next_column_compiled(logits, step, ends, ended, min_frames, max_frames, sample)
        batch, n_codebooks, n_classes = logits.shape
        logits = logits.clone()
        logits[:, 1:, self.eos_id] = float("-inf")  # only codebook 0 decides the end
        if step < min_frames.max():
            logits[:, 0, self.eos_id] = logits[:, 0, self.eos_id].masked_fill(step < min_frames, float("-inf"))
        sampled = sample(logits.view(-1, n_classes)).view(batch, n_codebooks)
        new_end = ~ended & (sampled[:, 0] == self.eos_id)
        ends = torch.where(new_end, step, ends)
        ended = ended | new_end | (step >= max_frames)
        if step >= n_codebooks - 1 and bool((ends > step).all()):   # every frame step - k is in 0 .. end
            return sampled, ends, ended
        frame = step - torch.arange(n_codebooks, device=logits.device)[None]   # frame held by (k, step)
        end = ends[:, None]
        column = torch.where((frame >= 0) & (frame < end), sampled, self.fill_id)
        column = torch.where(frame == end, self.eos_id, column)
        return column, ends, ended

    def _next_column_compiled(self, logits, step, ends, ended, min_frames, max_frames, sample: Sampler
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_next_column` for top-k sampling on a CPU as one numba call (~0.1 ms less per step)."""
        from ira.models.numba_sampling import next_column_top_k   # numba loads in ~0.5 s: only here
        batch, n_codebooks, _ = logits.shape
        logits = logits.float() if sample.temperature == 1.0 else logits.float() / sample.temperature
        uniform = torch.rand(batch * n_codebooks, sample.top_k, generator=sample.generator)
        column, ends, ended = next_column_top_k(
            logits.detach().contiguous().numpy(), step, ends.numpy(), ended.numpy(), min_frames.numpy(),
            max_frames.numpy(), uniform.numpy(), sample.top_k, self.eos_id, self.fill_id)
        return torch.from_numpy(column), torch.from_numpy(ends), torch.from_numpy(ended)


@dataclass(frozen=True)
class Sampler:
    """Checked sampling settings bound together: `sampler(logits [N, C])` -> ids [N]."""
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_logits(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def compiled_top_k(self, logits: torch.Tensor) -> bool:
        """Whether the numba-compiled top-k path applies to these logits [..., C]."""
        return (logits.device.type == "cpu" and self.temperature > 0 and self.top_p >= 1.0
                and 0 < self.top_k < logits.shape[-1] and compiled_cpu_kernels_enabled())


def _sampler(temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
             seed: int | None, device: torch.device) -> Sampler:
    """Check the sampling settings once and bind them: logits [N, C] -> ids [N]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if seed is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    return Sampler(temperature, top_k, top_p, generator)


def _positions(prefix_valid: torch.Tensor, n_audio: int) -> torch.Tensor:
    """RoPE positions: real prefix tokens count 0, 1, ...; audio steps continue after them."""
    prefix_pos = (prefix_valid.long().cumsum(dim=1) - 1).clamp(min=0)
    start = prefix_valid.sum(dim=1, keepdim=True)
    audio_pos = start + torch.arange(n_audio, device=prefix_valid.device)[None]
    return torch.cat([prefix_pos, audio_pos], dim=1)
