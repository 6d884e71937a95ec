import os

import pytest
import torch

from ira.data.dataset import LengthBucketBatchSampler, SpeechTokenDataset, pad_codes
from ira.data.token_cache import CacheError, is_fresh, load_split, write_split


def _clips(n=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (k, int(torch.randint(3, 40, (1,), generator=g))), generator=g) for _ in range(n)]


def test_round_trip(tmp_path):
    clips = _clips()
    path = write_split(tmp_path / "train.safetensors", clips, [f"c{i}" for i in range(5)], [f"text {i}" for i in range(5)],
                       [["a voice"]] * 5, "fp1", "h1", "train")
    split = load_split(path, expected_fingerprint="fp1")
    assert split.codes.dtype == torch.int16
    assert len(split) == 5 and split.n_codebooks == 4
    for i, c in enumerate(clips):
        assert torch.equal(split.clip_codes(i), c)
    assert split.texts[3] == "text 3" and split.descriptions[0] == ["a voice"]
    assert is_fresh(path, "fp1", "h1") and not is_fresh(path, "fp1", "other") and not is_fresh(path, "fp2", "h1")


def test_fingerprint_mismatch_is_clear(tmp_path):
    path = write_split(tmp_path / "t.safetensors", _clips(2), ["a", "b"], ["x", "y"], [[], []], "mel-A", "h", "train")
    with pytest.raises(CacheError, match="mel-A"):
        load_split(path, expected_fingerprint="encodec-B")


def test_interrupted_write_keeps_the_old_cache(tmp_path, monkeypatch):
    path = tmp_path / "train.safetensors"
    write_split(path, _clips(3), ["a", "b", "c"], ["x"] * 3, [[]] * 3, "fp", "old", "train")
    import ira.data.token_cache as tc

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # a partial file at the temporary name, then the crash
            handle.write(b"\x00" * 100)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tc, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_split(path, _clips(4, seed=1), list("abcd"), ["y"] * 4, [[]] * 4, "fp", "new", "train")
    assert load_split(path).data_hash == "old"            # the old complete file is intact
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no leftover temporary file


def test_truncated_file_is_stale_not_read(tmp_path):
    path = write_split(tmp_path / "t.safetensors", _clips(3), ["a", "b", "c"], ["x"] * 3, [[]] * 3, "fp", "h", "train")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert not is_fresh(path, "fp", "h")
    with pytest.raises(CacheError, match="rebuild|unreadable"):
        load_split(path)


def test_out_of_range_tokens_refused(tmp_path):
    with pytest.raises(CacheError, match="int16"):
        write_split(tmp_path / "t.safetensors", [torch.full((2, 3), 40000)], ["a"], ["x"], [[]], "fp", "h", "train")


def test_dataset_skips_over_long_clips(tmp_path):
    clips = [torch.zeros(2, n, dtype=torch.long) for n in (5, 50, 7)]
    split = load_split(write_split(tmp_path / "t.safetensors", clips, ["a", "b", "c"], ["x"] * 3, [[]] * 3, "f", "h", "train"))
    ds = SpeechTokenDataset(split, max_frames=10)
    assert len(ds) == 2 and ds.skipped == 1 and [ds[i]["id"] for i in range(2)] == ["a", "c"]


def test_bucket_sampler_is_deterministic_complete_and_length_grouped():
    lengths = [int(x) for x in torch.randint(10, 500, (203,))]
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, seed=3, pool_batches=4)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first                      # same (seed, epoch) -> same batches
    sampler.set_epoch(2)
    assert list(sampler) != first                      # another epoch -> another order
    flat = sorted(i for b in first for i in b)
    assert flat == list(range(203))                    # every clip exactly once
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 200                                # similar lengths together (random batches: ~380)


def test_bucket_sampler_frame_cap():
    lengths = [100] * 10 + [400] * 10
    batches = list(LengthBucketBatchSampler(lengths, batch_size=8, max_batch_frames=800, seed=0))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 800


def test_pad_codes():
    codes, lengths = pad_codes([torch.ones(3, 4, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)], pad_value=-1)
    assert codes.shape == (2, 3, 4) and lengths.tolist() == [4, 2] and (codes[1, :, 2:] == -1).all()
