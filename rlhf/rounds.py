"""Weekly rounds: each new preference batch retrains the reward models on all batches so far,
then rejection sampling (with the best-so-far pool) and optionally PPO improve the policy.

A run directory::

    RUN/round.yaml                   the round recipe (copied in by the first `round run --recipe`)
    RUN/batches/001/                 immutable copies of a batch's files + batch.json (hashes)
    RUN/rounds/001/                  one round: a pipeline directory (its stages) + round.json
    RUN/report/                      the progress report over all rounds

A round is a pipeline whose stages may also name, in ``inputs``, the outside names
``initial_policy`` (the recipe's starting policy), ``policy`` (the previous round's policy, or the
initial one) and ``pool`` (the previous round's pool stage; left unset in round 1). The stages
listed under ``batches`` get every stored batch file of the listed kinds appended to
``data.sources``; a mixture part that lists the source ``batches:KIND`` (or ``batches``) takes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from contextlib import nullcontext

import yaml
from pydantic import Field

from rlhf.artifacts import (
    InputError, is_main_process, locked, now, read_manifest, write_json_atomic, write_text_atomic,
)
from rlhf.config import RecipeError, StageConfig, Strict, Tracker, validate
from rlhf.recipe import (
    Pipeline, PipelineConfig, PipelineStage, apply_overrides, merge_overrides, read_yaml, resolve_stages,
    split_overrides,
)
from rlhf.tracking import tracking_defaults

BatchKind = Literal["helpfulness", "safety"]
ROUND_RECIPE = "round.yaml"


class RoundConfig(Strict):
    """A round recipe (see the module docstring)."""

    initial_policy: Path = Field(description="Stage directory (or HF model dir) round 1 starts from")
    stages: list[PipelineStage] = Field(min_length=1)
    batches: dict[str, list[BatchKind]] = Field({}, description="stage name -> the batch kinds it trains on")
    policy: str = Field(description="The stage whose output is the round's policy")
    pool: str | None = Field(None, description="The stage whose output is the next round's pool")
    batch_format: str = Field("auto", description="Data format of the batch files")
    report_to: list[Tracker] = Field([], description="report_to of every stage that does not set its own")
    wandb_project: str | None = Field(None, description="wandb_project of every stage that does not set its "
                                      "own; default: the run directory's name")


# ---------------------------------------------------------------------------------------------
# Batches


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_info(path: Path, fix: str) -> dict[str, Any]:
    """A batch.json or round.json of ours; damage is explained (with ``fix``), not a traceback."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        what = f"invalid JSON: {exc}" if isinstance(exc, ValueError) else exc.strerror
        raise InputError(f"{path}: damaged ({what}); {fix}") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: damaged (not a JSON object); {fix}")
    return info


def list_batches(run: Path) -> list[dict[str, Any]]:
    batches = []
    for path in sorted((Path(run) / "batches").glob("[0-9][0-9][0-9]")):
        fix = f"restore it, or move {path} out of the run and add its files again with `rlhf round add-batch`"
        batches.append({"id": path.name, "dir": path, **_read_info(path / "batch.json", fix)})
    return batches


def add_batch(run: Path, files: dict[str, Path], format: str = "auto") -> Path:
    """Validate a weekly batch and store an immutable copy. Nothing in ``run`` changes unless
    every file is valid. Returns the batch directory."""
    from rlhf.data.load import read_records

    run = Path(run)
    files = {kind: Path(path) for kind, path in files.items() if path is not None}
    if not files:
        raise RecipeError("give --helpfulness FILE and/or --safety FILE")
    counts = {kind: len(read_records(path, "preference", format)) for kind, path in files.items()}
    empty = [str(files[kind]) for kind, n in counts.items() if n == 0]
    if empty:
        raise RecipeError(f"{', '.join(empty)}: no preference pairs; a batch must hold some")
    hashes = {kind: _sha256(path) for kind, path in files.items()}
    with locked(run / "batches"):  # one add-batch at a time: numbers and copies do not collide
        return _store_batch(run, files, format, counts, hashes)


def _store_batch(run: Path, files: dict[str, Path], format: str, counts: dict, hashes: dict) -> Path:
    batches = list_batches(run)
    for batch in batches:
        if {k: v["sha256"] for k, v in batch["files"].items()} == hashes:
            raise RecipeError(f"{run}: this batch was already added as batch {batch['id']}")
    batches_dir = run / "batches"
    for leftover in batches_dir.glob(".incoming-*"):  # of killed add-batch runs: the lock says none is live
        shutil.rmtree(leftover)
    number = max((int(b["id"]) for b in batches), default=0) + 1
    tmp = batches_dir / f".incoming-{os.getpid()}"
    tmp.mkdir()
    info = {"added_at": now(), "format": format, "files": {}}
    for kind, path in files.items():
        target = tmp / f"{kind}{''.join(path.suffixes)}"
        shutil.copyfile(path, target)
        target.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        info["files"][kind] = {"file": target.name, "source": str(path), "sha256": hashes[kind], "pairs": counts[kind]}
    (tmp / "batch.json").write_text(json.dumps(info, indent=2))
    final = batches_dir / f"{number:03d}"
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------
# Rounds


_DIR_HEADER, _OVERRIDES_HEADER = "# recipes_dir: ", "# overrides: "


@dataclass
class RoundRecipe:
    cfg: RoundConfig  # with the overrides of its own keys applied
    recipes_dir: Path  # where the stage recipes it names are: the folder it came from
    per_stage: dict[str, list[str]]  # the overrides of its stages, by stage name
    text: str  # what the run's round.yaml holds: a header (recipes_dir, overrides), then the recipe


def read_round_recipe(path: Path, overrides: list[str] = ()) -> RoundRecipe:
    """A round recipe file with ``overrides`` on top of those it was stored with (a run's
    round.yaml keeps them in its header; a key given again takes the new value)."""
    path = Path(path)
    data = read_yaml(path)
    text = path.read_text(encoding="utf-8")
    recipes_dir, stored = _header(path, text)
    merged = merge_overrides(stored, list(overrides))
    own, per_stage = split_overrides(data, merged)
    cfg = validate(RoundConfig, apply_overrides(data, own), f"{path} (with overrides)" if merged else str(path))
    header = f"{_DIR_HEADER}{recipes_dir.resolve()}\n" + (f"{_OVERRIDES_HEADER}{json.dumps(merged)}\n" if merged else "")
    old_header = "".join(line for line in text.splitlines(keepends=True)[:2] if line.startswith((_DIR_HEADER, _OVERRIDES_HEADER)))
    return RoundRecipe(cfg, recipes_dir, per_stage, header + text.removeprefix(old_header))


def _header(path: Path, text: str) -> tuple[Path, list[str]]:
    """The stage recipes' folder and the overrides of a stored round recipe, from its header
    lines; a recipe without them: its own folder, no overrides."""
    recipes_dir, overrides = path.parent, []
    for number, line in enumerate(text.splitlines()[:2], 1):
        if line.startswith(_DIR_HEADER):
            recipes_dir = Path(line.removeprefix(_DIR_HEADER))
        elif line.startswith(_OVERRIDES_HEADER):
            try:
                overrides = json.loads(line.removeprefix(_OVERRIDES_HEADER))
            except ValueError:
                overrides = None
            if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
                raise RecipeError(f"{path}:{number}: damaged overrides line; expected a JSON list of KEY=VALUE")
    return recipes_dir, overrides


def load_round_recipe(run: Path, recipe: Path | None = None, overrides: list[str] = ()) -> RoundRecipe:
    """The run's round recipe: a given ``recipe`` replaces the stored one and its overrides;
    ``overrides`` go on top. Nothing is stored here (``store_round_recipe`` does, once the
    round resolves)."""
    stored = Path(run) / ROUND_RECIPE
    if recipe is None and not stored.exists():
        raise RecipeError(f"{run}: no round recipe yet; pass --recipe FILE the first time")
    return read_round_recipe(stored if recipe is None else Path(recipe), overrides)


def store_round_recipe(run: Path, text: str) -> None:
    """Write the run's round.yaml; one that differs is kept as ``round.yaml.<time>``."""
    stored = Path(run) / ROUND_RECIPE
    if stored.exists() and stored.read_text(encoding="utf-8") == text:
        return
    if stored.exists():
        os.replace(stored, stored.with_name(f"{ROUND_RECIPE}.{now().replace(':', '')}"))
    Path(run).mkdir(parents=True, exist_ok=True)
    write_text_atomic(stored, text)


def preview_round(path: Path, overrides: list[str] = ()) -> Pipeline:
    """A round recipe resolved as round 1 of a run ``RUN`` with one batch ``NNN`` (for
    ``rlhf show`` and recipe checks)."""
    recipe = read_round_recipe(path, overrides)
    cfg = recipe.cfg
    batch = {"id": "NNN", "dir": Path("RUN/batches/NNN"), "format": cfg.batch_format,
             "files": {kind: {"file": f"{kind}.jsonl"} for kind in ("helpfulness", "safety")}}
    kind = (read_manifest(cfg.initial_policy) or {}).get("stage", "sft")
    outside = {"initial_policy": (kind, cfg.initial_policy), "policy": (kind, cfg.initial_policy)}

    track = tracking_defaults("round-NNN", cfg.report_to, cfg.wandb_project or "RUN")

    def edit(name: str, stage_data: dict[str, Any]) -> None:
        track(name, stage_data)
        if name in cfg.batches:
            _add_batch_sources(stage_data, [batch], cfg.batches[name])

    entries = [e.model_copy(update={"inputs": {k: v for k, v in e.inputs.items() if v != "pool"}}) for e in cfg.stages]
    stages = resolve_stages(entries, Path("RUN/rounds/NNN"), recipe.recipes_dir / Path(path).name, recipe.per_stage,
                            outputs=outside, edit=edit)
    pipeline = PipelineConfig(pipeline="round", output_dir=Path("RUN/rounds/NNN"), stages=cfg.stages)
    return Pipeline(config=pipeline, stages=stages)


def list_rounds(run: Path) -> list[dict[str, Any]]:
    """The rounds begun, in order. A round directory without round.json was never begun (a kill
    between creating it and writing round.json, before any stage ran); the next run begins it."""
    rounds = []
    for path in sorted((Path(run) / "rounds").glob("[0-9][0-9][0-9]")):
        if (path / "round.json").exists():
            fix = "restore it, or move its round directory out of the run to run that round again"
            rounds.append({"id": path.name, "dir": path, **_read_info(path / "round.json", fix)})
    return rounds


def _outside_names(run: Path, cfg: RoundConfig, previous: dict | None) -> dict[str, tuple[str, Path]]:
    initial = Path(cfg.initial_policy)
    kind = (read_manifest(initial) or {}).get("stage", "hf")
    names = {"initial_policy": (kind, initial), "policy": (kind, initial)}
    if previous is not None:
        # the stages the previous round named (its round.json), which a recipe given since,
        # e.g. one that adds PPO, may name otherwise
        prev_dir = Path(previous["dir"])
        for name in ("policy", "pool"):
            if stage_name := previous.get(name, getattr(cfg, name)):
                manifest = read_manifest(prev_dir / stage_name) or {}
                names[name] = (manifest.get("stage", "?"), prev_dir / stage_name)
    return names


def _add_batch_sources(stage_data: dict[str, Any], batches: list[dict], kinds: list[str]) -> None:
    """Append every batch file of ``kinds`` to ``data.sources``; in the mixture, a part listing
    ``batches:KIND`` (or ``batches``: every kind) takes those sources."""
    names: dict[str, list[str]] = {kind: [] for kind in kinds}
    sources = stage_data.setdefault("data", {}).setdefault("sources", [])
    for batch in batches:
        for kind in kinds:
            if kind in batch["files"]:
                name = f"batch_{batch['id']}_{kind}"
                path = Path(batch["dir"]) / batch["files"][kind]["file"]
                sources.append({"name": name, "path": str(path), "batch": batch["id"], "format": batch["format"]})
                names[kind].append(name)
    placeholders = {f"batches:{kind}": found for kind, found in names.items()}
    placeholders["batches"] = [n for found in names.values() for n in found]
    for part in stage_data["data"].get("mixture") or []:
        part["sources"] = [n for s in part.get("sources", []) for n in placeholders.get(s, [s])]


@dataclass
class RoundPlan:
    dir: Path
    batches: list[str]  # the batch ids this round trains on (fixed when the round starts)
    stages: list[tuple[str, StageConfig]]
    cfg: RoundConfig
    recipe_text: str  # the run's round.yaml for this round (stored when the round starts)


def plan_round(run: Path, recipe: Path | None = None, overrides: list[str] = ()) -> RoundPlan:
    """The round to run next (an unfinished one, or a new one when a new batch arrived) and
    its resolved stages."""
    run = Path(run)
    loaded = load_round_recipe(run, recipe, overrides)
    cfg = loaded.cfg
    rounds, batches = list_rounds(run), list_batches(run)
    if rounds and rounds[-1].get("status") != "complete":
        current, previous = rounds[-1], (rounds[-2] if len(rounds) > 1 else None)
    else:
        used = set(rounds[-1]["batches"]) if rounds else set()
        if not [b for b in batches if b["id"] not in used]:
            hint = f"rlhf round add-batch {run} --helpfulness FILE --safety FILE"
            raise RecipeError(f"{run}: no new preference batch since the last round; add one with `{hint}`")
        number = len(rounds) + 1
        current = {"dir": run / "rounds" / f"{number:03d}", "batches": [b["id"] for b in batches]}
        previous = rounds[-1] if rounds else None
    round_batches = [b for b in batches if b["id"] in current["batches"]]

    track = tracking_defaults(f"round-{Path(current['dir']).name}", cfg.report_to, cfg.wandb_project or run.resolve().name)

    def edit(name: str, stage_data: dict[str, Any]) -> None:
        track(name, stage_data)
        if name in cfg.batches:
            _add_batch_sources(stage_data, round_batches, cfg.batches[name])

    outside = _outside_names(run, cfg, previous)
    # round 1 has no pool yet: a stage that takes the previous pool starts without one
    entries = [
        e.model_copy(update={"inputs": {k: v for k, v in e.inputs.items() if v != "pool" or "pool" in outside}})
        for e in cfg.stages
    ]
    stages = resolve_stages(entries, Path(current["dir"]), loaded.recipes_dir / ROUND_RECIPE, loaded.per_stage,
                            outputs=outside, edit=edit)
    return RoundPlan(Path(current["dir"]), current["batches"], stages, cfg, loaded.text)


def run_round(run: Path, recipe: Path | None = None, overrides: list[str] = ()) -> Path:
    """Run (or finish) the next round; completed stages are skipped, a partial one resumes.
    ``overrides`` (``KEY=VALUE``: the round recipe's own keys, or ``STAGE.key=value``) are
    stored with the run's recipe, so later rounds and resumes use them too; a stage whose
    config they change runs again, like any changed config."""
    with locked(Path(run) / "rounds") if is_main_process() else nullcontext():  # one round run at a time
        return _run_round(run, recipe, overrides)


def _run_round(run: Path, recipe: Path | None, overrides: list[str]) -> Path:
    from rlhf.pipeline import PIPELINE_FILE, run_stage

    plan = plan_round(run, recipe, overrides)
    info_path = plan.dir / "round.json"
    if is_main_process():
        store_round_recipe(run, plan.recipe_text)
        plan.dir.mkdir(parents=True, exist_ok=True)
        if not info_path.exists():
            write_json_atomic(info_path, {"batches": plan.batches, "status": "running", "started_at": now()})
        stages = [{"name": name, "stage": c.stage} for name, c in plan.stages]
        (plan.dir / PIPELINE_FILE).write_text(yaml.safe_dump({"pipeline": f"round {plan.dir.name}", "stages": stages}))
    for name, stage_cfg in plan.stages:
        run_stage(stage_cfg, f"round {plan.dir.name} / {name}")
    if is_main_process():
        info = json.loads(info_path.read_text())
        write_json_atomic(info_path, {**info, "status": "complete", "ended_at": now(), "policy": plan.cfg.policy,
                                    "pool": plan.cfg.pool})
        from rlhf.report import write_report

        write_report(Path(run))
    return plan.dir


def round_status(run: Path) -> str:
    """Batches, rounds with their stages' states, and headline metrics, as text."""
    from rlhf.pipeline import status_rows
    from rlhf.report import round_summary

    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run directory")
    lines = [f"run {run}"]
    if (run / ROUND_RECIPE).exists():
        overrides = _header(run / ROUND_RECIPE, (run / ROUND_RECIPE).read_text(encoding="utf-8"))[1]
        lines += [f"overrides (in {run / ROUND_RECIPE}): {' '.join(overrides)}"] if overrides else []
    lines.append("batches:")
    for b in list_batches(run):
        files = ", ".join(f"{kind} {f['pairs']} pairs" for kind, f in b["files"].items())
        lines.append(f"  {b['id']}  added {b['added_at']}  {files}")
    for r in list_rounds(run):
        lines.append(f"round {r['id']}: {r.get('status')}  (batches {', '.join(r['batches'])})")
        for row in status_rows(Path(r["dir"])):
            lines.append(f"  {row['name']:<22} {row['stage']:<20} {row['state']:<12} {row.get('detail', '')}".rstrip())
        summary = round_summary(r["id"], Path(r["dir"]), r["batches"])
        for name, rm in summary["reward_models"].items():
            lines.append(f"  {name}: accuracy {rm['accuracy']:.3f}")
        for name, p in summary["policies"].items():
            gold = p.get("gold") or {}
            extra = "".join(f", gold {k} {v:.3f}" for k, v in gold.items() if isinstance(v, float))
            lines.append(f"  policy {name}: R_c {p.get('combined_reward', float('nan')):.3f}{extra}")
    return "\n".join(lines)
