"""PPO's arithmetic on toy problems: GAE, the clipped losses, the reward shaping, the KL controller."""

import pytest
import torch

from ira.training.ppo import (AdaptiveKLController, explained_variance, gae, group_advantages, kl_to_reference,
                              masked_whiten, ppo_losses, shaped_rewards, skipped_groups)


def brute_force_gae(rewards, values, gamma, lam):
    """Advantage at t = sum_l (gamma lam)^l delta_{t+l}, written out for one unmasked row."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, n)) for t in range(n)]


def test_gae_matches_the_definition_and_skips_masked_steps():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(1, 6, generator=gen), torch.randn(1, 6, generator=gen)
    full = torch.ones(1, 6, dtype=torch.bool)
    adv, ret = gae(rewards, values, full, gamma=0.9, lam=0.8)
    expected = brute_force_gae(rewards[0].tolist(), values[0].tolist(), 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(ret, adv + values)
    # padding after the end changes nothing and gets no advantage
    padded_r = torch.cat([rewards, torch.zeros(1, 3)], 1)
    padded_v = torch.cat([values, torch.randn(1, 3, generator=gen)], 1)
    mask = torch.cat([full, torch.zeros(1, 3, dtype=torch.bool)], 1)
    adv2, _ = gae(padded_r, padded_v, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv2[:, :6], adv, atol=1e-6) and adv2[:, 6:].abs().sum() == 0


def test_shaped_rewards_put_the_score_on_the_last_step():
    logprobs = torch.tensor([[-1.0, -2.0, -1.5, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, 0.0], [-0.5, -1.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    rewards, kl = shaped_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 0.05 + 3.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([0.0, -0.1 - 1.0, 0.0, 0.0])


def test_first_minibatch_has_ratio_one_and_no_clipping():
    gen = torch.Generator().manual_seed(1)
    logprobs = torch.randn(4, 7, generator=gen)
    mask = torch.rand(4, 7, generator=gen) > 0.2
    values = torch.randn(4, 7, generator=gen)
    out = ppo_losses(logprobs, logprobs.clone(), torch.randn(4, 7, generator=gen), values, values.clone(),
                     torch.randn(4, 7, generator=gen), mask)
    assert out.ratio_mean.item() == pytest.approx(1.0) and out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == pytest.approx(0.0, abs=1e-7)
    far = ppo_losses(logprobs + 1.0, logprobs, torch.ones(4, 7), values, values, values, mask)
    assert far.clip_fraction.item() == 1.0                       # every ratio is e > 1.2


def test_ppo_moves_a_toy_policy_toward_the_rewarded_action():
    """Three-step episodes over 4 actions; only action 2 is rewarded. A few PPO iterations later the
    policy prefers it."""
    torch.manual_seed(0)
    logits = torch.zeros(3, 4, requires_grad=True)               # one categorical per step
    value = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([logits, value], lr=0.05)
    ref_logits = torch.zeros(3, 4)
    kl = AdaptiveKLController(0.05, target=None)
    gen = torch.Generator().manual_seed(0)
    start = logits.softmax(-1)[:, 2].mean().item()
    for _ in range(15):
        with torch.no_grad():                                    # rollout
            probs = logits.softmax(-1).expand(64, 3, 4)
            actions = torch.multinomial(probs.reshape(-1, 4), 1, generator=gen).view(64, 3)
            old = logits.log_softmax(-1)[torch.arange(3), actions]
            ref = ref_logits.log_softmax(-1)[torch.arange(3), actions]
            score = (actions == 2).float().mean(1)
            mask = torch.ones(64, 3, dtype=torch.bool)
            rewards, _ = shaped_rewards(score, old, ref, mask, kl.value)
            old_values = value.detach().expand(64, 3)
            adv, returns = gae(rewards, old_values, mask)
            adv = masked_whiten(adv, mask)
        for _ in range(4):                                       # PPO epochs
            new = logits.log_softmax(-1)[torch.arange(3), actions]
            out = ppo_losses(new, old, adv, value.expand(64, 3), old_values, returns, mask)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    after = logits.softmax(-1)[:, 2].mean().item()
    assert start == pytest.approx(0.25) and after > 0.6, after


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0])           # groups of 2: (1, 3) (2, 2) (5, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    adv = group_advantages(rewards, 2, mask)
    assert torch.allclose(adv[0], torch.tensor([-1.0, -1.0, 0.0]), atol=1e-4)   # below its group's mean
    assert torch.allclose(adv[1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)     # masked steps get nothing
    assert torch.equal(adv[2:], torch.zeros(4, 3))                    # a group that scored alike: no signal
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4, mask)


def test_groups_whose_rewards_barely_differ_are_skipped_not_blown_up():
    rewards = torch.tensor([0.500, 0.503, 0.0, 1.0])                 # spread 0.0015, then 0.5
    mask = torch.ones(4, 2, dtype=torch.bool)
    assert torch.allclose(group_advantages(rewards, 2, mask)[:2, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)
    adv = group_advantages(rewards, 2, mask, min_spread=0.01)
    assert torch.equal(adv[:2], torch.zeros(2, 2))                     # noise, not signal: skipped
    assert torch.allclose(adv[2:, 0], torch.tensor([-1.0, 1.0]), atol=1e-4)
    assert skipped_groups(rewards, 2, 0.01) == 0.5 and skipped_groups(rewards, 2, 0.0) == 0.0


def test_group_advantages_move_a_toy_policy_toward_the_rewarded_action_without_a_value_head():
    """The same toy as above (only action 2 rewarded), the baseline being the other samples of each group
    of 8: no value head, no GAE."""
    torch.manual_seed(0)
    logits = torch.zeros(3, 4, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    start = logits.softmax(-1)[:, 2].mean().item()
    for _ in range(15):
        with torch.no_grad():
            probs = logits.softmax(-1).expand(64, 3, 4)
            actions = torch.multinomial(probs.reshape(-1, 4), 1, generator=gen).view(64, 3)
            old = logits.log_softmax(-1)[torch.arange(3), actions]
            mask = torch.ones(64, 3, dtype=torch.bool)
            adv = group_advantages((actions == 2).float().mean(1), 8, mask)
            zeros = torch.zeros(64, 3)
        for _ in range(4):
            new = logits.log_softmax(-1)[torch.arange(3), actions]
            out = ppo_losses(new, old, adv, zeros, zeros, zeros, mask, vf_coef=0.0)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    after = logits.softmax(-1)[:, 2].mean().item()
    assert start == pytest.approx(0.25) and after > 0.6, after


def test_kl_to_reference_estimates_the_kl_on_the_policys_own_samples():
    """Summed over a row's steps and averaged over rows, k3 is an unbiased estimate of KL(pi || pi_ref)."""
    gen = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(3, 5, generator=gen).log_softmax(-1), torch.randn(3, 5, generator=gen).log_softmax(-1)
    exact = (policy.exp() * (policy - ref)).sum().item()                          # 3 independent steps
    actions = torch.multinomial(policy.exp(), 20_000, replacement=True, generator=gen).T        # [N, 3]
    steps = torch.arange(3)
    mask = torch.ones(20_000, 3, dtype=torch.bool)
    estimate = kl_to_reference(policy[steps, actions], ref[steps, actions], mask).item()
    assert exact > 0.3 and estimate == pytest.approx(exact, rel=0.05)
    mask[:, 2] = False                                                         # masked steps count nothing
    partial = kl_to_reference(policy[steps, actions], ref[steps, actions], mask).item()
    assert partial == pytest.approx((policy.exp() * (policy - ref))[:2].sum().item(), rel=0.05)


def test_kl_loss_pulls_a_drifted_policy_back_while_the_group_advantage_teaches_nothing():
    """A policy that drifted onto action 0 (reference: uniform); every sample scores the same, so the group
    advantage is 0 and only the KL term acts: a few iterations bring the policy back to the reference."""
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 3, requires_grad=True)
    ref_logits = torch.zeros(3, 4)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(0)

    def exact_kl():
        logp = logits.detach().log_softmax(-1)
        return (logp.exp() * (logp - ref_logits.log_softmax(-1))).sum().item()

    start = exact_kl()
    for _ in range(15):
        with torch.no_grad():
            actions = torch.multinomial(logits.softmax(-1), 64, replacement=True, generator=gen).T    # [64, 3]
            old = logits.log_softmax(-1)[torch.arange(3), actions]
            ref = ref_logits.log_softmax(-1)[torch.arange(3), actions]
            mask = torch.ones(64, 3, dtype=torch.bool)
            adv = group_advantages(torch.ones(64), 8, mask)
            zeros = torch.zeros(64, 3)
        assert adv.abs().sum() == 0
        for _ in range(4):
            new = logits.log_softmax(-1)[torch.arange(3), actions]
            loss = ppo_losses(new, old, adv, zeros, zeros, zeros, mask, vf_coef=0.0).loss
            loss = loss + 0.5 * kl_to_reference(new, ref, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert start > 1.5 and exact_kl() < 0.2 * start, (start, exact_kl())


def test_adaptive_kl_coefficient():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))       # above target: up, error clipped
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(3.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))        # below: down
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(6.6, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(100.0, 1000) == 0.1
    again = AdaptiveKLController(1.0, target=1.0)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
