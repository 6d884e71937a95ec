"""Stage 2 on a tiny corpus with the real bundled LLM: what trains, what stays frozen, what is saved."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn
import torch.nn.functional as F

from ira.listener import Listener
from ira.models.splice import build_student_inputs
from ira.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ira.training.metrics_log import read_metrics
from ira.training.stage2 import Stage2Task, distillation_losses, run_stage2
from ira.training.teacher_responses import build_teacher_responses

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def runs(tiny_stage2):
    return tiny_stage2


def test_only_the_adapter_trains(runs, bundled_llm):
    root, _, stage1, stage2, llm_before = runs
    s1, s2 = load_checkpoint(stage1.last_checkpoint), load_checkpoint(stage2.last_checkpoint)
    assert s2.stage == "2" and {"speech_lm", "codec", "adapter"} <= set(s2.modules)
    for key, tensor in s1.state_dict("speech_lm").items():                  # SpeechLM bit-identical
        assert torch.equal(tensor, s2.state_dict("speech_lm")[key]), key
    llm_after = {name: p.detach().double().sum().item() for name, p in bundled_llm.model.named_parameters()}
    assert llm_after == llm_before                                          # the LLM untouched
    assert not any(p.requires_grad for p in bundled_llm.model.parameters())


def test_metrics_log_kd_agreement_and_cer(runs):
    _, _, _, stage2, _ = runs
    rows = read_metrics(stage2.metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    # step 1 is the alignment phase (CTC only, logged on its own: the first step always is), step 2 distils
    assert [(r["step"], r["alignment_phase"]) for r in train] == [(1, 1.0), (2, 0.0)]
    assert {"ctc_loss", "phoneme_ctc_loss"} <= set(train[0]) and "kd_loss" not in train[0]
    assert {"kd_loss", "ce_loss", "agreement"} <= set(train[-1])           # the reading is kept: no CTC after
    assert "ctc_loss" not in train[-1]
    assert val and {"val_ctc_loss", "val_phoneme_ctc_loss"} <= set(val[-1]) and val[-1]["val_ctc_loss"] >= 0.0


def test_teacher_replies_are_cached_once(runs, bundled_llm):
    root, cfg, _, _, _ = runs
    files = list((root / "data" / "teacher").glob("responses-*.jsonl"))
    assert len(files) == 1 and not list((root / "data" / "teacher").glob("*.partial"))
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {row["task"] for row in lines} == {"summarise", "question"}      # repeat's reply is the transcript
    before = files[0].stat().st_mtime_ns
    clips = [(row["id"], "unused") for row in lines if row["task"] == "question"]
    replies = build_teacher_responses(bundled_llm, clips, ["repeat", "summarise", "question"], files[0], 6)
    assert files[0].stat().st_mtime_ns == before and len(replies) == len(lines)   # nothing regenerated


def test_checkpoint_alone_understands_audio(runs, bundled_llm):
    root, _, _, stage2, _ = runs
    listener = Listener.from_checkpoint(stage2.last_checkpoint, device="cpu", llm=bundled_llm)
    wav = next((root / "data" / "wavs").glob("*.wav"))
    answer = listener.understand(wav, "What did the speaker say?", max_new_tokens=5)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="shorter"):
        listener.understand(torch.zeros(100), sample_rate=24000)


def test_student_input_does_not_depend_on_the_transcript(runs, bundled_llm):
    root, cfg, stage1, _, _ = runs
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    batch = next(iter(task.train_dataloader()))
    audio = task.batch_soft_tokens(batch)[0]
    other = {**batch, "transcripts": ["something else entirely"] * len(batch["transcripts"]),
             "llm_ids": [[1, 2]] * len(batch["transcripts"]), "phonemes": [[3]] * len(batch["transcripts"])}
    again = task.batch_soft_tokens(other)[0]
    assert torch.equal(audio, again)
    a = build_student_inputs(bundled_llm, batch["instructions"], audio, batch["responses"])
    b = build_student_inputs(bundled_llm, other["instructions"], again, other["responses"])
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)


def test_stage2_refuses_a_checkpoint_without_a_speech_lm(runs, tmp_path):
    root, cfg, _, _, _ = runs
    style = save_checkpoint(tmp_path / "stagestyle_latest.safetensors", {"style": nn.Linear(2, 2)}, stage="style",
                            epoch=0, step=1, config=cfg)
    with pytest.raises(CheckpointError, match="stage 2"):
        run_stage2(cfg, resume_from=style, cpu=True)
    with pytest.raises(ValueError, match="resume_checkpoint"):
        run_stage2(cfg, resume_from=None, cpu=True)


def test_distillation_losses():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 11, generator=gen)
    targets = teacher.argmax(-1)
    same = distillation_losses(teacher.clone(), teacher, targets, torch.zeros(5, dtype=torch.bool), 2.0)
    assert same["kd_loss"].item() == pytest.approx(0.0, abs=1e-6) and same["agreement"].item() == 1.0
    assert same["ce_loss"].item() == 0.0
    student = torch.randn(5, 11, generator=gen, requires_grad=True)
    out = distillation_losses(student, teacher, targets, torch.tensor([True, False, True, False, False]), 2.0)
    assert out["kd_loss"].item() > 0.0 and out["ce_loss"].item() > 0.0
    (out["kd_loss"] + out["ce_loss"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ira_understand_prints_the_answer_last(runs, bundled_llm, capsys):
    from ira.cli import main

    root, _, stage1, stage2, _ = runs
    wav = next((root / "data" / "wavs").glob("*.wav"))
    args = ["understand", "--checkpoint", str(stage2.last_checkpoint), "--audio", str(wav),
            "--prompt", "Who is speaking?", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(args) == 0                  # the LLM the checkpoint names is the one already loaded
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("Who is speaking?") and lines[-1].strip()
    args[2] = str(stage1.last_checkpoint)   # a stage-1 checkpoint has no adapter: a clear error
    assert main(args) == 1
    assert "stage" in capsys.readouterr().err


def test_feature_cache_is_rebuilt_when_stale_and_never_half_read(runs, tmp_path):
    from ira.data.prepare import ensure_prepared
    from ira.data.token_cache import load_split
    from ira.training import feature_cache
    from ira.models.hub import speech_lm_from_checkpoint

    root, cfg, stage1, _, _ = runs
    model = speech_lm_from_checkpoint(load_checkpoint(stage1.last_checkpoint)).eval()
    prepared = ensure_prepared(cfg)
    split = load_split(prepared.cache_files["train"])
    path = tmp_path / "speech_features_train.safetensors"
    features = feature_cache.load_or_build(path, model, split, layer=0, max_frames=1024)
    with torch.no_grad():
        expected, _ = model.audio_features(split.clip_codes(1)[None], torch.tensor([split.lengths()[1]]))
    assert len(features) == len(split)
    assert torch.allclose(features.clip_features(1).float(), expected[0], atol=2e-2)   # float16 copy
    # written batch by batch at each clip's place, still a whole safetensors file that reads back the same
    with safe_open(str(path), framework="pt") as handle:
        whole, offsets = handle.get_tensor("features"), handle.get_tensor("offsets")
    assert offsets.tolist() == [0, *torch.tensor(split.lengths()).cumsum(0).tolist()]
    assert all(torch.equal(features.clip_features(i), whole[offsets[i]:offsets[i + 1]]) for i in range(len(split)))
    copy = pickle.loads(pickle.dumps(features))                     # a DataLoader worker's copy opens its own file
    assert copy._fd is None and torch.equal(copy.clip_features(2), features.clip_features(2))
    stamp = path.stat().st_mtime_ns
    feature_cache.load_or_build(path, model, split, layer=0, max_frames=1024)
    assert path.stat().st_mtime_ns == stamp                         # fresh: read, not recomputed
    feature_cache.load_or_build(path, model, split, layer=1, max_frames=1024)
    assert path.stat().st_mtime_ns != stamp                         # another layer: rebuilt
    with torch.no_grad():
        next(model.parameters()).add_(1.0)                          # other weights: stale
    key = feature_cache.cache_key(model, 1, split, 1024)
    assert not feature_cache.is_fresh(path, key)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short: never read as fresh
    assert not feature_cache.is_fresh(path, feature_cache.cache_key(model, 0, split, 1024))


def test_vocabulary_reader_scores_and_reads_tokens_against_the_llm_table():
    from ira.models.vocabulary_reader import VocabularyReader

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 16, generator=gen)
    reader = VocabularyReader.from_llm_table(table, vocab_ids=[20, 3, 7, 9])
    # soft tokens that ARE the embeddings of 7, 9, 9 with blank directions between: read as [7, 9, 9]
    blank = reader.blank.detach()
    soft = torch.stack([table[7], blank, table[9], blank, table[9], table[9]])[None]
    with torch.no_grad():
        reader.log_scale.fill_(5.0)
    assert reader.decode(soft) == [[7, 9, 9]]
    good = reader.ctc_loss(soft, [[7, 9, 9]])
    assert good < reader.ctc_loss(soft, [[3, 20]]) and good < 0.5
    with pytest.raises(ValueError, match="reader's vocabulary"):
        reader.ctc_loss(soft, [[4]])
    # what the LLM hears: one vector per run of a word, close to that word's row (blank dropped)
    heard = reader.heard(soft)[0]
    assert heard.shape == (3, 16)
    for vector, token in zip(heard, (7, 9, 9)):
        assert F.cosine_similarity(vector, table[token], dim=0) > 0.9
    # all blank: still one vector, so the LLM is never handed an empty clip
    assert reader.heard(torch.stack([blank] * 4)[None])[0].shape == (1, 16)


def test_vocabulary_reader_of_a_checkpoint_reads_with_the_checkpoint_ids():
    from ira.models.vocabulary_reader import VocabularyReader

    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    trained = VocabularyReader.from_llm_table(table, vocab_ids=[3, 7, 9], trainable=True)
    empty = VocabularyReader(torch.zeros(3, 16), range(3), trainable=True)
    empty.load_state_dict(trained.state_dict())
    soft = table[[7, 9]][None]
    with torch.no_grad():
        for reader in (trained, empty):
            reader.log_scale.fill_(5.0)
    assert empty.decode(soft) == trained.decode(soft) == [[7, 9]]
    assert torch.allclose(empty.ctc_loss(soft, [[7, 9]]), trained.ctc_loss(soft, [[7, 9]]))
    # a frozen reader's rows come from the LLM, not from its saved state
    assert set(VocabularyReader.from_llm_table(table, [3]).state_dict()) == {"blank", "log_scale"}


def test_alignment_phase_makes_the_soft_tokens_depend_on_the_audio(runs, bundled_llm):
    root, cfg, stage1, _, _ = runs
    torch.manual_seed(0)
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    batch = next(iter(task.train_dataloader()))
    params = task.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=3e-3)

    def spread() -> float:
        with torch.no_grad():
            tokens = task.batch_soft_tokens(batch)[0]
        flat = torch.nn.functional.normalize(tokens.flatten(1), dim=-1)
        return float(1.0 - (flat @ flat.T)[0, 1:].mean())           # 1 - cosine to the other clips

    before = spread()
    for _ in range(8):
        task._steps_done = 0                                         # stay in the alignment phase
        assert task.in_alignment_phase
        out = task.training_step(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert "kd_loss" not in out and out["ctc_loss"] > 0
    assert spread() > before and spread() > 1e-3                     # different clips, different tokens


@pytest.mark.parametrize("output", ["free", "vocabulary"])
def test_both_adapter_outputs_train_and_the_llm_reads_what_they_hand_it(runs, bundled_llm, output):
    root, cfg, stage1, _, _ = runs
    torch.manual_seed(0)
    cfg = cfg.with_overrides([f"adapter.output={output}", f"adapter.spelled={output == 'vocabulary'}", "align.ctc_steps=1",
                              "align.distill_reading=true"])
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    assert (task.adapter.reader is not None) == (output == "vocabulary")
    assert ("align_ctc" in task.modules()) == (output == "free")   # in "vocabulary" mode it is the adapter's
    trainable = {id(p) for group in task.trainable_parameters() for p in group["params"]}
    assert all(id(p) in trainable for p in task.reader.parameters())
    batch = next(iter(task.train_dataloader()))
    for phase in (1.0, 0.0):                                         # the alignment step, then distillation
        out = task.training_step(batch)
        assert out["alignment_phase"] == phase and torch.isfinite(out["loss"])
        out["loss"].backward()
    assert out["kd_loss"] > 0 and task.reader.blank.grad is not None
    if output == "vocabulary":                                      # the reader's word directions learn too
        assert task.reader.directions.grad is not None and task.reader.directions.grad.abs().sum() > 0
    with torch.no_grad():
        heard = task.adapter.heard(task.batch_soft_tokens(batch)[0])
    lengths = [len(clip) for clip in heard]
    cue = cfg.adapter.cue_tokens
    assert cue > 0 and all(torch.equal(clip[-cue:], task.adapter.cue) for clip in heard)   # the cue closes every clip
    if output == "free":
        assert lengths == [cfg.adapter.n_latents + cue] * len(batch["instructions"])
    else:
        assert all(1 + cue <= n <= cfg.adapter.n_latents + cue for n in lengths)
    inputs = build_student_inputs(bundled_llm, batch["instructions"], heard, batch["responses"])
    assert inputs.audio_mask.sum(1).tolist() == lengths


def test_after_the_phase_only_the_cue_learns_when_the_reading_is_kept(runs, bundled_llm):
    root, cfg, stage1, _, _ = runs
    torch.manual_seed(0)
    assert not cfg.align.distill_reading and cfg.adapter.cue_tokens > 0        # the cpu preset's way
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    rows = bundled_llm.model.get_input_embeddings().weight
    assert all(any(torch.equal(v, r) for r in rows) for v in task.adapter.cue)  # starts as LLM embeddings
    groups = task.trainable_parameters()
    cue_group = [g for g in groups if any(p is task.adapter.cue for p in g["params"])]
    assert len(cue_group) == 1 and cue_group[0]["lr"] == cfg.align.cue_learning_rate
    batch = next(iter(task.train_dataloader()))
    assert not task.may_be_best()                  # during the phase the cue is untrained: never the best
    task._steps_done = cfg.align.ctc_steps                                     # the distillation
    assert task.may_be_best()
    out = task.training_step(batch)
    assert out["alignment_phase"] == 0.0 and "ctc_loss" not in out and out["kd_loss"] > 0
    out["loss"].backward()
    assert task.adapter.cue.grad is not None and task.adapter.cue.grad.abs().sum() > 0
    others = [p for name, p in task.adapter.named_parameters() if name != "cue"] + list(task.phoneme_head.parameters())
    assert all(p.grad is None for p in others)                                # the reading stays as it is


def test_the_alignment_phase_ends_by_its_share_of_the_time_budget(runs, bundled_llm):
    """align.ctc_share: a slower machine that cannot make align.ctc_steps in the phase's minutes still leaves
    the distillation its share; the switch is part of the resumable state."""
    root, cfg, stage1, _, _ = runs
    cfg = cfg.with_overrides(["align.ctc_steps=1000", "align.ctc_share=0.5"])
    task = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    task._steps_done = 10
    task.on_budget_used(0.49)
    assert task.in_alignment_phase
    task.on_budget_used(0.51)
    assert not task.in_alignment_phase and task._steps_done < cfg.align.ctc_steps
    task.on_budget_used(0.2)                      # never back: the phase has ended
    assert not task.in_alignment_phase
    again = Stage2Task(cfg, load_checkpoint(stage1.last_checkpoint), llm=bundled_llm, cpu=True)
    again.load_state_dict(task.state_dict())
    assert not again.in_alignment_phase
    steps_only = Stage2Task(cfg.with_overrides(["align.ctc_share=null"]), load_checkpoint(stage1.last_checkpoint),
                            llm=bundled_llm, cpu=True)
    steps_only.on_budget_used(0.99)
    assert steps_only.in_alignment_phase


def test_understanding_figures_with_the_real_llm(bundled_llm):
    from ira.eval.understanding import score_understanding

    gen = torch.Generator().manual_seed(0)
    texts = ["The cat sat on the mat.", "Open the window, please.", "It will rain tomorrow.", "I like green tea."]
    # soft tokens that are the transcripts' own embeddings (padded with the embedding of a space)
    ids = [bundled_llm.encode(t) for t in texts]
    n = max(len(i) for i in ids)
    space = bundled_llm.encode(" ")[0]
    rows = torch.tensor([i + [space] * (n - len(i)) for i in ids])
    exact = bundled_llm.embed(rows).float()
    score = score_understanding(bundled_llm, lambda idx: exact[idx], texts, batch_size=4, max_new_tokens=12,
                                ceiling=True)
    assert score.choice_accuracy == 1.0 and score.judge_margin > 1.0 and score.repeat_cer < 1.0
    assert score.text_repeat_cer is not None and score.text_repeat_cer < 1.0
    assert all("reply_from_text" in row for row in score.rows)
    noise = torch.randn(4, n, exact.shape[-1], generator=gen) * exact.norm(dim=-1).mean() / exact.shape[-1] ** 0.5
    blind = score_understanding(bundled_llm, lambda idx: noise[0:1].expand(len(idx), -1, -1), texts,
                                batch_size=4, max_new_tokens=4)
    assert blind.adapter_cosine == pytest.approx(1.0) and abs(blind.judge_margin) < 0.5


def test_ira_eval_understanding_prints_and_saves_the_figures(runs, bundled_llm, tmp_path, capsys):
    from ira.cli import main

    _, _, stage1, stage2, _ = runs
    out = tmp_path / "understanding.json"
    args = ["eval", "understanding", "--checkpoint", str(stage2.last_checkpoint), "--limit", "4",
            "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4-way choice" in printed and "judge margin" in printed and "repeat CER" in printed
    saved = json.loads(out.read_text())
    assert saved["clips"] == 4 and len(saved["rows"]) == 4 and 0.0 <= saved["choice_accuracy"] <= 1.0
    args[3] = str(stage1.last_checkpoint)          # no adapter: a clear error, not a crash
    assert main(args) == 1
    assert "stage" in capsys.readouterr().err
