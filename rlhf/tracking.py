"""Experiment trackers (``report_to: [tensorboard, wandb]``), started once per stage.

Each stage's run is named ``run_name`` (a pipeline's stages: ``<pipeline>/<stage name>``, a
round's: ``round-NNN/<stage name>``; a lone stage: its output directory's name), logs to the W&B
project ``wandb_project``, and starts with the resolved config as its hyper-parameters (dotted
keys: ``train.lr``). Every tracker file stays in the stage directory: TensorBoard writes to
``tensorboard/<project>/``, W&B to ``wandb/`` (offline runs too, ``WANDB_MODE=offline``).
Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.config import StageConfig, flatten

# In the stage directory: where TensorBoard writes, and the folder W&B makes in the dir it is given.
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"


def run_name(cfg: StageConfig) -> str:
    return cfg.run_name or Path(cfg.output_dir).name


def tracker_config(cfg: StageConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as hyper-parameters: dotted keys, values TensorBoard accepts (lists
    and nulls as JSON text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flatten(cfg.model_dump(mode="json")).items()}


def start_trackers(accelerator, run) -> None:
    """Start the trackers of ``run.cfg.report_to`` once (a resumed or second loop keeps them)."""
    if accelerator.log_with and not accelerator.trackers:
        cfg = run.cfg
        accelerator.init_trackers(cfg.wandb_project, config=tracker_config(cfg),
                                  init_kwargs={"wandb": {"name": run_name(cfg), "dir": str(run.dir)}})


def tracking_defaults(pipeline: str, report_to: list[str], wandb_project: str) -> Any:
    """An ``edit`` for ``rlhf.recipe.resolve_stages``: every stage of a pipeline (or a round) is
    named ``<pipeline>/<stage name>`` and logs to ``report_to`` in ``wandb_project``, unless its
    own recipe or an override says otherwise."""

    def edit(name: str, stage_data: dict[str, Any]) -> None:
        stage_data.setdefault("run_name", f"{pipeline}/{name}")
        stage_data.setdefault("wandb_project", wandb_project)
        stage_data.setdefault("report_to", list(report_to))

    return edit
