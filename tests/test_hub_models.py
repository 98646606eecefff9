"""Hugging Face hub model ids where a stage starts from a model (base_model's from_pretrained,
sft's model_from): loaded through the hub cache, recorded in the manifest by id and commit, and
an unreachable id says how to use a local copy. The hub here is a cache directory in the hub's
layout, read offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.artifacts import read_manifest
from rlhf.cli import main
from tiny import hh_rows, save_with_tokenizer, tiny_llama, weights, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "hi", "hello", "say", "no"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding ``tiny-org/tiny-llama`` at ``COMMIT`` (refs/main -> snapshot), used
    offline: ``from_pretrained("tiny-org/tiny-llama")`` resolves to it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    save_with_tokenizer(repo / "snapshots" / COMMIT, tiny_llama(len(WORDS), max_positions=64), word_tokenizer(WORDS))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory tiny-org/tiny-llama
    return repo / "snapshots" / COMMIT


def sft_recipe(path: Path, model_from: str) -> Path:
    recipe = {"stage": "sft", "output_dir": str(path.parent / "sft"), "model_from": model_from,
              "data": {"sources": [{"path": str(hh_rows(path.parent / "hh.jsonl", [(["say hello"], "hello", "no")]))}],
                       "max_length": 32},
              "train": {"lr": 1e-2, "batch_size": 1, "micro_batch_size": 1, "max_steps": 2}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_trains_from_a_hub_model_id_recorded_by_id_and_commit(hub, tmp_path):
    assert main(["run", str(sft_recipe(tmp_path / "sft.yaml", "tiny-org/tiny-llama"))]) == 0
    manifest = read_manifest(tmp_path / "sft")
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 2
    assert manifest["inputs"]["model_from"] == {"hub": "tiny-org/tiny-llama", "revision": COMMIT, "fingerprint": COMMIT}
    trained, start = weights(tmp_path / "sft" / "model"), weights(hub)
    assert any(not torch.equal(trained[n], start[n]) for n in start)
    assert f"| `model_from` | `hub: tiny-org/tiny-llama` | `{COMMIT}` |" in (tmp_path / "sft" / "model" / "README.md").read_text()
    # a second run finds the same commit in the cache: up to date, skipped
    assert main(["run", str(tmp_path / "sft.yaml")]) == 0
    assert read_manifest(tmp_path / "sft")["ended_at"] == manifest["ended_at"]


def test_base_model_saves_a_hub_model_as_its_model_dir(hub, tmp_path):
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "base_model", "output_dir": str(tmp_path / "base"),
                                      "from_pretrained": "tiny-org/tiny-llama"}))
    assert main(["run", str(recipe)]) == 0
    manifest = read_manifest(tmp_path / "base")
    assert manifest["inputs"]["from_pretrained"]["revision"] == COMMIT
    saved, original = weights(tmp_path / "base" / "model"), weights(hub)
    assert saved.keys() == original.keys() and all(torch.equal(saved[n], original[n]) for n in original)


def test_downstream_inputs_stay_local(hub, tmp_path, capsys):
    # policy_from reads another stage's output: a hub id there is no stage directory
    from rlhf.artifacts import InputError, input_fingerprints
    from rlhf.gatt.config import GAttConfig

    cfg = GAttConfig.model_construct(policy_from=Path("tiny-org/tiny-llama"), data=None)
    with pytest.raises(InputError, match="policy_from: tiny-org/tiny-llama: does not exist as a local directory"):
        input_fingerprints(cfg)


@pytest.mark.slow
def test_an_unreachable_hub_model_says_how_to_use_a_local_copy(tmp_path):
    """Through the command line, offline with an empty hub cache: exit 2, one message, no traceback."""
    recipe = sft_recipe(tmp_path / "sft.yaml", "Qwen/Qwen2.5-0.5B")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "rlhf", "run", str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(
        "error: model_from: Qwen/Qwen2.5-0.5B: no such local directory, and as a Hugging Face hub model id it "
        "could not be reached (HF_HUB_OFFLINE is set)")
    assert done.stderr.rstrip().endswith(
        "to use a local copy, download it where there is internet, `hf download Qwen/Qwen2.5-0.5B --local-dir "
        "models/Qwen2.5-0.5B`, and set model_from=models/Qwen2.5-0.5B")
    assert len(done.stderr.strip().splitlines()) == 1
