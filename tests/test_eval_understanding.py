"""The understanding figures on hand-made cases: choice accuracy, judge margin, pairwise cosine."""

import pytest
import torch

from ira.eval.understanding import N_CHOICES, choice_metrics, distractors, mean_pairwise_cosine


def test_choice_accuracy_and_margin_on_a_hand_made_case():
    # column 0 = the clip's own transcript
    ll = torch.tensor([[-1.0, -3.0, -2.0, -4.0],    # own best: right, margin -1 - (-3) = 2
                       [-2.0, -1.0, -3.0, -3.0],    # another wins: wrong, margin -2 - (-7/3) = 1/3
                       [-2.0, -2.0, -5.0, -5.0]])   # a tie with the best other is wrong, margin -2 - (-4) = 2
    accuracy, margin, correct, margins = choice_metrics(ll)
    assert correct == [True, False, False]
    assert accuracy == pytest.approx(1 / 3)
    assert margins == pytest.approx([2.0, 1 / 3, 2.0])
    assert margin == pytest.approx((2.0 + 1 / 3 + 2.0) / 3)


def test_an_adapter_that_makes_every_reply_equally_likely_scores_zero_not_chance():
    accuracy, margin, _, _ = choice_metrics(torch.full((5, 4), -2.5))
    assert accuracy == 0.0 and margin == 0.0


def test_distractors_are_other_clips_distinct_and_seeded():
    others = distractors(10)
    assert others == distractors(10)
    for i, row in enumerate(others):
        assert len(row) == N_CHOICES - 1 and len(set(row)) == N_CHOICES - 1 and i not in row
    with pytest.raises(ValueError, match="at least 4 clips"):
        distractors(3)


def test_pairwise_cosine_is_one_for_a_collapsed_adapter_and_low_for_distinct_outputs():
    same = torch.randn(1, 8, 16).expand(5, -1, -1)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0, abs=1e-5)
    distinct = torch.zeros(4, 8, 16)
    for i in range(4):
        distinct[i, i, 0] = 1.0                      # orthogonal one-hot outputs
    assert mean_pairwise_cosine(distinct) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.randn(1, 8, 16))
