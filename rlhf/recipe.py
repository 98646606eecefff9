"""Typed recipes: YAML files validated into pydantic config models.

A *stage recipe* has a top-level ``stage:`` key naming the stage (see ``rlhf.stages``) and the
groups of that stage's config model. A *pipeline recipe* has a top-level ``stages:`` list; each
entry names a stage recipe (``recipe:``) or holds one inline (``config:``), and wires its inputs
to earlier stages by name (``inputs: {policy_from: sft}``).

Errors are ``RecipeError`` with one line per problem: ``FILE: key.path: message``. The CLI
prints them and exits 2. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import textwrap
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic.fields import FieldInfo

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


def split_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides of a pipeline (or round) recipe: those of its own keys (``output_dir=...``), and
    those of a stage by its name (``sft.train.lr=1e-5`` -> ``{"sft": ["train.lr=1e-5"]}``)."""
    names = {s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)}
    own: list[str] = []
    per_stage: dict[str, list[str]] = {}
    for text in overrides:
        key = text.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head in names and "." in key:
            per_stage.setdefault(head, []).append(text.split(".", 1)[1])
        else:
            own.append(text)
    return own, per_stage


def merge_overrides(earlier: list[str], later: list[str]) -> list[str]:
    """``earlier`` then ``later``, an earlier override of a key given again left out."""
    keys = {text.split("=", 1)[0] for text in later}
    return [text for text in earlier if text.split("=", 1)[0] not in keys] + list(later)


def _load_pipeline(path: Path, data: dict[str, Any], overrides: list[str]) -> Pipeline:
    """Overrides address the pipeline's own keys (``output_dir=...``) or a stage by name
    (``sft.train.lr=1e-5``)."""
    own, per_stage = split_overrides(data, overrides)
    cfg: PipelineConfig = validate(PipelineConfig, apply_overrides(data, own), str(path))
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


# ---------------------------------------------------------------------------------------------
# The keys of a stage's recipe (``rlhf show --keys STAGE``)


class RecipeKey(NamedTuple):
    """One key of a recipe: its dotted path (``[]`` marks the items of a list of groups), its
    type, its default as JSON (``None``: required), its constraints, its description, and
    whether it is a group of keys."""

    path: str
    type: str
    default: str | None
    constraints: str
    description: str
    group: bool


def recipe_keys(model: type[BaseModel], prefix: str = "") -> list[RecipeKey]:
    """Every key of ``model``, groups before their keys, in declaration order."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        group, many = _group_of(field.annotation)
        keys.append(RecipeKey(path, type_name(field.annotation), _default(field), _constraints(field),
                              _description(model, name) or _docline(group), group is not None))
        if group is not None:
            keys += recipe_keys(group, f"{path}[]." if many else f"{path}.")
    return keys


def _group_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model of a group field (``X``, ``X | None``) or of a list of groups (``list[X]``)."""
    if get_origin(annotation) is list:
        inner, _ = _group_of(get_args(annotation)[0])
        return inner, inner is not None
    if _is_union(annotation):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return _group_of(kinds[0]) if len(kinds) == 1 else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType)


def type_name(annotation: Any) -> str:
    """A type as a recipe writer reads it: ``int | null``, ``cosine | constant``, ``list[path]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if _is_union(annotation):
        return " | ".join(type_name(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "group"
    names = {Path: "path", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    return json.dumps(TypeAdapter(Any).dump_python(value, mode="json"))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "at least", "max_length": "at most"}


def _constraints(field: FieldInfo) -> str:
    """``> 0``, ``>= 0, <= 1``, ``at least 1`` (items), ``pattern ^...$``."""
    found = []
    for item in field.metadata:
        for attr, sign in _BOUNDS.items():
            if getattr(item, attr, None) is not None:
                value = getattr(item, attr)
                found.append(f"{sign} {value:g}" if "length" not in attr else f"{sign} {value} item{'s' * (value != 1)}")
        if getattr(item, "pattern", None):
            found.append(f"pattern {item.pattern}")
    return ", ".join(found)


def _description(model: type[BaseModel], name: str) -> str:
    """A field's description; a field a subclass redefines (a new default) keeps its base's."""
    for cls in model.__mro__:
        field = getattr(cls, "model_fields", {}).get(name) if issubclass(cls, BaseModel) else None
        if field is not None and field.description:
            return " ".join(field.description.split())
    return ""


def _docline(model: type[BaseModel] | None) -> str:
    """The first sentence of a group's docstring, or of the nearest config class it extends
    (what a group field without a description is)."""
    docs = [c.__doc__ for c in (model.__mro__ if model is not None else ()) if issubclass(c, Strict) and c is not Strict]
    doc = " ".join(next((d for d in docs if d), "").split())
    return doc.split(". ")[0].rstrip(".") + "." if doc else ""


def format_keys(keys: list[RecipeKey], width: int = 100) -> str:
    """Keys as ``path: type (constraints) = default`` with the description indented below."""
    lines = []
    for key in keys:
        head = f"{key.path}: {key.type}" + (f" ({key.constraints})" if key.constraints else "")
        head += " = " + key.default if key.default is not None and (not key.group or key.default == "null") else ""
        head += " (required)" if key.default is None else ""
        lines.append(head)
        lines += textwrap.wrap(key.description, width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The shipped recipes (``rlhf recipes``, ``rlhf recipes copy``)


class ShippedRecipe(NamedTuple):
    name: str  # relative to the recipes folder, e.g. quickstart/sft.yaml
    kind: str  # the stage it runs, pipeline, round or accelerate
    description: str  # the first line of its leading comment


def shipped_recipes_dir() -> Path:
    """The ``recipes/`` folder of the source checkout the toolkit runs from (an editable install,
    or a checkout on the path). The recipes are no package data: they name the checkout's
    ``data/`` by relative path, so they live beside it."""
    root = Path(__file__).resolve().parents[1] / "recipes"
    if not root.is_dir():
        raise RecipeError(f"{root}: not found; the shipped recipes come with the source checkout: "
                          "clone the repository and install it with `pip install -e .`")
    return root


def shipped_recipes(root: Path) -> list[ShippedRecipe]:
    paths = sorted(root.rglob("*.yaml"), key=lambda p: p.relative_to(root).as_posix())
    return [_describe_recipe(root, path) for path in paths]


def _describe_recipe(root: Path, path: Path) -> ShippedRecipe:
    data = read_yaml(path)
    kinds = {"initial_policy": "round", "stages": "pipeline", "compute_environment": "accelerate"}
    kind = str(data["stage"]) if "stage" in data else next((k for key, k in kinds.items() if key in data), "")
    return ShippedRecipe(path.relative_to(root).as_posix(), kind, lead_sentence(path.read_text(encoding="utf-8")))


def lead_sentence(text: str) -> str:
    """What a YAML file's leading comment says first: its lines up to the first that ends a
    sentence (``.`` or ``:``) or precedes an indented command line, cut at the first ``: ``.
    "# Data parallel: accelerate launch ..." -> "Data parallel"."""
    lead = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line.strip("# "):
            break
        lead.append(line.strip("# "))
        if line.endswith((".", ":")):
            break
    return " ".join(lead).split(": ")[0].removesuffix(":").removesuffix(".")


def find_shipped(root: Path, name: str) -> Path:
    """A shipped recipe file or folder by relative name (``.yaml`` and a leading ``recipes/``
    may be left out); unknown names are refused with the close ones."""
    name = name.removeprefix("recipes/").rstrip("/")
    for candidate in (name, f"{name}.yaml"):
        path = (root / candidate).resolve()
        if name and path.is_relative_to(root) and (path.is_dir() or path.suffix == ".yaml") and path.exists():
            return path
    names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_dir() or p.suffix == ".yaml"]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise RecipeError(f"recipe {name!r}: no such shipped recipe or folder{hint} (`rlhf recipes` lists them)")


def copy_shipped(root: Path, name: str, dest: Path) -> Path:
    """Copy a shipped recipe (or a whole folder) to ``dest``, or into ``dest`` when it is an
    existing folder; never over an existing file or folder. Returns the copy."""
    source = find_shipped(root, name)
    target = Path(dest) / source.name if Path(dest).is_dir() else Path(dest)
    if target.exists() or target.is_symlink():
        raise RecipeError(f"{target}: already exists; nothing was copied (choose another destination)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        with open(source, "rb") as src, open(target, "xb") as out:  # "x": never over a file made meanwhile
            shutil.copyfileobj(src, out)
    return target


def missing_stage_recipes(path: Path) -> list[str]:
    """The stage recipes a pipeline or round recipe names (relative to its own file) that are
    not there."""
    stages = read_yaml(path).get("stages")
    named = [s["recipe"] for s in stages if isinstance(s, dict) and isinstance(s.get("recipe"), str)] \
        if isinstance(stages, list) else []
    return [r for r in named if not (path.parent / r).is_file()]
