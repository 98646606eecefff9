"""The one table of stages: recipe name -> (config model, stage function).

Both are given as ``module:attribute`` strings and imported on use, so validating a recipe
imports only the (torch-free) config module and ``rlhf --help`` imports neither.
A stage function has the signature ``run(cfg) -> Path`` (its output directory).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

STAGES: dict[str, tuple[str, str]] = {
    "base_model": ("rlhf.configs:BaseModelConfig", "rlhf.models:run_base_model"),
    "sft": ("sft.config:SFTConfig", "sft.stage:run"),
    "reward_model": ("reward_model.config:RewardModelConfig", "reward_model.stage:run"),
    "rejection_sampling": ("rlhf.configs:RejectionSamplingConfig", "rlhf.rejection_sampling:run"),
    "ppo": ("rlhf.ppo.config:PPOConfig", "rlhf.ppo.train:run"),
    "gatt": ("rlhf.method_configs:GAttConfig", "rlhf.gatt:run"),
    "context_distillation": ("rlhf.method_configs:ContextDistillationConfig", "rlhf.context_distillation:run"),
    "evaluate": ("rlhf.configs:EvaluateConfig", "rlhf.evaluate:run"),
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
