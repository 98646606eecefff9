"""Running recipes: one stage, or a pipeline of stages with skip-if-complete and resume.

A stage whose output directory holds a complete manifest of the same config and input
fingerprints is skipped; a stage whose inputs changed runs again; an interrupted stage resumes
from its newest checkpoint (the stage function does that from ``checkpoints/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf.artifacts import (
    changed_since, input_fingerprints, is_main_process, is_up_to_date, read_manifest, release_lock, remove_trash,
    stage_state, wait_for_everyone,
)
from rlhf.config import StageConfig
from rlhf.progress import quiet_libraries
from rlhf.recipe import Pipeline
from rlhf.report import stage_summary, write_report

PIPELINE_FILE = "pipeline.yaml"


def run_stage(cfg: StageConfig, name: str | None = None) -> Path:
    from rlhf.stages import stage_function

    label = name or Path(cfg.output_dir).name
    if is_up_to_date(cfg):
        if is_main_process():
            remove_trash(cfg.output_dir)  # checkpoints a kill left half deleted after the manifest
            print(f"[rlhf] {label}: complete, inputs and config unchanged; skipped")
        return Path(cfg.output_dir)
    if is_main_process():
        print(f"[rlhf] {label}: {start_line(cfg)}")
    quiet_libraries()
    try:
        out = stage_function(cfg.stage)(cfg)
    finally:
        release_lock(cfg.output_dir)
    wait_for_everyone()  # every process between stages
    if is_main_process():
        for line in stage_summary(Path(out), cfg.stage):
            print(f"[rlhf] {label}: {line}")
    return out


def start_line(cfg: StageConfig) -> str:
    """How a stage that is not up to date starts. Only an interrupted run of this very config and
    inputs resumes; any other earlier run is set aside and the stage starts over."""
    where = f"stage '{cfg.stage}' -> {cfg.output_dir}"
    state = stage_state(cfg.output_dir)
    if state not in ("interrupted", "complete"):
        return f"running {where}"
    changed = changed_since(cfg.output_dir, cfg.config_hash(), input_fingerprints(cfg))
    what = " and ".join(changed)
    if state == "complete":
        return f"running {where} again" + (f" (its {what} changed since the finished run)" if changed else "")
    if changed:
        return f"starting over (its {what} changed since the interrupted run): running {where}"
    return f"resuming {where}"


def run_pipeline(pipeline: Pipeline) -> Path:
    out = Path(pipeline.config.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        plan = {
            "pipeline": pipeline.config.pipeline,
            "stages": [
                {"name": name, "stage": cfg.stage}
                for name, cfg in pipeline.stages
            ],
        }
        (out / PIPELINE_FILE).write_text(yaml.safe_dump(plan, sort_keys=False))
    for name, cfg in pipeline.stages:
        run_stage(cfg, name)
    if pipeline.config.report and is_main_process():
        write_report(out)
    return out


def run_recipe(recipe: StageConfig | Pipeline) -> Path:
    if isinstance(recipe, Pipeline):
        return run_pipeline(recipe)
    return run_stage(recipe)


# ---------------------------------------------------------------------------------------------
# Status


def _stage_row(name: str, stage_dir: Path, stage: str | None = None) -> dict[str, Any]:
    manifest = read_manifest(stage_dir) or {}
    if stage is None:
        try:
            stage = yaml.safe_load((stage_dir / "config.yaml").read_text()).get("stage", "?")
        except (OSError, AttributeError, yaml.YAMLError):
            stage = manifest.get("stage", "?")
    state = stage_state(stage_dir)
    detail = ""
    if state == "complete":
        detail = f"finished {manifest.get('ended_at', '')}"
    elif state in ("running", "interrupted"):
        detail = _last_metrics_step(stage_dir)
    return {"name": name, "stage": stage, "state": state, "dir": str(stage_dir), "detail": detail}


def _last_metrics_step(stage_dir: Path) -> str:
    try:
        last = (stage_dir / "metrics.jsonl").read_text().strip().splitlines()[-1]
        return f"last logged step {json.loads(last).get('step')}"
    except (OSError, IndexError, ValueError):
        return ""


def _is_stage_dir(path: Path) -> bool:
    return (path / "manifest.json").exists() or (path / "config.yaml").exists()


def status_rows(root: Path) -> list[dict[str, Any]]:
    """Rows for ``rlhf status``: a pipeline's stages in order, one stage dir, or every stage
    directory found below ``root`` (rounds included)."""
    root = Path(root)
    if (root / PIPELINE_FILE).exists():
        plan = yaml.safe_load((root / PIPELINE_FILE).read_text())
        return [_stage_row(s["name"], root / s["name"], s["stage"]) for s in plan["stages"]]
    if _is_stage_dir(root):
        return [_stage_row(root.name, root)]
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_dir() and _is_stage_dir(p)):
        if ".superseded-" not in path.name and not any(_is_stage_dir(a) for a in path.parents):
            rows.append(_stage_row(str(path.relative_to(root)), path))
    return rows
