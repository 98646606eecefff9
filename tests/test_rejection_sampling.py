"""Rejection sampling: gate and best of K on hand-made rewards, the best-so-far pool, the Fig. 7
curves, prompt-masked fine-tuning rows, and the stage on a ``tiny.stage_world`` (a random
2-layer Llama policy with a byte-level BPE tokenizer, three reward models with different random
heads, 8 prompts): two rounds, a reward-model change, resume, and two processes."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from launch import launch
import rlhf.rejection_sampling.pool as rs_pool
from rlhf.prompt_sampling import Item, prompt_key
import rlhf.rejection_sampling.report as rs_report
import rlhf.rejection_sampling.stage as rs
from rlhf.config import RecipeError, validate
from rlhf.data import Message, Prompt
from rlhf.recipe import load_recipe
from rlhf.rejection_sampling.config import RejectionSamplingConfig
from tiny import (PROMPT_CORPUS, Crash, bpe_tokenizer, override, read_jsonl, save_with_tokenizer, stage_dir,
                  stage_world, stored_weights, tiny_llama, word_tokenizer)

REPO = Path(__file__).resolve().parents[1]
ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1)


class FixedRM:
    """A stand-in reward model: probabilities looked up by response text."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def probabilities(self, prompts, responses, batch_tokens=8192, finished=None):
        return torch.tensor([self.table[r] for r in responses])


def _rms(help_table, safe_table, fps=None):
    return rs.RewardModels(FixedRM(help_table), FixedRM(safe_table), fps or {"helpfulness": "h1", "safety": "s1"})


# ---------------------------------------------------------------------------------------------
# Gate, best of K, pool, curves


def test_gate_then_best_of_k_on_hand_made_rewards():
    h = {"a": 0.2, "b": 0.9, "c": 0.6, "x": 0.9, "y": 0.1, "z": 0.5}
    s = {"a": 0.5, "b": 0.1, "c": 0.8, "x": 0.3, "y": 0.7, "z": 0.6}
    helpful, unsafe = Prompt([Message("user", "q")]), Prompt([Message("user", "q2")], is_safety=True)
    scores = rs.score_pairs(ONE_PROCESS, _rms(h, s), [helpful] * 3 + [unsafe] * 3, list("abcxyz"), threshold=0.15)
    # helpfulness prompt: b's R_s 0.1 < 0.15 -> R_c = R_s = 0.1; a, c -> R_h: [0.2, 0.1, 0.6] -> best c
    # safety prompt: R_c = R_s always: [0.3, 0.7, 0.6] -> best y (despite its R_h of 0.1)
    rewards = [round(x["reward"], 6) for x in scores]
    assert rewards == [0.2, 0.1, 0.6, 0.3, 0.7, 0.6]
    assert [x["used_safety"] for x in scores] == [False, True, False, True, True, True]
    assert rs.best_of(rewards[:3]) == 2 and rs.best_of(rewards[3:]) == 1
    assert rs.best_of([0.4, 0.7, 0.7]) == 1  # ties: the first


def _entry(key, reward, response="r", round_no=1, fps=None, threshold=0.15):
    return {"key": key, "prompt": [{"role": "user", "content": key}], "is_safety": False, "response": response,
            "reward": reward, "round": round_no,
            **rs_pool.scored_by(fps or {"helpfulness": "h1", "safety": "s1"}, threshold, None)}


def test_pool_keeps_the_max_across_rounds():
    pool = {k: _entry(k, r) for k, r in (("a", 0.5), ("b", 0.7), ("c", 0.2))}
    best = {k: _entry(k, r, round_no=2) for k, r in (("a", 0.6), ("b", 0.7), ("d", 0.1))}
    new, counts = rs_pool.update_pool(pool, best)
    # a improves (0.6 > 0.5); b ties and keeps round 1; c was not sampled; d is new
    assert {k: (e["reward"], e["round"]) for k, e in new.items()} == {
        "a": (0.6, 2), "b": (0.7, 1), "c": (0.2, 1), "d": (0.1, 2)}
    assert counts == {"improved": 1, "added": 1, "kept": 1, "not_sampled": 1, "only_truncated": 0}


def test_stale_entries_are_rescored_under_the_current_reward_models():
    old_fps = {"helpfulness": "h0", "safety": "s0"}
    pool = {"a": _entry("a", 0.9, "ra", fps=old_fps), "b": _entry("b", 0.3, "rb")}
    rms = _rms({"ra": 0.2, "rb": 0.8}, {"ra": 0.5, "rb": 0.5})
    assert rs.rescore_stale(ONE_PROCESS, rms, pool, 0.15) == 1
    assert pool["a"]["reward"] == pytest.approx(0.2) and pool["a"]["reward_models"] == rms.fingerprints
    assert pool["b"]["reward"] == 0.3  # scored by the current models already: untouched
    # the re-scored entry now loses to a candidate it used to beat
    new, counts = rs_pool.update_pool(pool, {"a": _entry("a", 0.5, "new", round_no=2)})
    assert new["a"]["response"] == "new" and counts["improved"] == 1


def test_entries_gated_at_another_threshold_are_rescored():
    """The same reward models, another gate: an entry chosen when R_s < 0.15 sent it to the safety
    reward model (R_s 0.1) is re-scored under a gate of 0.05, which sends it to R_h (0.9)."""
    pool = {"a": _entry("a", 0.1, "ra"), "b": _entry("b", 0.3, "rb", threshold=0.05)}
    rms = _rms({"ra": 0.9, "rb": 0.3}, {"ra": 0.1, "rb": 0.5})
    assert rs.rescore_stale(ONE_PROCESS, rms, pool, 0.05) == 1
    assert pool["a"]["reward"] == pytest.approx(0.9) and pool["a"]["gate"] == {"threshold": 0.05, "missing_eos_penalty": None}
    assert pool["b"]["reward"] == 0.3  # gated at 0.05 already: untouched


def test_best_of_k_curve_hand_worked():
    # rewards [1, 2, 4]: k=1 -> mean 7/3 (max and median); k=2: subsets {1,2} {1,4} {2,4}:
    # max (2+4+4)/3 = 10/3, median (1.5+2.5+3)/3 = 7/3; k=3: max 4, median 2
    curve = rs_report.best_of_k_curve([4.0, 1.0, 2.0])
    assert curve["max"] == pytest.approx([7 / 3, 10 / 3, 4])
    assert curve["median"] == pytest.approx([7 / 3, 7 / 3, 2])
    assert rs_report.subset_order_statistic([1, 2, 4], 2, 1) == pytest.approx((1 + 1 + 2) / 3)


def test_fine_tuning_rows_are_prompt_masked():
    from sft.data import IGNORE, build_rows
    from sft.config import GenerationDataConfig

    words = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "add", "two", "five", "ok"]
    tokenizer = word_tokenizer(words, pad_token=None)
    entry = _entry("k", 0.5, response="five ok")
    entry["prompt"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "add two"}]
    rows, counts = build_rows(rs_pool.pool_examples({"k": entry}), tokenizer, GenerationDataConfig(sources=[{"path": "x.jsonl"}]))
    ids, targets = rows[0].input_ids.tolist(), rows[0].targets.tolist()
    # <s> [INST] hi [/INST] hello </s> <s> [INST] add two [/INST] five ok </s>: only the pool
    # response and its EOS are targets, not the earlier assistant turn "hello"
    assert ids == [1, 3, 5, 4, 6, 2, 1, 3, 7, 8, 4, 9, 10, 2]
    assert [t for t in targets if t != IGNORE] == [9, 10, 2]
    assert targets.index(9) == ids.index(4, 8)  # predicted from the last [/INST]


def test_prompt_keys_and_categories():
    a = Prompt([Message("user", "x")])
    assert prompt_key(a) == prompt_key(Prompt([Message("user", "x")])) != prompt_key(Prompt([Message("user", "y")]))
    assert prompt_key(Prompt([Message("user", "x")], id="p7")) == "p7"
    items = [Item("1", a, []), Item("2", Prompt([Message("user", "z")], is_safety=True, source="adv"), [])]
    assert rs_report.prompt_categories(items) == {"all": ["1", "2"], "helpfulness": ["1"], "safety": ["2"],
                                           "source:": ["1"], "source:adv": ["2"]}
    tasks = [Item(str(n), Prompt([Message("user", str(n))], meta=meta), []) for n, meta in
             enumerate([{"task": "add"}, {"task": "reverse"}, {}, {"task": "add"}])]
    assert rs_report.prompt_categories(tasks) == {"all": ["0", "1", "2", "3"], "helpfulness": ["0", "1", "2", "3"],
                                           "task:add": ["0", "3"], "task:reverse": ["1"]}
    assert "task:add" not in rs_report.prompt_categories(tasks[::3])  # one task: no split


# ---------------------------------------------------------------------------------------------
# The stage on a tiny world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``tiny.stage_world`` (prompts ``p0``..``p7``) with ``rm_s2``, a second safety RM, and 3
    SFT demonstrations in ``sft.jsonl``."""
    tokenizer = bpe_tokenizer(PROMPT_CORPUS)
    root = stage_world(tmp_path_factory.mktemp("rs_world"), tokenizer, tiny_llama(len(tokenizer), max_positions=256),
                       {"rm_h": 1, "rm_s": 2, "rm_s2": 3}, prompt_ids=True)
    with open(root / "sft.jsonl", "w") as fh:
        for text, answer in (("say hello", "hello"), ("name a colour", "red"), ("what is 2 + 3?", "5")):
            fh.write(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}) + "\n")
    return root


def _config(world: Path, out: Path, **overrides) -> dict:
    data = {
        "stage": "rejection_sampling", "output_dir": str(out), "seed": 0,
        "policy_from": str(world / "sft"), "helpfulness_rm_from": str(world / "rm_h"),
        "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "max_length": 64},
        "sampling": {"k": 4, "max_new_tokens": 6, "batch_size": 12},  # 3 prompts a bucket: 3 buckets
        "pool_truncated": True,  # the random policy almost never ends within 6 tokens (tests/test_truncation.py)
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "save_every": 1},
    }
    return override(data, overrides)


def _cfg(world: Path, out: Path, **overrides) -> RejectionSamplingConfig:
    return validate(RejectionSamplingConfig, _config(world, out, **overrides), "test")


@pytest.fixture(scope="module")
def round1(world, tmp_path_factory) -> Path:
    return rs.run(_cfg(world, tmp_path_factory.mktemp("r1") / "rs"))


def test_round_one_samples_scores_pools_and_fine_tunes(world, round1):
    manifest = json.loads((round1 / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["round"] == 1
    pool = read_jsonl(round1 / "pool.jsonl")
    assert sorted(e["key"] for e in pool) == [f"p{i}" for i in range(8)]
    samples = {s["key"]: s for s in read_jsonl(round1 / "samples.jsonl")}
    for e in pool:  # each entry is its prompt's best of the 4 samples
        rewards = [s["reward"] for s in samples[e["key"]]["scores"]]
        assert len(rewards) == 4 and e["reward"] == max(rewards)
        assert e["response"] == samples[e["key"]]["responses"][rewards.index(max(rewards))]
        assert e["round"] == 1 and e["model"]["path"] == str(world / "sft")
    assert manifest["metrics"]["pool_added"] == 8 and manifest["metrics"]["pool_improved"] == 0
    report = json.loads((round1 / "report" / "summary.json").read_text())
    curve = report["best_of_k"]["all"]
    assert len(curve["max"]) == 4 and curve["max"] == sorted(curve["max"])  # the max rises with k
    assert curve["max"][0] == pytest.approx(curve["median"][0])
    assert set(report["best_of_k"]) == {"all", "helpfulness", "safety"}
    assert (round1 / "report" / "best_of_k.png").stat().st_size > 0
    before, after = stored_weights(world / "sft" / "model"), stored_weights(round1 / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (round1 / "model" / "tokenizer.json").exists() and not (round1 / "checkpoints").exists()


def test_round_two_keeps_the_best_so_far(world, round1, tmp_path):
    out = rs.run(_cfg(world, tmp_path / "rs2", pool_from=str(round1), policy_from=str(round1)))
    old = {e["key"]: e for e in read_jsonl(round1 / "pool.jsonl")}
    new = {e["key"]: e for e in read_jsonl(out / "pool.jsonl")}
    samples = {s["key"]: max(x["reward"] for x in s["scores"]) for s in read_jsonl(out / "samples.jsonl")}
    m = json.loads((out / "manifest.json").read_text())
    assert m["round"] == 2 and m["metrics"]["pool_rescored"] == 0
    for key, entry in new.items():
        assert entry["reward"] == max(old[key]["reward"], samples[key])
        assert entry["round"] == (2 if samples[key] > old[key]["reward"] else 1)
    assert m["metrics"]["pool_improved"] == sum(samples[k] > old[k]["reward"] for k in new)


def test_changed_reward_models_rescore_the_pool(world, round1, tmp_path):
    from reward_model.model import load_reward_model

    out = rs.run(_cfg(world, tmp_path / "rs2", pool_from=str(round1), safety_rm_from=str(world / "rm_s2")))
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["pool_rescored"] == 8
    old = read_jsonl(round1 / "pool.jsonl")
    h, s = load_reward_model(world / "rm_h"), load_reward_model(world / "rm_s2")
    prompts = [[Message(**x) for x in e["prompt"]] for e in old]
    finished = [e["finished"] for e in old]  # a truncated answer is re-scored without an EOS too
    with torch.no_grad():
        s_old = s.probabilities(prompts, [e["response"] for e in old], finished=finished)
        h_old = h.probabilities(prompts, [e["response"] for e in old], finished=finished)
    new = {e["key"]: e for e in read_jsonl(out / "pool.jsonl")}
    for e, hp, sp in zip(old, h_old.tolist(), s_old.tolist()):
        rescored = sp if e["is_safety"] or sp < 0.15 else hp  # the old response under the new models
        entry = new[e["key"]]
        assert entry["reward"] >= rescored - 1e-6
        if entry["round"] == 1:
            assert entry["reward"] == pytest.approx(rescored, abs=1e-6) and entry["safety"] == pytest.approx(sp, abs=1e-6)


def test_distillation_with_replay_fine_tunes_the_student_and_sweeps_temperatures(world, round1, tmp_path):
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(world / "sft" / "model")
    small = tiny_llama(len(tokenizer), seed=5, hidden_size=16, layers=1, heads=2, kv_heads=1)
    student = save_with_tokenizer(stage_dir(tmp_path / "student", "sft") / "model", small, tokenizer)
    out = rs.run(_cfg(world, tmp_path / "rs", student_from=str(tmp_path / "student"),
                      report={"temperatures": [0.5, 1.5], "sweep_prompts": 2, "sweep_k": 3},
                      **{"data.replay": {"sources": [{"path": str(world / "sft.jsonl")}]}}))
    assert json.loads((out / "model" / "config.json").read_text())["hidden_size"] == 16
    counts = json.loads((out / "manifest.json").read_text())["data"]
    assert (counts["generated_examples"], counts["replay_examples"], counts["examples_used"]) == (8, 3, 11)
    before, after = stored_weights(student), stored_weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the samples are the policy's (the same as round one's), not the student's
    assert [s["responses"] for s in read_jsonl(out / "samples.jsonl")] == [s["responses"] for s in read_jsonl(round1 / "samples.jsonl")]
    sweep = json.loads((out / "report" / "summary.json").read_text())["temperature_sweep"]
    assert set(sweep) == {"0.5", "1.5"} and all(c["prompts"] == 2 and len(c["max"]) == 3 for c in sweep.values())
    assert (out / "report" / "temperature_sweep.png").exists()


def _safety_rm_with(world: Path, path: Path, **metrics) -> Path:
    """A copy of the world's safety reward model whose manifest's metrics are ``metrics``."""
    shutil.copytree(world / "rm_s", path)
    (path / "manifest.json").write_text(json.dumps({"stage": "reward_model", "status": "complete", "metrics": metrics}))
    return path


def test_a_calibrated_gate_threshold_is_the_safety_reward_models(world, round1, tmp_path):
    # the same samples as round one's (same policy and seeds) under the same safety weights: a
    # threshold halfway between two of its helpfulness samples' R_s sends half of them to R_s
    # (at 0.15, none of these random heads' scores is that low)
    first = read_jsonl(round1 / "samples.jsonl")
    helpful = sorted(x["safety"] for row in first if not row["is_safety"] for x in row["scores"])
    assert not any(x["used_safety"] for row in first if not row["is_safety"] for x in row["scores"])
    threshold = (helpful[len(helpful) // 2 - 1] + helpful[len(helpful) // 2]) / 2
    rm = _safety_rm_with(world, tmp_path / "rm_s", gate_threshold=threshold, gate_recall=0.55, gate_precision=0.9)
    out = rs.run(_cfg(world, tmp_path / "rs", safety_rm_from=str(rm), gate_threshold="calibrated"))
    assert json.loads((out / "manifest.json").read_text())["metrics"]["gate_threshold"] == threshold
    rows = read_jsonl(out / "samples.jsonl")
    for row in rows:
        assert all(x["used_safety"] == (row["is_safety"] or x["safety"] < threshold) for x in row["scores"])
    gated = [x["used_safety"] for row in rows if not row["is_safety"] for x in row["scores"]]
    assert sum(gated) == len(gated) // 2
    assert json.loads((round1 / "manifest.json").read_text())["metrics"]["gate_threshold"] == 0.15


def test_calibrated_without_a_calibrated_safety_reward_model_stops_before_sampling(world, tmp_path):
    rm = _safety_rm_with(world, tmp_path / "rm_s", loss=0.5)  # a reward model from before the calibration
    with pytest.raises(RecipeError, match="gate_threshold: calibrated, but the safety reward model .* has no "
                                          "calibrated gate threshold"):
        rs.run(_cfg(world, tmp_path / "rs", safety_rm_from=str(rm), gate_threshold="calibrated"))
    assert not (tmp_path / "rs" / "samples").exists()


def test_resume_samples_only_the_buckets_left(world, round1, tmp_path, monkeypatch):
    import rlhf.prompt_sampling as prompt_sampling

    real, calls, crash = prompt_sampling.sample_bucket, [], [True]

    def crash_on_second(*args, **kwargs):
        calls.append(len(args[2]))
        if crash[0] and len(calls) == 2:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(prompt_sampling, "sample_bucket", crash_on_second)
    with pytest.raises(Crash):
        rs.run(_cfg(world, tmp_path / "rs"))
    assert len(list((tmp_path / "rs" / "samples").glob("bucket-*.jsonl"))) == 1
    calls.clear()
    crash[0] = False
    out = rs.run(_cfg(world, tmp_path / "rs"))
    assert calls == [3, 2]  # buckets of 3, 3, 2 prompts: the first was done
    mine, straight = read_jsonl(out / "samples.jsonl"), read_jsonl(round1 / "samples.jsonl")
    assert [s["key"] for s in mine] == [s["key"] for s in straight]  # every prompt once
    assert [s["responses"] for s in mine] == [s["responses"] for s in straight]


@pytest.mark.slow
def test_two_processes_sample_every_prompt_once_and_the_same(world, round1, tmp_path):
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(yaml.safe_dump(_config(world, tmp_path / "rs")))
    out = launch(recipe, tmp_path / "rs", processes=2)
    samples = read_jsonl(out / "samples.jsonl")
    assert sorted(s["key"] for s in samples) == [f"p{i}" for i in range(8)]
    assert sorted(e["key"] for e in read_jsonl(out / "pool.jsonl")) == [f"p{i}" for i in range(8)]
    straight = {s["key"]: s["responses"] for s in read_jsonl(round1 / "samples.jsonl")}
    assert {s["key"]: s["responses"] for s in samples} == straight  # same seed, same samples


def test_shipped_recipes_validate():
    for name in ("quickstart/rejection_sampling.yaml", "llama2_7b/rejection_sampling.yaml"):
        cfg = load_recipe(REPO / "recipes" / name)
        assert cfg.stage == "rejection_sampling"


def test_prompts_that_cannot_fit_the_policy_stop_before_sampling(world, tmp_path):
    from rlhf.artifacts import InputError

    positions = json.loads((world / "sft" / "model" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(InputError, match=f"sampling.max_new_tokens {positions} = .* exceeds the model's max_position_embeddings {positions}"):
        rs.run(_cfg(world, tmp_path / "rs", **{"sampling.max_new_tokens": positions}))
    assert not list((tmp_path / "rs").glob("samples/*.jsonl"))
