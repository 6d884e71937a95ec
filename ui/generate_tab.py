"""The Generate tab: text + a voice description (or a reference clip) -> speech, streamed as it is
generated, and the LLM's answer about it; or recorded / uploaded speech -> the LLM's answer.

Pipelines (`ira.inference`) are loaded once per checkpoint file and kept; the LLM is shared by all of
them (`load_llm` reuses one copy per process). API endpoints: /speak, /understand_audio,
/generate_checkpoints.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr
import numpy as np
import torch

from ira.inference import RESPOND_PROMPT, IRAPipeline, create_pipeline_from_checkpoints
from ira.speaker import SamplingSettings
from ira.checkpoint import read_metadata
from ira.eval.quality import Quality, answer_cut_note, checkpoint_quality, find_card, find_speech_record
from ira.training.recipe import STATE_FILE, RecipeError, RecipeState
from ui.data_tab import guarded
from ui.ffmpeg import ensure_ffmpeg_on_path
from ui.workspace import Workspace, pick_choice

log = logging.getLogger(__name__)

SPEAKING_STAGES = ("1", "2", "3")
GENERATED = "generated"
"""Workspace folder for the complete wav of each generation (playable and downloadable after the stream)."""
CHUNK_FRAMES = 15
DEFAULT_TEXT = "Hello! This is my own speech model talking."
DEFAULT_STYLE = "a slow, deep voice with a British accent"
MAX_CACHED_PIPELINES = 2
ANSWER_TOKENS = 64
"""The most tokens the LLM answers with here; an answer that reaches it is said to be cut off."""
NO_CHECKPOINT = "Choose a checkpoint above first (train stage 1 in the Train tab, then press ↻ Refresh)."


def speaking_checkpoints(ws: Workspace) -> list[tuple[str, str]]:
    """(label, path) of the workspace checkpoints that can speak (stage 1, 2 or 3): one line per distinct save,
    grouped by run (the run written to last first), best first within a run (`Workspace.distinct_checkpoints`)."""
    return ws.distinct_checkpoints(lambda meta: meta.get("stage") in SPEAKING_STAGES)


def finished_recipe_checkpoint(ws: Workspace) -> Optional[str]:
    """The final checkpoint (its last stage's handed-over one) of the newest finished full recipe under runs/,
    relative to the workspace; None when no recipe has finished (or its checkpoint is gone, or lies outside the
    workspace: neither a recipe.json nor the checkpoint it names is read through a link out of it)."""
    finished = []
    for path in ws.runs_dir.glob(f"*/{STATE_FILE}"):
        if not ws.inside(path):
            continue
        try:
            final = RecipeState.load(path).final_checkpoint()
        except RecipeError:
            continue
        if final is not None:
            finished.append((path.stat().st_mtime, final))
    for _, final in sorted(finished, reverse=True):
        found = Path(final) if Path(final).is_absolute() else ws.root / final   # relative: to the job's folder
        if found.is_file() and ws.inside(found):
            return ws.relative(found)
    return None


def default_checkpoint(ws: Workspace, choices: list[tuple[str, str]]) -> Optional[str]:
    """The checkpoint the dropdown starts with: the newest finished recipe's final one, else the first listed
    (the run written to last, its best first)."""
    final = finished_recipe_checkpoint(ws)
    return pick_choice(final, choices)


def cannot_hear(rel: str) -> str:
    """Why a checkpoint cannot answer about speech, in the app's words (the package's message names a
    Python argument)."""
    return (f"{Path(rel).name} holds no adapter, so the LLM cannot hear its speech: choose a stage-2 or stage-3 "
            f"checkpoint above, or train stage 2 from this one in the Train tab.")


def checkpoint_quality_of(ws: Workspace, rel: str) -> Quality:
    """What the checkpoint was measured to do (ira/eval/quality.py): its header's figures and, when they are this
    save's, the card next to it and what `ira eval speech` recorded of it, with eSpeak's own figure (each read only
    when it stays inside the workspace)."""
    path = ws.resolve(rel, must_exist=True)
    meta = read_metadata(path)
    return checkpoint_quality(meta, find_card(path, meta, allowed=ws.inside),
                              find_speech_record(path, meta, allowed=ws.inside))


def checkpoint_summary(ws: Workspace, rel: str) -> str:
    """The checkpoint line: stage and step, then one plain sentence per skill, from what was measured."""
    return checkpoint_quality_of(ws, rel).markdown()


def speech_notes(quality: Quality, described: bool) -> list[str]:
    """Markdown lines beside a checkpoint's speech: how intelligible it was measured to be and, when a description
    or reference clip steered it, what its style encoder was measured to do."""
    lines = [f"**Speech**: {quality.speech.text}"] if quality.speech is not None else []
    if described:
        lines.append(f"**Voice description**: {quality.style.text}")
    return lines


def answer_notes(quality: Quality, tokens: int, limit: int = ANSWER_TOKENS) -> list[str]:
    """Markdown lines beside the LLM's answer: what the adapter was measured to let it hear, and a cut answer."""
    lines = [f"**The LLM's answer**: {quality.answers.text}"] if quality.answers is not None else []
    cut = answer_cut_note(tokens, limit)
    return lines + ([f"**Cut off**: {cut}"] if cut else [])


class PipelineCache:
    """The pipelines of the last few checkpoints used, keyed by (path, modification time)."""

    def __init__(self, device: str = "auto", limit: int = MAX_CACHED_PIPELINES):
        self.device, self.limit = device, limit
        self._pipelines: dict[tuple[str, float], IRAPipeline] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, progress: Optional[Callable[[float, str], None]] = None) -> IRAPipeline:
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            if key not in self._pipelines:
                pipeline = create_pipeline_from_checkpoints(path, device=self.device, progress=progress)
                while len(self._pipelines) >= self.limit:
                    self._pipelines.pop(next(iter(self._pipelines)))
                self._pipelines[key] = pipeline
            return self._pipelines[key]


def sampling_settings(temperature: float, top_k: float, top_p: float, cfg_scale: float, seed: float,
                      max_seconds: float) -> SamplingSettings:
    """The accordion's values as SamplingSettings; out-of-range values are clear errors."""
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature {temperature} must be >= 0 (0 = always the most likely token)")
    if top_p is None or not 0 < top_p <= 1:
        raise ValueError(f"top-p {top_p} must be in (0, 1]")
    if max_seconds is not None and max_seconds < 0:
        raise ValueError(f"max seconds {max_seconds} must be >= 0 (0 = enough for the text)")
    return SamplingSettings(temperature=float(temperature), top_k=max(0, int(top_k or 0)), top_p=float(top_p),
                            cfg_scale=float(cfg_scale) if cfg_scale else None, seed=int(seed or 0),
                            max_seconds=float(max_seconds) if max_seconds else None)


def _int16(wav: torch.Tensor | np.ndarray) -> np.ndarray:
    data = np.asarray(wav, dtype=np.float32)
    return (np.clip(np.nan_to_num(data), -1.0, 1.0) * 32767).astype(np.int16)


@dataclass
class GenerateTab:
    checkpoint: gr.Dropdown
    offered: gr.State            # the default checkpoint last offered (refresh_lists' second input and output)
    refresh_lists: Any


def build_generate_tab(ws: Workspace, device: str = "auto", pipelines: Optional[PipelineCache] = None
                       ) -> GenerateTab:
    """Lay out the Generate tab inside the current gr.Tab and wire its events."""
    pipelines = pipelines or PipelineCache(device)
    streaming = ensure_ffmpeg_on_path()
    choices = speaking_checkpoints(ws)
    first = default_checkpoint(ws, choices)
    with gr.Row():
        checkpoint = gr.Dropdown(choices, value=first, allow_custom_value=True,
                                 label="Checkpoint (stage 1, 2 or 3; from workspace/runs)", scale=4)
        refresh = gr.Button("↻ Refresh", scale=0, min_width=100)
    about = gr.Markdown(checkpoint_summary(ws, first) if first else
                        "No checkpoint yet: train stage 1 in the Train tab.")
    gr.Markdown("### Speak")
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(DEFAULT_TEXT, label="Text to speak", lines=2)
            style = gr.Textbox(DEFAULT_STYLE, label="Voice description (empty: no style)")
            reference = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                 label="…or a reference clip whose voice to imitate (overrides the description)")
            question = gr.Textbox("", label="Question for the LLM about the speech",
                                  placeholder=f"empty: \"{RESPOND_PROMPT}\"")
            with gr.Accordion("Sampling settings", open=False):
                with gr.Row():
                    temperature = gr.Slider(0.0, 1.5, value=SamplingSettings.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_k = gr.Slider(0, 500, value=50, step=1, label="Top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)")
                with gr.Row():
                    cfg_scale = gr.Slider(1.0, 4.0, value=1.5, step=0.1, label="Guidance scale (1 = off)")
                    seed = gr.Number(0, precision=0, label="Seed")
                    max_seconds = gr.Number(0, minimum=0, label="Max seconds (0 = enough for the text)")
            speak = gr.Button("Speak", variant="primary")
        with gr.Column(scale=2):
            stream_out = gr.Audio(label="Speech (streamed as it is generated)", streaming=True, autoplay=True,
                                  interactive=False, visible=streaming)
            full_out = gr.Audio(label="Complete speech (replay, download)", type="filepath", interactive=False)
            answer = gr.Textbox(label="The LLM's answer about the speech (it never sees the text)", lines=3,
                                interactive=False)
            speak_status = gr.Markdown("")
    gr.Markdown("### Understand: record or upload speech, ask the LLM")
    with gr.Row():
        with gr.Column(scale=3):
            heard = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speech")
            prompt = gr.Textbox("What did the speaker say?", label="Question")
            ask = gr.Button("Ask the LLM", variant="primary")
        with gr.Column(scale=2):
            reply = gr.Textbox(label="The LLM's answer", lines=4, interactive=False)
            reply_note = gr.Markdown("")
    offered = gr.State(first)   # the default last offered: a refresh moves it on unless the user chose another

    def pipeline_for(rel: Optional[str], progress: Optional[gr.Progress] = None) -> IRAPipeline:
        if not rel:
            raise ValueError("choose a checkpoint (train stage 1 in the Train tab, then ↻ Refresh)")
        say = (lambda fraction, message: progress(0.25 * fraction, desc=message)) if progress is not None else None
        return pipelines.get(ws.resolve(rel, must_exist=True), say)

    def on_speak(rel: str, text_value: str, style_value: str, reference_path: Optional[str], question_value: str,
                 temp: float, k: float, p: float, cfg: float, seed_value: float, seconds: float,
                 progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        start = time.perf_counter()
        if not rel or not str(rel).strip():   # said beside the outputs, not as an error badge on each of them
            gr.Warning(NO_CHECKPOINT)
            yield None, None, "", NO_CHECKPOINT
            return
        settings = guarded("Settings", sampling_settings, temp, k, p, cfg, seed_value, seconds)
        progress(0.0, desc="loading the checkpoint")
        pipeline = guarded("Loading the checkpoint", pipeline_for, rel, progress)
        quality = guarded("Reading the checkpoint", checkpoint_quality_of, ws, rel)
        if pipeline.speaker.style_encoder is None and ((style_value or "").strip() or reference_path):
            gr.Warning("This checkpoint has no style encoder: the voice description and reference are ignored "
                       "(train stage 1 from a style checkpoint to use them).")
            style_value, reference_path = None, None
        described = bool((style_value or "").strip() or reference_path)
        chunks = guarded("Speaking", pipeline.speaker.stream_with_codes, text_value, style_value or None,
                         reference_path or None, settings, CHUNK_FRAMES)
        codes, waves, first = [], [], None
        try:
            for code_chunk, wav in chunks:
                first = first if first is not None else time.perf_counter() - start
                codes.append(code_chunk)
                waves.append(wav)
                yield ((pipeline.sample_rate, _int16(wav)) if streaming else None, None, "",
                       f"speaking… {sum(c.shape[1] for c in codes)} frames, first audio after {first:.2f} s")
        except gr.Error:
            raise
        except Exception as exc:   # empty or over-long text, an unreadable reference clip, ...
            log.warning("speaking failed: %s", exc)
            raise gr.Error(f"Speaking failed: {exc}", title="Speaking", print_exception=False) from exc
        if not codes:
            raise gr.Error("The model ended the speech at once (no frames): train longer or change the seed",
                           title="Speaking", print_exception=False)
        wav = torch.cat(waves)
        out = ws.resolve(Path(GENERATED) / f"speech-{time.strftime('%Y%m%d-%H%M%S')}-{int(seed_value or 0)}.wav")
        path = str(pipeline.save_audio(wav, out))
        spoken = time.perf_counter() - start
        status = f"{wav.numel() / pipeline.sample_rate:.2f} s of speech in {spoken:.2f} s (first audio after {first:.2f} s)"
        heard = speech_notes(quality, described)
        if not pipeline.can_understand:
            yield None, path, "", "\n\n".join([f"{status}. {cannot_hear(rel)}", *heard])
            return
        yield None, path, "", "\n\n".join([f"{status}; the LLM is listening…", *heard])
        result = guarded("The LLM's answer", pipeline.answer_speech, torch.cat(codes, dim=1), wav,
                         (question_value or "").strip() or RESPOND_PROMPT, ANSWER_TOKENS)
        answered = (f"{status}; answered in {result['adapter_s'] + result['llm_s']:.2f} s "
                    f"({result['tokens']} tokens)")
        yield (None, path, result["reply"] or "(no answer)",
               "\n\n".join([answered, *heard, *answer_notes(quality, result["tokens"])]))

    def on_ask(rel: str, audio_path: Optional[str], prompt_value: str) -> tuple[str, str]:
        if not rel or not str(rel).strip():
            gr.Warning(NO_CHECKPOINT)
            return "", NO_CHECKPOINT
        if not audio_path:
            raise gr.Error("record or upload some speech first", title="Understand", print_exception=False)
        pipeline = guarded("Loading the checkpoint", pipeline_for, rel)
        if not pipeline.can_understand:
            raise gr.Error(cannot_hear(rel), title="Understand", print_exception=False)
        quality = guarded("Reading the checkpoint", checkpoint_quality_of, ws, rel)
        reply = guarded("Understanding", pipeline.understand, audio_path, prompt_value or "What did the speaker say?",
                        max_new_tokens=ANSWER_TOKENS)
        tokens = len(pipeline.listener.llm.tokenizer.encode(reply, add_special_tokens=False)) if reply else 0
        return reply, "\n\n".join(answer_notes(quality, tokens))

    def on_checkpoint(rel: Optional[str]) -> tuple:
        """The new checkpoint's line, and the outputs of the previous one cleared (they are not this one's)."""
        cleared = (None, None, "", "", "", "")
        if not rel or not str(rel).strip():
            return ("No checkpoint chosen.", *cleared)
        try:
            return (checkpoint_summary(ws, rel), *cleared)
        except (ValueError, OSError) as exc:   # a typed path that is not a checkpoint: said here, not as an error badge
            return (f"Cannot read this checkpoint: {exc}", *cleared)

    def refresh_lists(current: Optional[str] = None, last_offered: Optional[str] = None) -> tuple:
        """Today's checkpoints; the choice stays unless it is still the default the tab offered, which then
        becomes today's default (a recipe that finished since: its final checkpoint)."""
        found = speaking_checkpoints(ws)
        default = default_checkpoint(ws, found)
        value = default if current is None or current == last_offered else pick_choice(current, found)
        return gr.Dropdown(choices=found, value=value), default

    speak.click(on_speak, [checkpoint, text, style, reference, question, temperature, top_k, top_p, cfg_scale,
                           seed, max_seconds], [stream_out, full_out, answer, speak_status], api_name="speak",
                concurrency_limit=1, concurrency_id="inference", show_progress_on=[speak_status])
    ask.click(on_ask, [checkpoint, heard, prompt], [reply, reply_note], api_name="understand_audio",
              concurrency_limit=1, concurrency_id="inference", show_progress_on=[reply])
    checkpoint.change(on_checkpoint, checkpoint, [about, stream_out, full_out, answer, speak_status, reply, reply_note],
                      api_name="generate_checkpoint_quality")
    refresh.click(refresh_lists, [checkpoint, offered], [checkpoint, offered], api_name="generate_checkpoints")
    return GenerateTab(checkpoint=checkpoint, offered=offered, refresh_lists=refresh_lists)
