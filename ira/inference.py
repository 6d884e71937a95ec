"""The inference API: speak a text in a described voice, and let the LLM answer about speech.

    from ira.inference import create_pipeline_from_checkpoints
    pipeline = create_pipeline_from_checkpoints(
        speech_lm_checkpoint="checkpoints_laptop/stage3_latest.safetensors",
        llm_name_or_path="bundled",            # or a hub id, or a local folder; None: the one it was aligned to
        adapter_checkpoint=None,               # optional when the speech checkpoint holds the adapter
        device="auto",                         # or "cuda", "mps", "cpu"
    )
    result = pipeline.end_to_end_pipeline(input_text="Hello, analyze the sentiment of this speech.")
    pipeline.save_audio(result["audio_waveform"], "output.wav")
    print("LLM Response:", result["llm_response"])

Two halves, each built from one checkpoint and nothing else (shapes, tokenizer, codec and style
encoder come from its metadata): a `Speaker` (text -> codec tokens -> waveform) from the speech
checkpoint, and a `Listener` (codec tokens -> SpeechLM features -> adapter -> LLM) from the adapter
checkpoint. In `end_to_end_pipeline` the spoken tokens go straight to the listener when both use the
same codec, so nothing is re-encoded, and no transcript is made anywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from ira.audio import save_audio as _write_wav
from ira.listener import DEFAULT_PROMPT, Listener
from ira.models.llm import LoadedLLM
from ira.speaker import SamplingSettings, Speaker, SpeechResult
from ira.checkpoint import CheckpointError, read_header, require_stage

log = logging.getLogger(__name__)

RESPOND_PROMPT = "Listen to the speaker and respond to what they say or ask."
"""The LLM's instruction in `end_to_end_pipeline` when no `llm_prompt` is given: the answer follows the
spoken text's own request ("analyze the sentiment of this speech" gets an analysis)."""


class PipelineError(RuntimeError):
    """A pipeline cannot do what was asked (e.g. answer without an adapter); the message says what to do."""


def create_pipeline_from_checkpoints(speech_lm_checkpoint: str | Path, llm_name_or_path: Optional[str] = None,
                                     adapter_checkpoint: Optional[str | Path] = None, device: str = "auto",
                                     llm: Optional[LoadedLLM] = None, llm_quantization: Optional[str] = None,
                                     progress: Optional[Callable[[float, str], None]] = None) -> "IRAPipeline":
    """Build a pipeline from a stage 1, 2 or 3 checkpoint (speaking) and, for answering, the adapter of a
    stage 2 or 3 checkpoint (`adapter_checkpoint`, or the speech checkpoint itself when it holds one).

    `llm_name_or_path`: "bundled", a hub id or a local folder; None uses the LLM the adapter was aligned
    to (recorded in its checkpoint). `llm` passes an LLM already loaded (the app and tests share one).
    A speech checkpoint without an adapter, and no `adapter_checkpoint`, gives a pipeline that speaks
    and says clearly, when asked to answer, that it cannot. `progress(fraction, message)` hears what loads.
    """
    report = progress or (lambda fraction, message: None)
    report(0.0, f"loading the SpeechLM, codec and style encoder of {Path(speech_lm_checkpoint).name}")
    speaker = Speaker.from_checkpoint(speech_lm_checkpoint, device=device)
    listener_source = _adapter_source(speech_lm_checkpoint, adapter_checkpoint)
    listener, why_not = None, None
    if listener_source is None:
        # Plain words without angle brackets: the app shows this text as Markdown, where <...> is a tag.
        why_not = (f"{Path(speech_lm_checkpoint).name} holds no adapter, so the LLM cannot hear its speech: use a "
                   f"stage-2 or stage-3 checkpoint (train stage 2 from this one), or in Python pass "
                   f"adapter_checkpoint=PATH of one")
    else:
        llm_config = None
        if llm is None and (llm_name_or_path is not None or llm_quantization is not None):
            recorded = read_header(listener_source).ira_config().llm
            llm_config = replace(recorded, name=llm_name_or_path or recorded.name,
                                 quantization=llm_quantization or recorded.quantization)
        report(0.5, f"loading the LLM and the adapter of {Path(listener_source).name} (the LLM once per app)")
        listener = Listener.from_checkpoint(listener_source, device=str(speaker.device), llm=llm,
                                            llm_config=llm_config)
    report(1.0, "loaded")
    return IRAPipeline(speaker, listener, why_not)


def _adapter_source(speech_checkpoint: str | Path, adapter_checkpoint: Optional[str | Path]) -> Optional[Path]:
    """The checkpoint to take the adapter (and the SpeechLM that feeds it) from, or None if there is none."""
    if adapter_checkpoint is not None:
        ckpt = require_stage(read_header(adapter_checkpoint), ("2", "3"), purpose="the adapter")
        if "adapter" not in ckpt.modules:
            raise CheckpointError(f"{adapter_checkpoint} holds no adapter; give a stage 2 or 3 checkpoint")
        return Path(adapter_checkpoint)
    return Path(speech_checkpoint) if "adapter" in read_header(speech_checkpoint).modules else None


class IRAPipeline:
    """Speak (`speak`, `stream`), understand (`understand`), or both in turn (`end_to_end_pipeline`)."""

    def __init__(self, speaker: Speaker, listener: Optional[Listener] = None, why_no_listener: Optional[str] = None):
        self.speaker, self.listener = speaker, listener
        self._why_no_listener = why_no_listener or "this pipeline was built without an adapter"

    @property
    def device(self) -> torch.device:
        return self.speaker.device

    @property
    def sample_rate(self) -> int:
        return self.speaker.codec.sample_rate

    @property
    def can_understand(self) -> bool:
        return self.listener is not None

    @property
    def why_cannot_understand(self) -> Optional[str]:
        """None when the LLM can answer about speech; otherwise why not and what to do."""
        return None if self.listener is not None else self._why_no_listener

    def _require_listener(self) -> Listener:
        if self.listener is None:
            raise PipelineError(self._why_no_listener)
        return self.listener

    # ------------------------------------------------------------------ the two halves

    def speak(self, text: str, style: Optional[str] = None, reference_audio: Any = None,
              settings: Optional[SamplingSettings] = None) -> SpeechResult:
        """Text (+ a voice description or a reference clip) -> waveform, codec tokens and timings.

        Empty text and text longer than the model reads (`speech_lm.max_text_tokens`) are errors that
        say so; nothing is truncated silently.
        """
        return self.speaker.speak(text, style=style, reference=reference_audio, settings=settings)

    def stream(self, text: str, style: Optional[str] = None, reference_audio: Any = None,
               settings: Optional[SamplingSettings] = None, chunk_frames: int = 25) -> Iterator[np.ndarray]:
        """`speak`, as float32 waveform chunks at `sample_rate` while the frames are generated."""
        for chunk in self.speaker.stream(text, style=style, reference=reference_audio, settings=settings,
                                         chunk_frames=chunk_frames):
            yield chunk.numpy().astype(np.float32, copy=False)

    def understand(self, audio: Any, prompt: str = DEFAULT_PROMPT, sample_rate: Optional[int] = None,
                   max_new_tokens: int = 64) -> str:
        """The LLM's answer to `prompt` about `audio` (a file path, or a waveform at `sample_rate`)."""
        return self._require_listener().understand(audio, prompt, sample_rate=sample_rate,
                                                   max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ both

    def end_to_end_pipeline(self, input_text: str, style: Optional[str] = None, reference_audio: Any = None,
                            llm_prompt: Optional[str] = None, return_audio: bool = True,
                            settings: Optional[SamplingSettings] = None, max_new_tokens: int = 64
                            ) -> dict[str, Any]:
        """Speak `input_text`, then let the LLM answer about that audio (it never sees the text).

        Returns: input_text, llm_prompt, llm_response (None, with `warning` set, when the pipeline has
        no adapter), audio_waveform (float32 numpy, None unless `return_audio`), sample_rate,
        audio_tokens (LongTensor [codebooks, frames]), audio_seconds, and timings in seconds:
        speak_s (token generation), decode_s (tokens -> waveform), adapter_s (SpeechLM features and
        adapter), llm_s (the LLM's answer), total_s; plus llm_tokens and llm_tokens_per_s.
        """
        start = time.perf_counter()
        speech = self.speak(input_text, style=style, reference_audio=reference_audio, settings=settings)
        prompt = llm_prompt.strip() if isinstance(llm_prompt, str) and llm_prompt.strip() else RESPOND_PROMPT
        timings = {"speak_s": speech.timings["generate_s"], "decode_s": speech.timings["decode_s"]}
        result: dict[str, Any] = {
            "input_text": input_text, "llm_prompt": prompt, "llm_response": None,
            "audio_waveform": speech.waveform.numpy().astype(np.float32) if return_audio else None,
            "sample_rate": speech.sample_rate, "audio_tokens": speech.codes, "audio_seconds": speech.seconds,
            "llm_tokens": 0, "llm_tokens_per_s": 0.0, "warning": None}
        if self.listener is None:
            result["warning"] = self._why_no_listener
            log.warning(self._why_no_listener)
        elif speech.codes.shape[1] == 0:
            result["warning"] = "the model ended the speech at once (no frames), so there is nothing to answer about"
        else:
            answer = self.answer_speech(speech.codes, speech.waveform, prompt, max_new_tokens)
            timings.update(adapter_s=answer["adapter_s"], llm_s=answer["llm_s"])
            result.update(llm_response=answer["reply"], llm_tokens=answer["tokens"],
                          llm_tokens_per_s=answer["tokens"] / max(answer["llm_s"], 1e-9))
        timings["total_s"] = time.perf_counter() - start
        result["timings"] = timings
        return result

    def answer_speech(self, codes: torch.Tensor, waveform: torch.Tensor, prompt: str = RESPOND_PROMPT,
                      max_new_tokens: int = 64) -> dict[str, Any]:
        """The LLM's answer about speech this pipeline spoke: its codec tokens [K, T] go straight to the
        listener (its waveform is re-encoded only when the adapter was trained on another codec).
        Returns reply, tokens (of the reply), adapter_s and llm_s."""
        listener = self._require_listener()
        t0 = time.perf_counter()
        if listener.codec.fingerprint == self.speaker.codec.fingerprint:
            codes = codes.cpu()
        else:
            with torch.inference_mode():
                codes = listener.codec.encode(waveform, self.sample_rate).cpu()
        vectors = listener.audio_tokens([codes])
        _sync(listener.device)
        t1 = time.perf_counter()
        reply = listener.answer(vectors, [prompt], max_new_tokens=max_new_tokens)[0]
        t2 = time.perf_counter()
        tokens = len(listener.llm.tokenizer.encode(reply, add_special_tokens=False)) if reply else 0
        return {"reply": reply, "tokens": tokens, "adapter_s": t1 - t0, "llm_s": t2 - t1}

    # ------------------------------------------------------------------ files

    def save_audio(self, waveform: Any, path: str | Path, sample_rate: Optional[int] = None) -> Path:
        """Write a mono 16-bit WAV (at the codec's rate unless `sample_rate` is given), atomically.

        Samples beyond [-1, 1] are clipped, never wrapped; NaN/inf or an empty waveform is an error.
        """
        if waveform is None:
            raise ValueError("no waveform to save: call end_to_end_pipeline(..., return_audio=True)")
        data = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if data.numel() == 0:
            raise ValueError(f"{path}: the waveform is empty (0 samples); nothing to save")
        return _write_wav(path, data, int(sample_rate or self.sample_rate))


def _sync(device: torch.device) -> None:
    """Finish queued GPU work so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


__all__ = ["IRAPipeline", "PipelineError", "RESPOND_PROMPT", "create_pipeline_from_checkpoints"]
