"""Canonical records: the shapes every stage reads, whatever format the data came in.

A conversation is a list of ``Message``; an ``SFTExample`` is a conversation ending with an
assistant turn; a ``PreferencePair`` is a prompt conversation with a chosen and a rejected
response; a ``Prompt`` is a conversation ending with a user turn, for sampling and PPO.

The canonical JSONL (one record per line, written by ``write_jsonl``, read back by
``rlhf.data.read_records``) spells conversations as lists of ``{"role", "content"}`` objects:

    sft:        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    preference: {"prompt": [...], "chosen": str, "rejected": str, "rating": "better", ...}
    prompts:    {"prompt": [...], "is_safety": false, "meta": {...}}

This module is pure Python (no torch, no datasets).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Union

ROLES = ("system", "user", "assistant")

# Strength of a preference, strongest first (Llama 2, Sec. 3.2.1).
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# Other spellings of the canonical labels; "unsure" counts as negligibly better.
RATING_ALIASES = {"unsure": "negligibly_better"}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class SFTExample:
    """A conversation to imitate; the loss falls on its assistant turns."""

    messages: list[Message]
    source: str = ""
    id: str | None = None
    finished: bool = True  # False: the last answer was cut at the token limit; trained without an EOS


@dataclass
class PreferencePair:
    """Two responses to the same prompt conversation; ``chosen`` is the preferred one.

    ``rating`` is one of ``RATINGS`` or None; ``margin`` an explicit numeric margin or None;
    ``chosen_safe`` / ``rejected_safe`` the safety labels of safety pairs (None when unlabelled).
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    rating: str | None = None
    margin: float | None = None
    chosen_safe: bool | None = None
    rejected_safe: bool | None = None
    source: str = ""
    batch: str | None = None
    id: str | None = None


@dataclass
class Prompt:
    """A conversation awaiting the assistant's answer. ``is_safety`` tags prompts that may be
    unsafe (the PPO safety gate reads it); ``meta`` carries anything else (e.g. a task and its
    expected answer, for a gold judge)."""

    messages: list[Message]
    is_safety: bool = False
    source: str = ""
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Record = Union[SFTExample, PreferencePair, Prompt]
RECORD_TYPES: dict[str, type] = {"sft": SFTExample, "preference": PreferencePair, "prompts": Prompt}


def canonical_rating(label: str) -> str | None:
    """``"Significantly better"`` -> ``"significantly_better"``; None if not a known label."""
    key = label.strip().lower().replace(" ", "_").replace("-", "_")
    key = RATING_ALIASES.get(key, key)
    return key if key in RATINGS else None


def safety_category(pair: PreferencePair) -> str | None:
    """The safety-label category of a pair (Llama 2, Sec. 3.2.1): ``"safe_vs_unsafe"``
    (chosen safe, rejected unsafe), ``"both_safe"``, ``"both_unsafe"``, ``"unsafe_vs_safe"``
    (excluded by the method), or None when unlabelled."""
    if pair.chosen_safe is None or pair.rejected_safe is None:
        return None
    if pair.chosen_safe != pair.rejected_safe:
        return "safe_vs_unsafe" if pair.chosen_safe else "unsafe_vs_safe"
    return "both_safe" if pair.chosen_safe else "both_unsafe"


def user_turns(messages: list[Message]) -> int:
    return sum(m.role == "user" for m in messages)


# ---------------------------------------------------------------------------------------------
# Problems found in data


@dataclass(frozen=True)
class Problem:
    """One problem in a data file. ``line`` is the physical line (JSONL), the row number with
    the header as line 1 (CSV), or the 1-based record index (``unit="record"``: JSON arrays,
    Parquet, datasets dirs, hooks); None for a problem with the whole file."""

    file: str
    line: int | None
    field: str
    message: str
    unit: Literal["line", "record"] = "line"

    def __str__(self) -> str:
        if self.line is None:
            where = self.file
        elif self.unit == "record":
            where = f"{self.file}:record {self.line}"
        else:
            where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class DataError(Exception):
    """Bad data; ``str()`` is one ``FILE:LINE: field: message`` line per problem, then the
    ``hint`` (the way out) when there is one."""

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems, self.hint = list(problems), hint
        super().__init__("\n".join([*(str(p) for p in self.problems), *([hint] if hint else [])]))


# ---------------------------------------------------------------------------------------------
# Canonical JSON


def messages_to_json(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def to_dict(record: Record) -> dict[str, Any]:
    """The canonical JSON object of a record (keys whose value is None are left out)."""
    if isinstance(record, SFTExample):
        data = {"messages": messages_to_json(record.messages), "source": record.source,
                "id": record.id}
    elif isinstance(record, PreferencePair):
        data = {"prompt": messages_to_json(record.prompt), "chosen": record.chosen,
                "rejected": record.rejected, "rating": record.rating, "margin": record.margin,
                "chosen_safe": record.chosen_safe, "rejected_safe": record.rejected_safe,
                "source": record.source, "batch": record.batch, "id": record.id}
    elif isinstance(record, Prompt):
        data = {"prompt": messages_to_json(record.messages), "is_safety": record.is_safety,
                "source": record.source, "id": record.id, "meta": record.meta or None}
    else:
        raise TypeError(f"not a data record: {type(record).__name__}")
    return {k: v for k, v in data.items() if v is not None}


def write_jsonl(path: str | Path, records: Iterable[Record], overwrite: bool = False) -> int:
    """Write records as canonical JSONL (gzip when the name ends in ``.gz``), atomically;
    returns the number written. An existing file is replaced only with ``overwrite=True``
    (for files the toolkit itself wrote in a run directory)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; records are never written over existing data")
    return write_jsonl_rows(path, (to_dict(record) for record in records))


def write_jsonl_rows(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object per line (gzip when the name ends in ``.gz``), atomically: the file is
    complete or absent, which resuming relies on. Returns the number of rows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with (gzip.open if path.suffix == ".gz" else open)(tmp, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file the toolkit wrote; a broken line is a ``DataError`` naming it."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise DataError([Problem(str(path), n, "json", str(exc))]) from None
    return rows
