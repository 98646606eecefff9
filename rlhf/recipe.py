"""Typed recipes: YAML files validated into pydantic config models.

A *stage recipe* has a top-level ``stage:`` key naming the stage (see ``rlhf.stages``) and the
groups of that stage's config model. A *pipeline recipe* has a top-level ``stages:`` list; each
entry names a stage recipe (``recipe:``) or holds one inline (``config:``), and wires its inputs
to earlier stages by name (``inputs: {policy_from: sft}``).

Errors are ``RecipeError`` with one line per problem: ``FILE: key.path: message``. The CLI
prints them and exits 2. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, model_validator

from rlhf.config import RecipeError, StageConfig, Strict, Tracker, describe, validate
from rlhf.tracking import tracking_defaults

# ---------------------------------------------------------------------------------------------
# Pipelines


class PipelineStage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    recipe: str | None = None  # path relative to the pipeline file
    config: dict[str, Any] | None = None  # or the stage recipe inline
    inputs: dict[str, str] = {}  # input field -> name of an earlier stage
    set: dict[str, Any] = {}  # overrides of the stage recipe, dotted keys allowed

    @model_validator(mode="after")
    def _one_source(self) -> "PipelineStage":
        if (self.recipe is None) == (self.config is None):
            raise ValueError("give exactly one of 'recipe' or 'config'")
        return self


class PipelineConfig(Strict):
    pipeline: str = "pipeline"
    output_dir: Path = Path("runs/pipeline")
    report: bool = False  # write the progress report (rlhf report) at the end
    report_to: list[Tracker] = Field([], description="report_to of every stage that does not set its own.")
    wandb_project: str | None = Field(None, description="wandb_project of every stage that does not set its "
                                      "own; default: the pipeline's name.")
    stages: list[PipelineStage] = Field(min_length=1)


class Pipeline(Strict):
    """A validated pipeline: its own config and each stage's resolved config, in order."""

    config: PipelineConfig
    stages: list[tuple[str, StageConfig]]

    model_config = ConfigDict(arbitrary_types_allowed=True)


# ---------------------------------------------------------------------------------------------
# YAML loading and overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``) and refuses a key
    given twice in one mapping (PyYAML keeps the last silently: a second ``train:`` group would
    replace the whole first one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in this mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-5`` -> ("train.lr", 1e-05). The value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    return key, parse_yaml(raw, f"override {text}") if raw else ""


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: {'.'.join(parts[: i + 1])}: is not a group of keys")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Loading a recipe of either kind


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value, f"override {text}")
    return data


def _stage_class(data: dict[str, Any], source: str) -> type[StageConfig]:
    from rlhf.stages import config_class, stage_names

    name = data.get("stage")
    if not isinstance(name, str) or name not in stage_names():
        got = "nothing" if name is None else describe(name)
        raise RecipeError(f"{source}: stage: expected one of {', '.join(stage_names())}, got {got}")
    return config_class(name)


def load_stage(data: dict[str, Any], source: str) -> StageConfig:
    return validate(_stage_class(data, source), data, source)


def load_recipe(path: Path | str, overrides: list[str] = ()) -> StageConfig | Pipeline:
    """Read, override and validate a stage or pipeline recipe."""
    path = Path(path)
    data = read_yaml(path)
    if "initial_policy" in data:
        raise RecipeError(f"{path}: a round recipe; run it with `rlhf round run RUN --recipe {path}`")
    if "stages" in data:
        return _load_pipeline(path, data, list(overrides))
    data = apply_overrides(data, list(overrides))
    where = f"{path} (with overrides)" if overrides else str(path)
    return load_stage(data, where)


def _load_pipeline(path: Path, data: dict[str, Any], overrides: list[str]) -> Pipeline:
    """Overrides address the pipeline's own keys (``output_dir=...``) or a stage by name
    (``sft.train.lr=1e-5``)."""
    stage_names_in_file = {
        s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)
    }
    per_stage: dict[str, list[str]] = {}
    for text in overrides:
        head = text.split("=", 1)[0].split(".", 1)[0]
        if head in stage_names_in_file and "." in text.split("=", 1)[0]:
            per_stage.setdefault(head, []).append(text.split(".", 1)[1])
        else:
            apply_overrides(data, [text])
    cfg: PipelineConfig = validate(PipelineConfig, data, str(path))
    track = tracking_defaults(cfg.pipeline, cfg.report_to, cfg.wandb_project or cfg.pipeline)
    stages = resolve_stages(cfg.stages, cfg.output_dir, path, per_stage, edit=track)
    return Pipeline(config=cfg, stages=stages)


def resolve_stages(
    entries: list[PipelineStage],
    output_dir: Path,
    path: Path,
    per_stage: dict[str, list[str]] | None = None,
    outputs: dict[str, tuple[str, Path]] | None = None,
    edit: Any = None,
) -> list[tuple[str, StageConfig]]:
    """Validate each entry's stage config, wiring ``inputs`` to earlier stages (or to the
    named ``outputs`` given from outside: stage name -> (stage kind, directory)).
    ``edit(name, stage_data)``, when given, may change a stage's raw data before validation."""
    per_stage = dict(per_stage or {})
    outputs = dict(outputs or {})
    stages: list[tuple[str, StageConfig]] = []
    for i, entry in enumerate(entries):
        where = f"{path}: stages[{i}] ({entry.name})"
        if entry.name in outputs:
            raise RecipeError(f"{where}: name: '{entry.name}' is taken by an earlier stage or a round input")
        if entry.recipe is not None:
            stage_data = read_yaml((path.parent / entry.recipe).resolve())
            source = str(Path(entry.recipe))
        else:
            stage_data, source = dict(entry.config or {}), str(path)
        for key, value in entry.set.items():
            set_dotted(stage_data, key, value, where)
        apply_overrides(stage_data, per_stage.pop(entry.name, []))
        stage_data["output_dir"] = str(Path(output_dir) / entry.name)
        if edit is not None:
            edit(entry.name, stage_data)
        source = f"{source} (stage '{entry.name}' of {path})"
        cls = _stage_class(stage_data, source)
        for field, upstream in entry.inputs.items():
            _check_input(cls, field, upstream, outputs, where)
            set_dotted(stage_data, field, str(outputs[upstream][1]), where)
        stage_cfg = validate(cls, stage_data, source)
        stages.append((entry.name, stage_cfg))
        outputs[entry.name] = (stage_cfg.stage, stage_cfg.output_dir)
    if per_stage:
        raise RecipeError(f"{path}: override for unknown stage(s): {', '.join(per_stage)}")
    return stages


def _check_input(
    cls: type[StageConfig], field: str, upstream: str, outputs: dict[str, tuple[str, Path]], where: str
) -> None:
    stage = cls.model_fields["stage"].default
    pattern = field if field in cls.INPUTS else field.rsplit(".", 1)[0] + ".*"
    if pattern not in cls.INPUTS:
        known = ", ".join(cls.INPUTS) or "none"
        raise RecipeError(f"{where}: inputs.{field}: not an input of stage '{stage}' ({known})")
    if upstream not in outputs:
        raise RecipeError(f"{where}: inputs.{field}: '{upstream}' is not an earlier stage")
    kinds, upstream_kind = cls.INPUTS[pattern], outputs[upstream][0]
    if kinds and upstream_kind not in kinds:
        wanted = " or ".join(k for k in kinds if k != "hf")
        raise RecipeError(f"{where}: inputs.{field}: expects the output of {wanted}, got a '{upstream_kind}' stage")


def to_yaml(obj: StageConfig | Pipeline) -> str:
    """The fully resolved recipe as YAML (what ``rlhf show`` prints)."""
    if isinstance(obj, Pipeline):
        data = obj.config.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [
            {"name": name, "config": cfg.model_dump(mode="json")} for name, cfg in obj.stages
        ]
    else:
        data = obj.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
