"""Config models of the stages that live in the ``rlhf`` package (torch-free).

``sft/config.py`` and ``reward_model/config.py`` hold those stages' configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.data.config import DataConfig
from rlhf.method_configs import GenerationDataConfig, ReplayConfig
from rlhf.recipe import StageConfig, Strict
from sft.config import SFTModelConfig, SFTTrainConfig

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
    gold_samples: int = Field(4, ge=0, description="Also score this many sampled answers per prompt with "
                              "the gold judge (`gold_sampled`: expected scores under sampling, less noisy than "
                              "the greedy answers'; 0: greedy only)")
    gold_temperature: float = Field(0.7, gt=0, description="Sampling temperature of `gold_samples`")


# ---------------------------------------------------------------------------------------------
# Rejection sampling


class RejectionSamplingSampling(Strict):
    """How the K samples of each prompt are drawn (``rlhf.generation``)."""

    k: int = Field(8, ge=1, description="Samples per prompt; the best under R_c is kept (the paper's "
                   "Fig. 7 goes to 100).")
    temperature: float = Field(1.0, ge=0, description="0 = greedy. The best temperature drifts as the "
                               "policy changes (1.2-1.3 for RLHF models, Fig. 8): re-tune each round "
                               "with `report.temperatures`.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    max_prompt_length: int = Field(1024, gt=0, description="Longer prompts are left out (counted).")
    batch_size: int = Field(64, gt=0, description="Rows (samples) per generation call on each process; "
                            "a call holds whole prompts: batch_size // k of them, at least one.")
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
        "helpfulness_rm_from": ("reward_model",),
        "safety_rm_from": ("reward_model",),
        "pool_from": ("rejection_sampling",),
        "student_from": POLICY_KINDS,
    }

    stage: Literal["rejection_sampling"] = "rejection_sampling"
    output_dir: Path = Path("runs/rejection_sampling")
    policy_from: Path = Field(description="The policy that samples (and is fine-tuned unless `student_from`).")
    helpfulness_rm_from: Path
    safety_rm_from: Path
    pool_from: Path | None = Field(None, description="The previous rejection_sampling stage: its pool "
                                   "(best response so far per prompt) is carried over and competes.")
    student_from: Path | None = Field(None, description="Distillation: fine-tune this (smaller) model on "
                                      "the pool instead of the policy.")
    round: int | None = Field(None, ge=1, description="Round number recorded in the pool (default: the "
                              "previous pool's last round + 1, or 1).")
    data: RejectionSamplingData
    sampling: RejectionSamplingSampling = RejectionSamplingSampling()
    gate_threshold: float = Field(0.15, ge=0, le=1, description="Safety gate on R_s (probability scale).")
    report: RejectionSamplingReport = RejectionSamplingReport()
    model: SFTModelConfig = SFTModelConfig()
    train: SFTTrainConfig = SFTTrainConfig()


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

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"from_pretrained": ("hf",), "tokenizer.corpus": ()}

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
