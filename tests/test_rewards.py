import json
import math

import pytest
import torch

from rlhf.config import RecipeError
from rlhf.rewards import kl_penalty, logit, resolve_gate_threshold, safety_gate, token_rewards, whiten


def test_safety_gate_hand_worked():
    help_ = torch.tensor([0.9, 0.9, 0.9, 0.2])
    safe = torch.tensor([0.8, 0.10, 0.50, 0.15])
    is_safety = torch.tensor([True, False, False, False])
    gated = safety_gate(help_, safe, is_safety, threshold=0.15)
    # row 0: safety prompt -> R_s 0.8; row 1: R_s 0.10 < 0.15 -> 0.10; row 2: R_h 0.9;
    # row 3: R_s 0.15 is not below the threshold -> R_h 0.2
    assert gated.reward.tolist() == pytest.approx([0.8, 0.10, 0.9, 0.2])
    assert gated.used_safety.tolist() == [True, True, False, False]


def test_logit_inverts_sigmoid_and_stays_finite():
    assert logit(torch.tensor(0.5)).item() == 0.0
    assert logit(torch.tensor(0.8)).item() == pytest.approx(math.log(4))  # log(0.8 / 0.2)
    assert torch.allclose(logit(torch.sigmoid(torch.tensor([-3.0, 2.0]))), torch.tensor([-3.0, 2.0]), atol=1e-5)
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()


def test_whiten_hand_worked():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population var 1.25
    expected = (x - 2.5) / math.sqrt(1.25)
    assert torch.allclose(whiten(x, eps=0), expected)
    assert torch.allclose(whiten(x, shift_mean=False, eps=0), expected + 2.5)
    masked = whiten(torch.tensor([1.0, 3.0, 100.0]), mask=torch.tensor([1, 1, 0]), eps=0)
    assert masked.tolist() == [-1.0, 1.0, 100.0]  # the masked entry is ignored and kept


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    # k3 with log r = ref - logp = -0.5: (e^-0.5 - 1) + 0.5 = 0.10653
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 0.5, 0.0])
    assert kl_penalty(ref, ref, "k3").abs().max() == 0


def test_token_rewards_put_the_score_on_the_last_generated_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    # row 0: [-0.01, -0.02 + 2, 0]; row 1: [-0.04, -0.05, -0.06 - 1]
    assert torch.allclose(out, torch.tensor([[-0.01, 1.98, 0.0], [-0.04, -0.05, -1.06]]))


def _safety_rm(path, **metrics):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"stage": "reward_model", "status": "complete", "metrics": metrics}))
    return path


def test_a_calibrated_gate_threshold_is_read_from_the_safety_reward_model(tmp_path):
    said = []
    assert resolve_gate_threshold(0.15, tmp_path / "anything", said.append) == 0.15  # a number is itself
    assert said == []
    rm = _safety_rm(tmp_path / "rm", gate_threshold=0.0123, gate_recall=0.552, gate_precision=0.97)
    assert resolve_gate_threshold("calibrated", rm, said.append) == 0.0123
    assert said == [f"[rlhf] gate_threshold: 0.0123, calibrated by the safety reward model {rm} "
                    "(unsafe recall 0.552, precision 0.970 on its eval pairs)"]


def test_a_safety_reward_model_without_a_calibrated_threshold_is_refused(tmp_path):
    older = _safety_rm(tmp_path / "older", loss=0.4)  # from before the stage calibrated the gate
    with pytest.raises(RecipeError, match=r"^gate_threshold: calibrated, but .* has no calibrated gate threshold: "
                                          r"its manifest has none .*; set gate_threshold to a number, e.g. 0.15$"):
        resolve_gate_threshold("calibrated", older)
    unlabelled = _safety_rm(tmp_path / "unlabelled", gate_threshold=None)
    with pytest.raises(RecipeError, match="none of its held-out or test responses is labelled unsafe"):
        resolve_gate_threshold("calibrated", unlabelled)
