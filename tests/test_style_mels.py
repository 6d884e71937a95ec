"""The style stage's log-mel cache: computed once per corpus split, read back exactly, never stale."""

from __future__ import annotations

import torch

from ira.data.style_mels import cache_path, cached_mels


def _counting(mels: dict[str, torch.Tensor]):
    calls: list[str] = []

    def compute(clip_id: str) -> torch.Tensor:
        calls.append(clip_id)
        return mels[clip_id]
    return compute, calls


def test_the_second_read_comes_from_the_file_and_equals_the_first(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mels = {f"c{i}": torch.randn(6, 5 + 3 * i, generator=gen).half() for i in range(4)}
    compute, calls = _counting(mels)
    path = cache_path(tmp_path, "train", "hash-a", {"n_mels": 6})
    first = cached_mels(path, list(mels), compute)
    assert calls == list(mels) and path.is_file()
    second = cached_mels(path, list(mels), compute)
    assert calls == list(mels)                       # nothing computed again
    for clip_id, mel in mels.items():
        assert torch.equal(first[clip_id], mel) and torch.equal(second[clip_id], mel)
        assert second[clip_id].dtype == torch.float16


def test_another_corpus_setting_or_clip_list_never_reads_a_stale_file(tmp_path):
    mels = {f"c{i}": torch.full((2, 3), float(i)).half() for i in range(3)}
    compute, calls = _counting(mels)
    path = cache_path(tmp_path, "train", "hash-a", {"n_mels": 2})
    cached_mels(path, ["c0", "c1"], compute)
    assert cache_path(tmp_path, "train", "hash-b", {"n_mels": 2}) != path      # the corpus changed
    assert cache_path(tmp_path, "train", "hash-a", {"n_mels": 3}) != path      # a mel setting changed
    assert cache_path(tmp_path, "val", "hash-a", {"n_mels": 2}) != path        # the other split
    calls.clear()
    got = cached_mels(path, ["c0", "c2"], compute)   # same file, other clips: computed and rewritten
    assert calls == ["c0", "c2"] and torch.equal(got["c2"], mels["c2"])


def test_a_truncated_file_is_computed_again(tmp_path):
    mels = {"a": torch.ones(2, 4).half()}
    compute, calls = _counting(mels)
    path = cache_path(tmp_path, "val", "h", {})
    cached_mels(path, ["a"], compute)
    path.write_bytes(path.read_bytes()[:20])
    calls.clear()
    assert torch.equal(cached_mels(path, ["a"], compute)["a"], mels["a"]) and calls == ["a"]
