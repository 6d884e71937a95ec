"""The MusicGen delay pattern, on its own."""

import pytest
import torch

from ira.models.delay_pattern import apply_delay, delay_masks, delayed_length, undo_delay

FILL, EOS = 100, 101


def test_shift_matches_the_diagram():
    codes = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]])  # K=3, T=4
    F, E = FILL, EOS
    expected = torch.tensor([[[1, 2, 3, 4, E, F, F],
                              [F, 5, 6, 7, 8, E, F],
                              [F, F, 9, 10, 11, 12, E]]])
    assert torch.equal(apply_delay(codes, FILL, eos_id=EOS), expected)
    assert torch.equal(apply_delay(codes, FILL), expected[:, :, :-1].masked_fill(expected[:, :, :-1] == E, F))


def test_undo_reads_frame_t_of_codebook_k_at_step_t_plus_k():
    delayed = torch.arange(3 * 7).view(1, 3, 7)
    frames = undo_delay(delayed)
    assert frames.shape == (1, 3, 5)
    for k in range(3):
        for t in range(5):
            assert frames[0, k, t] == delayed[0, k, t + k]
    assert undo_delay(delayed, 2).shape == (1, 3, 2)
    with pytest.raises(ValueError, match="at most 5 complete frames"):
        undo_delay(delayed, 6)


@pytest.mark.parametrize("n_codebooks", range(1, 9))
def test_round_trip_random_shapes(n_codebooks):
    gen = torch.Generator().manual_seed(n_codebooks)
    for _ in range(5):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        n_frames = int(torch.randint(0, 30, (1,), generator=gen))
        codes = torch.randint(0, 50, (batch, n_codebooks, n_frames), generator=gen)
        for eos in (None, EOS):
            delayed = apply_delay(codes, FILL, eos_id=eos)
            assert delayed.shape == (batch, n_codebooks, delayed_length(n_frames, n_codebooks, eos is not None))
            assert torch.equal(undo_delay(delayed, n_frames), codes)


def test_masks_count_real_values_and_one_eos_per_codebook():
    lengths = torch.tensor([4, 0, 2])
    real, eos = delay_masks(lengths, 3, delayed_length(4, 3))
    assert real.shape == eos.shape == (3, 3, 7)
    assert torch.equal(real.sum(dim=2), lengths[:, None].expand(3, 3))
    assert torch.equal(eos.sum(dim=2), torch.ones(3, 3, dtype=torch.long))
    assert not (real & eos).any()
    # codebook k of a sample of length L: real on steps k .. k + L - 1, EOS at k + L
    assert real[0, 2].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert eos[2, 1].nonzero().flatten().tolist() == [3]
    assert eos[1, 0].nonzero().flatten().tolist() == [0]


def test_padding_of_shorter_samples_is_ignored_and_filled():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 0])
    codes = torch.randint(0, 50, (3, 4, 5), generator=gen)
    garbage = codes.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, :, n:] = -7  # whatever the collator padded with
    delayed = apply_delay(garbage, FILL, lengths, eos_id=EOS)
    assert torch.equal(delayed, apply_delay(codes, FILL, lengths, eos_id=EOS))
    real, eos = delay_masks(lengths, 4, delayed.shape[2])
    assert (delayed[~(real | eos)] == FILL).all()
    assert (delayed[eos] == EOS).all()
    for b, n in enumerate(lengths.tolist()):  # each padded sample equals itself alone
        alone = apply_delay(codes[b:b + 1, :, :n], FILL, eos_id=EOS)
        assert torch.equal(delayed[b:b + 1, :, :alone.shape[2]], alone)
        assert (delayed[b, :, alone.shape[2]:] == FILL).all()
        assert torch.equal(undo_delay(delayed[b:b + 1], n), codes[b:b + 1, :, :n])


def test_bad_lengths_are_clear_errors():
    codes = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths must be in"):
        apply_delay(codes, FILL, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="shape"):
        apply_delay(codes, FILL, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[B, K, T\]"):
        apply_delay(codes[0], FILL)
