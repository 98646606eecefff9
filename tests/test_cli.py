"""The conveniences of the command line: --version, the shipped recipes (list, copy), the keys of
a stage (show --keys), and round run with overrides."""

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import pytest

from rlhf.cli import DISTRIBUTION, main
from rlhf.recipe import lead_sentence, load_recipe, recipe_keys, type_name
from rlhf.rounds import add_batch, list_rounds, preview_round
from rlhf.stages import STAGES, config_class
from tiny import echo_round_world

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def test_version_is_the_installed_distribution(capsys):
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"] == DISTRIBUTION
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code in (0, None)
    assert capsys.readouterr().out == f"{DISTRIBUTION} {version(DISTRIBUTION)}\n"


# ---------------------------------------------------------------------------------------------
# rlhf recipes


def test_recipes_lists_every_shipped_yaml_with_its_kind_and_description(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(None, 2)[0]: line.split(None, 2)[1:] for line in lines if line.split(" ", 1)[0].endswith(".yaml")}
    assert set(rows) == {p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")}
    assert rows["quickstart.yaml"] == ["pipeline", "The whole Llama 2-Chat method on the quickstart world, on 2 CPU cores"]
    assert rows["quickstart/round.yaml"][0] == "round" and rows["quickstart/sft.yaml"][0] == "sft"
    assert rows["accelerate/fsdp.yaml"][0] == "accelerate"
    assert "folders (copy one whole): accelerate, llama2_7b, quickstart" in lines[-1]


def test_lead_sentence_of_a_leading_comment():
    # up to the line ending the sentence, cut at the first ": " (a command follows it)
    assert lead_sentence("# Data parallel: accelerate launch x\n# more\nkey: 1\n") == "Data parallel"
    # a sentence over two lines, the indented command line not part of it
    assert lead_sentence("# Fine-tuning of a policy,\n# on GPUs:\n#   rlhf run x.yaml\n") == "Fine-tuning of a policy, on GPUs"
    assert lead_sentence("# Base model\n#   rlhf run base.yaml\n") == "Base model"
    assert lead_sentence("stage: sft\n# later comment\n") == ""


def test_copy_a_recipe_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "mine" / "sft.yaml"
    assert main(["recipes", "copy", "quickstart/sft", str(dest)]) == 0  # .yaml may be left out
    assert dest.read_bytes() == (RECIPES / "quickstart" / "sft.yaml").read_bytes()
    assert main(["recipes", "copy", "quickstart/sft.yaml", str(tmp_path / "mine")]) == 2  # into the folder: taken
    dest.write_text("my edits\n")
    assert main(["recipes", "copy", "quickstart/ppo.yaml", str(dest)]) == 2
    assert f"{dest}: already exists; nothing was copied" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert main(["recipes", "copy", "quickstart/ppo.yaml", str(tmp_path / "mine")]) == 0  # into an existing folder
    assert (tmp_path / "mine" / "ppo.yaml").read_bytes() == (RECIPES / "quickstart" / "ppo.yaml").read_bytes()


def test_copied_pipeline_names_its_stage_recipes_and_runs_with_the_folder_beside_it(tmp_path, capsys):
    assert main(["recipes", "copy", "quickstart.yaml", str(tmp_path / "exp" / "quickstart.yaml")]) == 0
    note = capsys.readouterr().out
    assert "not there: quickstart/base.yaml, quickstart/sft.yaml" in note
    assert main(["recipes", "copy", "quickstart", str(tmp_path / "exp")]) == 0  # the folder, into exp/
    assert "note:" not in capsys.readouterr().out
    copied = sorted(p.name for p in (tmp_path / "exp" / "quickstart").iterdir())
    assert copied == sorted(p.name for p in (RECIPES / "quickstart").iterdir())
    pipeline = load_recipe(tmp_path / "exp" / "quickstart.yaml", ["sft.train.lr=1e-3"])
    assert dict(pipeline.stages)["sft"].train.lr == 1e-3
    assert main(["recipes", "copy", "quickstart", str(tmp_path / "exp")]) == 2  # exp/quickstart exists now


def test_copy_of_an_unknown_recipe_lists_close_names(tmp_path, capsys):
    assert main(["recipes", "copy", "quickstart/sfft.yaml", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "recipe 'quickstart/sfft.yaml': no such shipped recipe" in err and "quickstart/sft.yaml" in err
    assert main(["recipes", "copy", "../pyproject.toml", str(tmp_path / "x.yaml")]) == 2  # nothing outside recipes/
    assert not (tmp_path / "x.yaml").exists()


# ---------------------------------------------------------------------------------------------
# rlhf show --keys


def test_show_keys_prints_type_default_and_description(capsys):
    assert main(["show", "--keys", "sft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("train.lr: float (> 0) = 2e-05")  # SFT's default, the base's description
    assert lines[at + 1] == "    Peak learning rate (AdamW), reached after warmup."
    assert "model_from: path (required)" in lines
    assert "data.sources[].path: path | null = null" in lines
    assert 'model.lora.target_modules: list[str] | all-linear = "all-linear"' in lines
    assert "train.betas: tuple[float, float] = [0.9, 0.95]" in lines
    assert main(["show", "--keys", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size: int (> 0) = 64\n    PPO mini-batch: rollouts per optimizer step" in out  # its own text
    assert main(["show", "--keys", "pp"]) == 2
    assert "unknown stage 'pp' (did you mean ppo?)" in capsys.readouterr().err
    assert main(["show", "recipes/quickstart/sft.yaml", "--keys", "sft"]) == 2


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_recipe_key_of_every_stage_has_a_description(stage):
    keys = recipe_keys(config_class(stage))
    missing = [k.path for k in keys if not k.description.strip()]
    assert not missing, f"{stage}: add Field(description=...) for {', '.join(missing)}"
    assert len({k.path for k in keys}) == len(keys)


def test_recipe_keys_reach_every_kind_of_nested_group():
    def paths(stage):
        return {k.path for k in recipe_keys(config_class(stage))}

    assert {"tokenizer.corpus", "model.size"} <= paths("base_model")  # an optional group, a group
    assert {"data.replay.sources[].path", "sampling.k"} <= paths("rejection_sampling")  # a list of groups
    assert {"early_stop.data.mixture[].share", "critic.lora.r"} <= paths("ppo")
    assert {"instructions.constraints[].checker"} <= paths("gatt")


def test_type_names():
    from pathlib import Path as P

    assert type_name(int | None) == "int | null"
    assert type_name(Literal["cosine", "constant"]) == "cosine | constant"
    assert type_name(list[P]) == "list[path]"
    assert type_name(tuple[float, float]) == "tuple[float, float]"
    assert type_name(dict[str, int]) == "dict[str, int]"


# ---------------------------------------------------------------------------------------------
# rlhf round run RUN KEY=VALUE


@pytest.fixture
def world(tmp_path, echo_stage):
    return echo_round_world(tmp_path)


def _out(run, number, stage):
    return (run / "rounds" / f"{number:03d}" / stage / "out.txt").read_text()


def test_round_run_overrides_reach_the_stages_and_stay_with_the_run(world, capsys):
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    assert main(["round", "run", str(run), "--recipe", str(world / "round.yaml"), "rl.message=q"]) == 0
    assert _out(run, 1, "rl") == "q+sft" and _out(run, 1, "rm").startswith("rm+sft")
    assert '# overrides: ["rl.message=q"]' in (run / "round.yaml").read_text()
    add_batch(run, {"helpfulness": world / "week2.jsonl"})
    assert main(["round", "run", str(run)]) == 0  # the stored override holds in later rounds
    assert _out(run, 2, "rl") == "q+q+sft"
    assert main(["round", "status", str(run)]) == 0
    assert "rl.message=q" in capsys.readouterr().out


def _round_interrupted_at_rl(world, monkeypatch):
    """Round 1 run with the override rl.message=q, its rl stage failing; the run directory."""
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    monkeypatch.setenv("ECHO_FAIL_AT", "rl")
    with pytest.raises(RuntimeError):
        main(["round", "run", str(run), "--recipe", str(world / "round.yaml"), "rl.message=q"])
    monkeypatch.delenv("ECHO_FAIL_AT")
    return run


def test_round_resume_with_other_overrides_is_a_changed_config(world, echo_stage, monkeypatch):
    run = _round_interrupted_at_rl(world, monkeypatch)
    before = len(echo_stage.RUNS)
    assert main(["round", "run", str(run), "rl.message=z", "rl.sleep=0"]) == 0
    rl_dir = run / "rounds" / "001" / "rl"
    assert echo_stage.RUNS[before:] == [str(rl_dir)]  # rm is unchanged and skipped
    assert _out(run, 1, "rl") == "z+sft" and list(rl_dir.parent.glob("rl.superseded-*"))
    assert list_rounds(run)[0]["status"] == "complete"
    assert len(list(run.glob("round.yaml.*"))) == 1  # the recipe stored with rl.message=q, kept


def test_resume_without_overrides_uses_the_stored_ones(world, echo_stage, monkeypatch):
    run = _round_interrupted_at_rl(world, monkeypatch)
    assert main(["round", "run", str(run)]) == 0
    assert _out(run, 1, "rl") == "q+sft" and not list((run / "rounds" / "001").glob("rl.superseded-*"))
    assert not list(run.glob("round.yaml.*"))


def test_a_bad_round_override_is_refused_and_nothing_stored(world, capsys):
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    assert main(["round", "run", str(run), "--recipe", str(world / "round.yaml"), "rl.nope=1"]) == 2
    assert "(stage 'rl' of" in (err := capsys.readouterr().err) and "nope: unknown key" in err
    assert not (run / "round.yaml").exists() and not list_rounds(run)
    assert main(["round", "run", str(run), "--recipe", str(world / "round.yaml"), "nope=1"]) == 2
    assert "(with overrides): nope: unknown key" in capsys.readouterr().err
    assert not (run / "round.yaml").exists()


def test_show_of_a_round_recipe_takes_stage_overrides(world):
    stages = dict(preview_round(world / "round.yaml", ["rl.message=q", "rm.train.lr=0.5"]).stages)
    assert stages["rl"].message == "q" and stages["rm"].train.lr == 0.5


@pytest.mark.slow
def test_the_new_commands_import_no_torch():
    code = ("import sys, rlhf.cli\n"
            "assert rlhf.cli.main(['show', '--keys', 'ppo']) == 0 and rlhf.cli.main(['recipes']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "rlhf", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith(f"{DISTRIBUTION} ")


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_eval_rm_refuses_a_gate_recall_outside_0_1(value, capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval-rm", "m", "d.jsonl", "--gate-recall", value])
    assert exit_.value.code == 2 and "--gate-recall: expected a number in (0, 1]" in capsys.readouterr().err
