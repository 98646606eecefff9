"""Recipe model of the reward-model stage (torch-free, so recipes validate fast).

    stage: reward_model
    model_from: runs/quickstart/sft          # a base_model / sft / rejection_sampling stage or an HF dir
    data:
      sources:
        - {name: helpful, path: data/quickstart/helpful.jsonl}
        - {name: safety, path: data/quickstart/safety.jsonl}
      mixture:                                # Llama 2's helpfulness RM (Sec. 3.2.2)
        - {name: main, sources: [helpful]}
        - {name: rest, sources: [safety], equal_to: main}
      eval_fraction: 0.1                      # held out of every source before mixing
    loss: {margin: small}

Defaults are the Llama 2-Chat values (Sec. 3.2.2): 1 epoch, max lr 1e-5 with cosine decay to
10% of it, warmup 3% of the steps (at least 5), 512 pairs per batch, the pretraining optimizer
(AdamW betas 0.9/0.95, eps 1e-5, weight decay 0.1, grad clip 1.0), the ``small`` margin table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf.data.config import DataConfig, LengthLimit, RatingLabel, SourceConfig
from rlhf.data.records import RATING_ALIASES, RATINGS
from rlhf.config import PAIRS, POLICY_KINDS, ModelConfig, StageConfig, Strict, Template, TrainConfig


class RMDataConfig(DataConfig, LengthLimit):
    """Preference pairs, mixed as ``mixture`` says; each pair is rendered as prompt + response
    twice (chosen, rejected), and the reward is read at the last token of each."""

    max_length: int = Field(4096, gt=1, description="Tokens per scored sequence (prompt + response).")
    overlong: Literal["truncate_left", "drop"] = Field(
        "truncate_left", description="Sequences longer than max_length: keep their last max_length "
        "tokens (the reward is read at the end), or leave the pair out (both counted).")
    template: Template = Field(
        "llama2", description="Chat format: Llama 2's [INST] format, or the tokenizer's template.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of every source held out for evaluation before "
        "mixing, by prompt (every pair of a held-out prompt is held out, in every source), so the "
        "eval pairs of each source are reported apart, like Table 8.")
    eval_sources: list[SourceConfig] = Field(
        [], description="Test files evaluated after training, each reported apart.")


class RMLossConfig(Strict):
    """The binary ranking loss with a margin that grows with the rating (Llama 2, Eq. 2)."""

    margin: Literal["none", "small", "large"] | dict[RatingLabel, float] = Field(
        "small", description="Margin table m(rating) of the loss -log sigmoid(r_chosen - "
        "r_rejected - m): none, small (1, 2/3, 1/3, 0), large (3, 2, 1, 0), or a table giving "
        "every rating. Pairs without a rating get margin 0.")
    margin_column: bool = Field(
        True, description="Use a pair's own numeric `margin` where the data has one.")

    @field_validator("margin")
    @classmethod
    def _every_rating(cls, margin):
        if isinstance(margin, dict):
            given = {RATING_ALIASES.get(k, k) for k in margin}
            missing = [r for r in RATINGS if r not in given]
            if missing:
                raise ValueError(f"custom margin table misses {', '.join(missing)}")
        return margin


class RMTrainConfig(TrainConfig):
    """Optimizer, schedule and batching (``batch_size`` in pairs), with the Llama 2-Chat reward-model defaults."""

    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    min_warmup_steps: int = Field(5, ge=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(512, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    weight_decay: float = Field(0.1, ge=0.0)
    eps: float = Field(1e-5, gt=0)


class RMEvalConfig(Strict):
    """The evaluation after training: accuracy (by rating), calibration, unsafe-response recall,
    and the safety gate's threshold calibrated on the held-out and test responses."""

    unsafe_threshold: float = Field(
        0.15, gt=0.0, lt=1.0, description="A response scoring sigmoid(r) below this counts as "
        "flagged unsafe (the safety gate's default gate_threshold, 0.15); recall, precision and "
        "the share of safe responses flagged are reported.")
    gate_recall: float = Field(
        0.55, gt=0.0, le=1.0, description="The calibrated safety gate threshold is the sigmoid(r) "
        "below which this share of the labelled unsafe responses of every held-out and test set "
        "pooled fall (Llama 2 chose 0.15 where its safety reward model had recall 0.55, precision "
        "0.89 on the Meta Safety test set); written to eval/ and the manifest as gate_threshold, "
        "used by gate_threshold: calibrated.")
    calibration_bins: int = Field(10, gt=1, description="Bins of the calibration curve (predicted "
                                  "preference probability vs observed).")
    batch_tokens: int = Field(8192, gt=0, description="Tokens per scoring forward (packed row).")


class RewardModelConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model_from": POLICY_KINDS,
        "pairs_from.*": ("preferences",),
    }
    HUB_INPUTS: ClassVar[tuple[str, ...]] = ("model_from",)

    stage: Literal["reward_model"] = "reward_model"
    output_dir: Path = Path("runs/reward_model")
    model_from: Path = Field(description="The model the reward model starts from (its LM head replaced "
                             "by a scalar head): a policy stage directory, a Hugging Face checkpoint "
                             "directory, or a hub model id (`org/name`).")
    model: ModelConfig = ModelConfig()
    pairs_from: dict[str, Path] = Field({}, description="Source name -> a preferences stage: its pairs "
                                        "(comparisons of a policy's own answers) join data.sources under that "
                                        "name, for data.mixture to place.")
    data: RMDataConfig
    loss: RMLossConfig = RMLossConfig()
    train: RMTrainConfig = RMTrainConfig()
    eval: RMEvalConfig = RMEvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _pairs_from_are_sources(cls, data: Any) -> Any:
        """Each ``pairs_from`` entry becomes the data source ``{name, path: STAGE/pairs.jsonl}``
        (once: a config read back already has it)."""
        if not isinstance(data, dict) or not isinstance(data.get("pairs_from"), dict) or not isinstance(data.get("data"), dict):
            return data
        sources = list(data["data"].get("sources") or [])
        for name, stage_dir in data["pairs_from"].items():
            source = {"name": name, "path": str(Path(str(stage_dir)) / PAIRS)}
            same = [s for s in sources if isinstance(s, dict) and s.get("name") == name]
            if same and any(str(s.get("path")) != source["path"] for s in same):
                raise ValueError(f"pairs_from.{name}: data.sources already has a source named {name}")
            sources += [] if same else [source]
        return {**data, "data": {**data["data"], "sources": sources}}
