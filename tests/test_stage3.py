"""Stage 3 (PPO with the LLM as judge) on the tiny stage-2 model: what trains, what is logged and saved,
that the first minibatch has ratio 1, and that a run stopped mid-iteration resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_stage3_config
from ira.eval import asr
from ira.listener import Listener
from ira.speaker import SamplingSettings, Speaker
from ira.training.checkpoint import CheckpointError, load_checkpoint, read_metadata, train_state_path
from ira.training.metrics_log import read_metrics
from ira.training.stage3 import UNREADABLE_PHONEME_SCORE, Stage3Task, phoneme_log_likelihood, run_stage3

pytestmark = pytest.mark.usefixtures("one_thread")

def _cfg(tiny_stage2, out, *extra):
    return tiny_stage3_config(tiny_stage2, out, *extra)


@pytest.fixture(scope="module")
def ppo_run(tiny_stage3):
    return tiny_stage3


@pytest.mark.parametrize("guidance", [1.5, None])
def test_first_minibatch_of_an_iteration_has_ratio_one(tiny_stage2, bundled_llm, tmp_path, guidance):
    """The samples are scored under the distribution they were drawn from, guided (the presets) or not."""
    scale = "null" if guidance is None else guidance
    cfg = _cfg(tiny_stage2, tmp_path, f"ppo.cfg_scale={scale}").with_training_from("ppo")
    task = Stage3Task(cfg, load_checkpoint(tiny_stage2[3].last_checkpoint), llm=bundled_llm, cpu=True)
    assert task.cfg_scale == guidance
    batch = next(iter(task.train_dataloader()))
    out = task.training_step(batch)
    assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert out["clip_fraction"].item() == 0.0 and out["approx_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kl"] == pytest.approx(0.0, abs=1e-4)            # the policy starts as the reference
    assert out["reward_semantic"] < 0.0                          # a mean log-likelihood
    assert task.buffer["mask"].any(dim=1).all()


def test_the_evaluation_asr_is_loaded_for_a_validation_only(tiny_stage2, bundled_llm, tmp_path):
    """Issue 36, item 8: the second Whisper that only validations use is not held through the rollouts."""
    task = Stage3Task(_cfg(tiny_stage2, tmp_path).with_training_from("ppo"),
                      load_checkpoint(tiny_stage2[3].last_checkpoint), llm=bundled_llm, cpu=True)
    if task.eval_asr is None:
        pytest.skip("the evaluation ASR is not installed")
    asr.transcriber.cache_clear()
    heard_by: list = []
    original = asr.Transcriber.__call__

    def listening(self, wav, sample_rate):
        heard_by.append(self)
        return original(self, wav, sample_rate)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asr.Transcriber, "__call__", listening)
        metrics = task.validate(task.val_dataloader())
    assert "val_asr_wer" in metrics and heard_by and task._eval_ears is None
    assert all(ears.name == task.eval_asr for ears in heard_by)
    held = [asr.transcriber(task.cfg.ppo.reward_asr)] if asr.is_available(task.cfg.ppo.reward_asr) else []
    assert asr.transcriber.cache_info().currsize == len(held)     # the reward's ASR only, never the evaluation's
    asr.transcriber.cache_clear()


def test_group_advantage_speaks_each_text_a_group_of_times_and_needs_no_value_head(tiny_stage2, bundled_llm, tmp_path):
    cfg = _cfg(tiny_stage2, tmp_path, "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.advantage=group",
               "ppo.group_size=2", "ppo.phoneme_weight=1.0").with_training_from("ppo")
    task = Stage3Task(cfg, load_checkpoint(tiny_stage2[3].last_checkpoint), llm=bundled_llm, cpu=True)
    batch = next(iter(task.train_dataloader()))
    out = task.training_step(batch)
    assert out["reward_phonemes"] < 0.0 and "align_phonemes" in task.modules()   # stage 2's reader, kept
    assert "group_reward_std" in out and "explained_variance" not in out and torch.isfinite(out["loss"])
    assert out["value_loss"].item() == 0.0                           # the group is the baseline
    assert out["kl_loss"].item() == pytest.approx(0.0, abs=1e-4)     # a loss term, 0 while policy = reference
    assert torch.equal(task.buffer["ref_logprobs"] != 0, task.buffer["mask"])
    assert task.buffer["text_ids"].shape[0] == 4
    assert torch.equal(task.buffer["text_ids"][0], task.buffer["text_ids"][1])      # text 1, twice
    assert torch.equal(task.buffer["text_ids"][2], task.buffer["text_ids"][3])      # text 2, twice
    advantages = task.buffer["advantages"]
    sums = (advantages.sum(1) / task.buffer["mask"].sum(1)).view(2, 2).sum(1)      # per group: +a and -a
    assert torch.allclose(sums, torch.zeros(2), atol=1e-4)
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in task.value_head.parameters())


def test_metrics_and_checkpoint(ppo_run, tiny_stage2, bundled_llm):
    rows = read_metrics(ppo_run.metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    for key in ("reward", "reward_semantic", "reward_style", "kl", "kl_coef", "clip_fraction", "entropy",
                "value_loss", "policy_loss", "explained_variance", "rollouts_per_second"):
        assert key in train[-1], key
    assert train[-1]["rollouts_per_second"] > 0
    assert {"val_reward_semantic", "val_kl", "val_judge_cer", "val_ref_logprob_per_frame"} <= set(val[-1])
    assert val[0]["step"] == 0 and val[0]["val_kl"] == pytest.approx(0.0, abs=1e-4)   # the start, before PPO
    if asr.is_available():   # what a listener hears, next to what the judge rewards (the README's setup has it)
        assert val[-1]["val_asr_wer"] >= 0.0 and 0.0 <= val[-1]["val_asr_cer"]
        newest = max(Path(ppo_run.metrics_path).parent.glob("samples/stage3_step*/judge.jsonl"),
                     key=lambda path: int(path.parent.name.rsplit("step", 1)[1]))
        heard = [json.loads(line) for line in newest.open()]
        assert heard and all({"text", "heard", "eval_asr_heard", "reward_asr_heard", "asr"} <= set(row)
                             for row in heard)
    ckpt = load_checkpoint(ppo_run.last_checkpoint)
    assert ckpt.stage == "3" and {"speech_lm", "value_head", "reference", "adapter", "codec"} <= set(ckpt.modules)
    s2 = load_checkpoint(tiny_stage2[3].last_checkpoint)
    changed = any(not torch.equal(t, ckpt.state_dict("speech_lm")[k]) for k, t in s2.state_dict("speech_lm").items())
    assert changed                                               # the policy trained ...
    for key, tensor in s2.state_dict("speech_lm").items():      # ... the reference did not
        assert torch.equal(tensor, ckpt.state_dict("reference")[key]), key
    for key, tensor in s2.state_dict("adapter").items():
        assert torch.equal(tensor, ckpt.state_dict("adapter")[key]), key
    speaker = Speaker.from_checkpoint(ppo_run.last_checkpoint, device="cpu")      # inference needs nothing else
    assert speaker.speak("hello", settings=SamplingSettings(max_seconds=0.3)).codes.shape[0] == 2
    listener = Listener.from_checkpoint(ppo_run.last_checkpoint, device="cpu", llm=bundled_llm)
    assert isinstance(listener.understand(torch.randn(24000) * 0.1, sample_rate=24000, max_new_tokens=3), str)
    for key, tensor in listener.speech_lm.state_dict().items():  # it hears with the features the adapter learned
        assert torch.equal(tensor, ckpt.state_dict("reference")[key]), key


def test_resume_mid_iteration_is_exact(ppo_run, tiny_stage2, bundled_llm, tmp_path):
    """Step 2 of 4 is the middle of a PPO iteration (2 epochs x 2 minibatches): resuming there, as after a
    crash, re-uses the stored rollouts and ends exactly where the uninterrupted run ends."""
    step2 = next(p for p in sorted(ppo_run.last_checkpoint.parent.glob("stage3_*.safetensors"))
                 if read_metadata(p)["step"] == "2")
    for path in (step2, train_state_path(step2)):
        shutil.copy(path, tmp_path / path.name)
    resumed = run_stage3(_cfg(tiny_stage2, tmp_path, "ppo.max_steps=4"), tmp_path / step2.name, cpu=True,
                         llm=bundled_llm)
    assert resumed.ok and resumed.step == 4
    a, b = load_checkpoint(ppo_run.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    for name in ("speech_lm", "value_head"):
        for key, tensor in a.state_dict(name).items():
            assert torch.equal(tensor, b.state_dict(name)[key]), (name, key)


def test_resume_mid_iteration_is_exact_with_the_group_advantage(tiny_stage2, bundled_llm, tmp_path):
    """The same with the cpu preset's advantage: each text spoken by a group, no value head in the loss."""
    group = ("ppo.advantage=group", "ppo.group_size=2", "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.max_steps=4")
    whole = run_stage3(_cfg(tiny_stage2, tmp_path / "whole", *group), tiny_stage2[3].last_checkpoint, cpu=True,
                       llm=bundled_llm)
    assert whole.ok and whole.step == 4
    step2 = next(p for p in sorted(whole.last_checkpoint.parent.glob("stage3_*.safetensors"))
                 if read_metadata(p)["step"] == "2")
    (tmp_path / "resumed").mkdir()
    for path in (step2, train_state_path(step2)):
        shutil.copy(path, tmp_path / "resumed" / path.name)
    resumed = run_stage3(_cfg(tiny_stage2, tmp_path / "resumed", *group), tmp_path / "resumed" / step2.name,
                         cpu=True, llm=bundled_llm)
    assert resumed.ok and resumed.step == 4
    a, b, start = (load_checkpoint(p).state_dict("speech_lm") for p in (whole.last_checkpoint,
                                                                       resumed.last_checkpoint, step2))
    moved = False
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key
        moved |= not torch.equal(tensor, start[key])
    assert moved                                   # steps 3 and 4 trained: the comparison could fail


def test_stage3_refuses_a_checkpoint_without_an_adapter(tiny_stage2, tmp_path):
    with pytest.raises(CheckpointError, match="stage 3"):
        run_stage3(_cfg(tiny_stage2, tmp_path), tiny_stage2[2].last_checkpoint, cpu=True)


def _eval_judge_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_judge", Path(__file__).parents[1] / "scripts" / "eval_judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_judge_averages_over_seeds(ppo_run, tmp_path, capsys):
    """scripts/eval_judge.py --seeds 2: each text spoken twice (other samples), the figures their mean."""
    import statistics

    eval_judge = _eval_judge_script()
    out = tmp_path / "judge.json"
    assert eval_judge.main(["--checkpoint", str(ppo_run.last_checkpoint), "--texts", "2", "--seeds", "2",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    first, second = report["per_seed"]
    assert first["val_reward_semantic"] != second["val_reward_semantic"]          # other samples
    assert report["val_reward_semantic"] == pytest.approx(
        statistics.mean([first["val_reward_semantic"], second["val_reward_semantic"]]))
    printed = capsys.readouterr().out
    assert "x 2 seed(s)" in printed and "does the judge rank a text's 2 samples as the evaluation ASR does?" in printed
    val_texts = report["judged"]
    assert len(val_texts) == 2 and all([row["text"] for row in run] == val_texts for run in report["samples"])
    assert {"semantic", "phonemes", "style", "reward", "asr"} <= set(report["samples"][0][0])
    assert {"reward_vs_cer", "semantic_pick_cer", "oracle_pick_cer"} <= set(report["agreement"])

    # --skip: the texts after those that chose a stage-3 checkpoint
    assert eval_judge.main(["--checkpoint", str(ppo_run.last_checkpoint), "--texts", "1", "--skip", "1",
                            "--json", str(out)]) == 0
    assert json.loads(out.read_text())["judged"] == val_texts[1:]
    assert eval_judge.main(["--checkpoint", str(ppo_run.last_checkpoint), "--texts", "1", "--skip", "10000"]) == 2
    assert "validation clips, fewer than --skip 10000" in capsys.readouterr().err


def test_phoneme_reward_prefers_the_spoken_text_and_never_rewards_unreadable_audio():
    """The phoneme reader's CTC score: higher for the phonemes the frames hold than for others; audio too
    short to hold its text scores UNREADABLE_PHONEME_SCORE (CTC's zero_infinity would make it the best)."""
    spoken = [3, 1, 4, 1]                                         # tokenizer ids; reader classes are id + 1
    reader = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        reader.weight.copy_(torch.eye(6) * 8.0)
    frames = torch.zeros(1, 8, 6)
    for t, c in enumerate([4, 0, 2, 0, 5, 0, 2, 0]):                # each phoneme, then a blank
        frames[0, t, c] = 1.0
    valid = torch.ones(1, 8, dtype=torch.bool)

    def score(ids, frames=frames, valid=valid):
        ids = torch.tensor([ids])
        return phoneme_log_likelihood(reader, frames, valid, ids, torch.ones_like(ids, dtype=torch.bool)).item()

    assert score(spoken) > -0.1 and score([1, 3, 4, 2]) < score(spoken) - 5.0
    short = score(spoken, frames[:, :2], valid[:, :2])
    assert short == UNREADABLE_PHONEME_SCORE


def test_ranking_agreement_tells_a_judge_that_hears_from_one_that_does_not():
    """Two texts, three samples each: the reward ranks them as the ASR's CER does, the style score the other
    way round, the semantic score not at all (one value per text)."""
    eval_judge = _eval_judge_script()
    heard = {"a b c d": ["a b c d", "a b x d", "x y z d"], "e f g h": ["e f g h", "e f g x", "x f x x"]}
    groups = [[{"text": text, "eval_asr_heard": asr, "reward": -i, "style": i, "semantic": 0.0, "phonemes": -2.0 * i,
                "asr": -0.1 * i, "asr_likelihood": -0.5 * i} for i, asr in enumerate(options)] for text, options in heard.items()]
    out = eval_judge.ranking_agreement(groups)
    assert out["oracle_pick_cer"] == 0.0 and out["mean_cer"] > 0.1
    assert out["reward_vs_cer"] < -0.9 and out["reward_pick_cer"] == 0.0         # agrees: picks the best
    assert out["style_vs_cer"] > 0.9 and out["style_pick_cer"] > out["mean_cer"]  # the opposite
    assert out["phonemes_vs_cer"] < -0.9
    assert out["asr_vs_cer"] < -0.9 and out["asr_pick_cer"] == 0.0
    assert out["asr_likelihood_vs_cer"] < -0.9 and out["asr_likelihood_pick_cer"] == 0.0


@pytest.mark.skipif(not asr.is_available(asr.TINY), reason="the ira[eval] extra (faster-whisper) is not installed")
def test_asr_reward_prefers_the_text_spoken_over_another_text_over_silence():
    """The reward's ASR term, through the reward's own batched hearing: eSpeak's clip of the text scores
    above a clip of another text, and both above silence."""
    from ira.data import espeak
    from ira.training.stage3 import asr_score

    text = "The kettle began to whistle just as the phone rang."
    other = "Please close the gate behind you when you leave."
    clips = [torch.from_numpy(espeak.synthesize(t, voice="en-us")[0]) for t in (text, other)]
    heard = asr.transcriber(asr.TINY).transcribe_batch([*clips, torch.zeros(3 * 22_050)], 22_050)
    own, another, silence = asr_score([text] * 3, heard).tolist()
    assert own > -0.15, heard
    assert own > another + 0.3 and another > silence, (heard, own, another, silence)
    assert silence == -1.0


@pytest.mark.skipif(not asr.is_available(asr.TINY), reason="the ira[eval] extra (faster-whisper) is not installed")
def test_asr_likelihood_prefers_the_text_spoken_over_another_text_over_silence():
    """The reward ASR's log-likelihood of the text, from the same encoder pass as its transcript: eSpeak's clip
    of the text scores above a clip of another text, both above silence, and an empty clip gets the floor; the
    transcripts are those `transcribe_batch` hears."""
    from ira.data import espeak

    text = "The kettle began to whistle just as the phone rang."
    other = "Please close the gate behind you when you leave."
    clips = [torch.from_numpy(espeak.synthesize(t, voice="en-us")[0]) for t in (text, other)]
    clips += [torch.zeros(3 * 22_050), torch.zeros(0)]
    transcriber = asr.transcriber(asr.TINY)
    heard, scores = transcriber.hear_batch(clips, 22_050, [text] * 4)
    own, another, silence, empty = scores
    assert own > -1.5 and own > another + 2.0 and another > silence, scores
    assert empty == asr.SILENCE_LOG_LIKELIHOOD and heard[3] == ""
    assert heard == transcriber.transcribe_batch(clips, 22_050)
    assert transcriber.hear_batch(clips[:1], 22_050, [text], transcribe=False) == ([], [own])
