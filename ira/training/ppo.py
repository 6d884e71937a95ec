"""PPO's arithmetic, on its own: rewards with a KL penalty, GAE, the clipped losses, the KL controller.

Shapes are [B, S]: B sampled sequences, S steps (for the SpeechLM a step is one column of the delayed
grid, whose log-probability is the sum over its sampled codebooks), with a mask that is True on the
steps the policy actually chose. Everything here is plain tensor code, tested alone
(tests/test_ppo.py); the stage-3 task feeds it rollouts.

The recipe is the one of Ziegler et al. (2019) / Stiennon et al. (2020) for language models:
    reward_t   = -kl_coef * (log pi(a_t) - log pi_ref(a_t))      + score at the sequence's last step
    advantages = GAE(reward, value; gamma, lambda), whitened over the batch
    loss       = clipped-ratio policy loss + vf_coef * clipped value loss - ent_coef * entropy
and the KL coefficient adapts so that the measured KL to the reference tracks a target.

The other estimate of the advantage (`group_advantages`, as GRPO, Shao et al. 2024): each text is spoken
several times, and a sample's advantage is its score standardised within its group, the same at every step:
the other samples of the text are the baseline, no value head. The KL to the reference is then not in the
reward (standardising within a group would cancel the drift all samples of a text share) but a loss term of
its own (`kl_to_reference`), as in GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def last_step_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True step ([B]); a row with no step gets 0."""
    steps = torch.arange(mask.shape[1], device=mask.device)[None].expand_as(mask)
    return torch.where(mask, steps, torch.zeros_like(steps)).max(dim=1).values


def shaped_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step rewards [B, S]: the KL penalty at every step, plus `score` [B] at each row's last step.

    Returns (rewards, kl) where kl = log pi - log pi_ref per step (its sum over a row estimates the
    sequence KL to the reference policy).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_step_index(mask)
    has_steps = mask.any(dim=1)
    bonus = torch.zeros_like(rewards)
    bonus[torch.arange(len(score), device=score.device), last] = torch.where(has_steps, score.to(rewards.dtype), 0.0)
    return rewards + bonus, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, S] (steps outside the mask are skipped, and the value
    after a row's last step is 0). Returns (advantages, returns = advantages + values)."""
    m = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # a masked step is not a decision of the policy: the future passes through it unchanged
        running = torch.where(mask[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = running * m[:, t]
    return advantages, (advantages + values) * m


def group_advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor,
                     min_spread: float = 0.0) -> torch.Tensor:
    """Sequence rewards [B] of B / group_size groups of consecutive samples (one text each) -> advantages
    [B, S]: (reward - its group's mean) / (its group's std + 1e-6) on every masked step of the row. A group
    whose rewards spread by less than `min_spread` (their std) teaches nothing (advantage 0): standardising
    it would blow its noise up to +-1 (DMOSpeech 2 skips such groups)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be cut into groups of {group_size} (>= 2)")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    spread = groups.std(dim=1, unbiased=False, keepdim=True)
    standardised = torch.where(spread >= max(min_spread, 1e-6), centred / (spread + 1e-6), torch.zeros_like(centred))
    return standardised.reshape(-1, 1).to(mask.device) * mask.to(torch.float32)


def skipped_groups(rewards: torch.Tensor, group_size: int, min_spread: float) -> float:
    """The share of groups `group_advantages` leaves out for a spread below `min_spread`."""
    spread = rewards.float().view(-1, group_size).std(dim=1, unbiased=False)
    return (spread < max(min_spread, 1e-6)).float().mean().item()


def kl_to_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) per sample (nats, the unit of the KL target), as a loss: the sum over each row's masked
    steps of the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi (Schulman, 2020: unbiased on the
    policy's own samples, never negative), averaged over the rows. Its gradient pulls every sampled step's
    log-probability toward the reference's, whatever the step's advantage."""
    r = ((ref_logprobs - logprobs) * mask).clamp(-20.0, 20.0)   # a masked step: r = 0, k3 = 0
    return ((r.exp() - r - 1.0) * mask).sum(1).mean()


@dataclass
class PPOLosses:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor       # mean of (ratio - 1) - log ratio (k3 estimator of KL(old || new))
    clip_fraction: torch.Tensor   # share of steps whose ratio left [1 - clip, 1 + clip]
    ratio_mean: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.__dict__.items() if k != "loss"}


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               entropy: torch.Tensor | None = None, clip_range: float = 0.2, clip_range_value: float = 0.2,
               vf_coef: float = 0.5, ent_coef: float = 0.0) -> PPOLosses:
    """The clipped surrogate objective (and clipped value loss) over the masked steps."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    surrogate = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.maximum(surrogate, clipped), mask)

    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    value_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2), mask)

    ent = masked_mean(entropy, mask) if entropy is not None else logprobs.new_zeros(())
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    loss = policy_loss + vf_coef * value_loss - ent_coef * ent
    return PPOLosses(loss, policy_loss, value_loss, ent, approx_kl, clip_fraction, ratio_mean)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 = the value head predicts returns perfectly, <= 0 = no better
    than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns.clamp(min=1e-8))


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): nudged so the measured KL tracks `target`.

    coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_coef: float, target: float | None, horizon: int = 10_000):
        if init_coef < 0:
            raise ValueError(f"the initial KL coefficient must be >= 0, got {init_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"the KL target must be > 0 (or None for a fixed coefficient), got {target}")
        if horizon <= 0:
            raise ValueError(f"the KL horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init_coef), target, int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
