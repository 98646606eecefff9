"""Recipe model of the SFT stage (torch-free, so recipes validate fast).

    stage: sft
    model_from: runs/quickstart/base_model     # a policy stage, an HF dir, or a hub id (org/name)
    data:
      sources: [{path: data/quickstart/sft.jsonl}]
      max_length: 4096
    train: {lr: 2.0e-5, epochs: 2}

Defaults are the Llama 2-Chat values (Sec. 3.1): lr 2e-5 cosine, weight decay 0.1, 64
sequences of 4096 tokens packed, 2 epochs, AdamW betas 0.9/0.95, eps 1e-5, grad clip 1.0.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from rlhf.data.config import DataConfig, LengthLimit
from rlhf.config import POLICY_KINDS, ModelConfig, StageConfig, Strict, Template, TrainConfig


class SFTDataConfig(DataConfig, LengthLimit):
    """Conversations ending with an assistant turn, rendered and masked for the loss."""

    max_length: int = Field(4096, gt=1, description="Tokens per training sequence (packed row).")
    packing: bool = Field(True, description="Concatenate examples into rows of max_length, each "
                          "example attending only to itself; off = one example per row.")
    overlong: Literal["truncate", "drop", "keep_end"] = Field(
        "truncate", description="Examples longer than max_length: cut to max_length, left out, or "
        "`keep_end`: their earliest exchanges (a user turn and its answer) dropped whole until they "
        "fit, the system prompt kept (then cut if the last exchange alone is too long); all counted "
        "in the manifest.")
    loss_on: Literal["all", "last"] = Field(
        "all", description="Train on every assistant turn, or only the last (Ghost Attention).")
    template: Template = Field(
        "llama2", description="Chat format: Llama 2's [INST] format, or the tokenizer's template.")


class SFTTrainConfig(TrainConfig):
    """Optimizer, schedule and batching of fine-tuning, with the Llama 2-Chat SFT defaults."""

    lr: float = Field(2e-5, gt=0)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(64, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    weight_decay: float = Field(0.1, ge=0.0)
    eps: float = Field(1e-5, gt=0)


class GenerationDataConfig(SFTDataConfig):
    """Prompts to generate from (kind ``prompts``), and how the generated conversations are
    rendered for fine-tuning: always with the loss on the last assistant turn only."""

    loss_on: Literal["last"] = Field("last", description="Only the last assistant turn is trained on.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts.")


class ReplayConfig(Strict):
    """SFT conversations replayed along with generated ones."""

    replay: DataConfig | None = Field(
        None, description="SFT conversations (kind `sft`) trained on along with the generated "
        "ones (loss on their last answer), so the policy keeps its other skills; a `mixture` "
        "part with `take: N` replays N of them.")


class SFTConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model_from": POLICY_KINDS,
    }
    HUB_INPUTS: ClassVar[tuple[str, ...]] = ("model_from",)

    stage: Literal["sft"] = "sft"
    output_dir: Path = Path("runs/sft")
    model_from: Path = Field(description="The model fine-tuned: a base_model or policy stage directory, "
                             "a Hugging Face checkpoint directory, or a hub model id (`org/name`).")
    model: ModelConfig = ModelConfig()
    data: SFTDataConfig
    train: SFTTrainConfig = SFTTrainConfig()
