"""Config models of the stages that live in the ``rlhf`` package (torch-free).

``sft/config.py`` and ``reward_model/config.py`` hold those stages' configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.data.config import DataConfig
from rlhf.recipe import StageConfig, Strict

POLICY_KINDS = ("base_model", "sft", "rejection_sampling", "ppo", "gatt", "context_distillation", "hf")


class EvaluateConfig(StageConfig):
    """Compare policies on held-out prompts under the reward models (and a gold judge when the
    prompts carry one, as the quickstart world's do).

        stage: evaluate
        policies: {sft: runs/q/sft, rejection_sampling: runs/q/rs, ppo: runs/q/ppo}  # oldest first
        baseline_from: runs/q/sft
        helpfulness_rm_from: runs/q/rm_helpfulness
        safety_rm_from: runs/q/rm_safety
        prompts: {sources: [{path: data/quickstart/eval_prompts.jsonl}]}
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policies.*": POLICY_KINDS,
        "baseline_from": POLICY_KINDS,
        "helpfulness_rm_from": ("reward_model",),
        "safety_rm_from": ("reward_model",),
    }

    stage: Literal["evaluate"] = "evaluate"
    output_dir: Path = Path("runs/evaluate")
    policies: dict[str, Path] = Field(min_length=1, description="name -> policy, oldest first; "
                                      "each is compared with the baseline and with the one before it")
    baseline_from: Path | None = Field(None, description="Win rates and KL are against this policy "
                                       "(default: the first of `policies`)")
    helpfulness_rm_from: Path
    safety_rm_from: Path
    prompts: DataConfig = Field(description="Held-out prompts (kind: prompts)")
    max_prompts: int | None = Field(None, gt=0, description="Evaluate only the first N prompts")
    max_new_tokens: int = Field(64, gt=0)
    template: Literal["llama2", "tokenizer"] = "llama2"
    gate_threshold: float = Field(0.15, ge=0, le=1, description="Safety gate on the probability scale")
    kl_temperature: float = Field(1.0, gt=0, description="Sampling temperature of the responses "
                                  "the KL from the baseline is estimated on")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch")
    gold: Literal["auto", "on", "off"] = Field("auto", description="Score with the quickstart "
                                               "world's gold judge (auto: when the prompts carry its task info)")


# ---------------------------------------------------------------------------------------------
# Base model


class TokenizerSpec(Strict):
    """A byte-level BPE tokenizer trained on the strings of ``corpus`` (JSONL or text files)."""

    corpus: list[Path] = Field(min_length=1)
    vocab_size: int = Field(1024, ge=300)


class ModelSpec(Strict):
    """A randomly initialised Llama: ``size`` is one of rlhf.models.SIZES (tiny, small, medium, 20m)."""

    size: Literal["tiny", "small", "medium", "20m"] = "tiny"
    max_positions: int = Field(512, gt=0)
    tie_embeddings: bool = False


class BaseModelConfig(StageConfig):
    """The starting model: a local Hugging Face checkpoint copied in (``from_pretrained``), or a
    tokenizer trained in-process plus a randomly initialised Llama (``tokenizer`` + ``model``).

        stage: base_model
        tokenizer: {corpus: [data/quickstart/sft.jsonl], vocab_size: 1024}
        model: {size: tiny}
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"from_pretrained": ("hf",)}

    stage: Literal["base_model"] = "base_model"
    output_dir: Path = Path("runs/base_model")
    from_pretrained: Path | None = None
    tokenizer: TokenizerSpec | None = None
    model: ModelSpec = ModelSpec()

    @model_validator(mode="after")
    def _one_source(self) -> "BaseModelConfig":
        if (self.from_pretrained is None) == (self.tokenizer is None):
            raise ValueError("give either from_pretrained (a local checkpoint) or tokenizer (to build one)")
        return self
