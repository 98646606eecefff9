"""Recipe model of the rejection sampling stage (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.config import (
    POLICY_KINDS, REWARD_MODEL_KINDS, GateThreshold, JudgeConfig, MissingEosPenalty, ModelConfig,
    PromptSamplingConfig, StageConfig, Strict,
)
from sft.config import GenerationDataConfig, ReplayConfig, SFTTrainConfig


class RejectionSamplingSampling(PromptSamplingConfig):
    """How the K samples of each prompt are drawn (``rlhf.generation``); ``batch_size`` rows per
    call hold whole prompts: batch_size // k of them, at least one."""

    k: int = Field(8, ge=1, description="Samples per prompt; the best under R_c is kept (the paper's "
                   "Fig. 7 goes to 100).")
    temperature: float = Field(1.0, ge=0, description="0 = greedy. The best temperature drifts as the "
                               "policy changes (1.2-1.3 for RLHF models, Fig. 8): re-tune each round "
                               "with `report.temperatures`.")
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(64, gt=0, description="Rows (samples) per generation call on each process.")
    backend: Literal["transformers"] = Field(
        "transformers", description="Plain transformers generation on the KV cache, length-bucketed "
        "(the only backend of this version).")


class RejectionSamplingData(GenerationDataConfig, ReplayConfig):
    """Prompts to sample (kind ``prompts``); how the pool is rendered for fine-tuning (loss on the
    sampled answer only); optionally SFT conversations replayed along with the pool."""


class RejectionSamplingReport(Strict):
    """Fig. 7 (reward of the best of k samples, max and median, k = 1..K) is always reported; a
    temperature sweep (Fig. 8) only when ``temperatures`` is set."""

    temperatures: list[float] = Field([], description="Temperatures of the sweep, e.g. [0.6, 0.8, 1.0, "
                                      "1.2, 1.4]; empty = no sweep.")
    sweep_prompts: int = Field(32, gt=0, description="Prompts of the sweep (the first N).")
    sweep_k: int | None = Field(None, ge=1, description="Samples per prompt in the sweep (default: sampling.k).")


class RejectionSamplingConfig(StageConfig):
    """Rejection sampling fine-tuning with a best-so-far pool (Llama 2, Sec. 3.2.3).

        stage: rejection_sampling
        policy_from: runs/q/sft              # samples; fine-tuned unless student_from is set
        helpfulness_rm_from: runs/q/rm_helpfulness
        safety_rm_from: runs/q/rm_safety
        pool_from: runs/q/rejection_sampling_1   # the previous round (optional)
        data: {sources: [{path: data/quickstart/prompts.jsonl}]}
        sampling: {k: 8, temperature: 1.0}
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": POLICY_KINDS,
        "helpfulness_rm_from": REWARD_MODEL_KINDS,
        "safety_rm_from": REWARD_MODEL_KINDS,
        "pool_from": ("rejection_sampling",),
        "student_from": POLICY_KINDS,
        "judge.reward_model_from": REWARD_MODEL_KINDS,
    }

    stage: Literal["rejection_sampling"] = "rejection_sampling"
    output_dir: Path = Path("runs/rejection_sampling")
    policy_from: Path = Field(description="The policy that samples (and is fine-tuned unless `student_from`).")
    helpfulness_rm_from: Path = Field(description="The helpfulness reward model (a reward_model stage) "
                                      "that scores the samples (R_h).")
    safety_rm_from: Path = Field(description="The safety reward model (a reward_model stage) that scores "
                                 "the samples (R_s).")
    pool_from: Path | None = Field(None, description="The previous rejection_sampling stage: its pool "
                                   "(best response so far per prompt) is carried over and competes.")
    student_from: Path | None = Field(None, description="Distillation: fine-tune this (smaller) model on "
                                      "the pool instead of the policy.")
    round: int | None = Field(None, ge=1, description="Round number recorded in the pool (default: the "
                              "previous pool's last round + 1, or 1).")
    data: RejectionSamplingData
    sampling: RejectionSamplingSampling = RejectionSamplingSampling()
    gate_threshold: GateThreshold = 0.15
    missing_eos_penalty: MissingEosPenalty = None
    pool_truncated: bool = Field(
        False, description="Let a sample cut at sampling.max_new_tokens (no EOS) compete for the pool "
        "(scored without an EOS, lowered by missing_eos_penalty, fine-tuned without an EOS). false: "
        "only finished samples enter it; a prompt whose K samples were all cut keeps its old entry "
        "(counted as pool_only_truncated).")
    report: RejectionSamplingReport = RejectionSamplingReport()
    judge: JudgeConfig = Field(JudgeConfig(), description="An independent judge, never optimised against "
                               "(gold, reward_model_from or hook): its scores are reported beside the proxy rewards.")
    model: ModelConfig = ModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()

    @model_validator(mode="after")
    def _judge_is_independent(self) -> "RejectionSamplingConfig":
        self.judge.check_independent(self.helpfulness_rm_from, self.safety_rm_from)
        return self
