"""The one table of stages: recipe name -> (config model, stage function).

Both are given as ``module:attribute`` strings and imported on use, so validating a recipe
imports only the (torch-free) config module and ``rlhf --help`` imports neither.
A stage function has the signature ``run(cfg) -> Path`` (its output directory).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

STAGES: dict[str, tuple[str, str]] = {
    "base_model": ("rlhf.base_model.config:BaseModelConfig", "rlhf.base_model.stage:run"),
    "sft": ("sft.config:SFTConfig", "sft.stage:run"),
    "reward_model": ("reward_model.config:RewardModelConfig", "reward_model.stage:run"),
    "rejection_sampling": ("rlhf.rejection_sampling.config:RejectionSamplingConfig", "rlhf.rejection_sampling.stage:run"),
    "ppo": ("rlhf.ppo.config:PPOConfig", "rlhf.ppo.stage:run"),
    "gatt": ("rlhf.gatt.config:GAttConfig", "rlhf.gatt.stage:run"),
    "context_distillation": ("rlhf.context_distillation.config:ContextDistillationConfig",
                             "rlhf.context_distillation.stage:run"),
    "evaluate": ("rlhf.evaluate.config:EvaluateConfig", "rlhf.evaluate.stage:run"),
    "preferences": ("rlhf.preferences.config:PreferencesConfig", "rlhf.preferences.stage:run"),
}

# Commands of the CLI that live in a stage package (the core never imports a stage).
COMMANDS: dict[str, str] = {
    "eval-rm": "reward_model.evaluate:run_eval_rm",
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(import_module(module), attr)


def stage_names() -> list[str]:
    return list(STAGES)


def config_class(stage: str) -> type:
    return _load(STAGES[stage][0])


def stage_function(stage: str) -> Callable:
    return _load(STAGES[stage][1])


def command(name: str) -> Callable:
    return _load(COMMANDS[name])
