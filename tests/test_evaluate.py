import json

import pytest
import torch
import yaml

from rlhf.cli import main
from rlhf.evaluate.stage import _compare, win_rate
from tiny import stage_dir


def test_win_rate_counts_ties_half():
    a, b = torch.tensor([0.9, 0.5, 0.2, 0.7]), torch.tensor([0.1, 0.5, 0.3, 0.6])
    # wins on prompts 0 and 3, a tie on 1, a loss on 2: (2 + 0.5) / 4
    assert win_rate(a, b) == 0.625
    assert win_rate(torch.tensor([]), torch.tensor([])) is None


def test_fig11_axes_use_each_reward_model_on_its_own_prompts():
    mine = {"helpfulness": torch.tensor([0.9, 0.1, 0.8]), "safety": torch.tensor([0.2, 0.9, 0.1]),
            "combined": torch.tensor([0.9, 0.9, 0.1]), "is_safety": torch.tensor([False, True, True])}
    other = {"helpfulness": torch.tensor([0.5, 0.9, 0.9]), "safety": torch.tensor([0.9, 0.5, 0.5]),
             "combined": torch.tensor([0.5, 0.5, 0.5]), "is_safety": mine["is_safety"]}
    # helpfulness: prompt 0 only (0.9 > 0.5) -> 1.0; safety: prompts 1, 2 (0.9 > 0.5, 0.1 < 0.5) -> 0.5
    assert _compare(mine, other) == pytest.approx({"overall": 2 / 3, "helpfulness": 1.0, "safety": 0.5})


def test_truncated_answers_are_scored_as_unfinished():
    from rlhf.data import Message, Prompt
    from rlhf.evaluate.stage import _scores

    class RM:
        def probabilities(self, messages, texts, finished=None):
            self.finished = finished
            return torch.tensor([0.9 if f else 0.1 for f in finished])

    prompts = [Prompt([Message("user", "a")]), Prompt([Message("user", "b")], is_safety=True)]
    rms = {"helpfulness": RM(), "safety": RM()}
    scores = _scores(prompts, {"texts": ["x", "y"], "finished": [True, False]}, rms, 0.15)
    assert rms["helpfulness"].finished == rms["safety"].finished == [True, False]
    assert scores["combined"].tolist() == pytest.approx([0.9, 0.1])


def test_calibrated_gate_needs_a_safety_reward_model_that_has_one(tmp_path, capsys):
    for name, stage in (("sft", "sft"), ("rm_h", "reward_model"), ("rm_s", "reward_model")):
        stage_dir(tmp_path / name, stage)  # the safety RM's manifest has no gate_threshold
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    recipe = tmp_path / "evaluate.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "evaluate", "output_dir": str(tmp_path / "eval"), "policies": {"sft": str(tmp_path / "sft")},
        "helpfulness_rm_from": str(tmp_path / "rm_h"), "safety_rm_from": str(tmp_path / "rm_s"),
        "prompts": {"sources": [{"path": str(tmp_path / "prompts.jsonl")}]}, "gate_threshold": "calibrated"}))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: gate_threshold: calibrated, but the safety reward model") and "set gate_threshold to a number" in err
