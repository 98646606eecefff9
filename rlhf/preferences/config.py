"""Recipe model of the preference-collection stage (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from rlhf.config import POLICY_KINDS, PromptSamplingConfig, StageConfig
from rlhf.data.config import PromptDataConfig


class PreferenceSampling(PromptSamplingConfig):
    """How each prompt's answers are sampled; comparisons are drawn among the distinct ones."""

    k: int = Field(4, ge=2, description="Answers sampled per prompt.")
    temperature: float = Field(1.0, ge=0, description="Llama 2 varied the temperature between the two answers "
                               "of a comparison; one temperature here, several answers per prompt.")
    batch_size: int = Field(64, gt=0, description="Rows (answers) per generation call on each process.")


class PreferencePrompts(PromptDataConfig):
    """The prompts whose answers are compared (kind ``prompts``)."""

    kind: Literal["all", "helpfulness", "safety"] = Field(
        "all", description="Which prompts get comparisons: all, the helpfulness prompts (is_safety false) "
        "or the safety prompts (is_safety true); a reward model takes a stage of each kind as its own source.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts (after `kind`).")


class PreferencesConfig(StageConfig):
    """Comparisons of a policy's own answers, labelled by an annotator: the weekly preference
    batches of Llama 2 (Sec. 3.2.1), sampled from the latest policy so that the reward models
    retrained on them stay on its distribution.

        stage: preferences
        policy_from: runs/q/rejection_sampling
        data: {sources: [{path: data/quickstart/prompts.jsonl}], kind: helpfulness}
        sampling: {k: 8, temperature: 0.7}
        pairs_per_prompt: 3
        annotator: rlhf.world.annotators:annotate     # the quickstart world's annotators

    Writes ``pairs.jsonl`` (canonical preference pairs, ``batch`` set), read by a reward_model
    stage through ``pairs_from``.
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"policy_from": POLICY_KINDS}

    stage: Literal["preferences"] = "preferences"
    output_dir: Path = Path("runs/preferences")
    policy_from: Path = Field(description="The policy whose answers are compared.")
    data: PreferencePrompts
    sampling: PreferenceSampling = PreferenceSampling()
    pairs_per_prompt: int = Field(1, ge=1, description="Comparisons per prompt at most, drawn at random among "
                                  "the pairs of its distinct finished answers (a prompt with fewer than two "
                                  "gets none; counted).")
    annotator: str = Field(pattern=r"^.+:[A-Za-z_]\w*$", description="`module:function` or `file.py:function`, "
                           "called as function(prompts, responses_a, responses_b) -> one rlhf.data.PreferencePair "
                           "(or None: no label) per comparison, its chosen and rejected the two answers: a script "
                           "over your annotators' labels, an LLM-as-judge, or the quickstart world's "
                           "rlhf.world.annotators:annotate.")
    batch: str | None = Field(None, description="The `batch` of every pair (default: the stage directory's name).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Sampling precision (bf16/fp16 "
                                                           "need a GPU).")
