"""The user's guide and the data docs work as written. Every fenced block of the files in DOCS is
found by parsing them (a block added later is checked without changing this file) and:

- ```yaml: parsed as a recipe is, validated against the config model it documents (a stage,
  pipeline or round recipe through the recipe loader; a `data:` group against the data config of
  the stage its comments name), then its data loaded through that stage's own loader, so rows a
  stage would refuse and mixtures it cannot draw fail here. Files a user brings get the stand-ins
  of STAND_INS; a block naming ../shared/realdata skips its loading when that is absent.
- ```bash: every command line is parsed by the program it names (rlhf's parser, torchrun's,
  accelerate's with its config file, make's targets) and the recipes it names validate; the slow
  test then runs each command of a document in order, in a fresh directory, except NOT_RUN's.
- ```jsonl: every line is a valid row of some record kind.

Any other block fails unless NOT_INPUT lists it, and an entry of NOT_INPUT, NOT_RUN, PLACEHOLDERS
or STAND_INS that no longer matches the docs fails too, so the lists cannot go stale."""

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOCS = ("README.md", "data/README.md", "data/README_formats.md")
CHECKED = ("yaml", "bash", "jsonl")

# Blocks that are input to nothing: (document, how the block starts) -> why.
NOT_INPUT = {
    ("data/README_formats.md", "<s>[INST] <<SYS>>"): "the Llama 2 chat format written out, not a file or command",
}

# Commands a test cannot run: how the command starts -> why, and what is checked instead.
NOT_RUN = {
    "make quickstart": "runs the whole method (about 10 minutes); checked: the Makefile has the target",
    "make test": "runs this test suite; checked: the Makefile has the target",
    ".venv/bin/python -m pytest": "runs this test suite; checked: the markers it selects are declared",
    "rlhf round run": "trains two reward models on a week of pairs and samples from the quickstart's SFT policy "
                      "(minutes); checked: the command line parses and its round recipe validates",
    **{f"rlhf round add-batch runs/weekly --helpfulness runs/weekly/rounds/{r}/preferences/pairs.jsonl":
       "adds the comparisons of round {r}, which `rlhf round run` (not run here) writes; checked: the command "
       "line parses".format(r=r) for r in ("001", "002")},
    "torchrun": "starts several processes (8 on GPUs for the 7B recipe); checked: torchrun accepts the command "
                "line and the recipe validates with its overrides",
    "accelerate launch": "starts several processes (FSDP and DeepSpeed on GPUs); checked: accelerate accepts the "
                         "command line and its config file, as it does before it starts anything, and the "
                         "recipe validates",
}

# Words of the docs that stand for the user's own values -> what the checks put there.
PLACEHOLDERS = {"RECIPE": "recipes/quickstart/sft.yaml", "RUN": "runs/weekly"}


def _shared(relative: str):
    return lambda tmp: SHARED / relative


def _rated_pairs_csv(tmp: Path) -> Path:
    """A user's own rated pairs: 200 quickstart pairs as question, good, bad, strength (1 = best)."""
    strength = {"significantly_better": 1, "better": 2, "slightly_better": 3, "negligibly_better": 4}
    rows = [json.loads(line) for line in (REPO / "data/quickstart/helpful_pairs.jsonl").read_text().splitlines()[:200]]
    return _write_csv(tmp / "week3.csv", ["question", "good", "bad", "strength"],
                      [[r["prompt"][0]["content"], r["chosen"], r["rejected"], strength[r["rating"]]] for r in rows])


def _demos_csv(tmp: Path) -> Path:
    """A user's own demonstrations: 50 quickstart ones as question, answer."""
    rows = [json.loads(line)["messages"] for line in (REPO / "data/quickstart/sft.jsonl").read_text().splitlines()[:50]]
    return _write_csv(tmp / "my_demos.csv", ["question", "answer"], [[m[0]["content"], m[1]["content"]] for m in rows])


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


# Files the docs' YAML names that a user brings: the path as written -> its stand-in.
STAND_INS = {
    "prefs/week3.csv": _rated_pairs_csv,
    "my_demos.csv": _demos_csv,
    # the train split is not stored beside the checkout; the test split has the same kind of flawed rows
    "hh/harmless-base.train.jsonl.gz": _shared("realdata/hh-rlhf/harmless-base.test.jsonl.gz"),
}


# ---------------------------------------------------------------------------------------------
# Finding the blocks and their commands


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


FENCE = re.compile(r"^\s*```(\S*)\s*$")


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc``, in order."""
    found, opened, lang, body = [], None, "", []
    for number, line in enumerate((REPO / doc).read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if opened is None and fence:
            opened, lang, body = number, fence.group(1), []
        elif opened is not None and fence and not fence.group(1):
            found.append(Block(doc, opened, lang, textwrap.dedent("\n".join(body))))
            opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{doc}:{opened}: a fence that is never closed"
    return found


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv) of every command line of a shell block; comments dropped, continued lines joined."""
    found, pending = [], ""
    for offset, line in enumerate(block.text.splitlines(), start=1):
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if argv := shlex.split(pending, comments=True):
            found.append((block.line + offset, argv))
        pending = ""
    return found


BLOCKS = [block for doc in DOCS for block in blocks(doc)]
COMMANDS = [(block, line, argv) for block in BLOCKS if block.lang == "bash" for line, argv in commands(block)]


def _of(lang: str) -> list[Block]:
    return [block for block in BLOCKS if block.lang == lang]


def _starts(argv: list[str], prefix: str) -> bool:
    return argv[: len(prefix.split())] == prefix.split()


def _not_run(argv: list[str]) -> str | None:
    return next((prefix for prefix in NOT_RUN if _starts(argv, prefix)), None)


def _not_input(block: Block) -> bool:
    return any(block.doc == doc and block.text.startswith(start) for doc, start in NOT_INPUT)


def test_every_block_is_checked():
    assert {doc for doc in DOCS if not blocks(doc)} == set()
    unchecked = [f"{b} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in CHECKED and not _not_input(b)]
    assert unchecked == [], "blocks no check covers: give them a language this test checks, or list them in NOT_INPUT"


def test_every_listed_exception_still_matches_the_docs():
    yaml_text = "\n".join(b.text for b in _of("yaml"))
    stale = [f"NOT_INPUT {key}" for key in NOT_INPUT if not any(b.doc == key[0] and b.text.startswith(key[1]) for b in BLOCKS)]
    stale += [f"NOT_RUN {p!r}" for p in NOT_RUN if not any(_starts(argv, p) for _, _, argv in COMMANDS)]
    stale += [f"PLACEHOLDERS {p!r}" for p in PLACEHOLDERS if not any(p in argv for _, _, argv in COMMANDS)]
    stale += [f"STAND_INS {p!r}" for p in STAND_INS if p not in yaml_text]
    assert stale == []


# ---------------------------------------------------------------------------------------------
# YAML blocks


class _Absent(Exception):
    """A block names ../shared, which is not beside this checkout."""


def _with_stand_ins(node, tmp: Path, block: Block, absent: list[str]):
    """``node`` (parsed YAML) with every source ``path`` a user brings replaced by its stand-in;
    paths under an absent ../shared are collected in ``absent``."""
    if isinstance(node, list):
        return [_with_stand_ins(item, tmp, block, absent) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _with_stand_ins(value, tmp, block, absent) for key, value in node.items()}
    path = out.get("path")
    if isinstance(path, str):
        if path in STAND_INS:
            out["path"] = str(STAND_INS[path](tmp))
        elif not (REPO / path).exists():
            assert (REPO / path).resolve().is_relative_to(SHARED) and not SHARED.is_dir(), (
                f"{block}: names {path}, which does not exist; add a stand-in to STAND_INS")
        if not (REPO / out["path"]).exists():
            absent.append(path)
    return out


def _stage_named(block: Block) -> str:
    """The stage a `data:` block documents: the one stage its comments name (`# SFT: ...`)."""
    from rlhf.stages import stage_names

    comments = " ".join(line.split("#", 1)[1] for line in block.text.splitlines() if "#" in line).lower()
    named = [s for s in stage_names() if re.search(rf"\b({s}|{s.replace('_', ' ')})\b", comments)]
    assert len(named) == 1, f"{block}: a `data:` block's comments must name the one stage it is for, named {named}"
    return named[0]


def _beside_the_recipes(raw: dict, tmp: Path) -> Path:
    """``raw`` written as a recipe in a directory that also holds every entry of recipes/, so its
    ``recipe:`` references resolve as they would in recipes/."""
    home = tmp / "recipes"
    home.mkdir()
    for entry in (REPO / "recipes").iterdir():
        (home / entry.name).symlink_to(entry)
    path = home / "from_the_docs.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _data_groups(block: Block, raw, tmp: Path) -> list:
    """(stage, data config) of every data group a YAML block gives, validated."""
    from rlhf.config import RecipeError, validate
    from rlhf.data import DataConfig
    from rlhf.recipe import Pipeline, load_recipe
    from rlhf.rounds import preview_round
    from rlhf.stages import config_class

    if isinstance(raw, dict) and set(raw) == {"data"}:
        stage = _stage_named(block)
        return [(stage, validate(config_class(stage).model_fields["data"].annotation, raw["data"], str(block)))]
    assert isinstance(raw, dict) and {"stage", "stages"} & set(raw), (
        f"{block}: neither a recipe (stage:, stages:) nor a `data:` group; this test cannot place it")
    path = _beside_the_recipes(raw, tmp)
    try:
        recipe = preview_round(path) if "initial_policy" in raw else load_recipe(path)
    except RecipeError as exc:
        pytest.fail(f"{block}: {exc}")
    configs = [cfg for _, cfg in recipe.stages] if isinstance(recipe, Pipeline) else [recipe]
    return [(cfg.stage, value) for cfg in configs for name in type(cfg).model_fields
            if isinstance(value := getattr(cfg, name), DataConfig)]


def _load(stage: str, data):
    """A stage's data as the stage reads it (the reward model holds out and mixes its own way)."""
    from rlhf.data import load_data

    if stage == "reward_model":
        from reward_model.data import load_pairs

        return load_pairs(data, seed=0)[0]
    return load_data(data, {"sft": "sft"}.get(stage, "prompts"), seed=0)


@pytest.mark.parametrize("block", _of("yaml"), ids=str)
def test_yaml_block_validates_and_its_data_loads(block, tmp_path, monkeypatch):
    from rlhf.data import DataError
    from rlhf.recipe import parse_yaml

    monkeypatch.chdir(REPO)  # the docs name files relative to the repository
    absent: list[str] = []
    raw = _with_stand_ins(parse_yaml(block.text, str(block)), tmp_path, block, absent)
    groups = _data_groups(block, raw, tmp_path)
    if absent:
        pytest.skip(f"validated; ../shared is absent, so its data is not loaded ({', '.join(absent)})")
    for stage, data in groups:
        try:
            loaded = _load(stage, data)
        except DataError as exc:
            pytest.fail(f"{block}: the {stage} stage would refuse this data:\n{exc}")
        assert loaded.records, f"{block}: no {stage} records"


@pytest.mark.parametrize("block", _of("jsonl"), ids=str)
def test_jsonl_rows_are_valid_records(block, tmp_path):
    from rlhf.data import SourceConfig, load_source

    for number, line in enumerate(block.text.splitlines(), start=1):
        path = tmp_path / f"row{number}.jsonl"
        path.write_text(line + "\n")
        tried = {kind: load_source(SourceConfig(path=path), kind) for kind in ("sft", "preference", "prompts")}
        assert any(one.records and not one.problems for one in tried.values()), (
            f"{block}: row {number} is no valid record: "
            + "; ".join(f"{kind}: {', '.join(p.message for p in one.problems)}" for kind, one in tried.items()))


# ---------------------------------------------------------------------------------------------
# Shell blocks


def _is_python(program: str) -> bool:
    return Path(program).name.startswith("python")


def _rlhf_args(argv: list[str]) -> list[str] | None:
    """The arguments of the rlhf command line ``argv`` runs, or None if it runs something else."""
    if argv[0] == "rlhf":
        return argv[1:]
    if _is_python(argv[0]) and argv[1:3] == ["-m", "rlhf"]:
        return argv[3:]
    return None


def _check_rlhf(args: list[str]) -> None:
    """rlhf's own parser accepts ``args``, and the recipe they name validates with their overrides."""
    from rlhf.cli import _parser
    from rlhf.recipe import load_recipe, read_yaml
    from rlhf.rounds import preview_round

    try:
        ns = _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`rlhf {shlex.join(args)}`: refused by rlhf's command line")
    recipe, overrides = getattr(ns, "recipe", None), getattr(ns, "overrides", None) or []
    if recipe is not None:
        preview_round(recipe, overrides) if "initial_policy" in read_yaml(recipe) else load_recipe(recipe, overrides)


def _check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(args)
    assert ns.module and ns.training_script == "rlhf", "torchrun should run `-m rlhf ...`"
    _check_rlhf(ns.training_script_args)


def _check_accelerate(args: list[str]) -> None:
    # accelerate launch's own checks, which read the config file, before it starts anything
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    ns = launch_command_parser().parse_args(args)
    assert ns.config_file is None or Path(ns.config_file).is_file(), f"{ns.config_file}: no such config file"
    try:
        ns = _validate_launch_command(ns)[0]
    except ValueError as exc:
        pytest.fail(f"`accelerate launch {shlex.join(args)}`: refused: {exc}")
    assert ns.num_processes >= 1
    assert ns.module and ns.training_script == "rlhf", "accelerate launch should run `-m rlhf ...`"
    _check_rlhf(ns.training_script_args)


def _check_pytest(args: list[str], pytestconfig) -> None:
    declared = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    expression = args[args.index("-m") + 1] if "-m" in args else ""
    assert set(re.findall(r"[A-Za-z_]\w*", expression)) - {"and", "or", "not"} <= declared


def check_command(argv: list[str], pytestconfig) -> None:
    """Everything short of running it: the program exists and accepts the command line, and the
    files, recipes and flags it names exist and parse."""
    if (args := _rlhf_args(argv)) is not None:
        _check_rlhf(args)
    elif argv[0] == "make":
        assert re.search(rf"^{re.escape(argv[1])}:", (REPO / "Makefile").read_text(), re.M), f"no make target {argv[1]}"
    elif argv[0] == "torchrun":
        _check_torchrun(argv[1:])
    elif argv[:2] == ["accelerate", "launch"]:
        _check_accelerate(argv[2:])
    elif _is_python(argv[0]) and argv[1:3] == ["-m", "pytest"]:
        _check_pytest(argv[3:], pytestconfig)
    elif _is_python(argv[0]) and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
    else:
        pytest.fail(f"`{shlex.join(argv)}`: this test has no check for {argv[0]}; add one")


def _placed(argv: list[str]) -> list[str]:
    return [PLACEHOLDERS.get(arg, arg) for arg in argv]


@pytest.mark.parametrize("block, line, argv", COMMANDS, ids=[f"{b.doc}:{line}" for b, line, _ in COMMANDS])
def test_command_line_is_accepted(block, line, argv, monkeypatch, pytestconfig):
    monkeypatch.chdir(REPO)  # the docs name recipes and configs relative to the repository
    check_command(_placed(argv), pytestconfig)


def test_accelerate_configs_leave_the_process_count_to_the_launcher():
    """Without --num_processes accelerate refuses to launch (a count in the config would start
    that many processes on any machine, 8 on a laptop)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    for config in sorted((REPO / "recipes/accelerate").glob("*.yaml")):
        ns = launch_command_parser().parse_args(["--config_file", str(config), "-m", "rlhf", "run", "RECIPE"])
        with pytest.raises(ValueError, match="--num_processes"):
            _validate_launch_command(ns)


def _runnable(argv: list[str]) -> list[str]:
    if (args := _rlhf_args(argv)) is not None:
        return [sys.executable, "-m", "rlhf", *args]
    if _is_python(argv[0]):
        return [sys.executable, *argv[1:]]
    pytest.fail(f"`{shlex.join(argv)}`: no way to run {argv[0]} here; list it in NOT_RUN with the reason")


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted({block.doc for block, _, _ in COMMANDS}))
def test_commands_run_as_written(doc, tmp_path):
    """A document's commands, in order, in one fresh directory (later ones use earlier ones' files)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for block, line, argv in COMMANDS:
        if block.doc != doc or _not_run(argv):
            continue
        done = subprocess.run(_runnable(_placed(argv)), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{doc}:{line}: `{shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-3000:]}"
