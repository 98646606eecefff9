"""Answers cut at ``max_new_tokens`` (no EOS) are neither scored nor trained as finished:
``sample`` flags them, the chat renderer leaves them open (``unfinished``), the reward models
score them without the EOS they never generated, ``missing_eos_penalty`` lowers their reward in
rejection sampling and PPO alike, rejection sampling keeps them out of its pool unless
``pool_truncated``, and both stages report the truncation rate.

The policy that never ends is a tiny Llama whose every draw has its EOS logit at -inf
(``never_ends``); the stages run on a ``tiny.stage_world``."""

import json
import math
from pathlib import Path

import pytest
import torch

import rlhf.generation as generation
from reward_model.model import RewardModel, load_reward_model, response_ids
from rlhf.config import RecipeError, validate
from rlhf.data import Message, render
from rlhf.generation import sample
from rlhf.models import load_tokenizer
from rlhf.rewards import logit, safety_gate
from rlhf.stages import config_class
from tiny import (PROMPT_CORPUS, bpe_tokenizer, llama_config, override, read_jsonl, stage_dir, stage_world,
                  tiny_llama, word_tokenizer)

EOS = 2  # of every tokenizer in tiny.py
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "bye", "ok", "no"]


def never_ends(monkeypatch, end_at: int | None = None) -> None:
    """Every draw of ``rlhf.generation`` with the EOS logit at -inf, except the ``end_at``-th
    draw (1-based, counted from now), where every row draws EOS."""
    real, calls = generation.draw, []

    def draw(logits, *args):
        calls.append(1)
        if len(calls) == end_at:
            return torch.full(logits.shape[:1], EOS, dtype=torch.long, device=logits.device)
        return real(logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == EOS, -math.inf), *args)

    monkeypatch.setattr(generation, "draw", draw)


# ---------------------------------------------------------------------------------------------
# Sampling, rendering, scoring


def test_sample_flags_answers_cut_at_the_limit(monkeypatch):
    tokenizer = word_tokenizer(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(29))])
    model = tiny_llama(32, hidden_size=16).eval()
    prompts, seeds = [[1, 5, 6], [1, 7]], [0, 1]
    never_ends(monkeypatch)
    cut = sample(model, tokenizer, prompts, seeds, max_new_tokens=4)
    assert cut.finished == [False, False] and [len(r) for r in cut.response_ids] == [4, 4]
    assert EOS not in sum(cut.response_ids, [])
    monkeypatch.undo()
    never_ends(monkeypatch, end_at=4)  # EOS on the very last allowed token: the answer ended
    last = sample(model, tokenizer, prompts, seeds, max_new_tokens=4)
    assert last.finished == [True, True] and [r[-1] for r in last.response_ids] == [EOS, EOS]
    assert [len(r) for r in last.response_ids] == [4, 4]


def test_unfinished_drops_only_the_eos_closing_the_last_answer():
    from rlhf.data.chat import unfinished

    tokenizer = word_tokenizer(WORDS)
    conversation = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"),
                    Message("assistant", "ok no")]
    full = render(conversation, tokenizer)
    # <s> [INST] hi [/INST] hello </s> <s> [INST] bye [/INST] ok no </s>: the first answer's EOS stays
    cut = unfinished(full, EOS)
    assert cut.ids == [1, 3, 5, 4, 6, 2, 1, 3, 7, 4, 8, 9]
    assert cut.ids == full.ids[:-1] and cut.loss_mask == full.loss_mask[:-1]
    # a template whose turns close with EOS and more text: all of the last answer's close goes
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST] "
                               "{% else %}{{ m.content }} </s> bye {% endif %}{% endfor %}")
    templated = unfinished(render(conversation, tokenizer, template="tokenizer"), EOS)
    assert templated.ids == [3, 5, 4, 6, 2, 7, 3, 7, 4, 8, 9]
    assert templated.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]


def test_reward_model_scores_a_truncated_answer_as_its_ids_without_the_eos():
    from transformers import LlamaForSequenceClassification

    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(0)
    rm = RewardModel(LlamaForSequenceClassification(llama_config(len(WORDS), max_positions=64, num_labels=1)).eval(),
                     tokenizer)
    q = [Message("user", "hi")]
    ids = response_ids(q, "hello ok", tokenizer)
    assert ids[-1] == EOS
    scores = rm.score([q, q], ["hello ok", "hello ok"], finished=[True, False])
    expected = rm.score_ids([ids, ids[:-1]])
    torch.testing.assert_close(scores, expected)
    assert scores[0] != scores[1]  # the EOS the answer never generated changed its score
    torch.testing.assert_close(rm.score([q], ["hello ok"]), expected[:1])  # finished by default
    torch.testing.assert_close(rm.probabilities([q], ["hello ok"], finished=[False]), torch.sigmoid(expected[1:]))


def test_missing_eos_penalty_lowers_the_logit_of_truncated_answers_only():
    from rlhf.rewards import penalize_truncated

    reward, finished = torch.tensor([0.5, 0.5, 0.8]), torch.tensor([True, False, False])
    # LOGIT(0.5) = 0 -> sigmoid(0 - 1) = 0.26894; LOGIT(0.8) = ln 4 -> sigmoid(ln 4 - 1) = 4 / (4 + e) = 0.59539
    out = penalize_truncated(reward, finished, 1.0)
    assert out.tolist() == pytest.approx([0.5, 0.26894, 0.59539], abs=1e-5)
    assert torch.equal(penalize_truncated(reward, finished, None), reward)  # off: unchanged


@pytest.mark.parametrize("stage", ["rejection_sampling", "ppo"])
def test_missing_eos_penalty_is_one_key_with_one_range(stage):
    base = {"stage": stage, "policy_from": "p", "helpfulness_rm_from": "h", "safety_rm_from": "s",
            "data": {"sources": [{"path": "x.jsonl"}]}}
    cls = config_class(stage)
    assert validate(cls, base, "r.yaml").missing_eos_penalty is None
    assert validate(cls, {**base, "missing_eos_penalty": 1.0}, "r.yaml").missing_eos_penalty == 1.0
    with pytest.raises(RecipeError, match="missing_eos_penalty"):
        validate(cls, {**base, "missing_eos_penalty": -1.0}, "r.yaml")
    assert cls.model_fields["missing_eos_penalty"].description


# ---------------------------------------------------------------------------------------------
# The stages, on a policy that never ends


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    tokenizer = bpe_tokenizer(PROMPT_CORPUS)
    return stage_world(tmp_path_factory.mktemp("truncation_world"), tokenizer,
                       tiny_llama(len(tokenizer), max_positions=256), {"rm_h": 1, "rm_s": 2}, prompt_ids=True)


def _rs_cfg(world: Path, out: Path, **overrides):
    from rlhf.rejection_sampling.config import RejectionSamplingConfig

    data = {
        "stage": "rejection_sampling", "output_dir": str(out), "policy_from": str(world / "sft"),
        "helpfulness_rm_from": str(world / "rm_h"), "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "max_length": 64},
        "sampling": {"k": 2, "max_new_tokens": 4, "batch_size": 16},
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 2, "max_steps": 1},
    }
    return validate(RejectionSamplingConfig, override(data, overrides), "test")


def _previous_pool(root: Path, keys: list[str]) -> Path:
    """A finished rejection_sampling stage whose pool answers "ok" (finished) to ``keys``,
    scored 0 (any candidate would beat it) by other reward models (so it is re-scored)."""
    from tiny import PROMPTS

    stage = stage_dir(root, "rejection_sampling")
    rows = [{"key": f"p{i}", "prompt": [{"role": "user", "content": text}], "is_safety": safe, "id": f"p{i}",
             "response": "ok", "finished": True, "helpfulness": 0.0, "safety": 0.0, "reward": 0.0,
             "used_safety": False, "round": 1, "model": {}, "reward_models": {}}
            for i, (text, safe) in enumerate(PROMPTS) if f"p{i}" in keys]
    (stage / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stage


def test_rejection_sampling_keeps_truncated_answers_out_of_the_pool(world, tmp_path, monkeypatch):
    import rlhf.rejection_sampling.stage as rs

    previous = _previous_pool(tmp_path / "round1", ["p0", "p1", "p2", "p3"])
    never_ends(monkeypatch)
    out = rs.run(_rs_cfg(world, tmp_path / "rs", pool_from=str(previous)))
    pool = read_jsonl(out / "pool.jsonl")
    assert sorted(e["key"] for e in pool) == ["p0", "p1", "p2", "p3"]  # none of p4..p7 added
    assert all(e["finished"] and e["response"] == "ok" and e["round"] == 1 for e in pool)
    assert all(s["finished"] == [False, False] for s in read_jsonl(out / "samples.jsonl"))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["truncation_rate"] == 1.0 and metrics["pool_only_truncated"] == 8
    assert metrics["pool_added"] == metrics["pool_improved"] == 0 and metrics["pool_size"] == 4
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["truncation"] == {"samples": 16, "truncated": 16, "rate": 1.0}


def test_rejection_sampling_with_no_finished_answer_at_all_says_what_to_change(world, tmp_path, monkeypatch):
    import rlhf.rejection_sampling.stage as rs

    never_ends(monkeypatch)
    with pytest.raises(RecipeError, match="sampling.max_new_tokens: all 16 samples were cut.*pool_truncated"):
        rs.run(_rs_cfg(world, tmp_path / "rs"))


def test_rejection_sampling_lets_penalised_truncated_answers_compete_when_asked(world, tmp_path, monkeypatch):
    import rlhf.rejection_sampling.stage as rs

    never_ends(monkeypatch)
    out = rs.run(_rs_cfg(world, tmp_path / "rs", pool_truncated=True, missing_eos_penalty=2.0))
    samples = {s["key"]: s for s in read_jsonl(out / "samples.jsonl")}
    for s in samples.values():  # R_c = sigmoid(LOGIT(gated R_h / R_s) - 2) for each truncated sample
        for x in s["scores"]:
            gated = x["safety"] if x["used_safety"] else x["helpfulness"]
            assert x["reward"] == pytest.approx(1 / (1 + math.exp(2.0 - math.log(gated / (1 - gated)))), rel=1e-4)
    pool = read_jsonl(out / "pool.jsonl")
    assert len(pool) == 8 and not any(e["finished"] for e in pool)
    for e in pool:
        assert e["reward"] == max(x["reward"] for x in samples[e["key"]]["scores"])


def test_a_truncated_pool_answer_is_fine_tuned_without_an_eos():
    from rlhf.rejection_sampling.pool import pool_examples
    from sft.config import SFTDataConfig
    from sft.data import tokenize

    tokenizer = word_tokenizer(WORDS)
    entry = {"prompt": [{"role": "user", "content": "hi"}], "response": "hello ok"}
    finished, cut = tokenize(pool_examples({"a": {**entry, "finished": True}, "b": {**entry, "finished": False}}),
                             tokenizer, SFTDataConfig(sources=[{"path": "x.jsonl"}], loss_on="last"))
    # <s> [INST] hi [/INST] hello ok </s>, the loss on the answer; cut: no EOS to learn to stop with
    assert finished.ids == [1, 3, 5, 4, 6, 8, 2] and finished.loss_mask == [0, 0, 0, 0, 1, 1, 1]
    assert cut.ids == [1, 3, 5, 4, 6, 8] and cut.loss_mask == [0, 0, 0, 0, 1, 1]


def _ppo_cfg(world: Path, out: Path, **overrides):
    from rlhf.ppo.config import PPOConfig

    data = {
        "stage": "ppo", "output_dir": str(out), "policy_from": str(world / "sft"),
        "helpfulness_rm_from": str(world / "rm_h"), "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}]},
        "sampling": {"max_new_tokens": 4, "batch_size": 4, "max_prompt_length": 64},
        "ppo": {"iterations": 1, "prompts_per_iteration": 4},
        "train": {"batch_size": 4, "micro_batch_size": 4},
    }
    return validate(PPOConfig, override(data, overrides), "test")


def test_ppo_scores_truncated_rollouts_without_eos_and_penalised(world, tmp_path, monkeypatch):
    import rlhf.ppo.stage as ppo

    real, seen = ppo.collect_rollouts, []

    def spy(accelerator, models, batch, *args):
        seen.append((batch, real(accelerator, models, batch, *args)))
        return seen[-1][1]

    monkeypatch.setattr(ppo, "collect_rollouts", spy)
    never_ends(monkeypatch)
    out = ppo.run(_ppo_cfg(world, tmp_path / "ppo", missing_eos_penalty=1.5))
    (batch, ro), = seen
    assert ro.finished.tolist() == [0.0] * 4 and all(len(r) == 4 for r in ro.response_ids)
    # the configured path: both RMs read the answer without an EOS, gate, then LOGIT(R_c) - 1.5
    tokenizer = load_tokenizer(world / "sft" / "model")
    texts = [t.strip() for t in tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)]
    prompts, cut = [p.messages for p, _ in batch], [False] * len(batch)
    r_h, r_s = (load_reward_model(world / name).probabilities(prompts, texts, finished=cut) for name in ("rm_h", "rm_s"))
    gated = safety_gate(r_h, r_s, torch.tensor([p.is_safety for p, _ in batch]), 0.15).reward
    torch.testing.assert_close(ro.r_c, torch.sigmoid(logit(gated) - 1.5), atol=1e-5, rtol=1e-5)
    assert read_jsonl(out / "metrics.jsonl")[0]["truncation_rate"] == 1.0
