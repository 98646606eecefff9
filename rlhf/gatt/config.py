"""Recipe model of Ghost Attention (``gatt``), torch-free, so recipes validate fast.

    stage: gatt
    policy_from: runs/quickstart/rejection_sampling
    data: {sources: [{path: data/quickstart/prompts.jsonl}], turns: 4, max_length: 1024}
    instructions:
      constraints:
        - {name: case, text: "Always answer in upper case.", short: "Case: upper", checker: upper_case}
        - {name: hobby, text: "You enjoy {value}.", short: "Hobby: {value}", values: [tennis, chess]}
      combine: 0.3                  # share of instructions combining several constraints
      shorten: 0.5                  # share written in their short form ("Figure: Napoleon")

It fine-tunes through the SFT stage's one path (``sft.stage.fine_tune``: ``train`` is SFT's
group, ``data`` holds SFT's rendering options) with the loss on the last assistant turn only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.config import POLICY_KINDS, ModelConfig, SamplingConfig, StageConfig, Strict, placeholders
from rlhf.data.config import SourceConfig, missing_module
from rlhf.gatt.checks import CHECKERS, is_checker_name
from sft.config import GenerationDataConfig, ReplayConfig, SFTTrainConfig



class Constraint(Strict):
    """One kind of instruction (a hobby, a language, a persona, an answer style ...)."""

    name: str = Field(description="Name of the kind, e.g. hobby, language, persona.")
    text: str = Field(description="The instruction, e.g. 'Always act as {value}.'; `{value}` is "
                      "filled with one of `values`.")
    short: str | None = Field(None, description="Its shortened form, e.g. 'Figure: {value}'.")
    values: list[str] = Field([], description="What fills `{value}` (one drawn at random).")
    checker: str | None = Field(
        None, description="Judge of whether an answer follows it: a checker of rlhf.gatt.checks "
        "(upper_case, lower_case, ends_with, starts_with, mentions) or `module:function` "
        "called as f(answer, value) -> bool. Only constraints with a checker are evaluated.")

    @model_validator(mode="after")
    def _check(self) -> "Constraint":
        for key in ("text", "short"):
            text = getattr(self, key)
            if text is None:
                continue
            extra = placeholders(text) - {"value"}
            if extra:
                raise ValueError(f"{key}: unknown placeholder(s) {', '.join(sorted(extra))}; only {{value}}")
            if ("value" in placeholders(text)) != bool(self.values):
                raise ValueError(f"{key}: `{{value}}` and `values` go together (one without the other)")
        if self.checker is not None and not is_checker_name(self.checker):
            raise ValueError(f"checker: {self.checker!r} is neither a known checker nor module:function")
        if self.checker is not None and self.checker not in CHECKERS and (missing := missing_module(self.checker)):
            raise ValueError(f"checker: {self.checker!r}: {missing}")
        return self


class InstructionsConfig(Strict):
    """Where the system instructions are drawn from (Llama 2, App. A.3.5)."""

    constraints: list[Constraint] = Field(min_length=1, description="The kinds of instruction drawn from.")
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
    dialogues: int = Field(32, gt=0, description="Held-out dialogues evaluated.")
    turns: int = Field(6, ge=1, description="User turns per evaluated dialogue: the depths reported.")
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
    model: ModelConfig = ModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()

    @model_validator(mode="after")
    def _evaluable(self) -> "GAttConfig":
        if not any(c.checker for c in self.instructions.constraints):
            raise ValueError("instructions.constraints: no constraint has a checker, so nothing "
                             "can be evaluated; give at least one a `checker`")
        return self
