"""``rlhf data validate``: a data file's counts, or every problem in it."""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from rlhf.config import RecipeError
from rlhf.config import validate as validate_model
from rlhf.data.config import SourceConfig
from rlhf.data.formats import is_hub_id
from rlhf.data.load import load_source
from rlhf.data.records import DataError, PreferencePair, Problem, Record, safety_category, user_turns

SHOWN_PER_KIND = 3  # problems printed of each kind; the rest are counted
# What varies between problems of one kind: list indices, quoted values, numbers, the detail in
# parentheses (a row's columns, the known labels).
_INDEX = re.compile(r"\[\d+\]")
_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|-?\d+(?:\.\d+)?(?:e-?\d+)?|\s*\(.*\)$")


def problem_kind(problem: Problem) -> tuple[str, str, str]:
    """Problems of one kind share a file, a field (list indices aside) and a message (values
    aside): ``prompt[0].role: expected user, got 'x'`` and ``prompt[2].role: ... got 'y'``."""
    return problem.file, _INDEX.sub("[]", problem.field), _VALUES.sub("_", problem.message)


def problem_lines(problems: Sequence[Problem], per_kind: int = SHOWN_PER_KIND) -> list[str]:
    """The lines that report ``problems``: in file order the first ``per_kind`` of each kind
    (``FILE:LINE: field: message``), then for each kind with more a count, such as
    ``... and 2297 more like "prompt: missing" (data.jsonl:4 to 2300)``."""
    seen: Counter = Counter()
    lines, rest = [], {}
    for p in problems:
        kind = problem_kind(p)
        seen[kind] += 1
        if seen[kind] <= per_kind:
            lines.append(str(p))
        else:
            rest.setdefault(kind, []).append(p)
    for more in rest.values():
        first, last = more[0], more[-1]
        what = f"{first.field}: {first.message}"
        span = "" if last.line is None or last.line == first.line else f" to {last.line}"
        lines.append(f"... and {len(more)} more like \"{what}\" ({str(first).removesuffix(': ' + what)}{span})")
    return lines


def error_text(exc: BaseException) -> str:
    """What to print for a user error: a DataError's problems capped by kind (``problem_lines``)
    and its hint; any other error's message."""
    if not isinstance(exc, DataError):
        return str(exc)
    return "\n".join([*problem_lines(exc.problems), *([exc.hint] if exc.hint else [])])


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
    """``rlhf data validate``: print the counts and return 0, or print the problems
    (``FILE:LINE: field: message``, a few of each kind and a count of the rest: ``problem_lines``)
    and return 1 (2 for bad options). ``columns``, ``ratings`` and ``is_safety``
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
        print(error_text(exc))
        return 1
    if loaded.problems:
        print("\n".join(problem_lines(loaded.problems)))
        print(f"{len(loaded.problems)} problem(s) in {loaded.bad_rows} of {loaded.rows} rows")
        return 1
    if not loaded.rows:
        print(f"{path}: no rows (the file is empty)")
        return 1
    print(f"{path}: {kind}, no problems")
    print(summarize(kind, loaded.records))
    return 0
