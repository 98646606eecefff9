"""What a run prints: the libraries' own progress bars silenced (the toolkit's stay), each stage
named as the pipeline names it, data problems capped per kind, a changed config never announced as
a resume, and a closing line per stage."""

import json
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from rlhf.artifacts import StageRun
from rlhf.config import StageConfig
from rlhf.data import DataError, Problem, run_validate
from rlhf.data.validate import error_text, problem_kind, problem_lines
from rlhf.pipeline import run_recipe, run_stage
from rlhf.recipe import load_recipe
from tiny import save_with_tokenizer, tiny_llama, word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "tell", "me", "story", "good", "bad", "nice", "ugly", "a"]


# ---------------------------------------------------------------------------------------------
# 1. transformers' bars off, ours on


class ModelIOConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {}

    stage: Literal["model_io"] = "model_io"


def model_io_run(cfg: ModelIOConfig) -> Path:
    """Saves and reloads a tiny model (transformers' "Writing model shards" and "Loading weights"
    bars) between the toolkit's own progress lines."""
    from transformers import LlamaForCausalLM

    from rlhf.progress import Progress

    run = StageRun(cfg).start()
    progress = Progress(2, f"{cfg.output_dir.name} io")
    tiny_llama(len(WORDS)).save_pretrained(run.dir / "model")
    progress.update(1)
    LlamaForCausalLM.from_pretrained(run.dir / "model")
    progress.update(1)
    return run.finish({"loss": 0.25, "steps": 2})


@pytest.fixture
def model_io(monkeypatch):
    from transformers.utils import logging

    from rlhf import stages

    monkeypatch.setitem(stages.STAGES, "model_io", (f"{__name__}:ModelIOConfig", f"{__name__}:model_io_run"))
    was_on = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()  # as in a fresh process
    yield
    (logging.enable_progress_bar if was_on else logging.disable_progress_bar)()


def test_library_bars_are_silenced_and_ours_stay(tmp_path, model_io, capfd):
    cfg = load_recipe(_write(tmp_path / "io.yaml", {"stage": "model_io", "output_dir": str(tmp_path / "weights")}))
    run_stage(cfg)
    out, err = capfd.readouterr()
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert "[rlhf] weights io: 1/2" in out and "[rlhf] weights io: 2/2" in out  # a log, not a terminal: lines
    # the closing line: a stage with a training loss and no other summary reports the loss
    assert out.splitlines()[-1] == "[rlhf] weights: done: final loss 0.25 after 2 steps"


# ---------------------------------------------------------------------------------------------
# 2. each reward model under its own name


def test_two_reward_models_print_their_pipeline_names(tmp_path, capsys):
    lm = save_with_tokenizer(tmp_path / "lm", tiny_llama(len(WORDS), max_positions=64), word_tokenizer(WORDS))
    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    rows = [{"prompt": f"tell me a story {i}", "chosen": "a good nice story", "rejected": "a bad ugly story",
             "rating": ratings[i % 4]} for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = {"stage": "reward_model", "model_from": str(lm), "loss": {"margin": "small"},
          "data": {"sources": [{"path": str(tmp_path / "pairs.jsonl")}], "eval_fraction": 0.25, "max_length": 32},
          "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "min_warmup_steps": 0}}
    pipeline = {"pipeline": "rms", "output_dir": str(tmp_path / "run"),
                "stages": [{"name": "rm_helpful", "config": rm}, {"name": "rm_safe", "config": rm}]}
    run_recipe(load_recipe(_write(tmp_path / "rms.yaml", pipeline)))
    out = capsys.readouterr().out
    assert "[rlhf] reward_model:" not in out
    for name in ("rm_helpful", "rm_safe"):
        assert f"[rlhf] {name}: 12 training pairs" in out and f"[rlhf] {name}: 2/2 " in out
        closing = next(line for line in out.splitlines() if line.startswith(f"[rlhf] {name}: done:"))
        assert "held-out accuracy" in closing and "on 4 pairs; by rating: significantly_better " in closing


# ---------------------------------------------------------------------------------------------
# 3. data problems: a few per kind, then counts


def test_problems_are_capped_per_kind_then_counted():
    problems = [Problem("d.jsonl", n, field, "missing (the row has messages; rename with `columns:`)")
                for n in range(1, 8) for field in ("prompt", "chosen")]
    problems += [Problem("d.jsonl", 8, "prompt[2].role", "expected user, got 'bot'"),
                 Problem("d.jsonl", 9, "prompt[4].role", "expected user, got 'tool'")]  # one kind: index and value aside
    lines = problem_lines(problems, per_kind=2)
    assert lines == [
        "d.jsonl:1: prompt: missing (the row has messages; rename with `columns:`)",
        "d.jsonl:1: chosen: missing (the row has messages; rename with `columns:`)",
        "d.jsonl:2: prompt: missing (the row has messages; rename with `columns:`)",
        "d.jsonl:2: chosen: missing (the row has messages; rename with `columns:`)",
        "d.jsonl:8: prompt[2].role: expected user, got 'bot'",
        "d.jsonl:9: prompt[4].role: expected user, got 'tool'",
        '... and 5 more like "prompt: missing (the row has messages; rename with `columns:`)" (d.jsonl:3 to 7)',
        '... and 5 more like "chosen: missing (the row has messages; rename with `columns:`)" (d.jsonl:3 to 7)',
    ]
    assert problem_kind(problems[0]) != problem_kind(Problem("e.jsonl", 1, "prompt", "missing"))  # per file
    assert problem_lines(problems[:3]) == [str(p) for p in problems[:3]]  # few: all of them
    error = DataError(problems, "set data.on_error=skip to drop these 9 rows")
    assert error_text(error).splitlines()[-1] == "set data.on_error=skip to drop these 9 rows"
    assert len(error_text(error).splitlines()) == 3 + 3 + 2 + 2 + 1  # 3 of each missing field, both roles, counts, hint
    assert error_text(ValueError("x")) == "x"


def test_validating_a_file_of_another_kind_prints_a_screenful(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]} for i in range(500)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_validate(str(path), "preference") == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 * 3 + 3 + 1  # before: 1,500 problem lines
    assert out[-2] == f'... and 497 more like "rejected: missing (the row has messages; rename with `columns:`)" ({path}:4 to 500)'
    assert out[-1] == "1500 problem(s) in 500 of 500 rows"


def test_a_stage_on_a_file_of_another_kind_prints_a_screenful(tmp_path, capsys):
    from rlhf.cli import main

    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]} for i in range(500)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_with_tokenizer(tmp_path / "m", tiny_llama(len(WORDS)), word_tokenizer(WORDS))
    recipe = _write(tmp_path / "rm.yaml", {"stage": "reward_model", "output_dir": str(tmp_path / "rm"), "model_from": str(model),
                                           "data": {"sources": [{"path": str(tmp_path / "sft.jsonl")}], "max_length": 64}})
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert 5 < len(err) < 20, err  # before: one line per problem, 1,500
    assert any(line.startswith("... and 497 more like") for line in err)


# ---------------------------------------------------------------------------------------------
# 4. resuming only what resumes


def test_a_changed_config_is_not_announced_as_a_resume(tmp_path, echo_stage, monkeypatch, capsys):
    pipe = _write(tmp_path / "pipe.yaml", {"pipeline": "p", "output_dir": str(tmp_path / "run"),
                                           "stages": [{"name": "only", "config": {"stage": "echo", "message": "a"}}]})
    monkeypatch.setenv("ECHO_FAIL_AT", "only")
    for overrides in ([], [], ["only.message=b"]):  # interrupted twice, then with another config
        with pytest.raises(RuntimeError):
            run_recipe(load_recipe(pipe, overrides))
    monkeypatch.delenv("ECHO_FAIL_AT")
    run_recipe(load_recipe(pipe, ["only.message=c"]))  # completes
    run_recipe(load_recipe(pipe, ["only.message=d"]))
    starts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[rlhf] only: ") and "stage 'echo'" in line]
    where = f"stage 'echo' -> {tmp_path / 'run' / 'only'}"
    assert starts == [
        f"[rlhf] only: running {where}",
        f"[rlhf] only: resuming {where}",
        f"[rlhf] only: starting over (its config changed since the interrupted run): running {where}",
        f"[rlhf] only: starting over (its config changed since the interrupted run): running {where}",
        f"[rlhf] only: running {where} again (its config changed since the finished run)",
    ]


def test_changed_inputs_are_named(tmp_path, echo_stage, monkeypatch, capsys):
    source = tmp_path / "source.txt"
    source.write_text("v1")
    recipe = _write(tmp_path / "echo.yaml", {"stage": "echo", "output_dir": str(tmp_path / "e"), "source": str(source)})
    monkeypatch.setenv("ECHO_FAIL_AT", "e")
    with pytest.raises(RuntimeError):
        run_recipe(load_recipe(recipe))
    source.write_text("v2")
    with pytest.raises(RuntimeError):
        run_recipe(load_recipe(recipe))
    assert "[rlhf] e: starting over (its inputs changed since the interrupted run)" in capsys.readouterr().out


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
