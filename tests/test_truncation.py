"""Answers cut at ``max_new_tokens`` (no EOS) are neither scored nor trained as finished:
``sample`` flags them, the chat renderer leaves them open (``unfinished``), the reward models
score them without the EOS they never generated, ``missing_eos_penalty`` lowers their reward in
rejection sampling and PPO alike, rejection sampling keeps them out of its pool unless
``pool_truncated``, and both stages report the truncation rate.

Ghost Attention and context distillation sample through ``make_sampler``, which says which
answers finished: GAtt stops a training dialogue at a truncated answer and leaves its example
out, context distillation scores both answers as they ended and keeps truncated distilled
answers out; both report their truncation rates.

The policy that never ends is a tiny Llama whose every draw has its EOS logit at -inf
(``never_ends``); rejection sampling and PPO run on a ``tiny.stage_world``, GAtt and context
distillation on a ``tiny.word_world``."""

import json
import math
from pathlib import Path

import pytest
import torch

import rlhf.generation as generation
from reward_model.model import RewardModel, load_reward_model, response_ids
from rlhf.config import RecipeError, validate
from rlhf.data import Message, read_records, render
from rlhf.generation import Samples, sample
from rlhf.models import load_tokenizer
from rlhf.rewards import logit, safety_gate
from rlhf.stages import config_class
from tiny import (PROMPT_CORPUS, bpe_tokenizer, llama_config, override, ppo_config, read_jsonl, rs_config, save_reward_model, stage_dir,
                  stage_world, tiny_llama, word_tokenizer, word_world)

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
    out = rs.run(rs_config(world, tmp_path / "rs", pool_from=str(previous)))
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
        rs.run(rs_config(world, tmp_path / "rs"))


def test_rejection_sampling_lets_penalised_truncated_answers_compete_when_asked(world, tmp_path, monkeypatch):
    import rlhf.rejection_sampling.stage as rs

    never_ends(monkeypatch)
    out = rs.run(rs_config(world, tmp_path / "rs", pool_truncated=True, missing_eos_penalty=2.0))
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
    """One iteration, one mini-batch of 4, the paper's lr and beta."""
    return ppo_config(world, out, ppo={"iterations": 1, "prompts_per_iteration": 4},
                      train={"batch_size": 4, "micro_batch_size": 4}, critic={}, **{"sampling.max_new_tokens": 4, **overrides})


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
    # the configured path: both RMs (the policy's tokens) read the generated ids, without an EOS,
    # gate, then LOGIT(R_c) - 1.5
    cut = [False] * len(batch)
    r_h, r_s = (torch.sigmoid(load_reward_model(world / name).score_generated(ro.prompt_ids, ro.response_ids, cut))
                for name in ("rm_h", "rm_s"))
    gated = safety_gate(r_h, r_s, torch.tensor([p.is_safety for p, _ in batch]), 0.15).reward
    torch.testing.assert_close(ro.r_c, torch.sigmoid(logit(gated) - 1.5), atol=1e-5, rtol=1e-5)
    assert read_jsonl(out / "metrics.jsonl")[0]["truncation_rate"] == 1.0


# ---------------------------------------------------------------------------------------------
# Ghost Attention and context distillation: their sampler says which answers finished


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """``tiny.word_world`` (a policy that ends its answers early) and a safety RM in ``rm/``."""
    root = word_world(tmp_path_factory.mktemp("truncation_words"))
    save_reward_model(root / "rm", root / "base", load_tokenizer(root / "base"), seed=3)
    return root


def _gatt_cfg(world: Path, out: Path, **overrides):
    from rlhf.gatt.config import GAttConfig

    data = {
        "stage": "gatt", "output_dir": str(out), "policy_from": str(world / "base"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "turns": 3, "max_length": 96, "keep": "all",
                 "packing": False},
        "instructions": {"constraints": [{"name": "case", "text": "CAPS!", "checker": "upper_case"}]},
        "sampling": {"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0},
        "eval": {"dialogues": 2, "turns": 3, "temperature": 1.0},
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 2, "max_steps": 1},
    }
    return validate(GAttConfig, override(data, overrides), "test")


def _answers(keys, cut=()):
    """What a sampler returns for ``keys``: an answer per key, cut at the token limit for ``cut``."""
    return Samples([[5]] * len(keys), [f"ANSWER {k}" for k in keys], [k not in cut for k in keys])


def test_gatt_stops_a_dialogue_at_a_truncated_answer_and_leaves_its_example_out(tmp_path):
    from rlhf.gatt.stage import Dialogue, Instruction, gatt_examples, sample_turns

    caps = Instruction("CAPS!", (("case", ""),))

    def fresh():
        return [Dialogue(["u1", "u2", "u3"], caps, [], key) for key in ("a", "b", "c")]

    def sampler(conversations, keys):
        return _answers(keys, cut={"a/1", "b/0"})

    train = fresh()
    sample_turns(train, 3, sampler, "every", True)
    # a's second and b's first answer ran into max_new_tokens: neither dialogue goes on after it
    assert [d.finished for d in train] == [[True, False], [False], [True, True, True]]
    assert [len(d.answers) for d in train] == [2, 1, 3]
    examples, counts = gatt_examples(train, _gatt_cfg(tmp_path, tmp_path / "unused"))
    assert [e.messages[-1].content for e in examples] == ["ANSWER a/0", "ANSWER c/0", "ANSWER c/1", "ANSWER c/2"]
    assert counts["dropped_truncated"] == 2 and counts["dropped_empty_answer"] == 0
    held_out = fresh()  # evaluation judges every turn of every dialogue, truncated answers included
    sample_turns(held_out, 3, sampler, "first")
    assert [d.finished for d in held_out] == [[True, False, True], [False, True, True], [True, True, True]]


def test_gatt_with_a_policy_that_never_ends_has_nothing_to_train_on(words, tmp_path, monkeypatch):
    import rlhf.gatt.stage as gatt

    never_ends(monkeypatch)
    with pytest.raises(RecipeError, match=r"of 6 examples.*6 ended with an answer cut at sampling.max_new_tokens=6"):
        gatt.run(_gatt_cfg(words, tmp_path / "gatt"))


def test_gatt_trains_on_finished_answers_only_and_reports_the_truncation_rate(words, tmp_path):
    import rlhf.gatt.stage as gatt

    out = gatt.run(_gatt_cfg(words, tmp_path / "gatt"))
    sampled = read_jsonl(out / "eval" / "sampled.jsonl")
    flags = [f for d in sampled for f in d["finished"]]
    assert all(all(d["finished"][:-1]) for d in sampled)  # only a dialogue's last answer can be cut
    assert 0 < flags.count(False) < len(flags)
    # every example ends with an answer that finished: the EOS it is trained with was generated
    examples = read_records(out / "data" / "gatt.jsonl", "sft")
    assert [e.messages[-1].content for e in examples] == [
        a for d in sampled for k, (a, f) in enumerate(zip(d["answers"], d["finished"]), start=1) if f and all(d["answers"][:k])]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["dropped_truncated"] == flags.count(False)
    assert manifest["metrics"]["truncation_rate/sampled"] == flags.count(False) / len(flags)
    before = read_jsonl(out / "eval" / "before.jsonl")
    assert all(len(d["finished"]) == 3 for d in before)  # held-out dialogues go on past a cut answer
    assert manifest["metrics"]["truncation_rate/before"] == sum(not f for d in before for f in d["finished"]) / 6
    assert "truncation_rate/after" in manifest["metrics"] and "cut at" in (out / "eval" / "report.md").read_text()


def _cd_cfg(world: Path, out: Path, **overrides):
    from rlhf.context_distillation.config import ContextDistillationConfig

    data = {
        "stage": "context_distillation", "output_dir": str(out), "policy_from": str(world / "base"),
        "safety_rm_from": str(world / "rm"), "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "max_length": 64, "packing": False},
        "preprompt": {"generic": "be safe."},
        "sampling": {"max_new_tokens": 4, "batch_size": 4, "temperature": 1.0},
        "train": {"lr": 1e-2, "batch_size": 1, "micro_batch_size": 1, "max_steps": 1},
    }
    return validate(ContextDistillationConfig, override(data, overrides), "test")


def test_context_distillation_with_a_policy_that_never_ends_has_nothing_to_distill(words, tmp_path, monkeypatch):
    import rlhf.context_distillation.stage as cd

    never_ends(monkeypatch)
    with pytest.raises(RecipeError, match=r"preprompt: nothing to distill: of 12 preprompted answers.*12 were cut at sampling.max_new_tokens=4"):
        cd.run(_cd_cfg(words, tmp_path / "cd"))


def test_context_distillation_scores_truncated_answers_without_eos_and_keeps_them_out(words, tmp_path):
    import rlhf.context_distillation.stage as cd

    out = cd.run(_cd_cfg(words, tmp_path / "cd"))
    rows = read_jsonl(out / "data" / "candidates.jsonl")
    assert 0 < sum(not r["distilled_finished"] for r in rows) < len(rows)
    assert not any(r["kept"] and not r["distilled_finished"] for r in rows)
    kept = [r["distilled"] for r in rows if r["kept"]]
    assert [e.messages[-1].content for e in read_records(out / "data" / "context_distillation.jsonl", "sft")] == kept
    # both answers scored as they ended: a truncated one without the EOS it never generated
    rm, prompts = load_reward_model(words / "rm"), {p.id: p for p in read_records(words / "prompts.jsonl", "prompts")}
    for side in ("plain", "distilled"):
        expected = rm.score([prompts[r["id"]].messages for r in rows], [r[side] for r in rows],
                            finished=[r[f"{side}_finished"] for r in rows])
        assert [r[f"{side}_score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(r["distilled_score"] > r["plain_score"] and r["distilled"] and not r["kept"] for r in rows)  # cut ones
    assert manifest["data"]["dropped_truncated"] == sum(not r["distilled_finished"] for r in rows)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["truncation"]["distilled"]["truncated"] == sum(not r["distilled_finished"] for r in rows)
    assert manifest["metrics"]["truncation_rate/distilled"] == summary["truncation"]["distilled"]["rate"]
    assert set(summary["truncation"]) == {"plain", "distilled", "before", "after"}
