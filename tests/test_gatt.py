"""Ghost Attention: instructions, the GAtt transform, loss masks, follow rates, the stage."""

import json
import random
from pathlib import Path

import pytest
import torch

from launch import launch
from rlhf.artifacts import read_manifest
from rlhf.data import Message, Prompt, read_records, render
from rlhf.gatt.stage import Dialogue, Instruction, conversation, draw_instruction, follow_rates, follows, instruction_demos, make_dialogues, pour_dialogues, sample_turns, training_examples
from rlhf.gatt.checks import ends_with, mentions, starts_with, upper_case, words
from rlhf.gatt.config import Constraint, GAttConfig, InstructionsConfig
from rlhf.config import RecipeError
from rlhf.generation import Samples
from rlhf.recipe import load_recipe
from tiny import weights, word_tokenizer, word_world

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "HELLO", "add", "two", "FOUR",
         "bye", "BYE", "CAPS!"]
CAPS = Constraint(name="case", text="CAPS!", short="C", checker="upper_case")
LAST = Constraint(name="last", text="End with {value}.", short="Last: {value}", values=["ok", "done"], checker="ends_with")
HOBBY = Constraint(name="hobby", text="You enjoy {value}.", values=["tennis"])


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word; ids are the positions in WORDS."""
    return word_tokenizer(WORDS, pad_token=None)


def hand_made() -> Dialogue:
    return Dialogue(["hi", "add two", "bye"], Instruction("CAPS!", (("case", ""),)), ["HELLO", "FOUR", "BYE"])


def test_checkers():
    assert words("Hi, it's me!") == ["hi", "it's", "me"]
    assert upper_case("HELLO, 42!") and not upper_case("Hello") and not upper_case("42")
    assert ends_with("That is all. Done!", "done") and not ends_with("done, that is all", "done")
    assert starts_with("Ok: sure", "ok") and not starts_with("sure ok", "ok")
    assert mentions("I love to play tennis daily", "tennis") and not mentions("tennisball", "tennis")


def test_sampling_puts_the_instruction_in_every_user_turn():
    d = hand_made()
    d.answers = d.answers[:2]
    assert conversation(d, 3, "every") == [
        Message("user", "hi CAPS!"), Message("assistant", "HELLO"),
        Message("user", "add two CAPS!"), Message("assistant", "FOUR"),
        Message("user", "bye CAPS!"),
    ]


def test_training_keeps_it_in_the_first_turn_and_trains_on_the_last_answer(tokenizer):
    full = training_examples(hand_made(), every_depth=False)
    assert len(full) == 1
    assert full[0].messages == [
        Message("user", "hi CAPS!"), Message("assistant", "HELLO"),
        Message("user", "add two"), Message("assistant", "FOUR"),
        Message("user", "bye"), Message("assistant", "BYE"),
    ]
    out = render(full[0].messages, tokenizer, loss_on="last")
    # <s> [INST] hi CAPS! [/INST] HELLO </s> <s> [INST] add two [/INST] FOUR </s> <s> [INST] bye [/INST] BYE </s>
    assert out.ids == [1, 3, 5, 12, 4, 6, 2, 1, 3, 7, 8, 4, 9, 2, 1, 3, 10, 4, 11, 2]
    assert out.loss_mask == [0] * 18 + [1, 1]  # only "BYE </s>": previous answers are context
    depths = training_examples(hand_made(), every_depth=True)
    assert [len(e.messages) for e in depths] == [2, 4, 6] and depths[-1].messages == full[0].messages
    assert depths[1].messages[-1] == Message("assistant", "FOUR")


def test_sample_turns_batches_each_depth_and_sees_the_instruction_everywhere():
    calls = []

    def sampler(convs, keys):
        calls.append(keys)
        assert all(m.content.endswith("CAPS!") for c in convs for m in c if m.role == "user")
        return Samples([[]] * len(convs), [c[-1].content.split()[0].upper() for c in convs], [True] * len(convs))

    ds = [Dialogue(["hi", "add two", "bye"], Instruction("CAPS!", (("case", ""),)), [], f"d{i}") for i in range(2)]
    sample_turns(ds, 3, sampler, "every")
    assert calls == [["d0/0", "d1/0"], ["d0/1", "d1/1"], ["d0/2", "d1/2"]] and ds[0].answers == ["HI", "ADD", "BYE"]


def test_draw_instruction_shortens_and_combines():
    cfg = InstructionsConfig(constraints=[CAPS, LAST, HOBBY], combine=0.5, shorten=0.5)
    rng = random.Random(0)
    drawn = [draw_instruction(cfg, rng) for _ in range(400)]
    combined = [i for i in drawn if len(i.parts) == 2]
    assert 0.4 < len(combined) / 400 < 0.6
    assert all(i.parts[0][0] != i.parts[1][0] for i in combined)  # different kinds
    singles = [i for i in drawn if i.parts == (("last", "ok"),)]
    assert {i.text for i in singles} == {"End with ok.", "Last: ok"}
    assert {i.text for i in drawn if i.parts == (("hobby", "tennis"),)} == {"You enjoy tennis."}  # no short form
    checked = make_dialogues([["a"]] * 50, cfg, seed=1, name="eval", checked_only=True)
    assert all(name != "hobby" for d in checked for name, _ in d.instruction.parts)
    again = make_dialogues([["a"]] * 50, cfg, seed=1, name="eval", checked_only=True)
    assert [d.instruction for d in checked] == [d.instruction for d in again]


def test_instruction_demos_obey_their_instruction(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}."}]} for i in range(200)]
    rows[0]["messages"] += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "fine"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = instruction_demos(str(tmp_path / "sft.jsonl"), [LAST.model_dump()], share=0.5, seed=0)
    assert 70 < len(demos) < 130 and any(len(d.messages) == 4 for d in demos)
    for demo in demos:
        first, *others = [m.content for m in demo.messages if m.role == "user"]
        inst = first.split(" ", 1)[1]  # "q17 End with ok" -> the instruction, in the first turn only
        assert inst in {"End with ok.", "End with done.", "Last: ok", "Last: done"} and others in ([], ["more"])
        assert all(ends_with(m.content, inst.split()[-1]) for m in demo.messages if m.role == "assistant")
    both = instruction_demos(str(tmp_path / "sft.jsonl"), [CAPS.model_dump(), LAST.model_dump()], share=1.0, combine=1.0, shorten=0.0)
    assert len(both) == 200
    assert all(upper_case(a) and (ends_with(a, "ok") or ends_with(a, "done")) for d in both for a in [d.messages[1].content])
    with pytest.raises(ValueError, match="no rewrite"):
        instruction_demos(str(tmp_path / "sft.jsonl"), [HOBBY.model_dump()])


def test_pour_dialogues():
    prompts = [Prompt([Message("user", f"q{i}")]) for i in range(5)]
    prompts.insert(1, Prompt([Message("user", "a"), Message("assistant", "x"), Message("user", "b")]))
    dialogues, used = pour_dialogues(prompts, turns=3)
    assert dialogues == [["q0", "a", "b"], ["q1", "q2", "q3"]] and used == 6
    assert pour_dialogues(prompts, turns=3, limit=1) == ([["q0", "a", "b"]], 2)


def test_follow_rates_by_depth():
    both = Instruction("CAPS! End with ok.", (("case", ""), ("last", "ok")))
    hobby = Instruction("You enjoy tennis.", (("hobby", "tennis"),))
    assert follows("FINE OK", both, [CAPS, LAST]) and not follows("FINE", both, [CAPS, LAST])
    assert follows("anything", hobby, [CAPS, LAST, HOBBY]) is None
    ds = [
        Dialogue(["u"] * 2, both, ["YES OK", "no ok"]),
        Dialogue(["u"] * 2, Instruction("CAPS!", (("case", ""),)), ["YES", "YES"]),
        Dialogue(["u"] * 2, hobby, ["a", "b"]),  # not judged
    ]
    assert follow_rates(ds, [CAPS, LAST, HOBBY]) == {
        1: {"follow": 1.0, "judged": 2}, 2: {"follow": 0.5, "judged": 2},
    }


# ---------------------------------------------------------------------------------------------
# The stage, on a tiny Llama with a word-level tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return word_world(tmp_path_factory.mktemp("gatt_world"))


def gatt_cfg(world: Path, out: Path) -> GAttConfig:
    return GAttConfig(
        output_dir=out, policy_from=world / "base",
        data={"sources": [{"path": world / "prompts.jsonl"}], "turns": 3, "max_length": 96, "packing": False, "keep": "all",
              "replay": {"sources": [{"path": world / "sft.jsonl"}]}},
        instructions={"constraints": [{"name": "case", "text": "CAPS!", "checker": "upper_case"},
                                      {"name": "last", "text": "End with {value}", "values": ["ok", "done"], "checker": "ends_with"}],
                      "combine": 0.5},
        sampling={"max_new_tokens": 8, "batch_size": 2, "temperature": 1.0},
        eval={"dialogues": 2, "turns": 3},
        train={"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "epochs": 1, "weight_decay": 0.0, "save_every": 2},
    )


@pytest.fixture(scope="module")
def whole(world, tmp_path_factory) -> Path:
    """One uninterrupted run of the stage."""
    from rlhf.gatt.stage import run

    return run(gatt_cfg(world, tmp_path_factory.mktemp("gatt") / "whole"))


def test_stage_writes_gatt_data_trains_and_evaluates(world, whole):
    out = whole
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["stage"] == "gatt"
    data = manifest["data"]
    # 24 prompts: 2 held-out dialogues of 3 turns take 6, the other 18 make 6 dialogues of 3
    # turns, so up to 18 examples (one per depth: a dialogue stops at an answer cut at
    # max_new_tokens), less those with an empty or a cut sampled answer
    assert (data["eval_dialogues"], data["dialogues"]) == (2, 6)
    answered = sum(len(json.loads(line)["answers"]) for line in (out / "eval" / "sampled.jsonl").read_text().splitlines())
    assert data["generated_examples"] + data["dropped_empty_answer"] + data["dropped_truncated"] == answered <= 18
    assert data["generated_examples"] >= 12
    examples = read_records(out / "data" / "gatt.jsonl", "sft")
    assert len(examples) == data["generated_examples"] == data["examples"] - 4 and data["replay_examples"] == 4
    assert {len(e.messages) for e in examples} == {2, 4, 6}
    for e in examples:
        users = [m.content for m in e.messages if m.role == "user"]
        assert users[0].endswith(("CAPS!", "End with ok", "End with done"))  # the instruction, first turn
        assert not any("CAPS!" in u or "End with" in u for u in users[1:])  # and nowhere else
    rates = json.loads((out / "eval" / "gatt.json").read_text())
    assert set(rates) == {"sampled", "before", "after"} and set(rates["after"]) == {"1", "2", "3"}
    assert rates["before"]["3"]["judged"] == 2
    assert "follow/after/turn_3" in manifest["metrics"] and (out / "eval" / "report.md").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, (len(examples) + 4) // 4 + 1))  # one example per row, batch 4
    before, after = weights(world / "base"), weights(out / "model")
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_dialogues_beyond_one_pass_reuse_the_prompts(world, tmp_path):
    from rlhf.gatt.stage import dialogue_users

    cfg = gatt_cfg(world, tmp_path / "unused")
    train, held_out, counts = dialogue_users(cfg)
    assert (len(train), len(held_out), counts["rows"]) == (6, 2, 24)
    cfg.data.dialogues = 15
    more, held_again, _ = dialogue_users(cfg)
    assert len(more) == 15 and more[:6] == train and held_again == held_out
    assert all(len(d) == 3 for d in more)


def test_keep_following_drops_examples_the_checker_rejects(world, tmp_path):
    from rlhf.gatt.stage import gatt_examples

    cfg = gatt_cfg(world, tmp_path / "unused")
    cfg.data.keep = "following"
    caps = Instruction("CAPS!", (("case", ""),))
    sampled = [Dialogue(["hi", "what", "name"], caps, ["YES", "no", "OK"], finished=[True] * 3)]
    examples, counts = gatt_examples(sampled, cfg)
    assert [e.messages[-1].content for e in examples] == ["YES", "OK"] and counts["dropped_not_following"] == 1
    cfg.data.every_depth = False
    sampled[0].answers[-1] = "ok"
    with pytest.raises(RecipeError, match="no training example is left of 1 examples.*1 with one its instruction's checker rejects"):
        gatt_examples(sampled, cfg)


def test_interrupted_generation_and_training_resume_to_the_same_result(world, whole, tmp_path, monkeypatch):
    from rlhf import sharding, training
    from rlhf.gatt import stage as gatt

    calls, real_write, real_save, real_sample = [], sharding.write_json_atomic, training.save_checkpoint, gatt.sample_turns

    def write_then_die(path, data):
        if path.parent.name == "samples" and path.name == "chunk-000001.json":
            raise KeyboardInterrupt("killed while sampling")
        real_write(path, data)

    def save_then_die(accelerator, checkpoints, step, keep):
        real_save(accelerator, checkpoints, step, keep)
        raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(gatt, "sample_turns", lambda ds, *a: calls.append(ds[0].key) or real_sample(ds, *a))
    cfg = gatt_cfg(world, tmp_path / "resumed")
    monkeypatch.setattr(sharding, "write_json_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gatt.run(cfg)
    monkeypatch.setattr(sharding, "write_json_atomic", real_write)
    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        gatt.run(cfg)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = gatt.run(cfg)
    # eval_before, samples 0, 1 (killed) | samples 1, 2, then training killed | eval_after
    assert calls == ["eval/0", "train/0", "train/2", "train/2", "train/4", "eval/0"]
    assert (whole / "data" / "gatt.jsonl").read_text() == (resumed / "data" / "gatt.jsonl").read_text()
    assert (whole / "eval" / "gatt.json").read_text() == (resumed / "eval" / "gatt.json").read_text()
    a, b = weights(whole / "model"), weights(resumed / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path):
    recipe = tmp_path / "gatt.yaml"
    recipe.write_text(json.dumps(gatt_cfg(world, tmp_path / "unused").model_dump(mode="json")))  # JSON is YAML
    one, two = launch(recipe, tmp_path / "one"), launch(recipe, tmp_path / "two", processes=2)
    assert (one / "data" / "gatt.jsonl").read_text() == (two / "data" / "gatt.jsonl").read_text()
    assert read_manifest(two)["data"] == read_manifest(one)["data"]
    a, b = weights(one / "model"), weights(two / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Recipes


def test_shipped_recipes_validate_and_chain_in_a_pipeline(tmp_path):
    gatt = load_recipe(REPO / "recipes/quickstart/gatt.yaml")
    cd = load_recipe(REPO / "recipes/quickstart/context_distillation.yaml")
    assert (gatt.stage, cd.stage) == ("gatt", "context_distillation")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
output_dir: {tmp_path / "runs"}
stages:
  - {{name: sft, config: {{stage: sft, model_from: base, data: {{sources: [{{path: sft.jsonl}}]}}}}}}
  - {{name: rm_safety, config: {{stage: reward_model, model_from: base, data: {{sources: [{{path: pairs.jsonl}}]}}}}, inputs: {{model_from: sft}}}}
  - {{name: gatt, recipe: {REPO / "recipes/quickstart/gatt.yaml"}, inputs: {{policy_from: sft}}}}
  - {{name: distilled, recipe: {REPO / "recipes/quickstart/context_distillation.yaml"},
     inputs: {{policy_from: gatt, safety_rm_from: rm_safety}}}}
""")
    stages = dict(load_recipe(pipeline).stages)
    assert stages["gatt"].policy_from == tmp_path / "runs" / "sft"
    assert stages["distilled"].policy_from == tmp_path / "runs" / "gatt"
    assert stages["distilled"].safety_rm_from == tmp_path / "runs" / "rm_safety"
    wrong = pipeline.read_text().replace("safety_rm_from: rm_safety", "safety_rm_from: sft")
    pipeline.write_text(wrong)
    with pytest.raises(RecipeError, match="inputs.safety_rm_from: expects the output of reward_model"):
        load_recipe(pipeline)


def test_recipe_mistakes_name_the_key(tmp_path):
    recipe = tmp_path / "gatt.yaml"
    base = (REPO / "recipes/quickstart/gatt.yaml").read_text()
    recipe.write_text(base.replace('short: "Hobby: {value}"', 'short: "Hobby: {name}"'))
    with pytest.raises(RecipeError, match=r"instructions\.constraints\.2: short: unknown placeholder\(s\) name"):
        load_recipe(recipe)
    recipe.write_text(base.replace("checker: starts_with", "checker: starts with"))
    with pytest.raises(RecipeError, match=r"instructions\.constraints\.1: checker: 'starts with' is neither"):
        load_recipe(recipe)
    recipe.write_text(base.replace("checker: starts_with", "checker: null").replace("checker: ends_with", "checker: null"))
    with pytest.raises(RecipeError, match="no constraint has a checker"):
        load_recipe(recipe)
