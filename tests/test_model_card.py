"""Every saved ``model/`` has a model card (``README.md``): base model, stage, data sources with
fingerprints, key hyper-parameters, final metrics, and for reward models the accuracy per rating.
A LoRA adapter saved unmerged records its base by absolute path, so it loads from anywhere."""

import json
import shutil
from pathlib import Path

import pytest

import tiny
from rlhf.artifacts import read_manifest

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "hi", "tell", "me", "a", "story",
         "good", "nice", "bad", "ugly", "ok"]
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card_world")
    tiny.save_with_tokenizer(root / "base", tiny.tiny_llama(len(WORDS), max_positions=64), tiny.word_tokenizer(WORDS))
    sft = [{"prompt": "tell me a story" if i % 2 else "hi", "response": "a good story" if i % 2 else "ok"} for i in range(8)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pairs = [{"prompt": f"tell me a story {i}", "chosen": "a good nice story", "rejected": "a bad ugly story",
              "rating": RATINGS[i % 4]} for i in range(32)]  # 32 prompts: the held-out split goes by prompt
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def sft_cfg(model_from: Path, data: Path, out: Path, **model):
    from sft.config import SFTConfig

    return SFTConfig(output_dir=out, model_from=model_from, model=model,
                     data={"sources": [{"path": data}], "max_length": 32, "packing": False},
                     train={"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 2})


def test_sft_model_card_names_base_stage_data_settings_and_metrics(world, tmp_path):
    from sft.stage import run

    out = run(sft_cfg(world / "base", world / "sft.jsonl", tmp_path / "sft"))
    card = (out / "model" / "README.md").read_text()
    manifest = read_manifest(out)
    assert card.startswith("---\n") and "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert "`sft` stage" in card
    assert f"`{(world / 'base').resolve()}`" in card  # the base model, by absolute path
    data = manifest["inputs"]["data.sources.0.path"]
    assert f"`{Path(data['path']).resolve()}`" in card and f"`{data['fingerprint']}`" in card
    assert "| `train.lr` | 0.001 |" in card and "| `train.batch_size` | 4 |" in card and "| `data.template` | llama2 |" in card
    assert f"| `loss` | {manifest['metrics']['loss']:.4g} |" in card and "| `steps` | 2 |" in card
    assert "apply_chat_template" in card  # how to talk to it
    assert manifest["fingerprint"]  # the card is part of the stage's content, written before the manifest


def test_reward_model_card_has_the_accuracy_per_rating(world, tmp_path):
    from reward_model.config import RewardModelConfig
    from reward_model.stage import run

    cfg = RewardModelConfig(output_dir=tmp_path / "rm", model_from=world / "base",
                            data={"sources": [{"path": world / "pairs.jsonl"}], "max_length": 32, "eval_fraction": 0.25},
                            train={"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 2})
    out = run(cfg)
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "`reward_model` stage" in card
    results = json.loads((out / "eval" / "metrics.json").read_text())["held_out.pairs"]
    assert results["pairs"] == 8 and set(results["per_rating"]) == set(RATINGS)
    header = "| test set | pairs | accuracy | significantly better | better | slightly better | negligibly better |"
    cells = " | ".join(f"{results['per_rating'][r]['accuracy']:.3f} ({results['per_rating'][r]['pairs']})" for r in RATINGS)
    assert header in card
    assert f"| held_out.pairs | 8 | {results['accuracy']:.3f} | {cells} |" in card


def test_unmerged_lora_adapter_loads_from_any_directory(world, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from sft.stage import run

    monkeypatch.chdir(world)  # the recipe names its base relative to here
    out = run(sft_cfg(Path("base"), Path("sft.jsonl"), tmp_path / "sft", lora={"enabled": True, "merge": False}))
    base = json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == (world / "base").resolve()
    card = (out / "model" / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card and f"`{base}`" in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(out / "model")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_base_model_built_from_scratch_gets_a_card_and_a_copied_one_keeps_its_own(world, tmp_path):
    from rlhf.base_model.config import BaseModelConfig
    from rlhf.base_model.stage import run

    built = run(BaseModelConfig(output_dir=tmp_path / "scratch", tokenizer={"corpus": [world / "sft.jsonl"], "vocab_size": 300}))
    card = (built / "model" / "README.md").read_text()
    assert "`base_model` stage" in card and "None: built from scratch." in card and "| `model.size` | tiny |" in card
    hub = Path(shutil.copytree(world / "base", tmp_path / "hub"))
    (hub / "README.md").write_text("# The base's own card (its license)\n")
    copied = run(BaseModelConfig(output_dir=tmp_path / "copy", from_pretrained=hub))
    assert (copied / "model" / "README.md").read_text() == "# The base's own card (its license)\n"
