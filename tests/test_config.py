"""One config vocabulary: the same idea has the same key, bounds and accepted inputs in every
stage, and a key of an earlier version is an error naming its new place."""

import pytest

from rlhf.config import POLICY_KINDS, ModelConfig, RecipeError, SamplingConfig, validate
from rlhf.stages import STAGES, config_class

BASE = {"helpfulness_rm_from": "h", "safety_rm_from": "s"}
MINIMAL = {
    "sft": {"model_from": "m", "data": {"sources": [{"path": "x.jsonl"}]}},
    "reward_model": {"model_from": "m", "data": {"sources": [{"path": "x.jsonl"}]}},
    "rejection_sampling": {"policy_from": "p", **BASE, "data": {"sources": [{"path": "x.jsonl"}]}},
    "ppo": {"policy_from": "p", **BASE, "data": {"sources": [{"path": "x.jsonl"}]}},
    "evaluate": {"policies": {"a": "p"}, **BASE, "prompts": {"sources": [{"path": "x.jsonl"}]}},
}


def _load(stage: str, **extra):
    return validate(config_class(stage), {"stage": stage, **MINIMAL[stage], **extra}, "r.yaml")


@pytest.mark.parametrize("stage", ["sft", "reward_model", "rejection_sampling", "ppo", "evaluate"])
def test_every_policy_input_accepts_every_policy_kind(stage):
    cls = config_class(stage)
    policy_inputs = [k for k in cls.INPUTS if k in ("model_from", "policy_from", "policies.*", "baseline_from")]
    assert policy_inputs
    for key in policy_inputs:
        assert cls.INPUTS[key] == POLICY_KINDS, key  # before: PPO refused a GAtt policy


def test_every_policy_producing_stage_is_a_policy_kind():
    assert set(POLICY_KINDS) - {"hf"} == set(STAGES) - {"reward_model", "evaluate", "preferences"}


@pytest.mark.parametrize("stage", ["rejection_sampling", "ppo", "evaluate"])
def test_the_safety_gate_is_one_key_with_one_range(stage):
    assert _load(stage).gate_threshold == 0.15
    assert _load(stage, gate_threshold=0.0).gate_threshold == 0.0
    with pytest.raises(RecipeError, match="gate_threshold"):
        _load(stage, gate_threshold=1.5)
    assert _load(stage, gate_threshold="calibrated").gate_threshold == "calibrated"
    assert _load(stage, gate_threshold="1e-2").gate_threshold == 0.01  # PyYAML reads 1e-2 as a string
    for wrong, said in (("calibrate", "'calibrate'"), ("high", "'high'"), (None, "null"), (-0.1, "-0.1")):
        with pytest.raises(RecipeError, match=f"^r.yaml: gate_threshold: expected a number in \\[0, 1\\] or "
                                              f"calibrated, got {said}$"):
            _load(stage, gate_threshold=wrong)
    with pytest.raises(RecipeError, match="gate_threshold: expected a number, got true"):
        _load(stage, gate_threshold=True)


def test_the_reward_models_gate_recall_is_a_share():
    assert _load("reward_model").eval.gate_recall == 0.55  # Llama 2's recall at its 0.15
    assert _load("reward_model", eval={"gate_recall": 1.0}).eval.gate_recall == 1.0
    for wrong in (0.0, 1.5):
        with pytest.raises(RecipeError, match="eval.gate_recall"):
            _load("reward_model", eval={"gate_recall": wrong})


@pytest.mark.parametrize("stage", ["rejection_sampling", "ppo", "gatt", "context_distillation", "evaluate"])
def test_every_generating_stage_has_the_one_sampling_group(stage):
    field = config_class(stage).model_fields["sampling"]
    assert issubclass(field.annotation, SamplingConfig)


@pytest.mark.parametrize("stage, given, defaults", [
    ("ppo", {"max_new_tokens": 7}, {"temperature": 1.0, "batch_size": 64, "max_prompt_length": 512}),
    ("evaluate", {"top_p": 0.9}, {"temperature": 0.0, "batch_size": 64, "max_new_tokens": 64}),
    ("rejection_sampling", {"top_p": 0.9}, {"temperature": 1.0, "batch_size": 64, "max_new_tokens": 256, "k": 8}),
])
def test_a_partial_sampling_group_keeps_the_stages_defaults(stage, given, defaults):
    sampling = _load(stage, sampling=given).sampling
    assert {key: getattr(sampling, key) for key in defaults} == defaults


def test_max_prompt_length_sits_in_sampling_where_prompts_are_filtered():
    assert _load("rejection_sampling", sampling={"max_prompt_length": 7}).sampling.max_prompt_length == 7
    assert _load("ppo", sampling={"max_prompt_length": 7}).sampling.max_prompt_length == 7


@pytest.mark.parametrize("stage, old, value, new", [
    ("ppo", "generation", {"max_new_tokens": 8}, "sampling"),
    ("ppo", "ppo", {"gate_threshold": 0.2}, "gate_threshold"),
    ("evaluate", "max_new_tokens", 8, "sampling.max_new_tokens"),
    ("evaluate", "template", "llama2", "prompts.template"),
])
def test_an_old_key_is_an_error_naming_the_new_one(stage, old, value, new):
    with pytest.raises(RecipeError, match=f"r.yaml: .*renamed to {new}"):
        _load(stage, **{old: value})


def test_ppo_data_max_prompt_length_is_renamed():
    data = {**MINIMAL["ppo"]["data"], "max_prompt_length": 64}
    with pytest.raises(RecipeError, match="data.max_prompt_length was renamed to sampling.max_prompt_length"):
        _load("ppo", data=data)


def test_the_model_group_carries_the_attention_kernel_everywhere():
    assert ModelConfig().attn_implementation == "sdpa"
    assert _load("sft", model={"attn_implementation": "eager"}).model.attn_implementation == "eager"
    assert _load("ppo", policy={"attn_implementation": "eager"}).policy.attn_implementation == "eager"


@pytest.mark.parametrize("group", ["policy", "critic"])
def test_ppo_accepts_flash_attention_its_forwards_keep_apart(group):
    # the packed forwards run one flattened row under flash attention (tests/test_flash_attention.py)
    cfg = _load("ppo", **{group: {"attn_implementation": "flash_attention_2"}})
    assert getattr(cfg, group).attn_implementation == "flash_attention_2"


def test_ppo_refuses_greedy_rollouts():
    with pytest.raises(RecipeError, match="sampling.temperature"):
        _load("ppo", sampling={"temperature": 0})


def test_ppo_refuses_nucleus_sampling():
    with pytest.raises(RecipeError, match="sampling.top_p: 0.9 samples from the nucleus"):
        _load("ppo", sampling={"top_p": 0.9})


@pytest.mark.parametrize("group, key", [("train", "max_steps"), ("train", "lr"), ("sampling", "k")])
def test_true_or_false_where_a_number_belongs_is_an_error(group, key):
    with pytest.raises(RecipeError, match=f"r.yaml: {group}: {key}: expected a number, got true"):
        _load("rejection_sampling", **{group: {key: True}})


def test_booleans_still_parse_where_they_belong():
    assert _load("sft", model={"gradient_checkpointing": True}).model.gradient_checkpointing is True
