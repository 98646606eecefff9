"""The layout rule, checked on the source (ast, nothing imported but the torch-free stage table):
no import cycle, the core never imports a stage, a stage is a folder with ``config.py`` and
``stage.py``, stages share code only through the core, the fine-tune path and the scoring API,
and no function outside the tests is longer than 60 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "sft", "reward_model")
# What one stage may use of another: the one fine-tune path and the reward models' scoring API.
SHARED_BY_STAGES = {"sft.config", "sft.data", "sft.stage", "reward_model.model"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that ``name`` (a dotted import) lands in, or None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every module of ours that ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_owner(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found |= {_owner(f"{base}.{a.name}") for a in node.names}
    found.discard(None)
    found.discard(module)
    # a package's __init__ may name its own submodules
    return {m for m in found if not m.startswith(module + ".")}


GRAPH = {m: _imports(m) for m in MODULES}
STAGE_PACKAGES = {ref.partition(":")[0].rpartition(".")[0] for _, ref in STAGES.values()}


def _stage_of(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


def _cycle() -> list[str] | None:
    """One import cycle as a path of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_a_stage():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if _stage_of(m) is None
           for d in deps if _stage_of(d) is not None]
    assert not bad, bad


def test_stages_share_only_the_fine_tune_path_and_the_scoring_api():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if (own := _stage_of(m)) is not None
           for d in deps if _stage_of(d) not in (None, own) and d not in SHARED_BY_STAGES]
    assert not bad, bad


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_is_a_folder_with_config_and_stage(stage):
    config_ref, run_ref = STAGES[stage]
    config_module, run_module = config_ref.partition(":")[0], run_ref.partition(":")
    package = config_module.rpartition(".")[0]
    assert config_module == f"{package}.config" and config_module in MODULES
    assert run_module[0] == f"{package}.stage" and run_module[2] == "run" and run_module[0] in MODULES
    assert MODULES[package].name == "__init__.py"


def test_the_old_grab_bag_modules_are_gone():
    assert not (REPO / "rlhf" / "configs.py").exists()
    assert not (REPO / "rlhf" / "method_configs.py").exists()


def test_no_function_over_60_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_this_checker_sees_cycles_and_stage_imports():
    """The checks above would fail on the layout they guard against."""
    saved = {m: set(d) for m, d in GRAPH.items()}
    try:
        GRAPH["rlhf.config"].add("rlhf.recipe")  # recipe -> config -> recipe
        assert _cycle() is not None
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
    assert _stage_of("rlhf.gatt.checks") == "rlhf.gatt" and _stage_of("rlhf.generation") is None
    assert "sft.data" in GRAPH["sft.stage"] and "rlhf.packing" in GRAPH["sft.data"]


@pytest.mark.slow
def test_config_modules_and_the_cli_import_no_torch():
    code = ("import sys; from rlhf.stages import STAGES, config_class\n"
            "[config_class(s) for s in STAGES]\n"
            "import rlhf.cli, rlhf.recipe, rlhf.rounds, rlhf.pipeline\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
