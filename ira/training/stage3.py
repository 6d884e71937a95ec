"""Stage 3: Reinforced Behaviour Alignment — PPO on the SpeechLM, with the LLM as judge.

One PPO iteration:
1. Rollouts: the policy (the SpeechLM, initialised from stage 2) speaks a batch of corpus texts, each
   with one of its clip's voice descriptions (KV cache, sampling at `ppo.temperature`).
2. Judge: the frozen reference SpeechLM (the stage-2 one) reads the sampled audio (text and style
   dropped), the stage-2 adapter turns it into soft tokens, and the LLM is asked to repeat what was
   said; the semantic score is the LLM's mean log-likelihood per token of the intended text. The phoneme
   score is the adapter's own reading of the audio: stage 2's phoneme reader's CTC log-likelihood per
   phoneme of the text (within a text's samples it follows what a listener hears, where the LLM's reply
   does not: docs/decisions.md). The ASR score is what a listener hears: minus the character error rate
   of what the reward's ASR (`ppo.reward_asr`, Whisper tiny.en) hears in the decoded audio, capped at 1 (as
   F5R-TTS and CosyVoice 2's GRPO recipe reward). The style score is the cosine, in the style encoder's
   space, between the audio and the description.
3. Rewards: `semantic_weight * semantic + phoneme_weight * phonemes + asr_weight * asr + style_weight * style`
   at each sample's last step.
4. Advantages, then `ppo.ppo_epochs` passes of clipped-ratio minibatch updates against the log-probs stored
   at rollout time. `ppo.advantage: gae`: a per-step KL penalty to the reference policy joins the reward,
   then GAE with the value head's estimates, whitened. `group`: each text is spoken `group_size` times and
   the scores are standardised within each text's group (a group whose scores barely differ,
   `ppo.min_group_spread`, is skipped); the KL to the reference is a loss term. Either way the KL
   coefficient adapts toward `ppo.target_kl`.

Validation hears the samples with a second ASR that the reward never hears (`ppo.eval_asr_model`, Whisper
base): `stage3_best` is its lowest WER, so a policy that only learned to please the reward's ASR is not
kept; nor is one whose seconds per phoneme or share of samples ended by their own end-of-speech moved away
from the start's (`ppo.duration_tolerance`).

The policy is the SpeechLM's distribution at `ppo.temperature`, guided by `ppo.cfg_scale` as the speaker
samples (classifier-free guidance: the conditional and the unconditional logits of every step): samples are
drawn from it, and every log-probability (policy, old policy, reference) is taken from it, so PPO improves
the samples a user hears.

A step's action is one column of the delayed grid; its log-probability is the sum over the codebooks
that were sampled there (forced fill/EOS positions do not count). Dropout is off in every policy pass
(rollout, old log-probs and updates alike), so the first minibatch of an iteration has ratio 1.

Engine fit: the loader yields each prompt batch `ppo_epochs * batch_size / minibatch_size` times in a
row; the first time, `training_step` makes the rollouts, every time it trains on one minibatch. The
rollout buffer is part of the task's state, so a run stopped mid-iteration resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ira import peak_memory
from ira.checkpoint import Checkpoint, load_checkpoint, require_stage
from ira.config import IRAConfig
from ira.data.dataset import pad_codes
from ira.data.prepare import ensure_prepared
from ira.data.token_cache import TokenSplit, load_split
from ira.eval import asr
from ira.models.hub import (CodecState, adapter_from_checkpoint, codec_from_checkpoint,
                            feature_speech_lm_from_checkpoint, phoneme_reader_from_checkpoint,
                            speech_lm_from_checkpoint, style_encoder_from_checkpoint, tokenizer_from_checkpoint)
from ira.models.llm import LoadedLLM, load_llm
from ira.models.reading_rate import min_frames_for
from ira.models.speech_lm import SpeechLM
from ira.models.splice import build_student_inputs, generate_reply, reply_log_likelihood
from ira.text_metrics import corpus_cer, corpus_wer
from ira.training.engine import FitResult, Trainer
from ira.training.ppo import (AdaptiveKLController, explained_variance, gae, group_advantages, kl_to_reference,
                              masked_whiten, ppo_losses, shaped_rewards, skipped_groups)
from ira.training.engine import process_device
from ira.training.task import TrainingTask, inherit_frozen_sections
from ira.training.teacher_responses import TASK_INSTRUCTIONS

JUDGE_INSTRUCTION = TASK_INSTRUCTIONS["repeat"]
JUDGE_SCORES = ("semantic", "phonemes", "style", "asr", "asr_likelihood")   # what `judge` returns
SLOWEST_CHARS_PER_SECOND = 6.0   # rollouts may last this long at most (a very slow reading)
UNREADABLE_PHONEME_SCORE = -10.0  # nats per phoneme for audio too short for CTC to align the text at all
LENGTH_TOLERANCE = 0.2            # a sample ends within +-20% of the length head's prediction


def phoneme_log_likelihood(reader: nn.Module, frames: torch.Tensor, frames_valid: torch.Tensor,
                           text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood per phoneme [B] of each row's text (SpeechLM tokenizer ids) under CTC over the
    phoneme reader's classes (0 = blank, id + 1) at the adapter's encoded frames. Audio too short to hold
    its text gets `UNREADABLE_PHONEME_SCORE`, not CTC's "zero infinity" 0, which would be the best score."""
    log_probs = reader(frames).float().log_softmax(-1)
    lengths = text_mask.sum(1)
    nll = F.ctc_loss(log_probs.transpose(0, 1), (text_ids[text_mask] + 1).to(log_probs.device),
                     frames_valid.sum(1).cpu(), lengths.cpu(), reduction="none")
    score = -nll / lengths.to(nll.device).clamp(min=1)
    return torch.where(torch.isfinite(score), score, torch.full_like(score, UNREADABLE_PHONEME_SCORE))


def asr_score(texts: list[str], heard: list[str]) -> torch.Tensor:
    """The ASR term of the reward [B]: minus the character error rate of what was heard against each text
    (spoken forms), capped at 1 so that a long wrong transcript weighs no more than silence."""
    return -torch.tensor([min(asr.spoken_cer(text, said), 1.0) for text, said in zip(texts, heard)])


class ValueHead(nn.Module):
    """Expected return from the policy's hidden state at each audio step."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def step_logprobs(model: SpeechLM, batch: dict[str, Any], temperature: float = 1.0,
                  cfg_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced pass over sampled audio: per-step (log-prob, entropy, mask, hidden) [B, S] ([B, S, d]),
    under the distribution the samples were drawn from: the model's at `temperature`, guided by `cfg_scale`
    (uncond + s * (cond - uncond), as `SpeechLM.generate` samples; None = no guidance).

    The conditional rows keep every condition (no dropout of text or style), as at rollout time; with guidance
    the same samples run again with both dropped, in the same batch."""
    n = batch["codes"].shape[0]
    device = batch["codes"].device
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    guided = cfg_scale is not None
    twice = (lambda x: None if x is None else torch.cat([x, x])) if guided else (lambda x: x)
    drop = torch.cat([keep, torch.ones_like(keep)]) if guided else keep
    out = model(twice(batch["text_ids"]), twice(batch["text_mask"]), twice(batch.get("style")), twice(batch["codes"]),
                twice(batch["codes_lengths"]), drop_text=drop, drop_style=drop, return_hidden=True,
                align_frames=twice(batch.get("align_frames")))
    logits = out.logits.float()
    if guided:
        cond, uncond = logits[:n], logits[n:]
        logits = uncond + cfg_scale * (cond - uncond)
    log_probs = F.log_softmax(logits / temperature, dim=-1)                        # [B, K, S, C]
    targets, target_mask = out.targets[:n], out.target_mask[:n]
    targets = targets.clamp(max=log_probs.shape[-1] - 1)
    picked = log_probs.gather(-1, targets[..., None]).squeeze(-1) * target_mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * target_mask
    mask = target_mask.any(dim=1)
    return picked.sum(1), entropy.sum(1), mask, out.hidden[:n]


class PromptDataset(Dataset):
    """Corpus texts with one of their clip's voice descriptions (chosen by index: reproducible)."""

    def __init__(self, split: TokenSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        descriptions = self.split.descriptions[i]
        return {"clip": i, "text": self.split.texts[i],
                "description": descriptions[i % len(descriptions)] if descriptions else ""}


class RepeatedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of `batch_size`, each yielded `repeats` times in a row (one PPO iteration)."""

    def __init__(self, n: int, batch_size: int, repeats: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} prompts, fewer than ppo.batch_size={batch_size}: lower ppo.batch_size")
        self.n, self.batch_size, self.repeats, self.seed, self.epoch = n, batch_size, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for start in range(0, self.n - self.batch_size + 1, self.batch_size):
            batch = order[start:start + self.batch_size]
            for _ in range(self.repeats):
                yield batch

    def __len__(self) -> int:
        return (self.n // self.batch_size) * self.repeats


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"clip": torch.tensor([item["clip"] for item in items]), "texts": [item["text"] for item in items],
            "descriptions": [item["description"] for item in items]}


class Stage3Task(TrainingTask):
    stage = "3"
    validate_at_start = True   # the stage-2 policy is the best to beat: PPO never hands over a worse one

    def __init__(self, cfg: IRAConfig, source: Checkpoint, llm: Optional[LoadedLLM] = None, cpu: bool = False):
        self.cfg, self.source = cfg, source
        self.codec = codec_from_checkpoint(source, cfg)
        self.tokenizer = tokenizer_from_checkpoint(source)
        self.policy = speech_lm_from_checkpoint(source)
        self.reference = feature_speech_lm_from_checkpoint(source)  # resuming stage 3: still the stage-2 model
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.value_head = ValueHead(self.policy.cfg.d_model)
        self.adapter = adapter_from_checkpoint(source)
        self.phoneme_reader = phoneme_reader_from_checkpoint(source)
        if cfg.ppo.phoneme_weight > 0 and self.phoneme_reader is None:
            raise ValueError(f"{source.path} has no trained phoneme reader (stage 2 with align.phoneme_ctc_weight "
                             f"> 0 trains one) for ppo.phoneme_weight={cfg.ppo.phoneme_weight}: set "
                             f"ppo.phoneme_weight=0 or train stage 2 with the phoneme reader")
        self.style_encoder = style_encoder_from_checkpoint(source) if "style" in source.modules else None
        self.codec_state = CodecState(self.codec)
        pc = cfg.ppo
        for weight in ("asr_weight", "asr_likelihood_weight"):
            if getattr(pc, weight) > 0 and not asr.is_available(pc.reward_asr):
                raise ValueError(f"ppo.{weight}={getattr(pc, weight)} rewards what the ASR {pc.reward_asr!r} "
                                 f"(ppo.reward_asr) hears, and it cannot be loaded here: {asr.INSTALL_HINT}, "
                                 f"or set ppo.{weight}=0")
        self.eval_asr = pc.eval_asr_model if pc.eval_asr and asr.is_available(pc.eval_asr_model) else None
        self._eval_ears: Optional[asr.Transcriber] = None   # loaded by `hear_eval`, dropped when `validate` ends
        self.start_duration: dict[str, float] = {}   # the first validation's seconds per phoneme and EOS share
        self.cfg_scale = pc.cfg_scale if pc.cfg_scale not in (None, 1.0) else None   # 1 = the conditional model
        self._last_val: dict[str, float] = {}         # the latest validation's figures (may_be_best reads them)
        self.llm = llm or load_llm(cfg.llm, device=process_device(cpu))
        if self.adapter.out_dim != self.llm.hidden_size:
            raise ValueError(f"{source.path}: its adapter was trained for an LLM of hidden size "
                             f"{self.adapter.out_dim}, but {self.llm.name} has {self.llm.hidden_size}; "
                             f"set llm.name to the LLM of stage 2")
        self.repeats = pc.ppo_epochs * (pc.batch_size // pc.minibatch_size)
        self.kl = AdaptiveKLController(pc.init_kl_coef, pc.target_kl, pc.kl_horizon)
        self.micro = 0                     # training_step calls so far (position inside an iteration)
        self.buffer: dict[str, Any] = {}   # the current iteration's rollouts
        self.rollout_metrics: dict[str, float] = {}

        prepared = ensure_prepared(cfg)
        if prepared.codec.fingerprint != self.codec.fingerprint:
            raise ValueError(f"{source.path} was trained with the codec {self.codec.fingerprint}, but "
                             f"{cfg.data.dir} is tokenised with {prepared.codec.fingerprint}")
        self.train_split = load_split(prepared.cache_files["train"], self.codec.fingerprint)
        self.val_split = load_split(prepared.cache_files["val"], self.codec.fingerprint)
        # the best checkpoint is the one a listener hears best (the evaluation ASR's WER on held-out texts, an
        # ASR the reward never hears), not the one the judge likes most: a hacked reward cannot pick it;
        # without the evaluation ASR, the judge's reward
        self.best_metric = ("val_asr_wer", "min") if self.eval_asr else ("val_reward_semantic", "max")

    # -- the engine's interface -------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"speech_lm": self.policy, "value_head": self.value_head,
                                       "reference": self.reference, "adapter": self.adapter,
                                       "codec": self.codec_state}
        if self.style_encoder is not None:
            parts["style"] = self.style_encoder
        if self.phoneme_reader is not None:
            parts["align_phonemes"] = self.phoneme_reader
        return parts

    def setup(self, device: torch.device) -> None:
        if not self.llm.quantized:
            self.llm.model.to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.policy.parameters()) + list(self.value_head.parameters())

    def train_dataloader(self) -> DataLoader:
        sampler = RepeatedBatchSampler(len(self.train_split), self.cfg.ppo.batch_size, self.repeats,
                                       self.cfg.training.seed)
        return DataLoader(PromptDataset(self.train_split), batch_sampler=sampler, collate_fn=collate_prompts)

    def val_dataloader(self) -> Optional[DataLoader]:
        if not len(self.val_split):
            return None
        return self.held_out_loader(range(min(self.cfg.ppo.eval_texts, len(self.val_split))))

    def held_out_loader(self, indices: range) -> DataLoader:
        """The validation prompts at `indices`, in one batch (what `validate` speaks and judges)."""
        return DataLoader(torch.utils.data.Subset(PromptDataset(self.val_split), indices), batch_size=len(indices),
                          collate_fn=collate_prompts)

    # -- rollouts and their scores ----------------------------------------------------------------

    def _conditions(self, texts: list[str], descriptions: list[str]) -> dict[str, Any]:
        device = self.policy.device
        text_ids, text_mask = self.tokenizer.batch_encode(texts)
        text_ids = text_ids[:, : self.policy.cfg.max_text_tokens].to(device)
        text_mask = text_mask[:, : self.policy.cfg.max_text_tokens].to(device)
        style = None
        if self.style_encoder is not None:
            vectors = [self.style_encoder.embed_description(d) for d in descriptions]
            if all(v is not None for v in vectors):
                style = torch.stack(vectors).to(device)
        return {"text_ids": text_ids, "text_mask": text_mask, "style": style}

    @torch.no_grad()
    def speak(self, model: SpeechLM, texts: list[str], descriptions: list[str], seed: int
              ) -> dict[str, Any]:
        """Sample speech for the texts; the batch dict of the samples (conditions, codes, lengths)."""
        conditions = self._conditions(texts, descriptions)
        rate = self.codec.frame_rate
        longest = max(len(t) for t in texts)
        max_frames = min(model.cfg.max_audio_frames, int(math.ceil(longest / SLOWEST_CHARS_PER_SECOND * rate)) + 10)
        min_frames = min(min_frames_for(min(texts, key=len), rate), max_frames)
        was_training = model.training
        model.eval()
        # the frame count the alignment heads spread each text over: scoring the samples later (the
        # policy's and the reference's log-probabilities) must use the same one
        align_frames = model.predicted_frames(conditions["text_ids"], conditions["text_mask"],
                                              style=conditions["style"])
        codes = model.generate(text_ids=conditions["text_ids"], text_mask=conditions["text_mask"],
                               style=conditions["style"], max_frames=max_frames, min_frames=min_frames,
                               temperature=self.cfg.ppo.temperature, top_k=self.cfg.ppo.top_k, seed=seed,
                               cfg_scale=self.cfg_scale, length_tolerance=LENGTH_TOLERANCE, align_frames=align_frames)
        model.train(was_training)
        codes = [c if c.shape[1] else torch.zeros(c.shape[0], 1, dtype=torch.long) for c in codes]
        padded, lengths = pad_codes(codes)
        _, last = model.length_bounds(align_frames.cpu(), torch.ones(len(codes), dtype=torch.bool), min_frames,
                                      max_frames, LENGTH_TOLERANCE)
        return {**conditions, "codes": padded.to(model.device), "codes_lengths": lengths.to(model.device),
                "align_frames": align_frames.to(model.device), "ended_by_eos": (lengths < last).to(model.device)}

    @torch.no_grad()
    def listen(self, samples: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """What the judge's ears make of the samples: the adapter's encoded frames, their mask, and the soft
        tokens the LLM reads."""
        features, mask = self.reference.audio_features(samples["codes"], samples["codes_lengths"],
                                                       layer=self.adapter.cfg.feature_layer)
        frames, frames_valid = self.adapter.encode_frames(features, mask)
        return frames, frames_valid, self.adapter.heard(self.adapter.read(frames, frames_valid))

    @torch.no_grad()
    def waveforms(self, samples: dict[str, Any]) -> list[torch.Tensor]:
        """Each sample's audio, decoded by the codec (CPU, float32): what a listener hears."""
        wavs = []
        with torch.autocast(self.policy.device.type, enabled=False):   # the audio inference makes: full precision
            for codes, n in zip(samples["codes"], samples["codes_lengths"].tolist()):
                wavs.append(self.codec.decode(codes[:, :n].cpu()).float().reshape(-1) if n else torch.zeros(0))
        return wavs

    def hear_reward(self, samples: dict[str, Any], texts: Optional[list[str]], transcribe: bool = True,
                    wavs: Optional[list[torch.Tensor]] = None) -> tuple[list[str], list[float]]:
        """What the reward's ASR hears in each sample, all at once through a window fitted to the clips, in one
        pass of its encoder: its transcript (when `transcribe`) and its log-likelihood per token of each text
        (when `texts` are given); [] for what was not asked (`asr.Transcriber.hear_batch`)."""
        transcriber = asr.transcriber(self.cfg.ppo.reward_asr)
        return transcriber.hear_batch(wavs if wavs is not None else self.waveforms(samples), self.codec.sample_rate,
                                      texts, margin_seconds=self.cfg.ppo.asr_window_margin, transcribe=transcribe)

    def hear_eval(self, wavs: list[torch.Tensor]) -> Optional[list[str]]:
        """What the evaluation ASR (never the reward's) hears in each clip, each through Whisper's whole
        window as `ira eval speech` hears it; None when `ppo.eval_asr` is off or the ASR is not installed."""
        if self.eval_asr is None:
            return None
        if self._eval_ears is None:   # held until `validate` ends, not in the process-wide cache of ASRs
            self._eval_ears = asr.Transcriber(name=self.eval_asr)
        return [self._eval_ears(wav, self.codec.sample_rate) if wav.numel() else "" for wav in wavs]

    @torch.no_grad()
    def judge(self, samples: dict[str, Any], texts: list[str], descriptions: list[str],
              ears: Optional[tuple[torch.Tensor, torch.Tensor, Any]] = None,
              heard: Optional[tuple[list[str], list[float]]] = None) -> dict[str, torch.Tensor]:
        """Semantic score (LLM's mean log-likelihood per token of the text, from the audio), phoneme score
        (the phoneme reader's, per phoneme; 0 without one), ASR score (minus the CER, capped at 1, of what
        the reward's ASR heard), ASR likelihood (the reward ASR's log-probability per token of the text) and
        style score. The ASR terms are 0 when their weight is 0 and `heard` does not hold them. `ears`:
        `listen(samples)`, `heard`: `hear_reward(samples, texts)`, when the caller has them already."""
        pc = self.cfg.ppo
        said, likelihoods = heard if heard is not None else ([], [])
        transcribe, score = heard is None and pc.asr_weight > 0, heard is None and pc.asr_likelihood_weight > 0
        if transcribe or score:   # one pass of the reward ASR's encoder for both
            said, likelihoods = self.hear_reward(samples, texts if score else None, transcribe)
        frames, frames_valid, audio = ears if ears is not None else self.listen(samples)
        semantic = reply_log_likelihood(self.llm, [JUDGE_INSTRUCTION] * len(texts), audio, texts)
        phonemes = torch.zeros_like(semantic)
        if self.phoneme_reader is not None:
            phonemes = phoneme_log_likelihood(self.phoneme_reader, frames, frames_valid, samples["text_ids"],
                                              samples["text_mask"]).to(semantic.device)
        style = torch.zeros_like(semantic)
        if self.style_encoder is not None and samples.get("style") is not None:
            style = (self._audio_style(samples) * samples["style"].to(semantic.device)).sum(-1)
        zeros = torch.zeros_like(semantic)
        return {"semantic": semantic, "phonemes": phonemes, "style": style,
                "asr": asr_score(texts, said).to(semantic.device, semantic.dtype) if said else zeros,
                "asr_likelihood": torch.tensor(likelihoods, device=semantic.device, dtype=semantic.dtype)
                if likelihoods else zeros}

    def reward(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The judge's scores weighted into the sequence reward PPO maximises [B]."""
        pc = self.cfg.ppo
        return (pc.semantic_weight * scores["semantic"] + pc.phoneme_weight * scores["phonemes"]
                + pc.asr_weight * scores["asr"] + pc.asr_likelihood_weight * scores["asr_likelihood"]
                + pc.style_weight * scores["style"])

    def _audio_style(self, samples: dict[str, Any]) -> torch.Tensor:
        """Style-space vectors of the sampled audio (the codec's mel when it has one: no vocoder needed)."""
        clips = [samples["codes"][i, :, : int(n)].cpu() for i, n in enumerate(samples["codes_lengths"])]
        encoder = self.style_encoder
        if hasattr(self.codec, "decode_mel") and getattr(self.codec, "n_mels", None) == encoder.cfg.n_mels:
            return encoder.embed_audio([self.codec.decode_mel(c) for c in clips])
        return encoder.embed_audio([self.codec.decode(c).float() for c in clips], sr=self.codec.sample_rate)

    def give_back_memory(self, collect: bool = False) -> None:
        """On a CPU, before and after the rollouts and a validation and before each update: the memory freed
        since goes back to the system, else the C heap keeps it resident and the next phase's own comes on top of
        it (docs/decisions.md). On a GPU the tensors are not there. `collect`: also run Python's cycle collector
        (~150 ms: around validations, not at every step)."""
        if self.policy.device.type == "cpu":
            peak_memory.give_back(collect=collect)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> None:
        """Sample, judge, shape rewards, estimate advantages; store everything in `self.buffer`."""
        pc = self.cfg.ppo
        self.give_back_memory()
        iteration = self.micro // self.repeats
        texts, descriptions = batch["texts"], batch["descriptions"]
        if pc.advantage == "group":   # batch_size / group_size texts, each spoken group_size times
            n_texts = len(texts) // pc.group_size
            texts = [t for t in texts[:n_texts] for _ in range(pc.group_size)]
            descriptions = [d for d in descriptions[:n_texts] for _ in range(pc.group_size)]
        start = time.perf_counter()
        samples = self.speak(self.policy, texts, descriptions, seed=self.cfg.training.seed * 100_003 + iteration)
        scores = self.judge(samples, texts, descriptions)
        rollouts_per_second = len(texts) / max(time.perf_counter() - start, 1e-9)   # spoken and judged
        score = self.reward(scores)
        self.policy.eval()
        logprobs, _, mask, hidden = step_logprobs(self.policy, samples, pc.temperature, self.cfg_scale)
        values = self.value_head(hidden) * mask
        ref_logprobs, _, _, _ = step_logprobs(self.reference, samples, pc.temperature, self.cfg_scale)
        rewards, kl = shaped_rewards(score.to(logprobs.device), logprobs, ref_logprobs, mask, self.kl.value)
        extra: dict[str, torch.Tensor] = {}
        if pc.advantage == "group":   # the score alone is standardised; the KL is a loss term (training_step)
            score = score.to(kl.device)
            advantages, returns = group_advantages(score, pc.group_size, mask, pc.min_group_spread), values
            spread = {"group_reward_std": score.view(-1, pc.group_size).std(1, unbiased=False).mean().item(),
                      "skipped_groups": skipped_groups(score, pc.group_size, pc.min_group_spread)}
            extra["ref_logprobs"] = ref_logprobs
        else:
            advantages, returns = gae(rewards, values, mask, pc.gamma, pc.lam)
            advantages = masked_whiten(advantages, mask)
            spread = {"explained_variance": explained_variance(values, returns, mask)}
        sequence_kl = kl.sum(1).mean().item()
        self.rollout_metrics = {
            "reward": score.mean().item(), "reward_semantic": scores["semantic"].mean().item(),
            "reward_phonemes": scores["phonemes"].mean().item(), "reward_asr": scores["asr"].mean().item(),
            "reward_asr_likelihood": scores["asr_likelihood"].mean().item(),
            "reward_style": scores["style"].mean().item(), "kl": sequence_kl, "kl_coef": self.kl.value, **spread,
            "rollout_seconds_audio": samples["codes_lengths"].float().mean().item() / self.codec.frame_rate,
            **self.duration(samples), "rollouts_per_second": rollouts_per_second}
        self.kl.update(sequence_kl, pc.batch_size)
        self.buffer = {**{k: v for k, v in samples.items() if v is not None}, "old_logprobs": logprobs,
                       "old_values": values, "advantages": advantages, "returns": returns, "mask": mask, **extra}
        self.give_back_memory()

    # -- one optimizer step -----------------------------------------------------------------------

    def _minibatch(self, phase: int) -> torch.Tensor:
        """Indices of the minibatch for this phase of the iteration (a fresh shuffle per PPO epoch)."""
        pc = self.cfg.ppo
        per_epoch = pc.batch_size // pc.minibatch_size
        epoch, index = divmod(phase, per_epoch)
        iteration = self.micro // self.repeats
        order = torch.randperm(pc.batch_size, generator=torch.Generator().manual_seed(
            self.cfg.training.seed + 7919 * iteration + epoch))
        return order[index * pc.minibatch_size:(index + 1) * pc.minibatch_size]

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        phase = self.micro % self.repeats
        if phase == 0 or not self.buffer:
            self.rollout(batch)
        else:   # the previous update's backward pass freed what it held
            self.give_back_memory()
        rows = self._minibatch(phase).to(self.buffer["codes"].device)
        mb = {k: v[rows] for k, v in self.buffer.items()}
        self.policy.eval()                 # no dropout: the ratio compares like with like
        pc = self.cfg.ppo
        with self.policy.recomputing(pc.recompute):
            logprobs, entropy, _, hidden = step_logprobs(self.policy, mb, pc.temperature, self.cfg_scale)
        values = self.value_head(hidden)
        out = ppo_losses(logprobs, mb["old_logprobs"], mb["advantages"], values, mb["old_values"], mb["returns"],
                         mb["mask"], entropy=entropy, clip_range=pc.clip_range, clip_range_value=pc.clip_range_value,
                         vf_coef=pc.vf_coef if pc.advantage == "gae" else 0.0, ent_coef=pc.ent_coef)
        loss, extra = out.loss, {}
        if "ref_logprobs" in mb:      # the group advantage: the KL to the reference as a loss term
            kl_loss = kl_to_reference(logprobs, mb["ref_logprobs"], mb["mask"])
            loss = loss + self.kl.value * kl_loss
            extra["kl_loss"] = kl_loss.detach()
        self.micro += 1
        return {"loss": loss, **out.metrics(), **extra, **self.rollout_metrics,
                "samples": len(rows), "frames": int(mb["codes_lengths"].sum())}

    # -- validation -------------------------------------------------------------------------------

    def duration(self, samples: dict[str, Any]) -> dict[str, float]:
        """How the samples are timed: seconds per phoneme (per text token) and the share that ended by their
        own end-of-speech rather than at the length limit. A reward hacked by speaking slower, or by speech
        that never stops, moves them."""
        return {key: values.mean().item() for key, values in self.sample_durations(samples).items()}

    def sample_durations(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`duration`'s figures per sample: seconds per phoneme, and 1.0 for a sample ended by its end-of-speech."""
        seconds = samples["codes_lengths"].float() / self.codec.frame_rate
        phonemes = samples["text_mask"].sum(1).float().clamp(min=1).to(seconds.device)
        return {"seconds_per_phoneme": seconds / phonemes, "eos_share": samples["ended_by_eos"].float()}

    @torch.no_grad()
    def validate(self, loader: Any) -> dict[str, float]:
        """On held-out texts (`ppo.eval_seeds` samples of each): the judge's scores of the policy's samples,
        the KL to the reference, what the evaluation ASR (never the reward's) hears in them (val_asr_wer, by
        which stage3_best is kept) and what the reward's ASR hears, and the proxies a reward hack would show:
        the reference's log-likelihood per frame of the samples (do they still look like speech to the
        stage-2 model?), the judge's CER when it repeats what it heard, seconds per phoneme and the share of
        samples ended by their own end-of-speech.

        Each seed's samples are spoken and heard as one batch (seed `training.seed` + its round, as
        scripts/eval_judge.py does), so a validation holds no more at once than one round of the texts; the
        evaluation ASR is held for the validation only (docs/decisions.md)."""
        self.give_back_memory(collect=True)
        try:
            return self._validate(loader)
        finally:
            self._eval_ears = None   # the rollouts between validations never need it
            self.give_back_memory(collect=True)

    def _validate(self, loader: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for batch in loader:
            rounds = [self._validation_round(list(batch["texts"]), list(batch["descriptions"]),
                                             self.cfg.training.seed + r) for r in range(self.cfg.ppo.eval_seeds)]
            got = {key: [x for part in rounds for x in part[key]] for key in rounds[0]}
            texts, mean = got["text"], (lambda key: sum(got[key]) / len(got[key]))
            metrics = {"val_reward_semantic": mean("semantic"), "val_reward_phonemes": mean("phonemes"),
                       "val_reward_style": mean("style"), "val_kl": mean("kl"),
                       "val_ref_logprob_per_frame": mean("ref_logprob_per_frame"),
                       "val_judge_cer": corpus_cer(texts, got["heard"]),
                       "val_seconds_per_char": mean("seconds_per_char"),
                       "val_seconds_per_phoneme": mean("seconds_per_phoneme"), "val_eos_share": mean("eos_share")}
            self._last_heard = [{"text": t, "heard": h, **{k: got[k][i] for k in ("reward", *JUDGE_SCORES)}}
                                for i, (t, h) in enumerate(zip(texts, got["heard"]))]
            if "reward_asr_heard" in got:
                metrics["val_reward_asr"] = mean("asr")
                metrics["val_reward_asr_likelihood"] = mean("asr_likelihood")
                metrics["val_reward_asr_wer"] = corpus_wer(texts, got["reward_asr_heard"])
                metrics["val_reward_asr_cer"] = corpus_cer(texts, got["reward_asr_heard"])
                for row, text in zip(self._last_heard, got["reward_asr_heard"]):
                    row["reward_asr_heard"] = text
            if "eval_asr_heard" in got:
                metrics["val_asr_wer"] = corpus_wer(texts, got["eval_asr_heard"])
                metrics["val_asr_cer"] = corpus_cer(texts, got["eval_asr_heard"])
                for row, text in zip(self._last_heard, got["eval_asr_heard"]):
                    row["eval_asr_heard"] = text
        if metrics and not self.start_duration:   # the first validation is of the starting policy
            self.start_duration = {k: metrics[f"val_{k}"] for k in ("seconds_per_phoneme", "eos_share")}
        self._last_val = metrics
        return metrics

    def _validation_round(self, texts: list[str], descriptions: list[str], seed: int) -> dict[str, list]:
        """One sample of each text, spoken with `seed`, and what `validate` figures from each: lists, one
        value per sample (the ASRs' transcripts only where they are there)."""
        samples = self.speak(self.policy, texts, descriptions, seed=seed)
        ears = self.listen(samples)
        wavs = self.waveforms(samples)
        heard_by_reward = (self.hear_reward(samples, texts, wavs=wavs) if asr.is_available(self.cfg.ppo.reward_asr)
                           else None)
        scores = self.judge(samples, texts, descriptions, ears, heard=heard_by_reward)
        logprobs, _, mask, _ = step_logprobs(self.policy, samples, self.cfg.ppo.temperature, self.cfg_scale)
        ref_logprobs, _, _, _ = step_logprobs(self.reference, samples, self.cfg.ppo.temperature, self.cfg_scale)
        inputs = build_student_inputs(self.llm, [JUDGE_INSTRUCTION] * len(texts), ears[2], None)
        heard = generate_reply(self.llm, inputs, max_new_tokens=self.cfg.llm.max_new_tokens)
        frames = samples["codes_lengths"].float()
        chars = torch.tensor([len(t) for t in texts], dtype=torch.float, device=frames.device)
        per_sample = {"reward": self.reward(scores), **scores,
                      "kl": ((logprobs - ref_logprobs) * mask).sum(1),
                      "ref_logprob_per_frame": (ref_logprobs * mask).sum(1) / frames,
                      "seconds_per_char": frames / self.codec.frame_rate / chars, **self.sample_durations(samples)}
        out: dict[str, list] = {"text": list(texts), "heard": list(heard),
                                **{k: [float(x) for x in v.tolist()] for k, v in per_sample.items()}}
        if heard_by_reward is not None:
            out["reward_asr_heard"] = list(heard_by_reward[0])
        eval_heard = self.hear_eval(wavs)
        if eval_heard is not None:
            out["eval_asr_heard"] = list(eval_heard)
        return out

    def may_be_best(self) -> bool:
        """Not a policy whose held-out seconds per phoneme, or share of samples ended by their own
        end-of-speech, moved from the start's by more than `ppo.duration_tolerance` (relative; the share may
        rise): what a reward hacked by slower speech or by speech that never stops would show."""
        tolerance, last, start = self.cfg.ppo.duration_tolerance, self._last_val, self.start_duration
        if tolerance is None or not start or "val_seconds_per_phoneme" not in last:
            return True
        pace = abs(last["val_seconds_per_phoneme"] / start["seconds_per_phoneme"] - 1.0) <= tolerance
        ends = last["val_eos_share"] >= start["eos_share"] * (1.0 - tolerance)
        return pace and ends

    def on_validation_end(self, step: int, out_dir: Path) -> list[str]:
        heard = getattr(self, "_last_heard", [])
        if not heard:
            return []
        path = out_dir / "judge.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in heard))
        return [str(path)]

    # -- checkpoint -------------------------------------------------------------------------------

    def checkpoint_metadata(self) -> dict[str, str]:
        keys = ("codec_fingerprint", "codec_meta", "tokenizer", "speech_lm", "adapter", "llm", "align_tasks",
                "understanding")
        meta = {key: self.source.metadata[key] for key in keys if key in self.source.metadata}
        if self.style_encoder is not None:
            meta.update(self.style_encoder.metadata())
        return meta

    def state_dict(self) -> dict[str, Any]:
        return {"micro": self.micro, "kl": self.kl.state_dict(), "rollout_metrics": dict(self.rollout_metrics),
                "start_duration": dict(self.start_duration),
                "buffer": {k: v.detach().cpu() for k, v in self.buffer.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro = int(state.get("micro", 0))
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])
        self.rollout_metrics = dict(state.get("rollout_metrics", {}))
        self.start_duration = dict(state.get("start_duration", {}))
        device = self.policy.device
        self.buffer = {k: v.to(device) for k, v in state.get("buffer", {}).items()}


def run_stage3(cfg: IRAConfig, resume_from: str | Path, cpu: bool = False,
               llm: Optional[LoadedLLM] = None) -> FitResult:
    """`resume_from`: a stage-2 checkpoint starts PPO from it (it is also the reference policy and the
    judge); a stage-3 checkpoint continues exactly."""
    if resume_from is None:
        raise ValueError("stage 3 needs --resume_checkpoint: a stage-2 checkpoint (its SpeechLM is the starting "
                         "policy, its adapter the judge's ears), or a stage-3 checkpoint to continue")
    source = require_stage(load_checkpoint(resume_from), ("2", "3"), purpose="stage 3")
    cfg = inherit_frozen_sections(cfg, source, ("speech_lm", "style", "adapter")).with_training_from("ppo")
    # PPO's minibatches are its micro-steps: no gradient accumulation across them
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, grad_accum_steps=1, max_batch_frames=0))
    task = Stage3Task(cfg, source, llm=llm, cpu=cpu)
    return Trainer(cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from if source.stage == "3" else None)

