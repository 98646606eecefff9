"""The PPO math as small pure functions on tensors (Schulman et al. 2017; Stiennon et al. 2020).

All per-token tensors are ``(B, T)`` over the generated tokens of a batch of rollouts, right
padded; ``mask`` is 1 on generated tokens. Functions return per-token values; the training loop
sums them over the mask and divides by the number of generated tokens in the global mini-batch,
so every token weighs the same whatever the process count or micro-batching.

The reward itself (safety gate, logit, whitening, KL penalty) lives in ``rlhf.rewards``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf.rewards import kl_penalty


def entropy(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, (B, T, V) -> (B, T):
    H = lse - sum_v p_v * logit_v, with p = exp(logits - lse) (one temporary of the logits'
    size: they are large, vocabulary-wide)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    probs = (logits - lse.unsqueeze(-1)).exp_()
    return lse - torch.linalg.vecdot(probs, logits)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's generated tokens, (B, T) each.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last generated token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                 (the critic's regression targets)

    Entries where ``mask`` is 0 are ignored and come back as 0.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) per-token clipped surrogate loss (to minimise)
    clipped: torch.Tensor  # (B, T) bool: the clipped term was the one taken
    approx_kl: torch.Tensor  # (B, T) k3 estimate of KL(pi_old || pi) per token


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> PolicyLoss:
    """PPO's clipped surrogate: max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) with
    ratio = pi / pi_old per token."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped)
    approx_kl = kl_penalty(old_logprobs, logprobs.detach(), "k3")
    return PolicyLoss(loss, clipped > unclipped, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # (B, T)
    clipped: torch.Tensor  # (B, T) bool


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> ValueLoss:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clamp(V - V_old, +-clip):
    the critic may not move further than ``clip`` from its rollout-time values per update."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return ValueLoss(0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 = perfect critic,
    0 = no better than predicting the mean, negative = worse."""
    mask = mask.bool()
    returns, residual = returns[mask].float(), (returns - values)[mask].float()
    var = returns.var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - residual.var(unbiased=False) / var)
