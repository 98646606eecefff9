"""The SFT stage end to end on a tiny Llama: outputs, resume, LoRA, 2 processes == 1, real checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from launch import launch
from rlhf.artifacts import read_manifest
from rlhf.recipe import load_recipe
from sft.config import SFTConfig
from tiny import save_with_tokenizer, tiny_llama, weights, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"] + [
    "hi", "hello", "add", "two", "and", "three", "is", "five", "bye", "ok", "name", "a", "cat",
    "dog", "sun", "red", "blue", "what", "color", "sky", "the", "be", "brief.", "yes", "no"]


def conversation(i: int) -> dict:
    w = WORDS[7:]
    turns = [("user", f"what color {w[i % 24]}"), ("assistant", f"the {w[(i * 5) % 24]} is {w[(i * 7) % 24]}")]
    if i % 3 == 0:  # multi-turn, with a system prompt
        turns = [("system", "be brief.")] + turns + [("user", "name a dog"), ("assistant", f"{w[i % 24]} dog")]
    if i == 5:  # longer than max_length: truncated (or dropped)
        turns[-1] = ("assistant", " ".join(w * 3))
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny Llama (32 wide, 2 layers, 128 positions) with a word-level tokenizer in ``base/``,
    and 16 conversations."""
    root = tmp_path_factory.mktemp("sft_world")
    save_with_tokenizer(root / "base", tiny_llama(len(WORDS), max_positions=128), word_tokenizer(WORDS))
    lines = [json.dumps(conversation(i)) for i in range(16)]
    (root / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_cfg(world: Path, out: Path, **train) -> SFTConfig:
    return SFTConfig(
        output_dir=out, model_from=world / "base",
        data={"sources": [{"path": world / "sft.jsonl"}], "max_length": 32},
        train={"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "epochs": 2, "warmup_ratio": 0.0,
               "weight_decay": 0.0, **train},
    )


def test_stage_trains_on_answers_and_writes_its_directory(world, tmp_path):
    from sft.stage import run
    from transformers import AutoTokenizer

    out = run(make_cfg(world, tmp_path / "sft", max_steps=2))
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["stage"] == "sft"
    data = manifest["data"]
    assert data["examples"] == 16 and data["truncated"] == 1 and data["examples_used"] == 16
    assert data["packed_rows"] < 16 and data["sources"]["sft"]["used"] == 16
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0])
    before, after = weights(world / "base"), weights(out / "model")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor moved after 2 steps
    assert AutoTokenizer.from_pretrained(out / "model").eos_token == "</s>"


def test_overlong_examples_dropped_and_counted(world, tmp_path):
    from sft.stage import run

    cfg = make_cfg(world, tmp_path / "sft", max_steps=1)
    cfg.data.overlong = "drop"
    data = read_manifest(run(cfg))["data"]
    assert (data["dropped_overlong"], data["truncated"], data["examples_used"]) == (1, 0, 15)


def test_resumed_run_ends_with_the_same_weights(world, tmp_path, monkeypatch):
    from rlhf import training
    from sft.stage import run

    whole = run(make_cfg(world, tmp_path / "whole", save_every=2))

    real_save = training.save_checkpoint

    def save_then_die(accelerator, checkpoints, step, keep):
        real_save(accelerator, checkpoints, step, keep)
        if step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    cfg = make_cfg(world, tmp_path / "resumed", save_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert read_manifest(cfg.output_dir) is None
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = run(cfg)
    a, b = weights(whole / "model"), weights(resumed / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # no step logged twice


def test_lora_saves_a_merged_model_plain_transformers_loads(world, tmp_path):
    from sft.stage import run

    cfg = make_cfg(world, tmp_path / "lora", max_steps=2)
    cfg.model.lora.enabled = True
    cfg.model.lora.r = 4
    out = run(cfg)
    assert not (out / "model" / "adapter_config.json").exists()
    before, after = weights(world / "base"), weights(out / "model")
    assert set(before) == set(after)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # not adapted


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(world, tmp_path):
    recipe = tmp_path / "sft.yaml"
    cfg = make_cfg(world, tmp_path / "unused", max_steps=3)
    recipe.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    launch(recipe, tmp_path / "one"), launch(recipe, tmp_path / "two", processes=2)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_starts_from_the_real_tinystories_checkpoint(world, tmp_path, realdata):
    from sft.stage import run

    base = realdata / "models" / "tinystories-656k"
    if not base.is_dir():
        pytest.skip("tinystories-656k is not present")
    cfg = make_cfg(world, tmp_path / "real", max_steps=2)
    cfg.model_from = base
    cfg.data.max_length = 128
    out = run(cfg)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < loss < 20 for loss in losses)
    before, after = weights(base), weights(out / "model")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])  # still tied


@pytest.mark.parametrize("recipe", ["recipes/quickstart/sft.yaml", "recipes/llama2_7b/sft.yaml"])
def test_shipped_recipes_validate(recipe):
    cfg = load_recipe(REPO / recipe)
    assert cfg.stage == "sft"


def test_defaults_are_the_papers():
    train = SFTConfig.model_fields["train"].default
    assert (train.lr, train.schedule, train.weight_decay, train.batch_size, train.epochs) == (2e-5, "cosine", 0.1, 64, 2)
    assert (train.betas, train.eps, train.grad_clip) == ((0.9, 0.95), 1e-5, 1.0)
    partial = SFTConfig(model_from="m", data={"sources": [{"path": "d.jsonl"}]}, train={"lr": 1e-4})
    assert partial.train.weight_decay == 0.1  # a recipe setting one key keeps the others
    assert partial.data.max_length == 4096 and partial.data.packing
