"""Checkpoint files: round trip, atomic writes, latest links, safe loading and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ira.config import IRAConfig
from ira.training.checkpoint import (CheckpointError, check_compatible, checkpoint_path, find_latest,
                                     latest_path, link_latest, load_checkpoint, load_train_state,
                                     prune_checkpoints, read_metadata, require_stage,
                                     save_checkpoint, train_state_path)


class TiedLM(nn.Module):
    """Embedding and output head share one weight (safetensors refuses shared memory as is)."""

    def __init__(self, vocab: int = 10, dim: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(3))


def _save(path: Path, modules=None, stage="1", step=7, epoch=2, cfg=None, meta=None, state=None):
    modules = modules if modules is not None else {"speech_lm": TiedLM(), "adapter": nn.Linear(4, 2)}
    return save_checkpoint(path, modules, stage=stage, epoch=epoch, step=step, config=cfg or IRAConfig(),
                           metadata=meta if meta is not None else {"codec_fingerprint": "mel-abc"},
                           train_state=state)


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    torch.manual_seed(0)
    lm, adapter = TiedLM(), nn.Linear(4, 2)
    cfg = IRAConfig()
    cfg.speech_lm.d_model = 64
    path = _save(tmp_path / "stage1_epoch2.safetensors", {"speech_lm": lm, "adapter": adapter}, cfg=cfg,
                 meta={"codec_fingerprint": "mel-abc", "tokenizer": "char"}, state={"optimizer": {"x": 1}})
    ckpt = load_checkpoint(path)
    assert (ckpt.stage, ckpt.epoch, ckpt.step) == ("1", 2, 7)
    assert ckpt.modules == ["speech_lm", "adapter"]
    assert ckpt.extra == {"codec_fingerprint": "mel-abc", "tokenizer": "char"}
    assert ckpt.config["speech_lm"]["d_model"] == 64
    assert ckpt.ira_config().speech_lm.d_model == 64
    assert read_metadata(path)["checkpoint_id"] == ckpt.checkpoint_id
    assert set(ckpt.tensors["speech_lm"]) == set(lm.state_dict())

    fresh_lm, fresh_adapter = TiedLM(), nn.Linear(4, 2)
    ckpt.load_into("speech_lm", fresh_lm)
    ckpt.load_into("adapter", fresh_adapter)
    for a, b in zip(list(lm.state_dict().values()) + list(adapter.state_dict().values()),
                    list(fresh_lm.state_dict().values()) + list(fresh_adapter.state_dict().values())):
        assert torch.equal(a, b)
    assert fresh_lm.head.weight is fresh_lm.embed.weight           # still tied after loading

    state = load_train_state(path, ckpt.checkpoint_id)
    assert state["optimizer"] == {"x": 1} and state["step"] == 7 and state["stage"] == "1"


def test_names_latest_link_and_pruning(tmp_path):
    assert checkpoint_path(tmp_path, "1", epoch=50).name == "stage1_epoch50.safetensors"
    assert checkpoint_path(tmp_path, "style", step=300).name == "stagestyle_step300.safetensors"
    assert latest_path(tmp_path, "2").name == "stage2_latest.safetensors"
    assert train_state_path(tmp_path / "stage1_epoch3.safetensors").name == "stage1_epoch3.train_state.pt"

    for step in (100, 200, 300):
        path = _save(checkpoint_path(tmp_path, "1", step=step), step=step, state={})
        link_latest(path, latest_path(tmp_path, "1"))
    removed = prune_checkpoints(tmp_path, "1", keep=2)
    assert sorted(p.name for p in removed) == ["stage1_step100.safetensors", "stage1_step100.train_state.pt"]
    latest = load_checkpoint(find_latest(tmp_path, "1"))
    assert latest.step == 300
    assert load_train_state(latest.path, latest.checkpoint_id)["step"] == 300   # side file follows
    assert find_latest(tmp_path, "2") is None


def test_writes_are_atomic_and_temporary_files_are_never_loaded(tmp_path):
    good = _save(tmp_path / "stage1_latest.safetensors", step=5, state={})
    # A crash mid-save leaves a temporary file next to the real one.
    leftover = tmp_path / "stage1_latest.safetensors.4242.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert find_latest(tmp_path, "1") == good and load_checkpoint(good).step == 5
    with pytest.raises(CheckpointError, match="temporary file left by an interrupted save"):
        load_checkpoint(leftover)

    # A save that fails half-way (torch.save cannot pickle a lambda) leaves the previous pair
    # intact and consistent, and no temporary file behind.
    with pytest.raises(Exception, match="pickle"):
        _save(good, step=6, state={"optimizer": lambda: 0})
    assert load_checkpoint(good).step == 5
    assert load_train_state(good, load_checkpoint(good).checkpoint_id)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["stage1_latest.safetensors", "stage1_latest.train_state.pt", leftover.name])


def test_load_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found.*does not exist"):
        load_checkpoint(tmp_path / "nope" / "stage1_latest.safetensors")
    _save(tmp_path / "stage1_epoch1.safetensors")
    with pytest.raises(CheckpointError, match="not found.*available in .*stage1_epoch1.safetensors"):
        load_checkpoint(tmp_path / "stage1_epoch9.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not an IRA checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="side file; pass the checkpoint itself, stage1_epoch1.safe"):
        load_checkpoint(tmp_path / "stage1_epoch1.train_state.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no training state"):
        load_train_state(tmp_path / "stage1_epoch1.safetensors")
    with pytest.raises(CheckpointError, match="reserved keys"):
        _save(tmp_path / "x.safetensors", meta={"stage": "2"})


def test_wrong_stage_and_codec_mismatch(tmp_path):
    ckpt = load_checkpoint(_save(tmp_path / "stage2_latest.safetensors", stage="2"))
    assert require_stage(ckpt, {"2", "3"}) is ckpt
    with pytest.raises(CheckpointError, match=r"stage 2 \(adapter alignment\) checkpoint.*inference needs a "
                                              r"checkpoint from stage 1 \(SpeechLM pre-training\)"):
        require_stage(ckpt, {"1"}, purpose="inference")
    check_compatible(ckpt, codec_fingerprint="mel-abc")
    check_compatible(ckpt, codec_fingerprint=None, tokenizer=None)
    with pytest.raises(CheckpointError, match="codec 'mel-abc'.*current codec is 'encodec-8cb'"):
        check_compatible(ckpt, codec_fingerprint="encodec-8cb")


def test_shape_mismatch_names_the_tensor_the_shapes_and_the_config(tmp_path):
    cfg = IRAConfig()
    cfg.preset = "laptop"
    cfg.speech_lm.d_model = 8
    path = _save(tmp_path / "stage1_latest.safetensors", {"speech_lm": TiedLM(dim=8)}, cfg=cfg)
    ckpt = load_checkpoint(path)
    now = IRAConfig()
    now.speech_lm.d_model = 4
    with pytest.raises(CheckpointError) as err:
        ckpt.load_into("speech_lm", TiedLM(dim=4), current_config=now)
    text = str(err.value)
    assert "'speech_lm.embed.weight' has shape [10, 8] in the checkpoint but [10, 4] in the model" in text
    assert "preset 'laptop'" in text and "speech_lm.d_model: checkpoint 8, current 4" in text
    with pytest.raises(CheckpointError, match="speech_lm: d_model=8"):
        ckpt.load_into("speech_lm", TiedLM(dim=4))
    with pytest.raises(CheckpointError, match="has no module 'adapter'"):
        ckpt.load_into("adapter", nn.Linear(4, 2))

    class Bigger(TiedLM):
        def __init__(self):
            super().__init__(dim=8)
            self.extra = nn.Linear(8, 8)

    with pytest.raises(CheckpointError, match="missing from the checkpoint: speech_lm.extra.bias, "):
        ckpt.load_into("speech_lm", Bigger())


def test_train_state_is_loaded_without_unpickling_objects(tmp_path):
    path = _save(tmp_path / "stage1_latest.safetensors", state={"data": {"epoch": 1}})
    ckpt = load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    side = train_state_path(path)
    torch.save({"checkpoint_id": ckpt.checkpoint_id, "payload": Evil()}, side)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_train_state(path)

    # A torn pair (the side file from another save) is detected by its id.
    other = _save(tmp_path / "stage1_step9.safetensors", state={})
    os.replace(train_state_path(other), side)
    with pytest.raises(CheckpointError, match="belongs to a different save"):
        load_train_state(path, ckpt.checkpoint_id)


def poison(path: Path, n: int = 2) -> Path:
    """Rewrite checkpoint `path` with NaN and inf in `n` of its tensors, header kept: the file an older IRA wrote
    when a run diverged (save_checkpoint now refuses such weights)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key in [k for k, t in tensors.items() if t.is_floating_point()][:n]:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        tensors[key].view(-1)[-1] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    return path


def test_non_finite_weights_are_never_written(tmp_path):
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    path = _save(tmp_path / "stage1_epoch3.safetensors", state={"optimizer": {"m": torch.ones(2)}})
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"refusing to write .*stage1_epoch3.*1 tensor\(s\) hold NaN or "
                                              r"infinite values \(adapter\.weight\)"):
        _save(path, modules={"speech_lm": TiedLM(), "adapter": model}, state={"optimizer": {"m": torch.zeros(2)}})
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before   # the earlier save and its pair untouched


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_file(tmp_path):
    good = _save(tmp_path / "stage1_step2.safetensors")
    bad = poison(_save(tmp_path / "stage1_latest.safetensors", step=3))
    assert load_checkpoint(good).step == 7
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    message = str(err.value)
    assert str(bad) in message and "2 tensor(s) hold NaN or infinite values" in message
    assert "earlier checkpoint" in message and "stage1_step2.safetensors" in message
