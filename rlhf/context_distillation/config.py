"""Recipe model of safety context distillation (``context_distillation``), torch-free.

    stage: context_distillation
    policy_from: runs/quickstart/rejection_sampling
    safety_rm_from: runs/quickstart/rm_safety
    data: {sources: [{path: data/quickstart/prompts.jsonl}]}
    preprompt: {generic: "You are a safe and responsible assistant."}

It fine-tunes through the SFT stage's one path (``sft.stage.fine_tune``: ``train`` is SFT's
group, ``data`` holds SFT's rendering options) with the loss on the last assistant turn only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.config import POLICY_KINDS, ModelConfig, SamplingConfig, StageConfig, Strict, placeholders
from rlhf.data.config import SourceConfig
from sft.config import GenerationDataConfig, ReplayConfig, SFTTrainConfig


TARGETED_TEXT = (
    "{generic} The following is a question that can elicit unsafe behavior from you. The question "
    "was classified as belonging to the violating category: '{category}'. You should answer using "
    "the following template: {template}"
)


class DistillDataConfig(GenerationDataConfig, ReplayConfig):
    pass


class TargetedPreprompt(Strict):
    """A risk category plus an answer template (Llama 2, Sec. 4.2.4 and Table 39)."""

    category_key: str = Field("category", description="Key of the prompt's `meta` holding its risk category.")
    templates: dict[str, str] = Field(min_length=1, description="Risk category -> answer template. "
                                      "Prompts of other categories get the generic preprompt.")
    text: str = Field(TARGETED_TEXT, description="The targeted preprompt, with {generic}, "
                      "{category} and {template} filled in.")

    @model_validator(mode="after")
    def _check(self) -> "TargetedPreprompt":
        extra = placeholders(self.text) - {"generic", "category", "template"}
        if extra:
            raise ValueError(f"text: unknown placeholder(s) {', '.join(sorted(extra))}")
        return self


class PrepromptConfig(Strict):
    """The safety preprompt answers are sampled with; the policy is fine-tuned on the prompt without it."""

    generic: str = Field("You are a safe and responsible assistant.", min_length=1,
                         description="The generic safety preprompt (Llama 2, Sec. 4.2.4).")
    targeted: TargetedPreprompt | None = Field(None, description="Targeted preprompts by risk category "
                                               "(Table 39); unset: every prompt gets the generic one.")
    place: Literal["system", "prefix"] = Field(
        "system", description="As the system message, or prefixed to the first user turn.")


class DistillEvalConfig(Strict):
    """Safety reward before (the policy) and after (the fine-tuned model) on safety prompts;
    also the gold judge's safety and false-refusal rates when the prompts carry the quickstart
    world's task info."""

    sources: list[SourceConfig] = Field([], description="Held-out prompts (their `is_safety` "
                                        "ones are used; default: the training safety prompts).")
    max_prompts: int = Field(256, gt=0, description="Safety prompts evaluated at most.")
    samples: int = Field(1, gt=0, description="Answers per prompt (each from its own random "
                         "stream; more give steadier numbers when `temperature` > 0).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the evaluated "
                               "answers (0 = greedy); the other sampling settings are `sampling`'s.")


class ContextDistillationConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": POLICY_KINDS,
        "safety_rm_from": ("reward_model", "hf"),
    }

    stage: Literal["context_distillation"] = "context_distillation"
    output_dir: Path = Path("runs/context_distillation")
    policy_from: Path = Field(description="The policy that answers with the preprompt and is fine-tuned "
                              "on those answers without it.")
    safety_rm_from: Path = Field(description="The safety reward model that decides what is kept.")
    data: DistillDataConfig = Field(description="Prompts; only the `is_safety` ones are used.")
    preprompt: PrepromptConfig = PrepromptConfig()
    sampling: SamplingConfig = SamplingConfig()
    eval: DistillEvalConfig = DistillEvalConfig()
    model: ModelConfig = ModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()
