"""Recipe model of the PPO stage (torch-free, so recipes validate fast).

    stage: ppo
    policy_from: runs/quickstart/rejection_sampling   # or sft / ppo / a Hugging Face dir
    helpfulness_rm_from: runs/quickstart/rm_helpfulness
    safety_rm_from: runs/quickstart/rm_safety
    data:
      sources: [{path: data/quickstart/prompts.jsonl}]
    ppo: {iterations: 200, prompts_per_iteration: 512, beta: 0.01}

The reward of each rollout (Llama 2, Sec. 3.2.3; Stiennon et al. 2020 for what the paper leaves
open):

    R_c = R_s if IS_SAFETY(prompt) or R_s < gate_threshold else R_h   (probability scale)
    R_c = SIGMOID(LOGIT(R_c) - missing_eos_penalty)  if the response has no EOS (cut at max_new_tokens)
    R_t = -beta * KL_t(pi || pi_0)       on every generated token t
        + WHITEN(LOGIT(R_c))             added on the last generated token

WHITEN uses the mean and standard deviation of the current iteration's rollouts, over all
processes (batch statistics, as in ``rlhf.rewards``: no running state, so a resumed run
whitens exactly as an uninterrupted one). Advantages from GAE(gamma, lambda) are whitened the
same way. pi_0 is the policy before PPO; with a LoRA policy it is the same base model with the
adapter switched off (no second copy in memory).

Defaults are the paper's where it gives them (AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay
0.1, grad clip 1.0, constant lr 1e-6, 512 prompts per iteration, mini-batch 64, one PPO epoch,
clip 0.2, beta 0.01 for 7B/13B (0.005 for 34B/70B)) and common practice otherwise (gamma 1.0,
lambda 0.95, value clip 0.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf.config import (
    POLICY_KINDS, REWARD_MODEL_KINDS, GateThreshold, JudgeConfig, MissingEosPenalty, ModelConfig,
    PromptSamplingConfig, StageConfig, Strict, TrainConfig,
)
from rlhf.data.config import DataConfig, PromptDataConfig


class PPOTrainConfig(TrainConfig):
    """Optimizers and mini-batching. ``batch_size`` is the PPO mini-batch (rollouts per
    optimizer step, over all processes), cut into ``micro_batch_size`` rollouts per forward;
    ``epochs`` is the number of PPO epochs (passes over each iteration's rollouts);
    ``save_every`` counts iterations. The critic uses the same settings, except ``critic.lr``."""

    lr: float = Field(1e-6, gt=0)
    schedule: Literal["cosine", "constant", "linear"] = "constant"
    epochs: float = Field(1.0, gt=0, description="PPO epochs: passes over each iteration's rollouts "
                          "(a whole number).")
    max_steps: int | None = Field(None, gt=0, description="Not used by PPO (it runs ppo.iterations); "
                                  "leave unset.")
    batch_size: int = Field(64, gt=0, description="PPO mini-batch: rollouts per optimizer step, over all "
                            "processes; it must divide ppo.prompts_per_iteration.")
    micro_batch_size: int = Field(8, gt=0, description="Rollouts per forward on each process; gradient "
                                  "accumulation makes up the rest of batch_size.")
    weight_decay: float = Field(0.1, ge=0.0)
    eps: float = Field(1e-5, gt=0)
    save_every: int = Field(10, gt=0, description="Checkpoint every N iterations (a killed run resumes "
                            "from the newest).")

    @model_validator(mode="after")
    def _ppo_units(self) -> "PPOTrainConfig":
        if self.max_steps is not None:
            raise ValueError("max_steps: PPO runs ppo.iterations iterations; leave max_steps unset")
        if self.epochs != int(self.epochs):
            raise ValueError(f"epochs: PPO epochs must be a whole number, got {self.epochs}")
        return self


class CriticConfig(ModelConfig):
    """The value model: a reward model (backbone + scalar head) read at every token."""

    lr: float | None = Field(None, gt=0, description="Critic learning rate (default: train.lr).")


class PPOSampling(PromptSamplingConfig):
    """The rollouts: one answer per prompt, ``batch_size`` prompts per generation call. The
    log-probs are taken at the sampling temperature, so it must be above 0."""

    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(64, gt=0)
    max_prompt_length: int = Field(512, gt=0, description="Prompts of more tokens are left out (counted).")

    @field_validator("top_p")
    @classmethod
    def _full_distribution(cls, top_p: float) -> float:
        if top_p != 1.0:
            raise ValueError(f"{top_p} samples from the nucleus, but PPO's ratios and KL use the whole "
                             "distribution; set top_p: 1.0")
        return top_p


class PPOSettings(Strict):
    """PPO itself: iterations, the KL penalty, GAE and the clipped objectives."""

    iterations: int = Field(200, gt=0, description="PPO iterations (rollouts, then updates); the paper "
                            "ran 200-400, early-stopped.")
    prompts_per_iteration: int = Field(512, gt=0, description="Prompts rolled out per iteration (one "
                                       "answer each), over all processes.")
    beta: float = Field(0.01, ge=0, description="KL penalty: 0.01 (7B/13B), 0.005 (34B/70B).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token estimate of KL(pi || pi_0): k1 = log pi - log pi_0 (unbiased, can be "
        "negative); k3 = (r - 1) - log r with r = pi_0 / pi (never negative, lower variance).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of the GAE returns.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: bias (0) vs variance (1) of the advantages.")
    clip: float = Field(0.2, gt=0, description="Clip range of the policy ratio: 1 - clip to 1 + clip.")
    value_clip: float = Field(0.2, gt=0, description="Clip range of the new values around the rollout's values.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus (entropy is logged either way).")
    whiten_advantages: bool = Field(True, description="Whiten the advantages over each iteration's "
                                    "rollouts (all processes).")
    max_kl: float | None = Field(
        None, gt=0, description="Stop when the mean KL per response (nats, summed over its tokens) "
        "exceeds this; the last good checkpoint is kept.")
    offload_reward_models: bool = Field(
        False, description="Keep the reward models on the CPU outside the scoring phase.")
    forward_tokens: int = Field(
        4096, gt=0, description="Tokens per packed row in the no-gradient forwards (log-probs, "
        "reference, values, reward models).")


class EarlyStopConfig(Strict):
    """Evaluate the gated reward R_c of greedy answers to held-out prompts before PPO and every
    ``every`` iterations; stop after ``patience`` evaluations without improvement. The stage
    outputs the best evaluated policy (the starting one if PPO never beat it)."""

    data: DataConfig | None = Field(None, description="Held-out prompts (kind `prompts`); unset: no "
                                    "held-out evaluations, the last policy is the output.")
    every: int = Field(10, gt=0, description="Evaluate every N iterations (and after the last).")
    patience: int | None = Field(None, gt=0, description="Stop after this many evaluations in a row "
                                 "without a new best; null: never stop early (the best "
                                 "evaluated policy is still the output).")
    max_prompts: int = Field(256, gt=0, description="Held-out prompts evaluated at most.")
    min_improvement_se: float = Field(
        0.0, ge=0, description="A later evaluation is a new best only if it beats the best so far by more "
        "than this many standard errors of the per-prompt difference (paired over the held-out prompts): "
        "0 takes any gain; 2 keeps gains that are unlikely to be the noise of the evaluation itself, "
        "so a run whose reward only wanders keeps the start policy.")
    metric: Literal["reward", "judge"] = Field(
        "reward", description="What early stopping (and the policy kept) goes by on the held-out prompts: the "
        "proxy reward R_c, or the independent judge's mean score (needs `judge`).")
    warn_diverging: int = Field(
        3, gt=0, description="Warn (terminal, metrics `judge_diverging`, report) when the proxy reward rose "
        "while the judge's score fell at each of this many evaluations in a row: the held-out evaluations "
        "when `data` is set, else every iteration's rollouts.")


class PPOConfig(StageConfig):
    RENAMED: ClassVar[dict[str, str]] = {"generation": "sampling", "data.max_prompt_length":
                                         "sampling.max_prompt_length", "ppo.gate_threshold": "gate_threshold"}
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": POLICY_KINDS,
        "helpfulness_rm_from": REWARD_MODEL_KINDS,
        "safety_rm_from": REWARD_MODEL_KINDS,
        "critic_from": (*REWARD_MODEL_KINDS, "ppo"),
        "judge.reward_model_from": REWARD_MODEL_KINDS,
    }

    stage: Literal["ppo"] = "ppo"
    output_dir: Path = Path("runs/ppo")
    policy_from: Path = Field(description="The policy PPO starts from and trains; as it was before PPO, "
                              "it is the KL reference pi_0.")
    helpfulness_rm_from: Path = Field(description="The helpfulness reward model (a reward_model stage) "
                                      "that scores the rollouts (R_h).")
    safety_rm_from: Path = Field(description="The safety reward model (a reward_model stage) that scores "
                                 "the rollouts (R_s).")
    critic_from: Path | None = Field(None, description="Where the critic starts: a reward_model or ppo "
                                     "stage (default: the helpfulness reward model).")
    policy: ModelConfig = ModelConfig()
    critic: CriticConfig = CriticConfig()
    data: PromptDataConfig
    sampling: PPOSampling = PPOSampling()
    gate_threshold: GateThreshold = 0.15
    missing_eos_penalty: MissingEosPenalty = None
    ppo: PPOSettings = PPOSettings()
    train: PPOTrainConfig = PPOTrainConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    judge: JudgeConfig = Field(JudgeConfig(), description="An independent judge, never optimised against "
                               "(gold, reward_model_from or hook): its scores are reported beside the proxy rewards.")

    @model_validator(mode="after")
    def _batches_fit(self) -> "PPOConfig":
        if self.ppo.prompts_per_iteration % self.train.batch_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide ppo.prompts_per_iteration "
                f"({self.ppo.prompts_per_iteration})"
            )
        self.judge.check_independent(self.helpfulness_rm_from, self.safety_rm_from)
        if self.early_stop.metric == "judge" and not self.judge.enabled:
            raise ValueError("early_stop.metric: judge needs a judge (set judge.gold, judge.reward_model_from "
                             "or judge.hook)")
        return self
