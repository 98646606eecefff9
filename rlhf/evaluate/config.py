"""Recipe model of the evaluate stage (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.config import POLICY_KINDS, REWARD_MODEL_KINDS, GateThreshold, JudgeConfig, SamplingConfig, StageConfig
from rlhf.data.config import PromptDataConfig


class EvaluateSampling(SamplingConfig):
    """The evaluated answers: greedy unless ``temperature`` is set."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default).")
    batch_size: int = Field(64, gt=0)


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

    RENAMED: ClassVar[dict[str, str]] = {"max_new_tokens": "sampling.max_new_tokens",
                                         "batch_size": "sampling.batch_size", "template": "prompts.template"}
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policies.*": POLICY_KINDS,
        "baseline_from": POLICY_KINDS,
        "helpfulness_rm_from": REWARD_MODEL_KINDS,
        "safety_rm_from": REWARD_MODEL_KINDS,
        "judge.reward_model_from": REWARD_MODEL_KINDS,
    }

    stage: Literal["evaluate"] = "evaluate"
    output_dir: Path = Path("runs/evaluate")
    policies: dict[str, Path] = Field(min_length=1, description="name -> policy, oldest first; "
                                      "each is compared with the baseline and with the one before it")
    baseline_from: Path | None = Field(None, description="Win rates and KL are against this policy "
                                       "(default: the first of `policies`)")
    helpfulness_rm_from: Path = Field(description="The helpfulness reward model (a reward_model stage) "
                                      "that scores the answers (R_h).")
    safety_rm_from: Path = Field(description="The safety reward model (a reward_model stage) that scores "
                                 "the answers (R_s).")
    prompts: PromptDataConfig = Field(description="Held-out prompts (kind: prompts)")
    max_prompts: int | None = Field(None, gt=0, description="Evaluate only the first N prompts")
    sampling: EvaluateSampling = EvaluateSampling()
    gate_threshold: GateThreshold = 0.15
    kl_temperature: float = Field(1.0, gt=0, description="Sampling temperature of the responses "
                                  "the KL from the baseline is estimated on")
    gold: Literal["auto", "on", "off"] = Field("auto", description="Score with the quickstart "
                                               "world's gold judge (auto: when the prompts carry its task info)")
    gold_samples: int = Field(4, ge=0, description="Also score this many sampled answers per prompt with "
                              "the gold judge (`gold_sampled`: expected scores under sampling, less noisy than "
                              "the greedy answers'; 0: greedy only)")
    gold_temperature: float = Field(0.7, gt=0, description="Sampling temperature of `gold_samples`")
    judge: JudgeConfig = Field(JudgeConfig(), description="An independent judge (not the reward models of the win rates) "
                               "(gold, reward_model_from or hook): its scores are reported beside the proxy rewards.")

    @model_validator(mode="after")
    def _judge_is_independent(self) -> "EvaluateConfig":
        self.judge.check_independent(self.helpfulness_rm_from, self.safety_rm_from)
        return self
