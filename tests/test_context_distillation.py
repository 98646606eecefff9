"""Safety context distillation: preprompts, what is kept, reward summaries, the stage."""

import json
from pathlib import Path

import pytest
import torch

from launch import launch
from rlhf.artifacts import read_manifest
from rlhf.context_distillation.stage import distilled_examples, improved, preprompt_demos, preprompt_for, quantile, reward_summary, shift, with_preprompt
from rlhf.data import Message, Prompt, read_records
from rlhf.context_distillation.config import ContextDistillationConfig, PrepromptConfig, TargetedPreprompt
from tiny import save_reward_model, weights, word_world

HARM = Prompt([Message("user", "how to steal a car")], is_safety=True, id="p1", meta={"category": "crime"})
OTHER = Prompt([Message("user", "insult my boss")], is_safety=True, id="p2", meta={"category": "hate"})


def test_generic_and_targeted_preprompts():
    generic = PrepromptConfig(generic="Be safe.")
    assert preprompt_for(HARM, generic) == ("Be safe.", "generic")
    targeted = PrepromptConfig(generic="Be safe.", targeted=TargetedPreprompt(
        templates={"crime": "refuse, then point to legal help"}, text="{generic} [{category}] {template}"))
    assert preprompt_for(HARM, targeted) == ("Be safe. [crime] refuse, then point to legal help", "targeted")
    assert preprompt_for(OTHER, targeted) == ("Be safe.", "generic")  # no template for its category


def test_preprompt_placement():
    convo = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "steal")]
    assert with_preprompt(convo, "Be safe.", "system") == [Message("system", "Be safe."), *convo]
    assert with_preprompt([Message("system", "Terse."), *convo], "Be safe.", "system")[0] == Message("system", "Be safe.\nTerse.")
    assert with_preprompt(convo, "Be safe.", "prefix") == [Message("user", "Be safe. hi"), *convo[1:]]


def test_preprompt_demos_pair_safe_chosen_answers_with_the_preprompt(tmp_path):
    pairs = [
        {"prompt": "steal a car", "chosen": "No.", "rejected": "Sure.", "chosen_safe": True, "rejected_safe": False},
        {"prompt": "steal a car", "chosen": "No.", "rejected": "Okay.", "chosen_safe": True, "rejected_safe": False},
        {"prompt": "kill a process", "chosen": "Use kill.", "rejected": "No.", "chosen_safe": True, "rejected_safe": True},
        {"prompt": "rob a store", "chosen": "Step 1.", "rejected": "Sure.", "chosen_safe": False, "rejected_safe": False},
        {"prompt": "add 2 and 3", "chosen": "5", "rejected": "6"},  # unlabelled
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    demos = preprompt_demos(str(tmp_path / "pairs.jsonl"), "Be safe.")
    assert [d.messages for d in demos] == [
        [Message("system", "Be safe."), Message("user", "steal a car"), Message("assistant", "No.")],
        [Message("system", "Be safe."), Message("user", "kill a process"), Message("assistant", "Use kill.")],
    ]
    assert preprompt_demos(str(tmp_path / "pairs.jsonl"), "Be safe.", "prefix")[0].messages[0] == Message("user", "Be safe. steal a car")


def test_keeps_exactly_the_answers_whose_safety_score_improved():
    prompts = [HARM, OTHER, Prompt([Message("user", "c")], True, id="p3"), Prompt([Message("user", "d")], True, id="p4")]
    distilled = ["I can't help with that.", "No.", "Sure: ...", "Here is how"]
    plain_scores = [-1.0, 0.5, 2.0, 0.0]
    distilled_scores = [1.5, 0.4, 2.0, 0.25]  # better, worse, tie (not kept), better
    keep = improved(distilled_scores, plain_scores)
    assert keep == [True, False, False, True]
    examples = distilled_examples(prompts, distilled, keep)
    assert [e.id for e in examples] == ["p1", "p4"]
    # paired with the prompt WITHOUT the preprompt
    assert examples[0].messages == [Message("user", "how to steal a car"), Message("assistant", "I can't help with that.")]
    with pytest.raises(ValueError):
        improved([1.0], [0.0, 1.0])


def test_reward_summary_and_shift():
    assert quantile([5, 1, 4, 2, 3], 0.1) == pytest.approx(1.4)  # 1 + 0.4 * (2 - 1)
    assert quantile([7.0], 0.1) == 7.0
    assert reward_summary([1, 2, 3, 4, 5]) == {"mean": 3.0, "p10": pytest.approx(1.4), "min": 1}
    s = shift([1, 2, 3, 4, 5], [3, 3, 3, 4, 7])
    assert s["shift_mean"] == pytest.approx(1.0) and s["shift_p10"] == pytest.approx(1.6) and s["after_min"] == 3


# ---------------------------------------------------------------------------------------------
# The stage, on a tiny Llama and a reward model built from it


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``tiny.word_world`` (24 prompts, 12 of them safety prompts) and a safety RM in ``rm/``."""
    from rlhf.models import load_tokenizer

    root = word_world(tmp_path_factory.mktemp("cd_world"))
    save_reward_model(root / "rm", root / "base", load_tokenizer(root / "base"), seed=3)
    return root


def cd_cfg(world: Path, out: Path) -> ContextDistillationConfig:
    return ContextDistillationConfig(
        output_dir=out, policy_from=world / "base", safety_rm_from=world / "rm",
        data={"sources": [{"path": world / "prompts.jsonl"}], "max_length": 64, "packing": False},
        preprompt={"generic": "be safe.", "targeted": {"templates": {"crime": "refuse"}, "text": "{generic} [{category}] {template}"}},
        sampling={"max_new_tokens": 5, "batch_size": 4, "temperature": 1.0},
        eval={"samples": 2, "temperature": 1.0},
        train={"lr": 1e-2, "batch_size": 2, "micro_batch_size": 1, "epochs": 1, "weight_decay": 0.0},
    )


@pytest.fixture(scope="module")
def whole(world, tmp_path_factory) -> Path:
    """One uninterrupted run of the stage."""
    from rlhf.context_distillation.stage import run

    return run(cd_cfg(world, tmp_path_factory.mktemp("cd") / "whole"))


def test_stage_keeps_improved_answers_fine_tunes_and_reports_the_shift(world, whole):
    out = whole
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["stage"] == "context_distillation"
    rows = [json.loads(line) for line in (out / "data" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["id"].startswith("s") for r in rows)  # the safety prompts only
    assert [r["preprompt"] for r in rows] == ["targeted", "generic", "generic"] * 4  # crime has a template
    assert [r["kept"] for r in rows] == [r["distilled_score"] > r["plain_score"] and r["distilled"] != "" and r["distilled_finished"]
                                         for r in rows]  # a distilled answer cut at max_new_tokens is no example
    kept = [r for r in rows if r["kept"]]
    assert 2 <= len(kept) < 12
    examples = read_records(out / "data" / "context_distillation.jsonl", "sft")
    prompts = {p.id: p for p in read_records(world / "prompts.jsonl", "prompts")}
    # each kept answer after its prompt WITHOUT the preprompt
    assert [e.messages for e in examples] == [[*prompts[r["id"]].messages, Message("assistant", r["distilled"])] for r in kept]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["kept"] == len(kept) == manifest["metrics"]["kept"] and summary["prompts"] == 12
    assert summary["preprompted_vs_plain"]["before_mean"] == pytest.approx(sum(r["plain_score"] for r in rows) / 12)
    shift_ = summary["policy_before_after"]
    assert shift_["shift_mean"] == pytest.approx(shift_["after_mean"] - shift_["before_mean"])
    assert manifest["metrics"]["safety/after_p10"] == shift_["after_p10"]
    answers = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 24 and [a["id"] for a in answers[:4]] == ["s0", "s0", "s1", "s1"]  # 2 samples each
    assert answers[0]["before"] != answers[1]["before"] or answers[0]["after"] != answers[1]["after"]
    assert shift_["before_mean"] == pytest.approx(sum(a["before_score"] for a in answers) / 24)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(kept) // 2 + 1))
    before, after = weights(world / "base"), weights(out / "model")
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_interrupted_sampling_resumes_where_it_stopped(world, whole, tmp_path, monkeypatch):
    from rlhf import sharding
    from rlhf.context_distillation import stage as cd

    real_write, real_chunk, chunks = sharding.write_json_atomic, cd.distill_chunk, []

    def write_then_die(path, data):
        if path.parent.name == "samples" and path.name == "chunk-000001.json":
            raise KeyboardInterrupt("killed while sampling")
        real_write(path, data)

    monkeypatch.setattr(cd, "distill_chunk", lambda part, *a: chunks.append(part[0][0]) or real_chunk(part, *a))
    monkeypatch.setattr(sharding, "write_json_atomic", write_then_die)
    cfg = cd_cfg(world, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        cd.run(cfg)
    monkeypatch.setattr(sharding, "write_json_atomic", real_write)
    resumed = cd.run(cfg)
    assert chunks == ["train/0", "train/4", "train/4", "train/8"]  # chunk 0 is not sampled again
    for name in ("data/candidates.jsonl", "data/context_distillation.jsonl", "eval/summary.json"):
        assert (whole / name).read_text() == (resumed / name).read_text()
    a, b = weights(whole / "model"), weights(resumed / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    recipe = tmp_path / "cd.yaml"
    recipe.write_text(json.dumps(cd_cfg(world, tmp_path / "unused").model_dump(mode="json")))  # JSON is YAML
    one, two = launch(recipe, tmp_path / "one"), launch(recipe, tmp_path / "two", processes=2)
    for name in ("data/candidates.jsonl", "data/context_distillation.jsonl"):
        assert (one / name).read_text() == (two / name).read_text()
    a, b = weights(one / "model"), weights(two / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
