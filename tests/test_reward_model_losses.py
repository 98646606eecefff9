import pytest
import torch
from pydantic import ValidationError

from reward_model.config import RewardModelConfig
from reward_model.losses import margin_ranking_loss, margin_table, pair_margin

RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def _loss(chosen, rejected, margins):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return margin_ranking_loss(t(chosen), t(rejected), t(margins)).tolist()


def _margins(spec):
    table = margin_table(spec)
    return [pair_margin(r, None, table) for r in RATINGS]


def test_rating_to_margin_tables():
    assert _margins("none") == [0, 0, 0, 0]
    assert _margins("small") == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert _margins("large") == [3, 2, 1, 0]
    custom = {"significantly_better": 2, "better": 1.5, "slightly_better": 0.5, "unsure": 0.25}
    assert _margins(custom) == [2, 1.5, 0.5, 0.25]  # "unsure" is negligibly better
    table = margin_table("large")
    assert pair_margin("unsure", None, table) == 0
    assert pair_margin(None, None, table) == 0  # unrated pairs (e.g. HH-RLHF): no margin
    assert pair_margin("better", 0.7, table) == 0.7  # a numeric margin column wins
    assert pair_margin("better", 0.7, table, use_column=False) == 2


# loss = -log sigmoid(x) = log(1 + exp(-x)),  x = r_chosen - r_rejected - m
def test_loss_no_margin():
    # x = 2 - 0 - 0 = 2: log(1 + e^-2) = log(1.135335) = 0.126928
    # x = 0 - 1 - 0 = -1: log(1 + e^1) = log(3.718282) = 1.313262
    assert _loss([2, 0], [0, 1], _margins("none")[:2]) == pytest.approx([0.126928, 1.313262], abs=1e-6)


def test_loss_small_margin():
    # chosen 1, rejected 0 for every rating; margins 1, 2/3, 1/3, 0
    # x = 0:   log(2)                        = 0.693147
    # x = 1/3: log(1 + e^-1/3) = log(1.716531) = 0.540306
    # x = 2/3: log(1 + e^-2/3) = log(1.513417) = 0.414370
    # x = 1:   log(1 + e^-1)   = log(1.367879) = 0.313262
    got = _loss([1] * 4, [0] * 4, _margins("small"))
    assert got == pytest.approx([0.693147, 0.540306, 0.414370, 0.313262], abs=1e-6)


def test_loss_large_margin():
    # chosen 1, rejected 0; margins 3, 2, 1, 0
    # x = -2: log(1 + e^2) = log(8.389056) = 2.126928
    # x = -1: log(1 + e^1) = log(3.718282) = 1.313262
    # x =  0: log(2) = 0.693147;  x = 1: log(1 + e^-1) = 0.313262
    got = _loss([1] * 4, [0] * 4, _margins("large"))
    assert got == pytest.approx([2.126928, 1.313262, 0.693147, 0.313262], abs=1e-6)


def test_loss_custom_margin():
    # custom table sig 1.5, better 0.5, slightly 0, negligibly 0; chosen 2, rejected 1.5
    # x = 0.5 - 1.5 = -1: 1.313262;  x = 0.5 - 0.5 = 0: 0.693147;  x = 0.5: log(1 + e^-0.5) = 0.474077
    custom = {"significantly_better": 1.5, "better": 0.5, "slightly_better": 0, "negligibly_better": 0}
    got = _loss([2] * 3, [1.5] * 3, _margins(custom)[:3])
    assert got == pytest.approx([1.313262, 0.693147, 0.474077], abs=1e-6)


def test_loss_gradient_pushes_chosen_up():
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    margin_ranking_loss(chosen, rejected, torch.ones(1)).sum().backward()
    # d/dx log(1 + e^-x) = -sigmoid(-x); x = -1: -sigmoid(1) = -0.731059
    assert chosen.grad.item() == pytest.approx(-0.731059, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.731059, abs=1e-6)


def test_custom_table_must_give_every_rating():
    data = {"sources": [{"path": "pairs.jsonl"}]}
    with pytest.raises(ValidationError, match="misses slightly_better, negligibly_better"):
        RewardModelConfig(model_from="m", data=data, loss={"margin": {"significantly_better": 1, "better": 1}})
    with pytest.raises(ValidationError):
        RewardModelConfig(model_from="m", data=data, loss={"margin": "medium"})
