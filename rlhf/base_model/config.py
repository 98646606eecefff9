"""Recipe model of the base_model stage (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.config import StageConfig, Strict


class TokenizerSpec(Strict):
    """A byte-level BPE tokenizer trained on the strings of ``corpus`` (JSONL or text files)."""

    corpus: list[Path] = Field(min_length=1, description="JSONL or text files whose strings the "
                               "tokenizer is trained on.")
    vocab_size: int = Field(1024, ge=300, description="Vocabulary size of the trained tokenizer.")


class ModelSpec(Strict):
    """A randomly initialised Llama: ``size`` is one of rlhf.models.SIZES (tiny, small, medium, 20m)."""

    size: Literal["tiny", "small", "medium", "20m"] = Field(
        "tiny", description="Hidden size, layers, heads: tiny 64/2/4, small 128/4/4, medium 256/6/8, "
        "20m 512/6/8 (rlhf.models.SIZES).")
    max_positions: int = Field(512, gt=0, description="max_position_embeddings: the longest sequence "
                               "the model takes.")
    tie_embeddings: bool = Field(False, description="Share the input embedding's weights with the output head.")


class BaseModelConfig(StageConfig):
    """The starting model: a Hugging Face checkpoint (``from_pretrained``: a local directory
    copied in, or a hub model id fetched), or a tokenizer trained in-process plus a randomly
    initialised Llama (``tokenizer`` + ``model``).

        stage: base_model
        tokenizer: {corpus: [data/quickstart/sft.jsonl], vocab_size: 1024}
        model: {size: tiny}
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"from_pretrained": ("hf",), "tokenizer.corpus": ()}
    HUB_INPUTS: ClassVar[tuple[str, ...]] = ("from_pretrained",)

    stage: Literal["base_model"] = "base_model"
    output_dir: Path = Path("runs/base_model")
    from_pretrained: Path | None = Field(None, description="A local Hugging Face checkpoint directory "
                                         "(model and tokenizer) copied in, or a hub model id (`org/name`, "
                                         "e.g. `Qwen/Qwen2.5-0.5B`) fetched and saved; instead of `tokenizer`.")
    tokenizer: TokenizerSpec | None = None
    model: ModelSpec = ModelSpec()

    @model_validator(mode="after")
    def _one_source(self) -> "BaseModelConfig":
        if (self.from_pretrained is None) == (self.tokenizer is None):
            raise ValueError("give either from_pretrained (a checkpoint: a local directory or a hub model id) "
                             "or tokenizer (to build one)")
        return self
