import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import RecipeError
from rlhf.recipe import Pipeline, load_recipe, read_yaml, to_yaml
from rlhf.rounds import preview_round

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(REPO).parts
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_validates(path):
    recipe = preview_round(path) if "initial_policy" in read_yaml(path) else load_recipe(path)
    assert to_yaml(recipe)


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_scientific_notation_is_a_float(tmp_path, echo_stage):
    cfg = load_recipe(write(tmp_path, "stage: echo\ntrain:\n  lr: 1e-5\n  eps: 3E-8\n"))
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.eps == 3e-8


def test_wrong_type_names_file_and_key_path(tmp_path, echo_stage, capsys):
    path = write(tmp_path, "stage: echo\ntrain:\n  lr: fast\n")
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: train.lr: expected a number, got 'fast'" in err
    assert "Traceback" not in err


def test_unknown_key_names_key_path(tmp_path, echo_stage, capsys):
    path = write(tmp_path, "stage: echo\ntrain:\n  lr: 1e-4\n  learning_rate: 3\n")
    assert main(["run", str(path)]) == 2
    assert f"{path}: train.learning_rate: unknown key" in capsys.readouterr().err


def test_unknown_stage_lists_the_known_ones(tmp_path, echo_stage):
    with pytest.raises(RecipeError, match="stage: expected one of .*echo.*got 'sfft'"):
        load_recipe(write(tmp_path, "stage: sfft\n"))


def test_overrides_are_validated_like_the_file(tmp_path, echo_stage, capsys):
    path = write(tmp_path, "stage: echo\n")
    cfg = load_recipe(path, ["train.lr=3e-4", "message=hi there", "train.betas=[0.9, 0.99]"])
    assert (cfg.train.lr, cfg.message, cfg.train.betas) == (3e-4, "hi there", (0.9, 0.99))
    assert main(["show", str(path), "train.lr=fast"]) == 2
    assert "train.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["show", str(path), "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err
    assert main(["show", str(path), "garbage"]) == 2
    assert "expected key.sub=value" in capsys.readouterr().err


def test_cross_field_rule_is_reported(tmp_path, echo_stage):
    path = write(tmp_path, "stage: echo\ntrain: {batch_size: 10, micro_batch_size: 4}\n")
    with pytest.raises(RecipeError, match="train: batch_size \\(10\\) must be a multiple"):
        load_recipe(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "stage: echo\ntrain: [1, 2\nx: 1\n")
    with pytest.raises(RecipeError, match=rf"{path}:\d+: invalid YAML"):
        load_recipe(path)


PIPELINE = """
pipeline: demo
output_dir: {out}
stages:
  - name: first
    config: {{stage: echo, message: a}}
  - name: second
    recipe: second.yaml
    inputs: {{upstream: first}}
    set: {{train.lr: 1e-3}}
"""


def test_pipeline_wires_inputs_and_per_stage_overrides(tmp_path, echo_stage):
    write(tmp_path, "stage: echo\nmessage: b\n", "second.yaml")
    path = write(tmp_path, PIPELINE.format(out=tmp_path / "run"), "pipe.yaml")
    pipe = load_recipe(path, ["second.message=c", "pipeline=renamed"])
    assert isinstance(pipe, Pipeline) and pipe.config.pipeline == "renamed"
    (_, first), (_, second) = pipe.stages
    assert first.output_dir == tmp_path / "run" / "first"
    assert second.upstream == first.output_dir
    assert (second.message, second.train.lr) == ("c", 1e-3)
    assert "upstream:" in to_yaml(pipe)


def test_pipeline_refuses_a_later_or_unknown_input(tmp_path, echo_stage):
    text = PIPELINE.format(out=tmp_path / "run").replace("inputs: {upstream: first}", "inputs: {upstream: third}")
    write(tmp_path, "stage: echo\n", "second.yaml")
    with pytest.raises(RecipeError, match="inputs.upstream: 'third' is not an earlier stage"):
        load_recipe(write(tmp_path, text, "pipe.yaml"))
    text = PIPELINE.format(out=tmp_path / "run").replace("inputs: {upstream: first}", "inputs: {model: first}")
    with pytest.raises(RecipeError, match="inputs.model: not an input of stage 'echo'"):
        load_recipe(write(tmp_path, text, "pipe.yaml"))


@pytest.mark.slow
def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, rlhf.cli; rlhf.cli._parser(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    for args in (["--help"], ["run", "--help"], ["status", "--help"], ["data", "validate", "--help"]):
        out = subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: rlhf" in out.stdout
    assert (time.perf_counter() - start) / 4 < 1.0


def test_data_validate_cli_maps_columns(tmp_path, capsys):
    path = tmp_path / "adv.csv"
    path.write_text("goal,target\nDo a bad thing,Sure\n,Sure\n")
    assert main(["data", "validate", str(path), "--kind", "prompts", "--column", "prompt=goal", "--is-safety", "true"]) == 1
    assert f"{path}:3: goal: missing" in capsys.readouterr().out  # names the user's column
    assert main(["data", "validate", str(path), "--kind", "prompts", "--column", "prompt"]) == 2
