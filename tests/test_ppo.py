"""The PPO stage on a ``tiny.stage_world``: a random 2-layer Llama policy with a byte-level
BPE tokenizer (``rlhf.models``), two reward models initialised from it (different random
heads), 8 prompts."""

import json
from pathlib import Path

import pytest
import torch

from launch import launch
from rlhf.recipe import load_recipe
from rlhf.ppo.config import PPOConfig
from tiny import (PROMPT_CORPUS, Crash, ppo_config, read_jsonl, save_reward_model, save_with_tokenizer, stage_dir,
                  stage_world, stored_weights)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rlhf.models import build_model, train_tokenizer

    tokenizer = train_tokenizer(PROMPT_CORPUS, vocab_size=300)
    return stage_world(tmp_path_factory.mktemp("ppo_world"), tokenizer, build_model("tiny", len(tokenizer)),
                       {"rm_h": 1, "rm_s": 2})


def _cfg(world: Path, out: Path, **overrides) -> PPOConfig:
    return ppo_config(world, out, **overrides)


def _metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_iteration_changes_policy_and_critic_and_kl_starts_at_zero(world, tmp_path):
    from rlhf.ppo.stage import run

    out = run(_cfg(world, tmp_path / "ppo"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == 0.0  # iteration 1 samples from the policy before any update: pi == pi_0
    assert rows[1]["kl"] != 0.0
    for key in ("reward_h", "reward_s", "reward_c", "safety_scored", "gate_share", "entropy", "clip_fraction",
                "approx_kl", "value_loss", "explained_variance", "response_length", "time_generation",
                "time_scoring", "time_training"):
        assert key in rows[0], key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "ppo"
    before, after = stored_weights(world / "sft" / "model"), stored_weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    critic_before, critic_after = stored_weights(world / "rm_h" / "model"), stored_weights(out / "critic")
    assert not torch.equal(critic_before["score.weight"], critic_after["score.weight"])
    assert (out / "model" / "tokenizer.json").exists() and (out / "critic" / "reward_config.json").exists()


def test_resume_equals_uninterrupted(world, tmp_path, monkeypatch):
    import rlhf.ppo.stage as train

    cfg = dict(**{"ppo.iterations": 3})
    straight = train.run(_cfg(world, tmp_path / "straight", **cfg))
    real = train.ppo_epochs

    def crash_in_third(*args):
        if args[-2] == 2:  # iteration
            raise Crash
        return real(*args)

    monkeypatch.setattr(train, "ppo_epochs", crash_in_third)
    with pytest.raises(Crash):
        train.run(_cfg(world, tmp_path / "resumed", **cfg))
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000002").is_dir()
    monkeypatch.setattr(train, "ppo_epochs", real)
    resumed = train.run(_cfg(world, tmp_path / "resumed", **cfg))
    for name in ("model", "critic"):
        a, b = stored_weights(straight / name), stored_weights(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert drop(_metrics(straight)) == drop(_metrics(resumed))


def test_kl_limit_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    from rlhf.ppo.stage import TrainingStopped, run

    out = tmp_path / "ppo"
    with pytest.raises(TrainingStopped, match=r"iteration 3: KL .* > ppo.max_kl"):
        # iteration 1: KL 0; iteration 2: small; iteration 3 is past the limit after two big steps
        run(_cfg(world, out, **{"ppo.iterations": 4, "ppo.kl_estimator": "k3", "ppo.max_kl": _kl_after_two(world, tmp_path)}))
    assert not (out / "manifest.json").exists()
    from rlhf.cli import _user_errors

    assert issubclass(TrainingStopped, _user_errors())  # the CLI prints it, exit 2, no traceback
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]


def _kl_after_two(world, tmp_path) -> float:
    """A limit between the KL of iteration 2 and that of iteration 3 of the same run."""
    from rlhf.ppo.stage import run

    rows = _metrics(run(_cfg(world, tmp_path / "probe", **{"ppo.iterations": 3, "ppo.kl_estimator": "k3"})))
    assert rows[2]["kl"] > rows[1]["kl"] > 0
    return (rows[1]["kl"] + rows[2]["kl"]) / 2


def test_early_stop_keeps_the_best_held_out_policy(world, tmp_path):
    from rlhf.ppo.stage import run

    held_out = {"sources": [{"path": str(world / "prompts.jsonl")}]}
    stop = {"early_stop": {"data": held_out, "every": 1, "patience": 1}, "ppo.iterations": 5}
    out = run(_cfg(world, tmp_path / "ppo", **stop))
    rows = _metrics(out)
    manifest = json.loads((out / "manifest.json").read_text())
    best = manifest["metrics"]["kept_iteration"]
    rewards = [r["eval_reward"] for r in rows]  # step 0: the policy before PPO
    assert rows[0] == {"step": 0, "eval_reward": rewards[0]}
    assert manifest["metrics"]["eval_reward"] == manifest["best_eval_reward"] == max(rewards) == rewards[best]
    assert manifest["best_iteration"] == best
    if len(rows) < 6:  # stopped: the last evaluation did not improve on the best
        assert rewards[-1] <= max(rewards[:-1])
    # the saved policy is the one evaluated best: a plain run of that many iterations
    plain = run(_cfg(world, tmp_path / "plain", **{"ppo.iterations": best})) / "model" if best else world / "sft" / "model"
    a, b = stored_weights(out / "model"), stored_weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


ROLLOUT_KEYS = ("reward_c", "reward_h", "kl", "entropy", "policy_loss", "response_length")


def test_a_new_best_must_beat_the_best_by_its_standard_error():
    from rlhf.ppo.stage import beats

    best = [0.5, 0.5, 0.5]
    # differences 0.1, 0, 0.2: mean 0.1, standard deviation 0.1, standard error 0.1 / sqrt(3) = 0.0577
    assert beats([0.6, 0.5, 0.7], best, 0.5, 0.0) and beats([0.6, 0.5, 0.7], best, 0.5, 1.0)
    assert not beats([0.6, 0.5, 0.7], best, 0.5, 2.0)  # 0.1 < 2 x 0.0577
    assert not beats([0.4, 0.5, 0.6], best, 0.5, 0.0)  # the same mean: no gain
    assert beats([0.1], [], -float("inf"), 2.0)  # the first evaluation is the first best
    assert beats([0.6, 0.6], [], 0.5, 2.0) and not beats([0.4, 0.6], [], 0.5, 0.0)  # no per-prompt scores: the means


def test_early_stop_with_a_margin_keeps_the_start_policy_when_no_gain_clears_it(world, tmp_path):
    from rlhf.ppo.stage import run

    held_out = {"sources": [{"path": str(world / "prompts.jsonl")}]}
    stop = {"early_stop": {"data": held_out, "every": 1, "min_improvement_se": 1e6}, "ppo.iterations": 2}
    out = run(_cfg(world, tmp_path / "ppo", **stop))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert (metrics["kept_iteration"], metrics["kept_min_se"], metrics["last_iteration"]) == (0, 1e6, 2)
    a, b = stored_weights(out / "model"), stored_weights(world / "sft" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_manifest_and_card_describe_the_kept_policy_not_the_last_iteration(world, tmp_path, monkeypatch):
    """Held-out scores forced to peak at iteration 1 of 3: the manifest's metrics, the model card
    and the report are iteration 1's; the last iteration's are kept as ``last_NAME``."""
    from rlhf.ppo import stage
    from rlhf.report import ppo_summary

    scores = iter([([0.2], [0.1]), ([0.6], [0.5]), ([0.4], [0.7]), ([0.3], [0.2])])  # (R_c, judge) at iterations 0..3
    monkeypatch.setattr(stage, "evaluate", lambda *args: next(scores))
    held_out = {"sources": [{"path": str(world / "prompts.jsonl")}]}
    out = stage.run(_cfg(world, tmp_path / "ppo", **{"early_stop": {"data": held_out, "every": 1}, "ppo.iterations": 3}))
    rows = _metrics(out)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert (metrics["kept_iteration"], metrics["kept_by"], metrics["last_iteration"]) == (1, "reward", 3)
    assert (metrics["eval_reward"], metrics["eval_judge"], metrics["last_eval_reward"], metrics["last_eval_judge"]) == (0.6, 0.5, 0.3, 0.2)
    for key in ROLLOUT_KEYS:  # the rollouts of iteration 1, logged at step 1; the last's at step 3
        assert (metrics[key], metrics[f"last_{key}"]) == (rows[1][key], rows[3][key]), key
    assert rows[1]["kl"] != rows[3]["kl"]
    card = (out / "model" / "README.md").read_text()
    assert "The policy of PPO iteration 1 of 3, its best held-out evaluation by `reward`" in card
    assert "| `kept_iteration` | 1 |" in card and "| `eval_reward` | 0.6 |" in card and "| `last_eval_reward` | 0.3 |" in card
    assert f"| `kl` | {rows[1]['kl']:.4g} |" in card
    assert ppo_summary(out)["kept"] == {"iteration": 1, "of": 3, "by": "reward", "min_se": 0.0, "eval_reward": 0.6, "eval_judge": 0.5,
                                        "last": {"eval_reward": 0.3, "eval_judge": 0.2}}


def test_final_metrics_of_the_start_policy_and_of_a_run_without_held_out_prompts():
    from rlhf.ppo.stage import EarlyStop, final_metrics

    last = {"kl": 0.3, "eval_reward": 0.4}
    start = EarlyStop(best=0.5, best_iteration=0, best_metrics={"eval_reward": 0.5})  # nothing beat the start policy
    assert final_metrics(last, 4, start, "reward") == {"kept_iteration": 0, "kept_by": "reward", "eval_reward": 0.5,
                                                       "last_iteration": 4, "last_kl": 0.3, "last_eval_reward": 0.4}
    best_last = EarlyStop(best=0.4, best_iteration=4, best_metrics={"eval_reward": 0.4})  # the last was the best
    assert final_metrics(last, 4, best_last, "judge") == {"kept_iteration": 4, "kept_by": "judge", **last, "last_iteration": 4}
    assert final_metrics({"kl": 0.3}, 2, EarlyStop(), "reward") == {"kept_iteration": 2, "kept_by": "last", "kl": 0.3,
                                                                    "last_iteration": 2}


def test_lora_policy_is_its_own_reference(world, tmp_path):
    from rlhf.ppo.stage import load_models

    cfg = _cfg(world, tmp_path / "ppo", **{"policy.lora": {"enabled": True, "r": 4}})
    models = load_models(cfg, torch.device("cpu"))
    assert models.ref is None
    base = sum(p.numel() for p in models.policy.parameters() if not p.requires_grad)
    plain = stored_weights(world / "sft" / "model")
    assert base == sum(t.numel() for t in plain.values())  # one copy of the base weights
    pointers = {p.data_ptr() for p in models.policy.parameters()}
    assert len(pointers) == len(list(models.policy.parameters()))


def test_lora_run_starts_at_zero_kl(world, tmp_path):
    from rlhf.ppo.stage import run

    out = run(_cfg(world, tmp_path / "ppo", **{"policy.lora": {"enabled": True, "r": 4, "merge": True}}))
    rows = _metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0
    assert (out / "model" / "model.safetensors").exists()  # merged: a plain HF model


@pytest.mark.parametrize("precision, lora", [("no", None), ("bf16", None), ("no", 0.1), ("bf16", 0.1)],
                         ids=["fp32", "bf16", "lora-dropout", "bf16-lora-dropout"])
def test_first_update_starts_from_kl_zero_and_ratio_one(world, tmp_path, precision, lora):
    """Iteration 1: the reference's log-probs are the policy's (KL 0). Every iteration: its first
    update sees the log-probs its rollouts were scored with (ratio 1: approx-KL 0, nothing
    clipped), in every precision and with LoRA dropout (from iteration 2 on, when the adapter is
    no longer zero). One mini-batch per iteration, so its statistics are all taken before its
    optimizer step."""
    from rlhf.ppo.stage import run

    overrides = {"train.mixed_precision": precision, "train.batch_size": 4, "train.micro_batch_size": 2}
    if lora is not None:
        overrides["policy.lora"] = {"enabled": True, "r": 4, "dropout": lora}
    rows = _metrics(run(_cfg(world, tmp_path / "ppo", **overrides)))
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0
    for row in rows:
        assert row["approx_kl"] == pytest.approx(0.0, abs=1e-7) and row["clip_fraction"] == 0.0


def test_a_critic_with_another_tokenizer_is_refused(world, tmp_path):
    from rlhf.artifacts import InputError
    from rlhf.models import build_model, train_tokenizer
    from rlhf.ppo.stage import run

    other = train_tokenizer(["something else entirely"] * 4, vocab_size=300)
    lm = save_with_tokenizer(tmp_path / "other_lm", build_model("tiny", len(other)), other)
    save_reward_model(stage_dir(tmp_path / "other_rm", "reward_model") / "model", lm, other, seed=3)
    with pytest.raises(InputError, match="critic_from: .*its tokenizer is not the policy's"):
        run(_cfg(world, tmp_path / "ppo", critic_from=str(tmp_path / "other_rm")))


def test_prompts_that_cannot_fit_the_policy_stop_ppo_before_any_iteration(world, tmp_path):
    from rlhf.artifacts import InputError
    from rlhf.ppo.stage import run

    positions = json.loads((world / "sft" / "model" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(InputError, match=f"sampling.max_new_tokens {positions} = .* exceeds the model's max_position_embeddings {positions}"):
        run(_cfg(world, tmp_path / "ppo", **{"sampling.max_new_tokens": positions}))
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists() or not _metrics(tmp_path / "ppo")


def test_a_critic_with_fewer_positions_than_the_policy_is_refused(world, tmp_path):
    import shutil

    from rlhf.artifacts import InputError
    from rlhf.ppo.stage import run

    short = shutil.copytree(world / "rm_h", tmp_path / "short_rm")
    config = json.loads((short / "model" / "config.json").read_text())
    policy_positions = json.loads((world / "sft" / "model" / "config.json").read_text())["max_position_embeddings"]
    (short / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": policy_positions // 2}))
    with pytest.raises(InputError, match=f"the critic has {policy_positions // 2} positions, fewer than the policy's {policy_positions}"):
        run(_cfg(world, tmp_path / "ppo", critic_from=str(short)))


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    """Samples are seeded per response and each global mini-batch is split across processes,
    so two processes train what one does (up to float rounding)."""
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(json.dumps(_cfg(world, tmp_path / "unused").model_dump(mode="json")))  # JSON is YAML
    launch(recipe, tmp_path / "one"), launch(recipe, tmp_path / "two", processes=2)
    rows = [_metrics(tmp_path / name) for name in ("one", "two")]
    assert len(rows[1]) == 2 and rows[1][0]["kl"] == 0.0
    for key in ("reward_c", "kl", "response_length", "policy_loss", "value_loss"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-4, abs=1e-6), key
    a, b = stored_weights(tmp_path / "one" / "model"), stored_weights(tmp_path / "two" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_memory_options_run_together(world, tmp_path):
    """bf16, gradient checkpointing, a LoRA critic and reward models offloaded between phases."""
    from rlhf.ppo.stage import run

    out = run(_cfg(world, tmp_path / "ppo", **{
        "train.mixed_precision": "bf16", "policy.gradient_checkpointing": True, "ppo.offload_reward_models": True,
        "critic": {"lr": 1e-2, "gradient_checkpointing": True, "lora": {"enabled": True, "r": 4}},
    }))
    rows = _metrics(out)
    assert all(torch.isfinite(torch.tensor(r["value_loss"])) for r in rows)
    assert rows[0]["kl"] == 0.0  # the reference takes the autocast policy's precision path
    critic = stored_weights(out / "critic")
    assert "score.weight" in critic and not any("lora" in k for k in critic)  # merged


def test_shipped_recipes_validate():
    for name in ("quickstart/ppo.yaml", "llama2_7b/ppo.yaml"):
        cfg = load_recipe(REPO / "recipes" / name)
        assert cfg.stage == "ppo"
    llama = load_recipe(REPO / "recipes" / "llama2_7b" / "ppo.yaml")
    assert (llama.train.lr, llama.train.betas, llama.train.eps, llama.train.weight_decay) == (1e-6, (0.9, 0.95), 1e-5, 0.1)
    assert (llama.ppo.prompts_per_iteration, llama.train.batch_size, llama.train.epochs, llama.ppo.clip) == (512, 64, 1, 0.2)
    assert (llama.ppo.gamma, llama.ppo.lam, llama.train.grad_clip, llama.train.schedule) == (1.0, 0.95, 1.0, "constant")
