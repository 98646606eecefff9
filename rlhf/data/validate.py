"""``rlhf data validate``: a data file's counts, or every problem in it."""

from __future__ import annotations

from collections import Counter

from rlhf.config import RecipeError
from rlhf.config import validate as validate_model
from rlhf.data.config import SourceConfig
from rlhf.data.formats import is_hub_id
from rlhf.data.load import load_source
from rlhf.data.records import DataError, PreferencePair, Record, safety_category, user_turns



def summarize(kind: str, records: list[Record]) -> str:
    """Readable counts: rows, user turns, and by rating / safety label / source."""
    turns = Counter(user_turns(r.prompt if isinstance(r, PreferencePair) else r.messages)
                    for r in records)
    lines = [f"rows: {len(records)}",
             "user turns per row: " + _counts({f"{k}": v for k, v in sorted(turns.items())})]
    if kind == "preference":
        lines.append("rating: " + _counts(Counter(r.rating or "unrated" for r in records)))
        lines.append("safety labels: " + _counts(
            Counter(safety_category(r) or "unlabelled" for r in records)))
    if kind == "prompts":
        lines.append("is_safety: " + _counts(Counter(str(r.is_safety).lower() for r in records)))
    lines.append("source: " + _counts(Counter(r.source for r in records)))
    return "\n".join(lines)


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counter.items()) or "-"


def run_validate(path: str, kind: str, format: str = "auto",
                 columns: dict[str, str] | None = None, ratings: dict | None = None,
                 is_safety: bool | None = None) -> int:
    """``rlhf data validate``: print the counts and return 0, or print every problem
    (``FILE:LINE: field: message``) and return 1 (2 for bad options). ``columns``, ``ratings`` and ``is_safety``
    mean what they mean in a source config (``SourceConfig``)."""
    where = {"hub": path} if is_hub_id(path) else {"path": path, "format": format}
    options = {**where, "columns": columns or {}, "ratings": ratings, "is_safety": is_safety}
    try:
        src = validate_model(SourceConfig, options, "rlhf data validate")
    except RecipeError as exc:
        print(exc)
        return 2
    try:
        loaded = load_source(src, kind)
    except DataError as exc:
        print(exc)
        return 1
    if loaded.problems:
        print("\n".join(str(p) for p in loaded.problems))
        print(f"{len(loaded.problems)} problem(s) in {loaded.bad_rows} of {loaded.rows} rows")
        return 1
    if not loaded.rows:
        print(f"{path}: no rows (the file is empty)")
        return 1
    print(f"{path}: {kind}, no problems")
    print(summarize(kind, loaded.records))
    return 0
