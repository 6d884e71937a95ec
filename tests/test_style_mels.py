"""The style stage's log-mel cache (and the tensor cache under it): computed once per corpus split, read back
exactly, never stale, superseded files deleted."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ira import tensor_cache
from ira.data.style_mels import FOLDER, cached_mels


def _counting(mels: dict[str, torch.Tensor]):
    calls: list[str] = []

    def compute(clip_id: str) -> torch.Tensor:
        calls.append(clip_id)
        return mels[clip_id]
    return compute, calls


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "cache" / FOLDER).iterdir())


def test_the_second_read_comes_from_the_file_and_equals_the_first(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mels = {f"c{i}": torch.randn(6, 5 + 3 * i, generator=gen).half() for i in range(4)}
    compute, calls = _counting(mels)
    first = cached_mels(tmp_path, "train", "hash-a", list(mels), {"n_mels": 6}, compute)
    assert calls == list(mels) and len(_files(tmp_path)) == 1
    second = cached_mels(tmp_path, "train", "hash-a", list(mels), {"n_mels": 6}, compute)
    assert calls == list(mels)                       # nothing computed again
    for clip_id, mel in mels.items():
        assert torch.equal(first[clip_id], mel) and torch.equal(second[clip_id], mel)
        assert second[clip_id].dtype == torch.float16


def test_another_corpus_setting_or_clip_list_computes_again_and_replaces_the_old_file(tmp_path):
    mels = {f"c{i}": torch.full((2, 3), float(i)).half() for i in range(3)}
    compute, calls = _counting(mels)
    cached_mels(tmp_path, "train", "hash-a", ["c0", "c1"], {"n_mels": 2}, compute)
    cached_mels(tmp_path, "val", "hash-a", ["c2"], {"n_mels": 2}, compute)          # the other split
    for data_hash, ids, settings in (("hash-b", ["c0", "c1"], {"n_mels": 2}),     # the corpus changed
                                     ("hash-b", ["c0", "c1"], {"n_mels": 3}),     # a mel setting changed
                                     ("hash-b", ["c0", "c2"], {"n_mels": 3})):    # other clips
        calls.clear()
        got = cached_mels(tmp_path, "train", data_hash, ids, settings, compute)
        assert calls == ids and all(torch.equal(got[i], mels[i]) for i in ids)
        files = _files(tmp_path)
        assert len(files) == 2 and sum(f.startswith("train-") for f in files) == 1   # the old one deleted


def test_a_cut_or_inconsistent_file_is_computed_again(tmp_path):
    mels = {"a": torch.ones(2, 4).half(), "b": torch.zeros(2, 1).half()}
    compute, calls = _counting(mels)
    cached_mels(tmp_path, "val", "h", ["a", "b"], {}, compute)
    path = tmp_path / "cache" / FOLDER / _files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:20])                                      # cut short
    calls.clear()
    assert torch.equal(cached_mels(tmp_path, "val", "h", ["a", "b"], {}, compute)["a"], mels["a"])
    assert calls == ["a", "b"]
    with safe_open(str(path), framework="pt") as handle:                          # offsets that do not fit
        key = handle.metadata()["key"]
    tensor_cache.write(path, {"mels": torch.ones(2, 5).half(), "offsets": torch.tensor([0, 9, 5])}, key, "val")
    calls.clear()
    assert torch.equal(cached_mels(tmp_path, "val", "h", ["a", "b"], {}, compute)["b"], mels["b"])
    assert calls == ["a", "b"]
