"""Checkers of instruction following, for Ghost Attention's evaluation (and its optional filter
of sampled answers).

A checker is a pure function ``check(answer, value) -> bool``: does ``answer`` follow the
instruction drawn with ``value`` (the word or name filled into the instruction's text; ignored by
checkers that take none)? A recipe names a checker of ``CHECKERS`` by its key, or any function
as ``module:function``. Pure Python, no torch.
"""

from __future__ import annotations

import re
from importlib import import_module
from typing import Callable

from rlhf.config import RecipeError

Checker = Callable[[str, str], bool]

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def words(text: str) -> list[str]:
    """Words of ``text``, lower-cased, punctuation left out: "Hi, it's me!" -> [hi, it's, me]."""
    return [w.lower() for w in _WORD.findall(text)]


def upper_case(answer: str, value: str = "") -> bool:
    """Every letter is a capital (and there is at least one letter)."""
    return any(c.isalpha() for c in answer) and answer == answer.upper()


def lower_case(answer: str, value: str = "") -> bool:
    """No capital letter (and at least one letter)."""
    return any(c.isalpha() for c in answer) and answer == answer.lower()


def ends_with(answer: str, value: str) -> bool:
    """The last word is ``value`` (case and trailing punctuation ignored)."""
    found, wanted = words(answer), words(value)
    return bool(wanted) and found[-len(wanted):] == wanted


def starts_with(answer: str, value: str) -> bool:
    """The first word is ``value`` (case and punctuation ignored)."""
    found, wanted = words(answer), words(value)
    return bool(wanted) and found[: len(wanted)] == wanted


def mentions(answer: str, value: str) -> bool:
    """``value`` appears as a word (or a run of words) somewhere in the answer."""
    found, wanted = words(answer), words(value)
    n = len(wanted)
    return bool(wanted) and any(found[i : i + n] == wanted for i in range(len(found) - n + 1))


CHECKERS: dict[str, Checker] = {
    "upper_case": upper_case,
    "lower_case": lower_case,
    "ends_with": ends_with,
    "starts_with": starts_with,
    "mentions": mentions,
}


# How a demonstration obeys an instruction: its answer rewritten (``obey(answer, value)``), so
# that the checker of the same name accepts it.
OBEY: dict[str, Callable[[str, str], str]] = {
    "upper_case": lambda answer, value: answer.upper(),
    "lower_case": lambda answer, value: answer.lower(),
    "ends_with": lambda answer, value: f"{answer.rstrip()} {value}",
    "starts_with": lambda answer, value: f"{value} {answer.lstrip()}",
    "mentions": lambda answer, value: f"{answer.rstrip()} {value}",
}


def is_checker_name(name: str) -> bool:
    """A key of ``CHECKERS`` or a ``module:function`` reference (not imported here)."""
    return name in CHECKERS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name) is not None


def get_checker(name: str) -> Checker:
    """The checker a recipe names: a key of ``CHECKERS`` or ``module:function``."""
    if name in CHECKERS:
        return CHECKERS[name]
    module, _, attr = name.partition(":")
    try:
        return getattr(import_module(module), attr)
    except Exception as exc:  # a user's module may raise anything while it is imported
        raise RecipeError(f"checker {name!r}: cannot load: {type(exc).__name__}: {exc}") from None
