"""The quickstart pipeline end to end, reduced to a few steps and prompts so it fits the test
budget: every stage trains for real, and the report's files and keys exist."""

import json
from itertools import islice
from pathlib import Path

import pytest

from rlhf.artifacts import read_manifest
from rlhf.pipeline import run_recipe
from rlhf.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"


def _head(src: Path, dst: Path, n: int, stride: int = 1) -> Path:
    """Every ``stride``-th of the first ``n * stride`` rows (mixing helpful and safety prompts)."""
    with open(src) as fh:
        dst.write_text("".join(islice(fh, 0, n * stride, stride)))
    return dst


@pytest.mark.slow
def test_reduced_quickstart_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name data/quickstart/... relative to the repository
    prompts = _head(QUICKSTART / "prompts.jsonl", tmp_path / "prompts.jsonl", 8, stride=7)
    eval_prompts = _head(QUICKSTART / "eval_prompts.jsonl", tmp_path / "eval.jsonl", 12, stride=19)
    small = [f"{{path: {prompts}}}"]
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "sft.train.max_steps=3",
        "rm_helpfulness.train.max_steps=2", "rm_safety.train.max_steps=2",
        f"rejection_sampling.data.sources=[{small[0]}]", "rejection_sampling.sampling.k=2",
        "rejection_sampling.sampling.max_new_tokens=8", "rejection_sampling.report.temperatures=[]",
        "rejection_sampling.train.batch_size=1", "rejection_sampling.train.micro_batch_size=1",
        "rejection_sampling.train.epochs=1",
        *[f"{name}.{key}" for name in ("preferences_sft", "preferences") for key in (
            f"data.sources=[{small[0]}]", "sampling.k=3", "sampling.max_new_tokens=8")],
        "rm_helpfulness_2.train.max_steps=2",
        *[f"rejection_sampling_2.{key}" for key in (
            f"data.sources=[{small[0]}]", "sampling.k=2", "sampling.max_new_tokens=8", "report.temperatures=[]",
            "train.batch_size=1", "train.micro_batch_size=1", "train.epochs=1")],
        f"ppo.data.sources=[{small[0]}]", "ppo.ppo.iterations=1", "ppo.ppo.prompts_per_iteration=4",
        "ppo.sampling.max_new_tokens=8", "ppo.train.batch_size=4", "ppo.train.micro_batch_size=4",
        f"ppo.early_stop.data.sources=[{{path: {eval_prompts}}}]", "ppo.early_stop.max_prompts=4",
        f"evaluate.prompts.sources=[{{path: {eval_prompts}}}]", "evaluate.sampling.max_new_tokens=8",
    ]
    out = run_recipe(load_recipe(REPO / "recipes" / "quickstart.yaml", overrides))

    for stage in ("base_model", "sft", "rm_helpfulness", "rm_safety", "rejection_sampling", "preferences_sft",
                  "preferences", "rm_helpfulness_2", "rejection_sampling_2", "ppo", "evaluate"):
        assert read_manifest(out / stage)["status"] == "complete", stage
    on_policy = read_manifest(out / "rm_helpfulness_2")["data"]["sources"]
    assert {"sft_answers", "rs_answers"} <= set(on_policy)  # the comparisons of the policies' own answers
    report = out / "report"
    assert {"README.md", "summary.json", "rm_accuracy.png", "gold.png"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    (rnd,) = summary["rounds"]
    assert set(rnd["reward_models"]) == {"rm_helpfulness", "rm_safety", "rm_helpfulness_2"}
    assert 0 <= rnd["reward_models"]["rm_safety"]["accuracy"] <= 1
    assert list(rnd["policies"]) == ["sft", "rejection_sampling", "rejection_sampling_2", "ppo"]
    ppo = rnd["policies"]["ppo"]
    for key in ("helpfulness_reward", "safety_reward", "combined_reward", "win_rate_vs_baseline",
                "win_rate_vs_previous", "kl_from_baseline", "gold"):
        assert ppo[key] is not None, key
    assert {"helpfulness", "safety", "false_refusal"} <= set(ppo["gold"])
    assert ppo["gold_sampled"]["n"]["helpful"] == 4 * ppo["gold"]["n"]["helpful"]  # 4 answers a prompt
    assert rnd["policies"]["sft"]["kl_from_baseline"] == 0.0  # the baseline against itself
    assert "| ppo |" in (report / "README.md").read_text()
