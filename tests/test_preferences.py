"""Preference collection (the preferences stage): comparisons drawn among a prompt's distinct
answers, the annotator hook's checks, the quickstart world's annotators, and a reward model
reading a preferences stage's pairs through ``pairs_from``."""

import json
from pathlib import Path

import pytest

from rlhf.config import RecipeError, validate
from rlhf.data import Message, Prompt, load_data
from rlhf.preferences.stage import draw_comparisons, load_annotator, wanted
from rlhf.prompt_sampling import Item
from tiny import PROMPT_CORPUS, PROMPTS, bpe_tokenizer, ends_early, read_jsonl, stage_world, tiny_llama

HOOK = '''
from rlhf.data import PreferencePair

def longer(prompts, a, b):
    return [None if len(x) == len(y) else PreferencePair(list(p.messages), max(x, y, key=len), min(x, y, key=len), "better")
            for p, x, y in zip(prompts, a, b)]

def one_short(prompts, a, b):
    return longer(prompts, a, b)[1:]

def foreign(prompts, a, b):
    return [PreferencePair(list(p.messages), "something else", y) for p, x, y in zip(prompts, a, b)]
'''


def _item(key: str) -> Item:
    return Item(key, Prompt([Message("user", key)]), [])


def test_comparisons_are_drawn_among_distinct_finished_answers():
    items = [_item("a"), _item("b"), _item("c")]
    samples = {"a": {"responses": ["3", "3", "4", "5"], "finished": [True] * 4},
               "b": {"responses": ["7", "7", "x", " "], "finished": [True, True, False, True]},  # one distinct finished
               "c": {"responses": ["1", "2"], "finished": [True, True]}}
    all_pairs = draw_comparisons(items, samples, per_prompt=10, seed=0)
    assert sorted((i.key, a, b) for i, a, b in all_pairs) == [("a", "3", "4"), ("a", "3", "5"), ("a", "4", "5"), ("c", "1", "2")]
    one = draw_comparisons(items, samples, per_prompt=1, seed=0)
    assert [i.key for i, _, _ in one] == ["a", "c"] and (one[0][1], one[0][2]) in {("3", "4"), ("3", "5"), ("4", "5")}
    assert one == draw_comparisons(items, samples, per_prompt=1, seed=0)  # seeded per prompt


def test_prompt_kinds():
    helpful, safety = Prompt([Message("user", "q")]), Prompt([Message("user", "q")], is_safety=True)
    assert [wanted(p, k) for k in ("all", "helpfulness", "safety") for p in (helpful, safety)] == \
        [True, True, True, False, False, True]


def test_annotator_answers_are_checked(tmp_path):
    (tmp_path / "annot.py").write_text(HOOK)
    prompts = [Prompt([Message("user", "q")])] * 2
    labels = load_annotator(f"{tmp_path / 'annot.py'}:longer")(prompts, ["ab", "c"], ["a", "d"])
    assert (labels[0].chosen, labels[0].rejected, labels[0].rating) == ("ab", "a", "better") and labels[1] is None
    with pytest.raises(RecipeError, match=r"one pair \(or None\) per comparison \(2\), got 1"):
        load_annotator(f"{tmp_path / 'annot.py'}:one_short")(prompts, ["ab", "c"], ["a", "d"])
    with pytest.raises(RecipeError, match="item 0 must be None or a PreferencePair whose chosen and rejected are the two answers"):
        load_annotator(f"{tmp_path / 'annot.py'}:foreign")(prompts, ["ab", "c"], ["a", "d"])


def test_world_annotators_order_by_gold_and_are_deterministic():
    from rlhf.world.annotators import annotate

    add = Prompt([Message("user", "What is 7 plus 8?")], meta={"task": "add", "answer": "15"})
    harmful = Prompt([Message("user", "How do I steal a car?")], is_safety=True, meta={"task": "harmful"})
    pairs = annotate([add, add, harmful], ["14", "15", "Sure, here is how to steal a car."],
                     ["15", "I can't help with that.", "I can't help with that."])
    assert (pairs[0].chosen, pairs[0].rating) == ("15", "better")  # correct vs near miss (gap 0.5: never swapped)
    assert (pairs[1].chosen, pairs[1].rejected) == ("15", "I can't help with that.")
    assert (pairs[2].chosen, pairs[2].chosen_safe, pairs[2].rejected_safe) == ("I can't help with that.", True, False)
    assert annotate([add], ["14"], ["15"])[0] == pairs[0]  # the same comparison, the same label, in any batch
    # near ties are swapped about 15% of the time (two wrong answers)
    flips = [annotate([add], [f"{w}"], ["1"])[0].chosen == "1" for w in range(3, 13)]
    assert 0 < sum(flips) < len(flips)


def test_reward_model_reads_pairs_from_a_preferences_stage(tmp_path):
    from reward_model.config import RewardModelConfig

    data = {"stage": "reward_model", "output_dir": str(tmp_path / "rm"), "model_from": str(tmp_path / "sft"),
            "pairs_from": {"onpolicy": str(tmp_path / "prefs")},
            "data": {"sources": [{"name": "world", "path": str(tmp_path / "world.jsonl")}],
                     "mixture": [{"name": "helpfulness", "sources": ["world", "onpolicy"]}]}}
    cfg = validate(RewardModelConfig, data, "test")
    assert [(s.name, s.path) for s in cfg.data.sources] == [("world", tmp_path / "world.jsonl"),
                                                            ("onpolicy", tmp_path / "prefs" / "pairs.jsonl")]
    again = validate(RewardModelConfig, cfg.model_dump(mode="json"), "test")  # a config read back: added once
    assert [s.name for s in again.data.sources] == ["world", "onpolicy"]
    assert "pairs_from.onpolicy" in cfg.input_paths()
    data["data"]["sources"].append({"name": "onpolicy", "path": str(tmp_path / "other.jsonl")})
    with pytest.raises(RecipeError, match="pairs_from.onpolicy: data.sources already has a source named onpolicy"):
        validate(RewardModelConfig, data, "test")


def _world(tmp_path: Path) -> tuple[Path, dict]:
    """A ``tiny.stage_world`` whose policy ends its answers early, ``annot.py`` (``HOOK``), and a
    preferences recipe on its 8 prompts: 4 answers each, 2 comparisons, labelled by ``longer``."""
    tokenizer = bpe_tokenizer(PROMPT_CORPUS)
    policy = ends_early(tiny_llama(len(tokenizer), max_positions=256), opens=tokenizer.convert_tokens_to_ids("[/INST]"))
    world = stage_world(tmp_path / "world", tokenizer, policy, {})
    (tmp_path / "annot.py").write_text(HOOK)
    return world, {"stage": "preferences", "policy_from": str(world / "sft"), "annotator": f"{tmp_path / 'annot.py'}:longer",
                   "data": {"sources": [{"path": str(world / "prompts.jsonl")}]}, "pairs_per_prompt": 2,
                   "sampling": {"k": 4, "max_new_tokens": 6, "temperature": 1.0}, "batch": "week4"}


@pytest.mark.slow
def test_preferences_stage_writes_labelled_pairs_a_reward_model_reads(tmp_path):
    from reward_model.config import RewardModelConfig
    from rlhf.preferences.config import PreferencesConfig
    from rlhf.preferences.stage import run

    world, recipe = _world(tmp_path)
    cfg = validate(PreferencesConfig, {**recipe, "output_dir": str(tmp_path / "prefs"),
                                       "data": {**recipe["data"], "kind": "helpfulness"}}, "test")
    out = run(cfg)
    rows = read_jsonl(out / "pairs.jsonl")
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["prompts_sampled"] == 6 and m["pairs"] == len(rows) > 0  # the 6 helpfulness prompts of the 8
    assert m["comparisons"] == m["pairs"] + m["unlabelled"] and m["comparisons"] <= 12
    assert all(len(r["chosen"]) > len(r["rejected"]) and r["batch"] == "week4" and r["rating"] == "better" for r in rows)
    helpful = {text for text, is_safety in PROMPTS if not is_safety}
    assert {r["prompt"][0]["content"] for r in rows} <= helpful
    rm = validate(RewardModelConfig, {"stage": "reward_model", "output_dir": str(tmp_path / "rm"),
                                      "model_from": str(world / "sft"), "pairs_from": {"onpolicy": str(out)},
                                      "data": {"sources": []}}, "test")
    from rlhf.artifacts import input_fingerprints

    assert set(input_fingerprints(rm)) >= {"pairs_from.onpolicy", "model_from"}
    assert len(load_data(rm.data, "preference", 0).records) == len(rows)
    assert run(cfg) == out and read_jsonl(out / "pairs.jsonl") == rows  # re-running keeps the finished stage


@pytest.mark.slow
def test_two_processes_write_the_pairs_of_one(tmp_path):
    import yaml
    from launch import launch

    _, recipe = _world(tmp_path)
    path = tmp_path / "prefs.yaml"
    path.write_text(yaml.safe_dump({**recipe, "sampling": {**recipe["sampling"], "batch_size": 8}}))  # 4 buckets of 2 prompts
    one, two = launch(path, tmp_path / "one"), launch(path, tmp_path / "two", processes=2)
    assert read_jsonl(one / "pairs.jsonl") == read_jsonl(two / "pairs.jsonl") != []

