"""Reward-model data and evaluation: held-out split and mixtures (exact counts), margins,
collation into one packed row, per-rating / per-safety-category accuracy on hand-made sets, the
safety gate's threshold calibrated at a recall."""

import json

import pytest
import torch

from rlhf.data import Message, PreferencePair
from reward_model.config import RewardModelConfig
from reward_model.data import RMPair, build_pairs, collate, load_pairs, split_held_out
from reward_model.evaluate import (
    accuracy_by, calibrated_gate, calibration, evaluate_rewards, gate_threshold_at_recall, markdown, pooled, unsafe_recall,
)
from tiny import word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "bye", "ok", "no"]


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word; ids are the positions in WORDS."""
    return word_tokenizer(WORDS)


def write_pairs(path, n, rating="better"):
    # rows carry their own source label; mixtures and held-out sets go by the configured name
    rows = [{"prompt": f"{path.stem} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}", "rating": rating,
             "source": "row label"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": path.stem, "path": str(path)}


def config(tmp_path, mixture, eval_fraction=0.1):
    sources = [write_pairs(tmp_path / "helpful.jsonl", 20), write_pairs(tmp_path / "safety.jsonl", 30),
               write_pairs(tmp_path / "harmless.jsonl", 10)]
    data = {"sources": sources, "mixture": mixture, "eval_fraction": eval_fraction}
    return RewardModelConfig(model_from=tmp_path, data=data)


def test_helpfulness_mixture_counts_are_exact(tmp_path):
    # held out first: round(0.1 * 20) = 2, round(0.1 * 30) = 3, round(0.1 * 10) = 1
    # main = all 18 helpful left; rest = as many (18) of the 27 + 9 = 36 others
    mixture = [{"name": "main", "sources": ["helpful"]},
               {"name": "rest", "sources": ["safety", "harmless"], "equal_to": "main"}]
    data, held_out = load_pairs(config(tmp_path, mixture).data, seed=0)
    assert data.parts == {"main": 18, "rest": 18}
    assert {k: len(v) for k, v in held_out.items()} == {"held_out.helpful": 2, "held_out.safety": 3, "held_out.harmless": 1}
    s = data.sources
    assert s["helpful"] == {"rows": 20, "skipped": 0, "used": 18, "held_out": 2}
    assert s["safety"]["used"] + s["harmless"]["used"] == 18 and len(data.records) == 36
    held = {id(r) for rows in held_out.values() for r in rows}
    assert not held & {id(r) for r in data.records}  # no held-out pair is trained on


def test_safety_mixture_90_10_counts_are_exact(tmp_path):
    # after holding out: safety + harmless = 27 + 9 = 36 pairs, helpful 18;
    # total = min(36 / 0.9, 18 / 0.1) = 40 -> 36 safety-side pairs (all) and 4 helpful ones
    mixture = [{"name": "safety", "sources": ["safety", "harmless"], "share": 0.9},
               {"name": "helpful", "sources": ["helpful"], "share": 0.1}]
    data, _ = load_pairs(config(tmp_path, mixture).data, seed=0)
    assert data.parts == {"safety": 36, "helpful": 4}
    assert {n: c["used"] for n, c in data.sources.items()} == {"helpful": 4, "safety": 27, "harmless": 9}


def test_held_out_split_is_per_source_and_seeded():
    pools = {s: [PreferencePair([Message("user", f"{s} q{i}")], f"a{i}", f"b{i}") for i in range(10)] for s in "xy"}
    train, held = split_held_out(pools, 0.3, seed=1)
    assert {k: len(v) for k, v in train.items()} == {"x": 7, "y": 7}
    assert {k: len(v) for k, v in held.items()} == {"x": 3, "y": 3}
    assert split_held_out(pools, 0.3, seed=1)[1] == held != split_held_out(pools, 0.3, seed=2)[1]


def test_build_pairs_margins_truncation_and_counts(tokenizer, tmp_path):
    cfg = RewardModelConfig(model_from=tmp_path, data={"sources": [{"path": "x.jsonl"}], "max_length": 8},
                            loss={"margin": "large"})
    q = [Message("user", "hi")]
    records = [PreferencePair(q, "hello", "bye", rating="significantly_better"),
               PreferencePair(q, "ok", "no", rating="better", margin=0.5),
               PreferencePair(q, "hello hello hello hello", "no", rating=None)]
    items, counts = build_pairs(records, tokenizer, cfg.data, cfg.loss)
    # <s> [INST] hi [/INST] hello </s>
    assert items[0].chosen_ids == [1, 3, 5, 4, 6, 2] and items[0].rejected_ids == [1, 3, 5, 4, 7, 2]
    assert [i.margin for i in items] == [3.0, 0.5, 0.0]  # table, margin column, unrated
    # <s> [INST] hi [/INST] hello x4 </s> = 9 tokens, cut to the last 8 (the reward is read at </s>)
    assert items[2].chosen_ids == [3, 5, 4, 6, 6, 6, 6, 2] and items[2].rejected_ids == [1, 3, 5, 4, 9, 2]
    assert counts["truncated"] == 1 and counts["margin_from_column"] == 1
    assert counts["ratings"] == {"significantly_better": 1, "better": 1, "unrated": 1}
    dropped = cfg.data.model_copy(update={"overlong": "drop"})
    assert build_pairs(records, tokenizer, dropped, cfg.loss)[1]["dropped_overlong"] == 1


def test_collate_packs_chosen_and_rejected_into_rows_of_the_longest():
    batch = collate([RMPair([5, 6, 7], [5, 8], 1.0), RMPair([9], [4, 4], 0.0)])
    # lengths 3, 2, 1, 2, rows 3 wide: 3 alone; 2 + 1 (rejected_1, chosen_2); 2 + padding
    assert batch.input_ids.tolist() == [[5, 6, 7], [5, 8, 9], [4, 4, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]
    # (row, index) of chosen_1, rejected_1, chosen_2, rejected_2
    assert batch.ends.tolist() == [[0, 2], [1, 1], [1, 2], [2, 1]]
    assert batch.margins.tolist() == [1.0, 0.0]


def test_per_rating_accuracy_on_a_hand_made_set():
    ratings = ["significantly_better"] * 4 + ["better"] * 2 + ["negligibly_better"] * 3 + [None]
    chosen = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    # sig: 3>0, 2>0, 1>0, 0<1 -> 3/4; better: 1<2, 1>0 -> 1/2; negligibly: 0<1, 0=0 (a tie is
    # wrong), 1>0 -> 1/3; unlabelled: 2>1 -> 1/1; overall 6/10
    table = accuracy_by(chosen, rejected, ratings, ["significantly_better", "better", "slightly_better", "negligibly_better"])
    assert list(table) == ["significantly_better", "better", "negligibly_better", "unlabelled"]
    assert [table[k]["accuracy"] for k in table] == [0.75, 0.5, pytest.approx(1 / 3), 1.0]
    assert [table[k]["pairs"] for k in table] == [4, 2, 3, 1]
    pairs = [PreferencePair([Message("user", "q")], "a", "b", rating=r) for r in ratings]
    assert evaluate_rewards(chosen, rejected, pairs, 0.15, 4)["accuracy"] == pytest.approx(0.6)


def test_safety_categories_and_unsafe_recall():
    labels = [(True, False), (True, False), (True, True), (False, False)]
    pairs = [PreferencePair([Message("user", "q")], "a", "b", chosen_safe=c, rejected_safe=r) for c, r in labels]
    chosen = torch.tensor([1.0, -1.0, 0.0, -3.0])
    rejected = torch.tensor([-3.0, 0.0, -1.0, -2.0])
    result = evaluate_rewards(chosen, rejected, pairs, threshold=0.15, bins=4)
    cats = result["per_safety_category"]
    assert cats == {"safe_vs_unsafe": {"accuracy": 0.5, "pairs": 2}, "both_safe": {"accuracy": 1.0, "pairs": 1},
                    "both_unsafe": {"accuracy": 0.0, "pairs": 1}}
    # sigmoid(r) < 0.15 <=> r < logit(0.15) = -1.7346: flagged r = -3 (pair 1 rejected, unsafe),
    # -3 (pair 4 chosen, unsafe), -2 (pair 4 rejected, unsafe); unsafe responses: 4 (the rejected
    # of pairs 1, 2 and both of pair 4) -> recall 3/4, precision 3/3
    u = result["unsafe_recall"]
    assert (u["unsafe"], u["flagged"], u["recall"], u["precision"]) == (4, 3, 0.75, 1.0)
    # safe responses: the chosen of pairs 1-3 (r = 1, -1, 0) and the rejected of pair 3 (-1): none flagged
    assert (u["safe"], u["safe_flagged"]) == (4, 0.0)
    assert unsafe_recall(torch.tensor([0.0]), torch.tensor([True]), 0.6)["recall"] == 1.0  # sigmoid(0) = 0.5 < 0.6


def test_calibration_counts_both_orders():
    # r_c - r_r = 0 -> p = 0.5 both ways: observed (1 + 0) / 2 = 0.5, perfectly calibrated;
    # r_c - r_r = ln 3 -> p = 0.75 (observed 1) and 0.25 (observed 0): error 0.25 on both
    cal = calibration(torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]), torch.zeros(2), bins=4)
    assert [(b["bin"], b["count"]) for b in cal["bins"]] == [([0.0, 0.25], 1), ([0.5, 0.75], 2), ([0.75, 1.0], 1)]
    assert [b["observed"] for b in cal["bins"]] == [0.0, 0.5, 1.0]
    assert cal["ece"] == pytest.approx(2 / 4 * 0.25)  # 2 of 4 points off by 0.25


def test_pooled_summary_over_test_sets():
    results = {"a": {"accuracy": 0.75, "pairs": 4, "per_rating": {"better": {"accuracy": 0.75, "pairs": 4}}},
               "b": {"accuracy": 0.5, "pairs": 2, "per_rating": {"better": {"accuracy": 0.0, "pairs": 1},
                                                               "unlabelled": {"accuracy": 1.0, "pairs": 1}}}}
    # all: (3 + 1) / 6; better: (3 + 0) / 5; unlabelled: 1 / 1
    assert pooled(results) == {
        "accuracy": pytest.approx(4 / 6), "pairs": 6, "test_sets": {"a": 0.75, "b": 0.5},
        "per_rating": {"better": {"accuracy": 0.6, "pairs": 5}, "unlabelled": {"accuracy": 1.0, "pairs": 1}}}


def test_report_shows_only_ratings_present_and_no_recall_without_unsafe_responses():
    pairs = [PreferencePair([Message("user", "q")], "a", "b", rating="better", chosen_safe=True, rejected_safe=True)]
    result = evaluate_rewards(torch.tensor([1.0]), torch.tensor([-3.0]), pairs, threshold=0.15, bins=4)
    # two safe responses, r = 1 (sigmoid 0.73) and r = -3 (sigmoid 0.047 < 0.15, flagged)
    assert result["unsafe_recall"] == {"threshold": 0.15, "unsafe": 0, "flagged": 1, "recall": None, "precision": 0.0,
                                       "safe": 2, "safe_flagged": 0.5}
    text = markdown({"test": result})
    assert "| test set | better | avg |" in text and "| test | 100.0 (1) | 100.0 (1) |" in text
    assert "recall -, precision 0.000 (1 flagged, 0 unsafe)" in text


def _logits(probabilities: list[float]) -> torch.Tensor:
    """Reward logits whose sigmoid is ``probabilities``."""
    return torch.logit(torch.tensor(probabilities, dtype=torch.float64))


def test_gate_threshold_at_recall_hand_worked():
    # unsafe responses score 0.1, 0.2, 0.4, 0.8 (sigmoid), the safe ones 0.3 and 0.9
    rewards, unsafe = _logits([0.4, 0.3, 0.1, 0.9, 0.8, 0.2]), [True, False, True, False, True, True]
    # recall 0.5: k = 2 of 4, halfway between u_2 = 0.2 and the next unsafe score 0.4
    assert gate_threshold_at_recall(rewards, unsafe, 0.5) == pytest.approx(0.3)
    # recall 0.55: k = ceil(2.2) = 3, between 0.4 and 0.8
    assert gate_threshold_at_recall(rewards, unsafe, 0.55) == pytest.approx(0.6)
    assert unsafe_recall(rewards, torch.tensor(unsafe), 0.6)["recall"] == 0.75  # at least the share asked for
    # recall 0.1: k = ceil(0.4) = 1, between 0.1 and 0.2
    assert gate_threshold_at_recall(rewards, unsafe, 0.1) == pytest.approx(0.15)
    # recall 1: k = 4, no unsafe score above 0.8: halfway to the next score of any response, safe 0.9
    assert gate_threshold_at_recall(rewards, unsafe, 1.0) == pytest.approx(0.85)
    # ties: unsafe 0.1, 0.2, 0.2, 0.8 at recall 0.5: k = 2, the next HIGHER unsafe score is 0.8 (flags 3 of 4)
    assert gate_threshold_at_recall(_logits([0.1, 0.2, 0.2, 0.8]), [True] * 4, 0.5) == pytest.approx(0.5)
    # nothing above the k-th unsafe score: halfway to 1
    assert gate_threshold_at_recall(_logits([0.5, 0.3]), [True, False], 0.55) == pytest.approx(0.75)
    # 20 unsafe scores 0.01 .. 0.20 at recall 0.55: 0.55 * 20 is 11.000000000000002 in floats, k = 11 not 12
    assert gate_threshold_at_recall(_logits([(i + 1) / 100 for i in range(20)]), [True] * 20, 0.55) == pytest.approx(0.115)
    assert gate_threshold_at_recall([0.0, 1.0], [False, False], 0.55) is None  # lists too; no unsafe response
    assert gate_threshold_at_recall([0.0], [True], 0.55) == pytest.approx(0.75)  # sigmoid(0) = 0.5


def test_calibrated_gate_pools_the_test_sets_and_reports_each():
    labelled = {"safety": (_logits([0.1, 0.2, 0.6]).float(), torch.tensor([True, True, False])),
                "helpful": (_logits([0.12, 0.5, 0.9]).float(), torch.tensor([False, False, False]))}
    gate = calibrated_gate(labelled, 0.5)
    # pooled unsafe 0.1, 0.2: k = 1, threshold (0.1 + 0.2) / 2 = 0.15; it flags 0.1 (unsafe) and 0.12 (safe)
    assert gate["threshold"] == pytest.approx(0.15) and gate["recall_target"] == 0.5
    assert (gate["unsafe"], gate["flagged"], gate["recall"], gate["precision"]) == (2, 2, 0.5, 0.5)
    assert gate["safe_flagged"] == pytest.approx(1 / 4)
    assert gate["test_sets"]["safety"]["safe_flagged"] == 0.0 and gate["test_sets"]["safety"]["precision"] == 1.0
    assert gate["test_sets"]["helpful"]["safe_flagged"] == pytest.approx(1 / 3)
    assert gate["test_sets"]["helpful"]["recall"] is None
    none = calibrated_gate({"helpful": labelled["helpful"]}, 0.55)
    assert none["threshold"] is None and "labelled unsafe" in none["note"] and "test_sets" not in none
    assert calibrated_gate({}, 0.55)["threshold"] is None


def test_report_shows_the_calibrated_gate_per_test_set():
    labels = [(True, False), (True, True)]
    pairs = [PreferencePair([Message("user", "q")], "a", "b", chosen_safe=c, rejected_safe=r) for c, r in labels]
    chosen, rejected = _logits([0.9, 0.12]).float(), _logits([0.1, 0.6]).float()
    result = evaluate_rewards(chosen, rejected, pairs, threshold=0.15, bins=4)
    # one unsafe response (0.1): k = 1, nothing unsafe above, the next score is 0.12: threshold 0.11
    gate = calibrated_gate({"test": (torch.cat([chosen, rejected]), torch.tensor([False, False, True, False]))}, 0.55)
    assert gate["threshold"] == pytest.approx(0.11)
    text = markdown({"test": {**result, "gate": gate["test_sets"]["test"]}}, gate)
    assert "## Safety gate" in text and "threshold (`gate_threshold: calibrated`): 0.11, where sigmoid(r) below it flags at least 55.0% of the unsafe" in text
    # at 0.11 no safe response is flagged; at 0.15 one of three (0.12)
    assert "| test | 1.000 | 1.000 | 0.0% | 33.3% |" in text and "flagged at 0.15 |" in text
    assert "No calibrated gate threshold: no held-out" in markdown({"test": result}, calibrated_gate({}, 0.55))
