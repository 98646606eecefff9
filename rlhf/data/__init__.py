"""The data layer: canonical records, format adapters, validation, chat rendering, mixing.

``import rlhf.data`` stays light: torch, transformers and datasets are imported inside the
functions that need them.
"""

from rlhf.data.chat import Rendered, render, render_prompt
from rlhf.data.config import DataConfig, MixturePart, SourceConfig
from rlhf.data.formats import parse_transcript
from rlhf.data.load import Loaded, LoadedData, load_data, load_source, read_records
from rlhf.data.mixing import mix
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
    read_jsonl_rows,
    to_dict,
    write_jsonl,
    write_jsonl_rows,
)
from rlhf.data.validate import run_validate, summarize

__all__ = [
    "RATINGS", "DataConfig", "DataError", "Loaded", "LoadedData", "Message", "MixturePart",
    "PreferencePair", "Problem", "Prompt", "Rendered", "SFTExample", "SourceConfig",
    "canonical_rating", "load_data", "load_source", "mix", "parse_transcript", "read_records",
    "read_jsonl_rows", "render", "render_prompt", "run_validate", "safety_category", "summarize",
    "to_dict", "write_jsonl", "write_jsonl_rows",
]
