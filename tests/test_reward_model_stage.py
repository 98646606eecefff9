"""The reward-model stage end to end on a tiny Llama: every checkpoint weight carried over (tied
embeddings), saved models reload (plain transformers too), training changes the weights and
writes eval/, LoRA, resume == uninterrupted, 2 processes == 1, eval-rm on real HH-RLHF data."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from launch import launch
from rlhf.data import Message
from reward_model.config import RewardModelConfig
from tiny import Crash, save_with_tokenizer, stored_weights, tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "tell", "me", "story", "good", "bad", "nice", "ugly", "a", "the"]


def save_tied_lm(path: Path) -> Path:
    """A tiny Llama with tied embeddings stored ONCE, as ``lm_head.weight`` (like tinystories-656k)."""
    from safetensors.torch import save_file

    tiny_llama(len(WORDS), max_positions=64, pad_token_id=None, tie_word_embeddings=True).save_pretrained(path)
    weights = stored_weights(path)
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    word_tokenizer(WORDS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return save_tied_lm(tmp_path_factory.mktemp("lm"))


def write_pairs(path: Path, n: int = 24) -> Path:
    """Chosen answers say good/nice, rejected ones bad/ugly; the strength rating cycles; every
    pair has a prompt of its own (the held-out split goes by prompt)."""
    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    rows = [{"prompt": f"{'tell me a story' if i % 2 else 'hi'} {i}", "chosen": f"a {'good nice' * (1 + i % 3)} story",
             "rejected": f"a {'bad ugly' * (1 + i % 2)} story", "rating": ratings[i % 4],
             "chosen_safe": True, "rejected_safe": i % 3 != 0, "source": "row label"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, lm_dir: Path, **train) -> dict:
    return {
        "stage": "reward_model", "output_dir": str(tmp_path / "rm"), "model_from": str(lm_dir),
        "data": {"sources": [{"name": "pairs", "path": str(write_pairs(tmp_path / "pairs.jsonl"))}],
                 "eval_fraction": 0.25, "max_length": 32},
        "loss": {"margin": "small"},
        "train": {"lr": 5e-3, "batch_size": 4, "micro_batch_size": 2, "min_warmup_steps": 0, "save_every": 2, **train},
    }


def embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def test_tied_checkpoint_initialises_every_backbone_weight(lm_dir):
    from transformers import AutoModelForCausalLM

    from reward_model.model import init_reward_model

    rm = init_reward_model(lm_dir, pad_token_id=0)
    stored = stored_weights(lm_dir)["lm_head.weight"]
    torch.testing.assert_close(embeddings(rm), stored, rtol=0, atol=0)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    backbone = rm.model.state_dict()
    for name, weight in lm.model.state_dict().items():
        torch.testing.assert_close(backbone[name], weight, rtol=0, atol=0, msg=name)
    assert rm.score.weight.shape == (1, 32) and rm.config.num_labels == 1


def test_real_tied_checkpoint_embeddings_carry_over(realdata):
    from reward_model.model import init_reward_model

    path = realdata / "models" / "tinystories-656k"
    stored = stored_weights(path)["lm_head.weight"]  # the only copy of the tied matrix
    torch.testing.assert_close(embeddings(init_reward_model(path, pad_token_id=0)), stored, rtol=0, atol=0)


def test_saved_reward_model_reloads_and_plain_transformers_agrees(lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from reward_model.model import RewardModel, init_reward_model, load_reward_model

    rm = RewardModel(init_reward_model(lm_dir, pad_token_id=0, seed=3), word_tokenizer(WORDS), max_length=32)
    save_with_tokenizer(tmp_path / "model", rm, rm.tokenizer)
    prompts = [[Message("user", "hi")], [Message("user", "tell me a story")]]
    responses = ["a good story", "bad"]
    expected = rm.score(prompts, responses)
    reloaded = load_reward_model(tmp_path / "model")
    torch.testing.assert_close(reloaded.score(prompts, responses), expected, rtol=0, atol=1e-6)
    assert reloaded.max_length == 32
    # plain transformers, right-padded batch: it reads each row at its last non-pad token (EOS)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    seqs = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    logits = plain(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0]
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)


def run_stage(data: dict):
    from reward_model.stage import run

    return run(RewardModelConfig.model_validate(data))


def test_stage_trains_saves_and_evaluates(lm_dir, tmp_path):
    from reward_model.model import init_reward_model, load_reward_model

    data = recipe(tmp_path, lm_dir, max_steps=3)
    data["data"]["eval_sources"] = [{"name": "test", "path": str(write_pairs(tmp_path / "test.jsonl", n=5))}]
    out = run_stage(data)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 3
    # 24 pairs: 6 held out, 18 trained on
    assert manifest["data"]["sources"]["pairs"] == {"rows": 24, "skipped": 0, "used": 18, "held_out": 6}
    assert manifest["data"]["pairs"] == 18
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    trained = load_reward_model(out)
    initial = init_reward_model(lm_dir, pad_token_id=0)
    changed = [n for n, p in trained.model.named_parameters() if not torch.equal(p, initial.state_dict()[n])]
    assert "score.weight" in changed and any(n.startswith("model.layers") for n in changed)
    results = json.loads((out / "eval" / "metrics.json").read_text())
    assert results["held_out.pairs"]["pairs"] == 6 and "per_safety_category" in results["held_out.pairs"]
    assert results["test"]["pairs"] == 5 and list(results) == ["held_out.pairs", "test"]
    assert {p.name for p in (out / "eval").iterdir()} >= {"metrics.json", "summary.json", "report.md",
                                                         "accuracy_by_rating.png", "calibration.png"}
    assert manifest["metrics"]["eval/held_out.pairs/accuracy"] == results["held_out.pairs"]["accuracy"]
    check_calibrated_gate(out, data, manifest["metrics"], results)


def check_calibrated_gate(out: Path, data: dict, metrics: dict, results: dict) -> None:
    """The safety gate calibrated at eval.gate_recall (0.55) on the labelled responses of both test
    sets pooled, in the manifest, summary.json, metrics.json (per test set) and report.md."""
    from reward_model.data import load_pairs
    from reward_model.evaluate import gate_threshold_at_recall, labelled_responses, pair_rewards
    from reward_model.model import load_reward_model

    rm, cfg = load_reward_model(out), RewardModelConfig.model_validate(data)
    tests = load_pairs(cfg.data, cfg.seed)[1].values()
    labelled = [labelled_responses(*pair_rewards(rm, pairs), pairs) for pairs in tests]
    rewards, unsafe = torch.cat([r for r, _ in labelled]), torch.cat([u for _, u in labelled])
    assert int(unsafe.sum()) == sum(not p.rejected_safe for pairs in tests for p in pairs) > 0  # rows i % 3 == 0
    threshold = gate_threshold_at_recall(rewards, unsafe, 0.55)
    gate = json.loads((out / "eval" / "summary.json").read_text())["gate"]
    assert metrics["gate_threshold"] == gate["threshold"] == pytest.approx(threshold, rel=1e-5)
    assert gate["recall"] >= 0.55 and (metrics["gate_recall"], metrics["gate_precision"]) == (gate["recall"], gate["precision"])
    for name in ("held_out.pairs", "test"):
        assert results[name]["gate"]["threshold"] == gate["threshold"]
        assert metrics[f"eval/{name}/gate_safe_flagged"] == results[name]["gate"]["safe_flagged"]
        assert results[name]["unsafe_recall"]["threshold"] == 0.15  # eval.unsafe_threshold, reported beside it
    assert f"calibrated`): {gate['threshold']:.4g}, where sigmoid(r) below it flags at least 55.0%" in (out / "eval" / "report.md").read_text()


def test_no_test_set_no_calibrated_gate():
    from reward_model.stage import eval_metrics

    assert eval_metrics({}, None) == {"gate_threshold": None, "gate_recall": None, "gate_precision": None}


@pytest.mark.parametrize("merge", [True, False])
def test_stage_with_lora(lm_dir, tmp_path, merge):  # unmerged: with gradient checkpointing too
    from reward_model.model import init_reward_model, load_reward_model

    data = recipe(tmp_path, lm_dir, max_steps=2)
    data["model"] = {"lora": {"enabled": True, "r": 4, "merge": merge}, "gradient_checkpointing": not merge}
    out = run_stage(data)
    assert (out / "model" / "adapter_config.json").exists() != merge  # merged: plain weights
    rm = load_reward_model(out)
    trained = (rm.model if merge else rm.model.merge_and_unload()).state_dict()
    initial = init_reward_model(lm_dir, pad_token_id=0).state_dict()
    assert set(trained) == set(initial)  # LoRA merged into the weights, the head trained in full
    assert not torch.equal(trained["score.weight"], initial["score.weight"])
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # not adapted


def test_resumed_stage_equals_uninterrupted(lm_dir, tmp_path, monkeypatch):
    import reward_model.stage as stage
    from reward_model.model import load_reward_model

    for name in "ab":
        (tmp_path / name).mkdir()
    reference = run_stage(recipe(tmp_path / "a", lm_dir, max_steps=4))
    calls = {"n": 0}
    real_loss = stage.rm_loss

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:  # 2 micro-batches a step: dies in step 3, after the step-2 checkpoint
            raise Crash
        return real_loss(model, batch)

    monkeypatch.setattr(stage, "rm_loss", crashing)
    data = recipe(tmp_path / "b", lm_dir, max_steps=4)
    with pytest.raises(Crash):
        run_stage(data)
    assert (tmp_path / "b" / "rm" / "checkpoints").is_dir()
    monkeypatch.setattr(stage, "rm_loss", real_loss)
    resumed = run_stage(data)
    a, b = load_reward_model(reference).model.state_dict(), load_reward_model(resumed).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    logged = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_equal_one(lm_dir, tmp_path):
    data = recipe(tmp_path, lm_dir, max_steps=2)
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(data))
    launch(path, tmp_path / "one"), launch(path, tmp_path / "two", processes=2)
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text())["metrics"] for d in ("one", "two"))
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    assert m2["accuracy"] == m1["accuracy"]
    w1, w2 = (stored_weights(tmp_path / d / "model") for d in ("one", "two"))
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=1e-5, msg=name)


def test_eval_rm_on_hh_rlhf(realdata, tmp_path):
    from reward_model.evaluate import run_eval_rm
    from reward_model.model import RewardModel, init_reward_model
    from rlhf.models import load_tokenizer

    source = realdata / "models" / "tinystories-656k"
    tokenizer = load_tokenizer(source)
    rm = RewardModel(init_reward_model(source, pad_token_id=0), tokenizer, max_length=256)
    save_with_tokenizer(tmp_path / "rm", rm, tokenizer)
    results = run_eval_rm(str(tmp_path / "rm"), str(realdata / "hh-rlhf" / "harmless-base.test.jsonl.gz"),
                          max_pairs=24, out_dir=str(tmp_path / "eval"))
    r = results["harmless-base"]
    assert r["pairs"] == 24 and 0 <= r["accuracy"] <= 1
    assert r["per_rating"] == {"unlabelled": {"accuracy": r["accuracy"], "pairs": 24}}  # HH has no ratings
    assert "per_safety_category" not in r  # nor safety labels
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == results
