"""Checking rows and turning them into canonical records, in one cheap pass (no tokenizing).

``parse_row(kind, row, src, file, number, unit)`` returns the record or the row's problems.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf.data.config import SourceConfig
from rlhf.data.formats import is_transcript, parse_transcript
from rlhf.data.records import (
    RATING_ALIASES, RATINGS, ROLES, Message, PreferencePair, Problem, Prompt, Record,
    SFTExample, canonical_rating, safety_category,
)

_ASSISTANT = "\n\nAssistant:"
_TRUE = {"true", "yes", "1", "safe"}
_FALSE = {"false", "no", "0", "unsafe"}


class _Row:
    """One raw row read through a source's column mapping, collecting its problems."""

    def __init__(self, row: dict[str, Any], src: SourceConfig, file: str, number: int, unit: str):
        self.row, self.src, self.file, self.number, self.unit = row, src, file, number, unit
        self.problems: list[Problem] = []

    def column(self, field: str) -> str:
        return self.src.columns.get(field, field)

    def get(self, field: str) -> Any:
        return lookup(self.row, self.column(field))  # an empty cell is None (Arrow nulls, CSV "")

    def problem(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.number, field, message, self.unit))

    def missing(self, field: str) -> None:
        name = self.column(field)
        if name in self.row:
            self.problem(name, "missing")
        else:
            columns = ", ".join(map(str, self.row)) or "none"
            self.problem(name, f"missing (the row has {columns}; rename with `columns:`)")

    def wrong_type(self, field: str, expected: str, value: Any) -> None:
        self.problem(field, f"expected {expected}, got {type(value).__name__} {_short(value)}")

    def text(self, field: str) -> str | None:
        value = self.get(field)
        if value is None:
            self.missing(field)
            return None
        if not isinstance(value, str):
            self.wrong_type(self.column(field), "a string", value)
            return None
        if not value.strip():
            self.problem(self.column(field), "empty")
            return None
        return value if self.encodable(self.column(field), value) else None

    def encodable(self, field: str, text: str) -> bool:
        """Text a tokenizer can take: JSON can spell a lone surrogate ("\\ud800"), UTF-8 cannot."""
        try:
            text.encode("utf-8")
            return True
        except UnicodeEncodeError as exc:
            self.problem(field, f"not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                         f"{exc.start + 1}")
            return False

    def label(self, field: str) -> str | None:
        """An optional id-like value: a string or an integer, as a string."""
        value = self.get(field)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        self.wrong_type(self.column(field), "a string", value)
        return None

    def flag(self, field: str, default: bool | None = None) -> bool | None:
        value = self.get(field)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        self.wrong_type(self.column(field), "true or false", value)
        return None

    def conversation(self, field: str, last_role: str) -> list[Message] | None:
        """A string (one user turn) or a list of {role, content} ending with ``last_role``."""
        value, name = self.get(field), self.column(field)
        if isinstance(value, str) and last_role == "user":
            return [Message("user", value)] if self.text(field) is not None else None
        if value is None:
            self.missing(field)
            return None
        if not isinstance(value, list):
            expected = "a list of messages" + (" or a string" if last_role == "user" else "")
            self.wrong_type(name, expected, value)
            return None
        messages = [self.message(f"{name}[{i}]", m) for i, m in enumerate(value)]
        if None in messages:
            return None
        return messages if self.turn_order(name, messages, last_role) else None

    def message(self, name: str, value: Any) -> Message | None:
        if not isinstance(value, dict):
            self.wrong_type(name, "an object with role and content", value)
            return None
        role, content = value.get("role"), value.get("content")
        if role not in ROLES:
            self.problem(f"{name}.role", f"expected one of {', '.join(ROLES)}, got {_short(role)}")
        elif not isinstance(content, str):
            self.wrong_type(f"{name}.content", "a string", content)
        elif not content.strip():
            self.problem(f"{name}.content", "empty")
        elif self.encodable(f"{name}.content", content):
            return Message(role, content)
        return None

    def turn_order(self, name: str, messages: list[Message], last_role: str) -> bool:
        body = messages[1:] if messages and messages[0].role == "system" else messages
        for i, m in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                index = i + len(messages) - len(body)
                self.problem(f"{name}[{index}].role", f"expected {expected} (roles go: optional "
                             f"system, then user and assistant alternating), got {m.role!r}")
                return False
        if not body or body[-1].role != last_role:
            self.problem(name, f"must end with {_article(last_role)} {last_role} turn")
            return False
        return True


def lookup(row: dict[str, Any], column: str) -> Any:
    """``row[column]``; for a column the row lacks, ``a.b`` reads key b of object a and ``a.0``
    item 0 of list a (``metadata.score_chosen``, ``response.1``). None when absent."""
    if column in row:
        return row[column]
    value: Any = row
    for key in column.split("."):
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# One parser per kind


def parse_row(kind: str, row: dict[str, Any], src: SourceConfig, file: str, number: int,
              unit: str = "line") -> tuple[Record | None, list[Problem]]:
    """The canonical record of a raw row, or None and the row's problems."""
    r = _Row(row, src, file, number, unit)
    record = {"sft": _sft, "preference": _preference, "prompts": _prompt}[kind](r)
    return (None if r.problems else record), r.problems


def _hh(r: _Row) -> bool:
    """An HH-RLHF row: the source says so, or it has no prompt/messages and ``chosen`` holds
    ``\n\nAssistant:`` turns."""
    return r.src.format == "hh-rlhf" or (r.get("prompt") is None and r.get("messages") is None
                                         and is_transcript(r.get("chosen")))


def _dialogue(r: _Row, field: str) -> list[Message] | None:
    """The whole HH-RLHF transcript in ``field`` as a conversation ending with an assistant turn."""
    text = r.text(field)
    if text is None:
        return None
    try:
        messages = parse_transcript(text)
    except ValueError as exc:
        r.problem(r.column(field), str(exc))
        return None
    empty = [i for i, m in enumerate(messages) if not m.content.strip()]
    if empty:
        r.problem(r.column(field), f"turn {empty[0] + 1} ({messages[empty[0]].role}) is empty")
        return None
    return messages if r.turn_order(r.column(field), messages, "assistant") else None


def _sft(r: _Row) -> SFTExample | None:
    if _hh(r):
        messages = _dialogue(r, "chosen")  # the preferred dialogue is the one to imitate
    elif r.get("messages") is None and r.get("prompt") is not None:
        prompt = r.conversation("prompt", "user")
        # TRL's prompt/completion format names the response `completion`
        response = _answer(r, "completion" if r.get("response") is None and r.get("completion") is not None
                           else "response")
        messages = prompt + [Message("assistant", response)] if prompt and response else None
    else:
        messages = r.conversation("messages", "assistant")
    return SFTExample(messages, r.label("source") or r.src.name, r.label("id"))


def _preference(r: _Row) -> PreferencePair | None:
    if _hh(r):
        prompt, chosen, rejected = _split_transcripts(r)
    elif r.get("prompt") is None and isinstance(r.get("chosen"), list):
        prompt, chosen, rejected = _split_conversations(r)
    else:
        prompt = r.conversation("prompt", "user")
        chosen, rejected = _answer(r, "chosen"), _answer(r, "rejected")
    if chosen and rejected and chosen.strip() == rejected.strip():
        r.problem(r.column("rejected"), "identical to chosen")
    pair = PreferencePair(
        prompt, chosen, rejected, _rating(r), _margin(r), r.flag("chosen_safe", r.src.chosen_safe),
        r.flag("rejected_safe", r.src.rejected_safe), r.label("source") or r.src.name,
        r.label("batch") or r.src.batch, r.label("id"),
    )
    if safety_category(pair) == "unsafe_vs_safe":
        r.problem(r.column("chosen_safe"), "chosen response is unsafe while the rejected one is "
                  "safe (the method excludes such pairs)")
    return pair


def _answer(r: _Row, field: str) -> str | None:
    """A response: a string, or (TRL's conversational format) a list of one assistant message."""
    value, name = r.get(field), r.column(field)
    if not isinstance(value, list):
        return r.text(field)
    if len(value) != 1:
        r.problem(name, f"expected a string or one assistant message, got {len(value)} messages")
        return None
    message = r.message(f"{name}[0]", value[0])
    if message is not None and message.role != "assistant":
        r.problem(f"{name}[0].role", f"expected assistant, got {message.role!r}")
        return None
    return message.content if message else None


def _split_conversations(r: _Row) -> tuple[list[Message] | None, str | None, str | None]:
    """TRL's implicit-prompt conversational pairs: ``chosen`` and ``rejected`` each hold the whole
    conversation; the prompt is what comes before their final assistant turns, which both sides
    must share."""
    chosen, rejected = r.conversation("chosen", "assistant"), r.conversation("rejected", "assistant")
    if chosen is None or rejected is None:
        return None, None, None
    if chosen[:-1] != rejected[:-1]:
        r.problem("prompt", "chosen and rejected conversations differ before their final assistant "
                  "turn; the prompt must be shared")
        return None, chosen[-1].content, rejected[-1].content
    return chosen[:-1], chosen[-1].content, rejected[-1].content


def _split_transcripts(r: _Row) -> tuple[list[Message] | None, str | None, str | None]:
    """HH-RLHF: the prompt is the text before the last ``"\\n\\nAssistant:"``, which both sides
    must share; the responses are the texts after it."""
    sides = {}
    for field in ("chosen", "rejected"):
        text = r.text(field)
        if text is None:
            continue
        cut = text.rfind(_ASSISTANT)
        if cut < 0:
            r.problem(r.column(field), "no '\\n\\nAssistant:' turn in the transcript")
        elif not text[cut + len(_ASSISTANT):].strip():
            r.problem(r.column(field), "final assistant turn is empty")
        else:
            sides[field] = (text[:cut], text[cut + len(_ASSISTANT):].strip())
    if len(sides) < 2:
        return None, None, None
    (prompt_text, chosen), (other_prompt, rejected) = sides["chosen"], sides["rejected"]
    if prompt_text != other_prompt:
        at = next((i for i, (a, b) in enumerate(zip(prompt_text, other_prompt)) if a != b),
                  min(len(prompt_text), len(other_prompt)))
        r.problem("prompt", "chosen and rejected transcripts differ before their final "
                  f"'\\n\\nAssistant:' turn (from character {at + 1}); the prompt must be shared")
        return None, chosen, rejected
    try:
        prompt = parse_transcript(prompt_text)
    except ValueError as exc:
        r.problem(r.column("chosen"), str(exc))
        return None, chosen, rejected
    return (prompt if r.turn_order("prompt", prompt, "user") else None), chosen, rejected


def _score(r: _Row, column: str) -> float | None:
    """The number in ``column`` (``a.b`` as in ``lookup``), or None and a problem."""
    value = lookup(r.row, column)
    if value is None:
        r.problem(column, "missing")
        return None
    return _number(r, column, value)


def _rating_from_scores(r: _Row) -> str | None:
    rule = r.src.rating_from_scores
    chosen, rejected = _score(r, rule.chosen), _score(r, rule.rejected)
    if chosen is None or rejected is None:
        return None
    rating = rule.rating(chosen - rejected)
    if rating is None:
        r.problem("rating", f"score gap {chosen - rejected:g} ({rule.chosen} {chosen:g} - {rule.rejected} "
                  f"{rejected:g}) is below every gap of rating_from_scores: no preference")
    return rating


def _rating(r: _Row) -> str | None:
    if r.src.rating_from_scores is not None:
        return _rating_from_scores(r)
    value = r.get("rating")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric column with gaps holds 1 as 1.0
    table = r.src.rating_table()
    rating = table.get(str(value).strip()) or (canonical_rating(value) if isinstance(value, str) else None)
    if rating is None:
        known = ", ".join([*table, *RATINGS, *RATING_ALIASES])
        r.problem(r.column("rating"), f"unknown rating label {_short(value)} (known: {known}; "
                  "map other labels with `ratings:` in the source config)")
    return rating


def _margin(r: _Row) -> float | None:
    value = r.get("margin")
    return None if value is None else _number(r, r.column("margin"), value)


def _number(r: _Row, column: str, value: Any) -> float | None:
    """``value`` as a finite float (a CSV cell's text too), or None and a problem."""
    if isinstance(value, str):  # a CSV cell
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        r.wrong_type(column, "a finite number", value)
        return None
    return float(value)


def _prompt(r: _Row) -> Prompt | None:
    if _hh(r):  # the dialogue before the chosen side's final answer
        dialogue = _dialogue(r, "chosen")
        messages = dialogue[:-1] if dialogue else None
    else:
        messages = r.conversation("prompt", "user")
    is_safety = r.flag("is_safety", r.src.is_safety)
    if is_safety is None and r.get("is_safety") is None:
        r.problem(r.column("is_safety"), "missing (or set is_safety in the source config)")
    meta = r.get("meta")
    if meta is not None and not isinstance(meta, dict):
        r.wrong_type(r.column("meta"), "an object", meta)
        meta = None
    return Prompt(messages, bool(is_safety), r.label("source") or r.src.name, r.label("id"),
                  dict(meta or {}))
