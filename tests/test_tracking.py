"""Experiment tracking: ``report_to`` once for a whole pipeline or round, run names
``<pipeline>/<stage>``, a configurable W&B project, the resolved config logged as
hyper-parameters, and every tracker file inside the stage directory. The TensorBoard and W&B
runs skip where those packages are not installed."""

import json
from pathlib import Path

import pytest

import tiny
from rlhf.recipe import load_recipe

PIPELINE = """
pipeline: demo
output_dir: {out}
report_to: [tensorboard]
wandb_project: my-project
stages:
  - name: first
    config: {{stage: echo, message: a}}
  - name: second
    config: {{stage: echo, message: b, report_to: [], wandb_project: other}}
"""


def test_a_pipeline_reports_once_for_every_stage_with_its_run_names(tmp_path, echo_stage):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / "runs"))
    (_, first), (_, second) = load_recipe(path).stages
    assert (first.report_to, first.wandb_project, first.run_name) == (["tensorboard"], "my-project", "demo/first")
    assert (second.report_to, second.wandb_project, second.run_name) == ([], "other", "demo/second")  # its own say
    overridden = load_recipe(path, ["report_to=[wandb]", "first.run_name=mine"]).stages
    assert overridden[0][1].report_to == ["wandb"] and overridden[0][1].run_name == "mine"


def test_the_w_and_b_project_of_a_pipeline_defaults_to_its_name(tmp_path, echo_stage):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / "runs").replace("wandb_project: my-project\n", ""))
    assert load_recipe(path).stages[0][1].wandb_project == "demo"


def test_a_round_reports_once_for_every_stage(tmp_path, echo_stage):
    from rlhf.rounds import preview_round

    (tmp_path / "round.yaml").write_text(
        f"initial_policy: {tmp_path}\npolicy: rl\nreport_to: [wandb]\nwandb_project: weekly\n"
        "stages:\n  - {name: rl, config: {stage: echo, message: p}}\n")
    (_, rl), = preview_round(tmp_path / "round.yaml").stages
    assert (rl.report_to, rl.wandb_project, rl.run_name) == (["wandb"], "weekly", "round-NNN/rl")


def test_how_a_stage_is_logged_is_not_part_of_its_config_hash(tmp_path, echo_stage):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / "runs"))
    first = load_recipe(path).stages[0][1]
    moved = first.model_copy(update={"report_to": ["wandb"], "wandb_project": "x", "run_name": "y"})
    assert moved.config_hash() == first.config_hash()


# ---------------------------------------------------------------------------------------------
# Real trackers on a tiny SFT stage


WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "ok"]


def run_sft(tmp_path: Path, **tracking) -> Path:
    from sft.config import SFTConfig
    from sft.stage import run

    tiny.save_with_tokenizer(tmp_path / "base", tiny.tiny_llama(len(WORDS), max_positions=64), tiny.word_tokenizer(WORDS))
    rows = [{"prompt": "hi", "response": "hello ok"}] * 4
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(output_dir=tmp_path / "sft", model_from=tmp_path / "base", **tracking,
                    data={"sources": [{"path": tmp_path / "sft.jsonl"}], "max_length": 16, "packing": False},
                    train={"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "max_steps": 2})
    return run(cfg)


def test_tensorboard_gets_the_config_and_metrics_inside_the_stage_directory(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    out = run_sft(tmp_path, report_to=["tensorboard"], wandb_project="proj")
    events = sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events in the stage directory"
    scalars = set()
    for event in events:
        acc = EventAccumulator(str(event.parent))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert "loss" in scalars
    hparams = [p.read_text() for p in (out / "tensorboard").rglob("hparams.yml")]
    assert any("train.lr" in h and "data.max_length" in h for h in hparams)
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("base", "sft", "sft.jsonl")] == []


def test_w_and_b_offline_run_is_named_and_kept_in_the_stage_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    out = run_sft(tmp_path, report_to=["wandb"], wandb_project="proj", run_name="demo/sft")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb/"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the offline run: its config, name, project, metrics
    assert b"train.lr" in record and b"data.max_length" in record and b"demo/sft" in record and b"proj" in record
    assert not (tmp_path / "wandb").exists()
