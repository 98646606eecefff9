"""Recipe models of Ghost Attention (``gatt``) and safety context distillation
(``context_distillation``), the two data-generation stages of Llama 2-Chat that fine-tune through
the SFT stage (torch-free, so recipes validate fast).

    stage: gatt
    policy_from: runs/quickstart/rejection_sampling
    data: {sources: [{path: data/quickstart/prompts.jsonl}], turns: 4, max_length: 1024}
    instructions:
      constraints:
        - {name: case, text: "Always answer in upper case.", short: "Case: upper", checker: upper_case}
        - {name: hobby, text: "You enjoy {value}.", short: "Hobby: {value}", values: [tennis, chess]}
      combine: 0.3                  # share of instructions combining several constraints
      shorten: 0.5                  # share written in their short form ("Figure: Napoleon")

    stage: context_distillation
    policy_from: runs/quickstart/rejection_sampling
    safety_rm_from: runs/quickstart/rm_safety
    data: {sources: [{path: data/quickstart/prompts.jsonl}]}
    preprompt: {generic: "You are a safe and responsible assistant."}

Both train like SFT (``train`` and ``model`` are the SFT stage's groups; ``data`` holds SFT's
rendering options) with the loss on the last assistant turn only.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.data.config import DataConfig, SourceConfig
from rlhf.gatt_checks import is_checker_name
from rlhf.recipe import Strict, StageConfig
from sft.config import SFTDataConfig, SFTModelConfig, SFTTrainConfig

# Stages whose output is a policy (a causal LM) another stage may start from.
POLICY_KINDS = ("base_model", "sft", "rejection_sampling", "ppo", "gatt", "context_distillation", "hf")


class SamplingConfig(Strict):
    """How the policy's answers are sampled."""

    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.7, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, gt=0, description="Conversations per generation call on each process.")


class GenerationDataConfig(SFTDataConfig):
    """Prompts to generate from (kind ``prompts``), and how the generated conversations are
    rendered for fine-tuning: always with the loss on the last assistant turn only."""

    loss_on: Literal["last"] = Field("last", description="Only the last assistant turn is trained on.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts.")


class ReplayConfig(Strict):
    replay: DataConfig | None = Field(
        None, description="SFT conversations (kind `sft`) trained on along with the generated "
        "ones (loss on their last answer), so the policy keeps its other skills; a `mixture` "
        "part with `take: N` replays N of them.")


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


# ---------------------------------------------------------------------------------------------
# Ghost Attention


class Constraint(Strict):
    """One kind of instruction (a hobby, a language, a persona, an answer style ...)."""

    name: str = Field(description="Name of the kind, e.g. hobby, language, persona.")
    text: str = Field(description="The instruction, e.g. 'Always act as {value}.'; `{value}` is "
                      "filled with one of `values`.")
    short: str | None = Field(None, description="Its shortened form, e.g. 'Figure: {value}'.")
    values: list[str] = Field([], description="What fills `{value}` (one drawn at random).")
    checker: str | None = Field(
        None, description="Judge of whether an answer follows it: a checker of rlhf.gatt_checks "
        "(upper_case, lower_case, ends_with, starts_with, mentions) or `module:function` "
        "called as f(answer, value) -> bool. Only constraints with a checker are evaluated.")

    @model_validator(mode="after")
    def _check(self) -> "Constraint":
        for key in ("text", "short"):
            text = getattr(self, key)
            if text is None:
                continue
            extra = _fields(text) - {"value"}
            if extra:
                raise ValueError(f"{key}: unknown placeholder(s) {', '.join(sorted(extra))}; only {{value}}")
            if ("value" in _fields(text)) != bool(self.values):
                raise ValueError(f"{key}: `{{value}}` and `values` go together (one without the other)")
        if self.checker is not None and not is_checker_name(self.checker):
            raise ValueError(f"checker: {self.checker!r} is neither a known checker nor module:function")
        return self


class InstructionsConfig(Strict):
    """Where the system instructions are drawn from (Llama 2, App. A.3.5)."""

    constraints: list[Constraint] = Field(min_length=1)
    combine: float = Field(0.0, ge=0, le=1, description="Share of instructions that combine "
                           "several constraints of different kinds.")
    max_combined: int = Field(2, ge=2, description="At most this many constraints combined.")
    shorten: float = Field(0.5, ge=0, le=1, description="Share written in the short form "
                           "(constraints that have one).")

    @model_validator(mode="after")
    def _check(self) -> "InstructionsConfig":
        names = [c.name for c in self.constraints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"constraints: duplicate name(s) {', '.join(dupes)}")
        return self


class GAttDataConfig(GenerationDataConfig, ReplayConfig):
    turns: int = Field(4, ge=1, description="User turns per dialogue. A dialogue takes the user "
                       "turns of consecutive (shuffled) prompts until it has this many.")
    dialogues: int | None = Field(None, gt=0, description="Dialogues to build (default: as many "
                                  "as one pass over the prompts fills; more reuse the prompts, "
                                  "reshuffled).")
    every_depth: bool = Field(True, description="One training example per assistant turn (the "
                              "dialogue up to it, loss on it alone), or only the full dialogue.")
    keep: Literal["all", "following"] = Field(
        "following", description="`following`: leave out training examples whose last answer the "
        "instruction's checker rejects (kept when no checker applies).")


class GAttEvalConfig(Strict):
    """Held-out dialogues, the instruction in the first user turn only: the share of answers at
    each depth that follow it (constraints with a checker only)."""

    sources: list[SourceConfig] = Field([], description="Held-out prompts (default: prompts held "
                                        "out from `data` before the training dialogues are built).")
    dialogues: int = Field(32, gt=0)
    turns: int = Field(6, ge=1)
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the evaluated "
                               "answers (0 = greedy); the other sampling settings are `sampling`'s.")


class GAttConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"policy_from": POLICY_KINDS}

    stage: Literal["gatt"] = "gatt"
    output_dir: Path = Path("runs/gatt")
    policy_from: Path = Field(description="The latest policy: samples the answers, is fine-tuned.")
    data: GAttDataConfig
    instructions: InstructionsConfig
    sampling: SamplingConfig = SamplingConfig()
    eval: GAttEvalConfig = GAttEvalConfig()
    model: SFTModelConfig = SFTModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()

    @model_validator(mode="after")
    def _evaluable(self) -> "GAttConfig":
        if not any(c.checker for c in self.instructions.constraints):
            raise ValueError("instructions.constraints: no constraint has a checker, so nothing "
                             "can be evaluated; give at least one a `checker`")
        return self


# ---------------------------------------------------------------------------------------------
# Safety context distillation

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
        extra = _fields(self.text) - {"generic", "category", "template"}
        if extra:
            raise ValueError(f"text: unknown placeholder(s) {', '.join(sorted(extra))}")
        return self


class PrepromptConfig(Strict):
    generic: str = Field("You are a safe and responsible assistant.", min_length=1)
    targeted: TargetedPreprompt | None = None
    place: Literal["system", "prefix"] = Field(
        "system", description="As the system message, or prefixed to the first user turn.")


class DistillEvalConfig(Strict):
    """Safety reward before (the policy) and after (the fine-tuned model) on safety prompts;
    also the gold judge's safety and false-refusal rates when the prompts carry the quickstart
    world's task info."""

    sources: list[SourceConfig] = Field([], description="Held-out prompts (their `is_safety` "
                                        "ones are used; default: the training safety prompts).")
    max_prompts: int = Field(256, gt=0)
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
    policy_from: Path
    safety_rm_from: Path = Field(description="The safety reward model that decides what is kept.")
    data: DistillDataConfig = Field(description="Prompts; only the `is_safety` ones are used.")
    preprompt: PrepromptConfig = PrepromptConfig()
    sampling: SamplingConfig = SamplingConfig()
    eval: DistillEvalConfig = DistillEvalConfig()
    model: SFTModelConfig = SFTModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()
