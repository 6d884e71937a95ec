"""Understand speech with a stage-2 (or later) checkpoint: audio + a question -> the LLM's answer.

    wav -> codec -> SpeechLM features (text and style dropped) -> Perceiver adapter -> LLM

No transcript is made anywhere: the LLM reads the adapter's vectors between `<audio>` markers, laid out
exactly as in training (`ira/models/splice.py`). `ira understand`, the pipeline and the UI all call
`Listener.understand`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ira.audio import load_audio, prepare_waveform, trim_silence
from ira.checkpoint import Checkpoint, CheckpointError, load_checkpoint, require_stage
from ira.codec.base import Codec
from ira.config import DataConfig, IRAConfig, LLMConfig
from ira.hardware import resolve_device
from ira.models.adapter import PerceiverAdapter
from ira.models.hub import adapter_from_checkpoint, codec_from_checkpoint, feature_speech_lm_from_checkpoint
from ira.models.llm import LoadedLLM, load_llm
from ira.models.speech_lm import SpeechLM
from ira.models.splice import SoftTokens, build_student_inputs, generate_reply

UNDERSTANDING_STAGES = ("2", "3")
DEFAULT_PROMPT = "What did the speaker say?"
MIN_SECONDS = 0.25


def llm_config_for(ckpt: Checkpoint, override: Optional[LLMConfig] = None) -> LLMConfig:
    """The LLM the adapter was trained for: the checkpoint's config section, unless one is given."""
    if override is not None:
        return override
    cfg: IRAConfig = ckpt.ira_config()
    return cfg.llm


class Listener:
    def __init__(self, speech_lm: SpeechLM, codec: Codec, adapter: PerceiverAdapter, llm: LoadedLLM,
                 checkpoint: Optional[Path] = None, trim_silence_db: float = DataConfig.trim_silence_db):
        self.speech_lm, self.codec, self.adapter, self.llm = speech_lm.eval(), codec, adapter.eval(), llm
        self.checkpoint = checkpoint
        self.trim_silence_db = trim_silence_db  # the training corpus's (data.trim_silence_db): hear audio as trained
        if adapter.out_dim != llm.hidden_size:
            raise ValueError(f"the adapter writes {adapter.out_dim}-dimensional vectors but the LLM "
                             f"{llm.name} has hidden size {llm.hidden_size}: load the LLM the checkpoint was "
                             f"trained with (llm.name)")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", llm: Optional[LoadedLLM] = None,
                        llm_config: Optional[LLMConfig] = None) -> "Listener":
        ckpt = require_stage(load_checkpoint(path), UNDERSTANDING_STAGES, purpose="understanding speech")
        dev = resolve_device(device)
        adapter = adapter_from_checkpoint(ckpt, dev)
        if llm is None:
            llm = load_llm(llm_config_for(ckpt, llm_config), device=dev)
        recorded = json.loads(ckpt.metadata.get("llm", "{}")).get("name")
        if recorded and recorded != llm.name:
            raise CheckpointError(f"{path} was aligned to the LLM {recorded!r}, not {llm.name!r}: set llm.name "
                                  f"to {recorded!r}")
        cfg = ckpt.ira_config()
        return cls(feature_speech_lm_from_checkpoint(ckpt, dev), codec_from_checkpoint(ckpt, cfg),
                   adapter, llm, Path(path), trim_silence_db=cfg.data.trim_silence_db)

    @property
    def device(self) -> torch.device:
        return self.speech_lm.device

    def _waveform(self, audio: Any, sample_rate: Optional[int]) -> torch.Tensor:
        sr = self.codec.sample_rate
        if isinstance(audio, (str, Path)):
            wav = load_audio(audio, sr)
        else:
            wav = prepare_waveform(torch.as_tensor(audio), sample_rate or sr, sr, "audio")
        if wav.numel() < MIN_SECONDS * sr:
            raise ValueError(f"the audio {audio if isinstance(audio, (str, Path)) else ''} is shorter than "
                             f"{MIN_SECONDS} s; give at least a word of speech")
        max_frames = self.speech_lm.cfg.max_audio_frames
        if wav.numel() / sr * self.codec.frame_rate > max_frames:
            raise ValueError(f"the audio is {wav.numel() / sr:.1f} s long; this model hears at most "
                             f"{max_frames / self.codec.frame_rate:.1f} s (speech_lm.max_audio_frames): cut it")
        return wav

    @torch.inference_mode()
    def audio_tokens(self, codes: Sequence[torch.Tensor]) -> SoftTokens:
        """Codec codes (one LongTensor[K, T] per clip) -> the adapter's LLM-space vectors ([B, N, H], or one
        [N_i, H] per clip when the adapter hands the LLM the word pieces it hears)."""
        from ira.data.dataset import pad_codes
        padded, lengths = pad_codes([c.long() for c in codes])
        features, mask = self.speech_lm.audio_features(padded.to(self.device), lengths.to(self.device),
                                                       layer=self.adapter.cfg.feature_layer)
        return self.adapter(features, mask)

    @torch.inference_mode()
    def understand_codes(self, codes: Sequence[torch.Tensor], prompts: Sequence[str],
                         max_new_tokens: Optional[int] = None) -> list[str]:
        """Batched answers for clips given as codec codes (evaluation uses the token cache directly)."""
        if len(codes) != len(prompts):
            raise ValueError(f"{len(codes)} clips but {len(prompts)} prompts")
        return self.answer(self.audio_tokens(codes), prompts, max_new_tokens)

    @torch.inference_mode()
    def answer(self, audio_tokens: SoftTokens, prompts: Sequence[str],
               max_new_tokens: Optional[int] = None) -> list[str]:
        """The LLM's replies given the adapter's vectors (from `audio_tokens`) and one prompt per clip."""
        inputs = build_student_inputs(self.llm, [p.strip() or DEFAULT_PROMPT for p in prompts], audio_tokens, None)
        return [r.strip() for r in generate_reply(self.llm, inputs, max_new_tokens=max_new_tokens or 64)]

    def understand(self, audio: Any, prompt: str = DEFAULT_PROMPT, sample_rate: Optional[int] = None,
                   max_new_tokens: int = 64) -> str:
        """The LLM's answer to `prompt` about `audio` (a file path or a waveform at `sample_rate`)."""
        if not isinstance(prompt, str):
            raise ValueError("the prompt must be text, e.g. 'What did the speaker say?'")
        codes = self.encode(self._waveform(audio, sample_rate))
        return self.understand_codes([codes], [prompt], max_new_tokens)[0]

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """A waveform at the codec's rate -> its codes, prepared as the training clips were: leading and
        trailing silence trimmed (`data.trim_silence_db`). The adapter reads the clip by relative position
        (latent i around the i-th N-th of it), so a second of silence would shift every word it reads."""
        trimmed = trim_silence(wav.float().flatten(), self.codec.sample_rate, top_db=self.trim_silence_db)
        if trimmed.numel() < MIN_SECONDS * self.codec.sample_rate:
            raise ValueError(f"the audio holds less than {MIN_SECONDS} s of sound above the silence threshold "
                             f"(data.trim_silence_db = {self.trim_silence_db:g} dB below its peak): give speech")
        return self.codec.encode(trimmed, self.codec.sample_rate).cpu()
