"""The independent judge (issue 15): gold, hook and reward-model judges with known scores; the
over-optimisation curves and warning; PPO's health metrics and plots; the length bias of reward
models. Stages run on a ``tiny.stage_world`` (a random 2-layer Llama policy with a byte-level BPE
tokenizer, reward models with random heads, 8 prompts)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import JudgeConfig, RecipeError, validate
from rlhf.data import Message, Prompt, PreferencePair
from tiny import PROMPT_CORPUS, bpe_tokenizer, ppo_config, read_jsonl, stage_dir, stage_world, tiny_llama

HOOK = '''
def length(prompts, responses):
    return [float(len(r)) for r in responses]

def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``tiny.stage_world`` with reward models ``rm_h``, ``rm_s`` and ``rm_judge``, and
    ``judge_hook.py`` (``length``: the judge score is the response's length in characters)."""
    tokenizer = bpe_tokenizer(PROMPT_CORPUS)
    root = stage_world(tmp_path_factory.mktemp("judge_world"), tokenizer, tiny_llama(len(tokenizer), max_positions=256),
                       {"rm_h": 1, "rm_s": 2, "rm_judge": 3}, prompt_ids=True)
    (root / "judge_hook.py").write_text(HOOK)
    return root


def _prompt(task: str, answer: str | None = None) -> Prompt:
    meta = {"task": task, **({"answer": answer} if answer is not None else {})}
    return Prompt([Message("user", "q")], is_safety=task == "harmful", meta=meta)


# ---------------------------------------------------------------------------------------------
# 1. The judges


def test_judge_config_takes_one_judge_and_never_a_proxy(world):
    from rlhf.ppo.config import PPOConfig

    with pytest.raises(RecipeError, match="at most one of gold, reward_model_from, hook"):
        validate(JudgeConfig, {"gold": True, "hook": "m:f"}, "test")
    base = {"stage": "ppo", "policy_from": str(world / "sft"), "helpfulness_rm_from": str(world / "rm_h"),
            "safety_rm_from": str(world / "rm_s"), "data": {"sources": [{"path": "p.jsonl"}]}}
    with pytest.raises(RecipeError, match="judge.reward_model_from: .* a reward model this stage optimises"):
        validate(PPOConfig, {**base, "judge": {"reward_model_from": str(world / "rm_h")}}, "test")
    with pytest.raises(RecipeError, match="early_stop.metric: judge needs a judge"):
        validate(PPOConfig, {**base, "early_stop": {"metric": "judge"}}, "test")
    cfg = validate(PPOConfig, {**base, "judge": {"reward_model_from": str(world / "rm_judge")}}, "test")
    assert "judge.reward_model_from" in cfg.input_paths()


def test_gold_judge_scores_the_world_utility():
    from reward_model.model import load_judge

    judge = load_judge(JudgeConfig(gold=True))
    prompts = [_prompt("add", "12"), _prompt("add", "12"), _prompt("add", "12"), _prompt("harmful"), _prompt("harmful")]
    # correct 1.0, off by one 0.5, a refusal of a benign request 0.0; harmful: refusal 1, compliance 0
    responses = ["12", "13", "Sorry, I can't help with that.", "I can't help with that.", "Sure: ..."]
    assert judge(prompts, responses) == [1.0, 0.5, 0.0, 1.0, 0.0]
    with pytest.raises(RecipeError, match="judge.gold: these prompts carry no gold judge meta"):
        judge([Prompt([Message("user", "q")])], ["a"])


def test_hook_judge_returns_its_scores_and_is_checked(world):
    from reward_model.model import load_judge

    judge = load_judge(JudgeConfig(hook=f"{world / 'judge_hook.py'}:length"))
    assert judge([_prompt("add", "1")] * 2, ["abc", ""]) == [3.0, 0.0]
    bad = load_judge(JudgeConfig(hook=f"{world / 'judge_hook.py'}:one_short"))
    with pytest.raises(RecipeError, match="one finite number per response"):
        bad([_prompt("add", "1")] * 2, ["a", "b"])


def test_reward_model_judge_is_its_sigmoid(world):
    from reward_model.model import load_judge, load_reward_model

    prompts, responses = [Prompt([Message("user", "hi")]), Prompt([Message("user", "yo")])], ["hello", "no"]
    expected = load_reward_model(world / "rm_judge").probabilities([p.messages for p in prompts], responses)
    assert load_judge(JudgeConfig(reward_model_from=world / "rm_judge"))(prompts, responses) == pytest.approx(expected.tolist())


def test_evaluate_reports_the_judge_beside_the_rewards():
    from rlhf.evaluate.stage import _compare, _scores

    class RM:
        def probabilities(self, messages, texts, finished=None):
            return torch.tensor([0.5] * len(texts))

    prompts, rms = [Prompt([Message("user", "a")]), Prompt([Message("user", "b")])], {"helpfulness": RM(), "safety": RM()}
    judge = lambda prompts, texts: [float(len(t)) for t in texts]  # noqa: E731
    mine = _scores(prompts, {"texts": ["xx", "y"], "finished": [True, True]}, rms, 0.15, judge)
    other = _scores(prompts, {"texts": ["x", "y"], "finished": [True, True]}, rms, 0.15, judge)
    assert mine["judge"].tolist() == [2.0, 1.0]
    assert _compare(mine, other)["judge"] == 0.75  # a win and a tie


# ---------------------------------------------------------------------------------------------
# 2. Over-optimisation: RS's judge of the chosen sample vs k; PPO's warning and early stop


def test_judge_of_the_chosen_sample_vs_k():
    from rlhf.rejection_sampling.report import average_curves, chosen_judge_curve

    # k = 2: subsets {0,1} {0,2} {1,2} choose samples 1, 2, 1 (the highest reward): (.5 + .9 + .5) / 3
    assert chosen_judge_curve([1, 3, 2], [0.1, 0.5, 0.9]) == pytest.approx([0.5, 1.9 / 3, 0.5])
    assert chosen_judge_curve([2, 2], [0.0, 1.0]) == pytest.approx([0.5, 0.0])  # ties: the first, as best_of
    curves = average_curves({"a": [1, 3, 2]}, ["a"], {"a": [0.1, 0.5, 0.9]})
    assert curves["judge_of_chosen"] == pytest.approx([0.5, 1.9 / 3, 0.5]) and curves["judge_mean"] == pytest.approx(0.5)
    assert curves["judge_best"] == pytest.approx(0.9)
    # the judge orders all 3 pairs; R_c agrees on (0,1) and (0,2) but puts 1 above 2: 2 of 3
    assert curves["judge_agreement"] == pytest.approx(2 / 3)


def test_reward_judge_agreement_counts_only_the_pairs_the_judge_orders():
    from rlhf.rejection_sampling.report import average_curves, judge_agreement

    assert judge_agreement([1, 3, 2], [0.1, 0.5, 0.5]) == (2, 2)  # (1, 2): a judge tie, not counted
    assert judge_agreement([1, 1], [0.0, 1.0]) == (0.5, 1)  # a reward tie: half
    assert judge_agreement([2, 1], [0.0, 1.0]) == (0, 1)
    # pooled over prompts (pairs, not prompts, weigh); a prompt the judge cannot order adds nothing
    curves = average_curves({"a": [1, 3, 2], "b": [2, 1], "c": [5, 4]}, ["a", "b", "c"],
                            {"a": [0.1, 0.5, 0.5], "b": [0.0, 1.0], "c": [0.7, 0.7]})
    assert curves["judge_agreement"] == pytest.approx(2 / 3)
    assert average_curves({"c": [5, 4]}, ["c"], {"c": [0.7, 0.7]})["judge_agreement"] is None


def test_diverging_fires_on_proxy_up_judge_down_only():
    from rlhf.judge import diverging

    proxy, judge = [0.5, 0.6, 0.7, 0.8], [0.8, 0.7, 0.6, 0.5]
    assert diverging(proxy, judge, 3) and diverging(proxy, judge, 2)
    assert not diverging(proxy[:3], judge[:3], 3)  # only 2 changes
    assert not diverging(proxy, [0.8, 0.7, 0.75, 0.5], 3)  # the judge rose once
    assert not diverging(proxy, proxy, 2)  # both rise: fine
    assert not diverging([0.5, 0.6, 0.6, 0.8], judge, 3)  # the proxy stalled once


def test_ppo_warns_once_the_trend_holds_for_n_evaluations():
    from rlhf.ppo.config import EarlyStopConfig
    from rlhf.ppo.stage import EarlyStop, note_trend

    printed = []
    accelerator = SimpleNamespace(print=printed.append)
    cfg = SimpleNamespace(early_stop=EarlyStopConfig(warn_diverging=2))
    early, flags = EarlyStop(), []
    for done, (proxy, judge) in enumerate([(0.5, 0.8), (0.6, 0.7), (0.7, 0.6), (0.8, 0.7)]):
        metrics = {}
        note_trend(accelerator, early, metrics, proxy, judge, done, cfg)
        flags.append(metrics.get("judge_diverging", False))
    assert flags == [False, False, True, False]
    assert len(printed) == 1 and "at iteration 2 the proxy reward has risen while the judge's score fell" in printed[0]


def test_rejection_sampling_reports_the_judge_of_the_chosen_sample(world, tmp_path):
    import rlhf.rejection_sampling.stage as rs
    from rlhf.rejection_sampling.config import RejectionSamplingConfig

    data = {
        "stage": "rejection_sampling", "output_dir": str(tmp_path / "rs"), "seed": 0,
        "policy_from": str(world / "sft"), "helpfulness_rm_from": str(world / "rm_h"),
        "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "max_length": 64},
        "sampling": {"k": 4, "max_new_tokens": 6, "batch_size": 12}, "pool_truncated": True,
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "save_every": 1},
        "judge": {"hook": f"{world / 'judge_hook.py'}:length"},
    }
    out = rs.run(validate(RejectionSamplingConfig, data, "test"))
    rows = read_jsonl(out / "samples.jsonl")
    assert all(row["judge"] == [float(len(r)) for r in row["responses"]] for row in rows)
    curves = json.loads((out / "report" / "summary.json").read_text())["best_of_k"]["all"]
    assert len(curves["judge_of_chosen"]) == 4
    chosen = [row["judge"][rs.best_of([s["reward"] for s in row["scores"]])] for row in rows]
    assert curves["judge_of_chosen"][-1] == pytest.approx(sum(chosen) / len(chosen))  # k = K: the best of all K
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["judge_best_mean"] == pytest.approx(curves["judge_of_chosen"][-1])
    assert metrics["judge_sample_mean"] == pytest.approx(curves["judge_mean"])


def _ppo_cfg(world: Path, out: Path, **overrides):
    return ppo_config(world, out, **overrides)


def test_ppo_logs_judge_and_health_and_early_stops_on_the_judge(world, tmp_path):
    from rlhf.ppo.stage import run

    held_out = {"sources": [{"path": str(world / "prompts.jsonl")}]}
    out = run(_ppo_cfg(world, tmp_path / "ppo", **{"judge": {"reward_model_from": str(world / "rm_judge")},
                                                    "early_stop": {"data": held_out, "every": 1, "metric": "judge"}}))
    rows = read_jsonl(out / "metrics.jsonl")
    assert set(rows[0]) == {"step", "eval_reward", "eval_judge"}
    for row in rows[1:]:  # the judge beside the proxy per iteration, and PPO's health
        assert {"judge", "reward_c", "kl", "eval_judge", "entropy", "clip_fraction", "explained_variance",
                "response_length", "truncation_rate", "safety_scored", "advantage_mean", "advantage_std"} <= set(row)
        assert 0 <= row["judge"] <= 1 and row["advantage_std"] >= 0
    manifest = json.loads((out / "manifest.json").read_text())
    judged = [r["eval_judge"] for r in rows]
    assert manifest["early_stop_metric"] == "judge" and manifest["best_eval_reward"] == max(judged)
    assert judged[manifest["best_iteration"]] == max(judged)


# ---------------------------------------------------------------------------------------------
# 4. PPO health and over-optimisation in the report


def test_report_plots_ppo_health_and_shows_the_warning(tmp_path):
    import yaml

    from rlhf.report import write_report

    root = tmp_path / "run"
    (root).mkdir()
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"stages": [{"name": "ppo", "stage": "ppo"}]}))
    ppo = stage_dir(root / "ppo", "ppo")
    rows = [{"step": 0, "eval_reward": 0.5, "eval_judge": 0.8}]
    rows += [{"step": i, "kl": 0.1 * i, "reward_c": 0.5 + 0.1 * i, "judge": 0.8 - 0.1 * i, "entropy": 2.0,
              "clip_fraction": 0.1, "explained_variance": 0.2, "response_length": 5.0, "truncation_rate": 0.1,
              "safety_scored": 0.5, "advantage_mean": 0.0, "advantage_std": 1.0, **({"judge_diverging": True} if i == 3 else {})}
             for i in (1, 2, 3)]
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_report(root)
    assert (out / "run_ppo_health.png").is_file() and (out / "run_ppo_overoptimization.png").is_file()
    readme = (out / "README.md").read_text()
    assert "**Warning (ppo)**" in readme and "at iterations 3" in readme
    summary = json.loads((out / "summary.json").read_text())["rounds"][0]["ppo"]["ppo"]
    assert summary["diverging_at"] == [3] and summary["iterations"][2]["advantage_std"] == 1.0


# ---------------------------------------------------------------------------------------------
# 3. Length bias


def test_length_bias_on_hand_made_pairs():
    from reward_model.evaluate import evaluate_rewards, length_bias, pearson

    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # cov 1/3, variances 2/3 and 2/3
    assert pearson([1, 1], [1, 2]) is None
    # rewards (chosen 3, 2; rejected 1, 0) vs lengths (3, 1; 2, 0): longer chosen in pair 0, not in 1
    bias = length_bias([3.0, 2.0], [1.0, 0.0], [3, 1], [2, 1])
    assert bias["longer_wins"] == 0.75  # a win and a tie
    assert bias["reward_length_correlation"] == pytest.approx(pearson([3, 2, 1, 0], [3, 1, 2, 1]))
    pairs = [PreferencePair([Message("user", "q")], "a b c", "a b"), PreferencePair([Message("user", "q")], "a", "a b")]
    result = evaluate_rewards(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), pairs, 0.15, 2)
    assert result["length_bias"]["longer_wins"] == 0.5  # lengths in words: 3 vs 2, 1 vs 2


def test_pooled_length_bias_weighs_test_sets_by_pairs():
    from reward_model.evaluate import pooled

    def result(pairs, correlation, longer):
        return {"accuracy": 1.0, "pairs": pairs, "per_rating": {},
                "length_bias": {"reward_length_correlation": correlation, "longer_wins": longer}}

    # (3 * 0.2 + 1 * 0.6) / 4 = 0.3; (3 * 1.0 + 1 * 0.0) / 4 = 0.75; a set without a correlation is left out
    summary = pooled({"a": result(3, 0.2, 1.0), "b": result(1, 0.6, 0.0), "c": result(2, None, None)})
    assert summary["length_bias"] == pytest.approx({"reward_length_correlation": 0.3, "longer_wins": 0.75})


def test_report_shows_length_bias_and_response_length_beside_win_rates(tmp_path):
    import yaml

    from rlhf.report import markdown, round_summary

    root = tmp_path / "run"
    root.mkdir()
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"stages": [{"name": "rm", "stage": "reward_model"},
                                                                   {"name": "eval", "stage": "evaluate"}]}))
    (stage_dir(root / "rm", "reward_model") / "eval").mkdir()
    (root / "rm" / "eval" / "summary.json").write_text(json.dumps(
        {"accuracy": 0.7, "pairs": 10, "per_rating": {}, "length_bias": {"reward_length_correlation": 0.25, "longer_wins": 0.6}}))
    (stage_dir(root / "eval", "evaluate") / "eval").mkdir()
    (root / "eval" / "eval" / "summary.json").write_text(json.dumps(
        {"baseline": "sft", "policies": {"ppo": {"win_rate_vs_baseline": 0.55, "response_length": 7.5, "judge_score": 0.4}}}))
    text = markdown({"run": "r", "rounds": [round_summary("r", root, [])]}, [])
    assert "| rm | 0.700 | – | – | – | – | 0.250 | 0.600 |" in text
    header = next(line for line in text.splitlines() if line.startswith("| policy"))
    assert "win vs previous | response length" in header and "| judge |" in header
    assert "| ppo | – | – | – | 0.550 | – | 7.500 | – | 0.400 | – |" in text
