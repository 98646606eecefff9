"""The data layer: canonical records, format adapters, validation, chat rendering, mixing.

``import rlhf.data`` stays light: torch, transformers and datasets are imported inside the
functions that need them.
"""

from rlhf.data.chat import Rendered, render, render_prompt
from rlhf.data.config import DataConfig, MixturePart, SourceConfig
from rlhf.data.records import (
    RATINGS,
    DataError,
    Message,
    PreferencePair,
    Problem,
    Prompt,
    SFTExample,
    canonical_rating,
    safety_category,
    to_dict,
    write_jsonl,
)

__all__ = [
    "RATINGS", "DataConfig", "DataError", "Message", "MixturePart", "PreferencePair", "Problem",
    "Prompt", "Rendered", "SFTExample", "SourceConfig", "canonical_rating", "render",
    "render_prompt", "safety_category", "to_dict", "write_jsonl",
]
