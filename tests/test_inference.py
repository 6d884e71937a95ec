"""The inference API (ira/inference.py): the README snippet as written, on checkpoints of the tiny training
runs of conftest, with the real bundled LLM; speech-only pipelines; and every kind of bad input."""

import numpy as np
import pytest
import soundfile as sf
import torch

from ira.audio import AudioError
from ira.inference import RESPOND_PROMPT, IRAPipeline, PipelineError, create_pipeline_from_checkpoints
from ira.speaker import SamplingSettings
from ira.training.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

RESULT_KEYS = {"input_text", "llm_prompt", "llm_response", "audio_waveform", "sample_rate", "audio_tokens",
               "audio_seconds", "llm_tokens", "llm_tokens_per_s", "warning", "timings"}
TIMING_KEYS = {"speak_s", "decode_s", "adapter_s", "llm_s", "total_s"}


@pytest.fixture(scope="module")
def pipeline(tiny_stage3, bundled_llm):
    checkpoint = tiny_stage3.last_checkpoint
    # The README's snippet, word for word but for the paths and the device; "bundled" is the LLM the
    # tiny stage 2 was aligned to, so load_llm hands back the session's copy.
    return create_pipeline_from_checkpoints(
        speech_lm_checkpoint=str(checkpoint),
        llm_name_or_path="bundled",
        adapter_checkpoint=str(checkpoint),
        device="cpu",
    )


def test_the_readme_snippet(pipeline, tiny_stage3, tmp_path):
    result = pipeline.end_to_end_pipeline(input_text="Hello, analyze the sentiment of this speech.",
                                          return_audio=True, max_new_tokens=8)
    path = pipeline.save_audio(result["audio_waveform"], tmp_path / "output.wav")

    assert set(result) == RESULT_KEYS
    assert result["input_text"] == "Hello, analyze the sentiment of this speech."
    assert result["llm_prompt"] == RESPOND_PROMPT and result["warning"] is None
    assert isinstance(result["llm_response"], str) and result["llm_response"].strip()
    assert result["llm_tokens"] > 0 and result["llm_tokens_per_s"] > 0
    wav = result["audio_waveform"]
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0
    assert result["sample_rate"] == pipeline.sample_rate
    tokens = result["audio_tokens"]
    assert tokens.dtype == torch.long and tokens.shape[0] == pipeline.speaker.model.n_codebooks and tokens.shape[1] > 0
    assert result["audio_seconds"] == pytest.approx(wav.size / result["sample_rate"])
    assert set(result["timings"]) == TIMING_KEYS and all(v > 0 for v in result["timings"].values())
    assert result["timings"]["total_s"] >= result["timings"]["speak_s"] + result["timings"]["llm_s"]

    data, sr = sf.read(path, dtype="float32")
    assert sr == result["sample_rate"] and data.shape == wav.shape
    assert np.abs(data - np.clip(wav, -1, 1)).max() < 1e-3                 # 16-bit PCM of the same samples


def test_the_answer_follows_an_explicit_prompt_and_audio_can_be_left_out(pipeline):
    result = pipeline.end_to_end_pipeline("Good morning.", llm_prompt="What did the speaker say?",
                                          return_audio=False, max_new_tokens=4,
                                          settings=SamplingSettings(max_seconds=1.0))
    assert result["llm_prompt"] == "What did the speaker say?" and result["audio_waveform"] is None
    # an untrained tiny adapter may hear nothing worth saying (an empty reply); that the LLM answered counts
    assert result["audio_tokens"].shape[1] > 0 and isinstance(result["llm_response"], str)


def test_speak_stream_and_understand(pipeline, tmp_path):
    settings = SamplingSettings(max_seconds=1.0, seed=3)
    speech = pipeline.speak("A short test.", settings=settings)
    chunks = list(pipeline.stream("A short test.", settings=settings, chunk_frames=5))
    assert len(chunks) >= 2 and all(c.dtype == np.float32 for c in chunks)
    assert sum(c.size for c in chunks) > 0
    path = pipeline.save_audio(speech.waveform, tmp_path / "a.wav")
    answer = pipeline.understand(path, "What did the speaker say?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_a_checkpoint_without_an_adapter_speaks_but_says_it_cannot_answer(tiny_stage2):
    stage1 = tiny_stage2[2].last_checkpoint
    pipeline = create_pipeline_from_checkpoints(stage1, device="cpu")
    assert not pipeline.can_understand
    result = pipeline.end_to_end_pipeline("Hello there.", settings=SamplingSettings(max_seconds=1.0))
    assert result["audio_waveform"].size > 0 and result["llm_response"] is None
    assert "holds no adapter" in result["warning"] and "adapter_checkpoint" in result["warning"]
    with pytest.raises(PipelineError, match="holds no adapter"):
        pipeline.understand(result["audio_waveform"], sample_rate=result["sample_rate"])


def test_the_adapter_can_come_from_another_checkpoint(tiny_stage2, bundled_llm):
    stage1, stage2 = tiny_stage2[2].last_checkpoint, tiny_stage2[3].last_checkpoint
    pipeline = create_pipeline_from_checkpoints(stage1, adapter_checkpoint=stage2, device="cpu", llm=bundled_llm)
    assert pipeline.can_understand
    result = pipeline.end_to_end_pipeline("Hello there.", max_new_tokens=3, settings=SamplingSettings(max_seconds=1.0))
    # the tiny untrained adapter's reply may be empty (the end of turn at once); that the LLM heard and answered
    # is what counts here
    assert isinstance(result["llm_response"], str) and not result.get("warning")
    assert result["timings"]["adapter_s"] > 0 and result["timings"]["llm_s"] > 0


def test_bad_checkpoints_are_clear_errors(tiny_stage2, tmp_path):
    stage1 = tiny_stage2[2].last_checkpoint
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        create_pipeline_from_checkpoints(tmp_path / "nope.safetensors", device="cpu")
    with pytest.raises(CheckpointError, match="stage 2 .*or stage 3"):
        create_pipeline_from_checkpoints(stage1, adapter_checkpoint=stage1, device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        create_pipeline_from_checkpoints(junk, device="cpu")


def test_bad_text_and_audio_are_clear_errors(pipeline, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        pipeline.end_to_end_pipeline("   ")
    with pytest.raises(ValueError, match="split it into sentences"):
        pipeline.speak("word " * 2000)
    with pytest.raises(ValueError, match=r"cannot read '😀' \(U\+1F600\)"):   # the phonemes of the checkpoint
        pipeline.speak("😀😀")
    silent = tmp_path / "empty.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), 24000)
    with pytest.raises(AudioError, match="empty"):
        pipeline.understand(silent)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(AudioError, match="corrupt.wav"):
        pipeline.understand(corrupt)
    with pytest.raises(ValueError, match="shorter than"):
        pipeline.understand(np.zeros(100, dtype=np.float32), sample_rate=24000)


def test_save_audio_clips_and_refuses_nothing(pipeline, tmp_path):
    path = pipeline.save_audio(np.array([2.0, -3.0, 0.5], dtype=np.float32), tmp_path / "sub" / "clip.wav")
    data, sr = sf.read(path, dtype="float32")
    assert sr == pipeline.sample_rate and np.allclose(data, [1.0, -1.0, 0.5], atol=1e-3)
    with pytest.raises(ValueError, match="empty"):
        pipeline.save_audio(np.zeros(0, dtype=np.float32), tmp_path / "none.wav")
    with pytest.raises(ValueError, match="return_audio=True"):
        pipeline.save_audio(None, tmp_path / "none.wav")
    assert not (tmp_path / "none.wav").exists()


def test_a_pipeline_needs_no_listener_to_speak(tiny_stage2):
    from ira.speaker import Speaker
    pipeline = IRAPipeline(Speaker.from_checkpoint(tiny_stage2[2].last_checkpoint, device="cpu"))
    with pytest.raises(PipelineError):
        pipeline.understand(np.zeros(24000, dtype=np.float32), sample_rate=24000)


def test_streaming_can_be_resumed_from_other_threads(tiny_stage2):
    """The UI's server resumes a streaming generator from whichever worker thread is free; each step
    must still run in inference mode (it is per thread) and give the same speech as one thread."""
    import threading

    from ira.speaker import Speaker

    speaker = Speaker.from_checkpoint(tiny_stage2[2].last_checkpoint, device="cpu")
    settings = SamplingSettings(max_seconds=0.5, seed=3)
    same_thread = [codes for codes, _ in speaker.stream_with_codes("the door is open", settings=settings,
                                                                 chunk_frames=4)]
    chunks, pulled, errors = speaker.stream_with_codes("the door is open", settings=settings, chunk_frames=4), [], []

    def pull() -> None:
        try:
            pulled.append(next(chunks))
        except Exception as exc:   # StopIteration included: recorded, then checked below
            errors.append(exc)

    while not errors:
        worker = threading.Thread(target=pull)
        worker.start()
        worker.join()
    assert isinstance(errors[0], StopIteration), errors[0]
    assert len(pulled) == len(same_thread) > 1
    assert all(torch.equal(a, b) for (a, _), b in zip(pulled, same_thread))


def test_loading_a_pipeline_says_what_it_loads(tiny_stage2, bundled_llm):
    """The app's first Generate waits on this: it must say what loads, not sit at 0%."""
    seen: list[tuple[float, str]] = []
    create_pipeline_from_checkpoints(tiny_stage2[3].last_checkpoint, device="cpu", llm=bundled_llm,
                                     progress=lambda fraction, message: seen.append((fraction, message)))
    assert seen[0][0] == 0.0 and "SpeechLM" in seen[0][1] and "stage2_" in seen[0][1]
    assert any("LLM" in message for _, message in seen) and seen[-1] == (1.0, "loaded")
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
