import math

import pytest
import torch

from rlhf.logprobs import token_logprobs
from rlhf.ppo.losses import entropy, explained_variance, gae, policy_loss, value_loss


def test_gae_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])  # 9.0 sits on padding: ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45; the value after the last generated token is 0.
    # row 0: t2: delta = 1 + 0 - 0.7 = 0.3                     A2 = 0.3
    #        t1: delta = 0 + 0.9*0.7 - 0.6 = 0.03              A1 = 0.03 + 0.45*0.3 = 0.165
    #        t0: delta = 0 + 0.9*0.6 - 0.5 = 0.04              A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1: t2 is padding                                      A2 = 0
    #        t1: delta = 0 + 0.9*0 - 0.4 = -0.4                A1 = -0.4
    #        t0: delta = 0.5 + 0.9*0.4 - 0.2 = 0.66            A0 = 0.66 + 0.45*(-0.4) = 0.48
    assert torch.allclose(advantages, torch.tensor([[0.11425, 0.165, 0.3], [0.48, -0.4, 0.0]]))
    # returns = A + V on generated tokens: [0.61425, 0.765, 1.0], [0.68, 0.0, 0]
    assert torch.allclose(returns, torch.tensor([[0.61425, 0.765, 1.0], [0.68, 0.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.1, -0.2, 2.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward-to-go [1.9, 1.8, 2.0] minus the values
    assert torch.allclose(advantages, torch.tensor([[1.4, 1.2, 1.3]]))
    assert torch.allclose(returns, torch.tensor([[1.9, 1.8, 2.0]]))


def test_policy_loss_hand_worked():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    old = torch.full_like(ratio, -2.0)
    out = policy_loss(old + ratio.log(), old, advantages, clip=0.2)
    # max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)    r 1.5, A -1: max(1.5, 1.2) = 1.5
    #   r 0.5, A +1: max(-0.5, -0.8) = -0.5              r 0.5, A -1: max(0.5, 0.8) = 0.8 (clipped)
    #   r 1.0, A +2: -2
    assert torch.allclose(out.loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8, -2.0]]))
    assert out.clipped.tolist() == [[True, False, False, True, False]]
    # approx KL(old || new) per token = (r - 1) - log r: r = 1.5 -> 0.5 - log 1.5
    assert out.approx_kl[0, 0].item() == pytest.approx(0.5 - math.log(1.5), abs=1e-6)
    assert out.approx_kl[0, 4].item() == 0.0


def test_policy_loss_gradient_vanishes_when_clipped():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.5)]], requires_grad=True)
    out = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), clip=0.2)
    out.loss.sum().backward()
    # token 0 is clipped (no gradient); token 1: d(-A * exp(logp))/dlogp = 1 * 1.5
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 1.5])


def test_value_loss_hand_worked():
    old = torch.tensor([1.0, 1.0, 1.0])
    returns = torch.tensor([2.0, 2.0, 2.0])
    values = torch.tensor([1.5, 1.1, 0.0])
    out = value_loss(values, old, returns, clip=0.2)
    # v 1.5 -> clipped 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64 -> 0.32 (clipped term taken)
    # v 1.1 -> inside the clip range: 0.81 -> 0.405
    # v 0.0 -> clipped 0.8: max(4, 1.44) = 4 -> 2.0
    assert torch.allclose(out.loss, torch.tensor([0.32, 0.405, 2.0]))
    assert out.clipped.tolist() == [True, False, False]


def test_explained_variance_hand_worked():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == 0.0
    # residual [0, 0, 0, -1]: var = 0.25 - 0.0625 = 0.1875; var(returns) = 1.25 -> 1 - 0.15
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # softmax [0.25, 0.75], [0.5, 0.5]
    assert token_logprobs(logits, torch.tensor([[1, 0]]))[0].tolist() == pytest.approx(
        [math.log(0.75), math.log(0.5)])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(logits)[0].tolist() == pytest.approx([h, math.log(2)])


def test_entropy_matches_the_definition_and_its_gradient():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp.exp() * logp).sum(-1)
    got = entropy(logits)
    assert torch.allclose(got, expected, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)
