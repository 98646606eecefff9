"""The reward of the method (Llama 2, Sec. 3.2.3) as small pure functions on tensors.

    R_c = R_s  if IS_SAFETY(p) or R_s < threshold  else R_h        (probability scale)
    R_c = SIGMOID(LOGIT(R_c) - missing_eos_penalty)  for a response cut at the token limit
    R   = WHITEN(LOGIT(R_c)) - beta * KL(pi || pi_0)                (per generated token)

Rejection sampling ranks samples by R_c; PPO optimises R. Whitening uses the statistics of the
current batch of rollouts (the paper does not say; batch statistics need no state to resume).
The threshold is a number or, ``calibrated``, the one the safety reward model's evaluation
derived from its held-out data (``resolve_gate_threshold``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from rlhf.artifacts import read_manifest
from rlhf.config import RecipeError


class GatedReward(NamedTuple):
    reward: torch.Tensor  # (B,) R_c on the probability scale
    used_safety: torch.Tensor  # (B,) bool: the safety score was chosen


def safety_gate(
    helpfulness: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15
) -> GatedReward:
    """Combine the two reward models' probabilities (sigmoid of their logits), shape (B,)."""
    used_safety = is_safety.bool() | (safety < threshold)
    return GatedReward(torch.where(used_safety, safety, helpfulness), used_safety)


def resolve_gate_threshold(value: float | str, safety_rm_dir: Path, say: Callable[[str], None] = print) -> float:
    """The safety gate's threshold: ``value``, or for ``"calibrated"`` the ``gate_threshold`` of
    the safety reward model's manifest metrics (the score below which ``eval.gate_recall`` of its
    held-out unsafe responses fall), announced with ``say``. A reward model without one (trained
    before it was written, or without a held-out response labelled unsafe) is a ``RecipeError``."""
    if value != "calibrated":
        return float(value)
    metrics = (read_manifest(safety_rm_dir) or {}).get("metrics") or {}
    threshold = metrics.get("gate_threshold")
    if threshold is None:
        why = ("none of its held-out or test responses is labelled unsafe (it needs data.eval_fraction or "
               "data.eval_sources with chosen_safe / rejected_safe labels; see its eval/report.md)"
               if "gate_threshold" in metrics else
               "its manifest has none (a reward model trained before the reward_model stage calibrated the gate)")
        raise RecipeError(f"gate_threshold: calibrated, but the safety reward model {safety_rm_dir} has no "
                          f"calibrated gate threshold: {why}; set gate_threshold to a number, e.g. 0.15")
    recall, precision = metrics.get("gate_recall"), metrics.get("gate_precision")
    at = f" (unsafe recall {recall:.3f}, precision {precision:.3f} on its eval pairs)" if None not in (recall, precision) else ""
    say(f"[rlhf] gate_threshold: {threshold:.4g}, calibrated by the safety reward model {safety_rm_dir}{at}")
    return float(threshold)


def penalize_truncated(reward: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """R_c (B,) of the responses not ``finished`` (no EOS within the token limit) lowered by
    ``penalty`` on the logit scale, TRL's ``missing_eos_penalty`` (subtracted from the reward
    model's score); the others, or all when ``penalty`` is None, unchanged.

    R_c 0.8, penalty 1: sigmoid(ln 4 - 1) = 4 / (4 + e) = 0.595"""
    if penalty is None:
        return reward
    return torch.where(finished.bool(), reward, torch.sigmoid(logit(reward) - penalty))


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The inverse of the sigmoid, clamped away from 0 and 1 so it stays finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the entries where ``mask`` is true (all when None); with
    ``shift_mean=False`` the mean is added back (only the scale changes)."""
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    values = x[mask]
    mean = values.mean()
    var = values.var(unbiased=False) if values.numel() > 1 else torch.zeros_like(mean)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, x)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_0) from the sampled tokens' log-probabilities, (B, T).
    ``k1`` = log pi - log pi_0 (unbiased, can be negative); ``k3`` = (r - 1) - log r with
    r = pi_0 / pi (unbiased, never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards (B, T): -beta * KL on every generated token, plus the sequence score
    (B,) on the last generated token (``mask`` marks generated tokens)."""
    rewards = -beta * kl * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last generated token of each row
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last] += score
    return rewards
