"""Reading raw rows from files: ``read_rows(path, format)`` yields ``(number, row)`` pairs, where
``row`` is a dict, or a ``Problem`` for a row that cannot be read at all.

JSON and JSONL are read line by line here, so that a bad line is reported with its line number
(and the rest of the file still checked) instead of failing the whole file inside a columnar
reader. CSV, Parquet and ``datasets`` directories go through the ``datasets`` library (imported
on use), whose columns carry one type each. Also here: splitting HH-RLHF transcripts.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rlhf.data.records import DataError, Message, Problem

Row = tuple[int, "dict[str, Any] | Problem"]

# Unit of the numbers each format reports (see Problem).
UNITS = {"jsonl": "line", "hh-rlhf": "line", "csv": "line", "json": "record",
         "parquet": "record", "datasets": "record", "hook": "record", "hub": "record"}


def detect_format(path: Path) -> str:
    """The format of ``path`` judged by its name (and the first byte of a ``.json`` file)."""
    if not path.exists():
        raise DataError([_missing(path)])
    if path.is_dir():
        return "datasets"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "jsonl" if _first_char(path) == "{" else "json"
    for ext in ("csv", "parquet"):
        if name.endswith(f".{ext}"):
            return ext
    raise DataError([Problem(str(path), None, "format", "cannot tell the format from the file "
                             "name; set format: jsonl, json, csv, parquet or datasets")])


def read_rows(path: Path, format: str, split: str = "train") -> Iterator[Row]:
    """Rows of a file in ``format`` (not ``auto``); ``split`` picks the split of a ``datasets``
    dir that holds several. Raises DataError if the file cannot be read at all."""
    if not path.exists():
        raise DataError([_missing(path)])
    if format == "datasets":
        return _datasets_dir_rows(path, split)
    if path.is_dir():
        raise DataError([Problem(str(path), None, "path", f"is a directory; format {format} reads a file "
                                 "(a `datasets` save_to_disk directory is format: datasets)")])
    readers = {"jsonl": _jsonl_rows, "hh-rlhf": _jsonl_rows, "json": _json_rows,
               "csv": _csv_rows, "parquet": _parquet_rows}
    return readers[format](path)


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is no local file nor names one: what a Hugging Face hub id looks like."""
    return (not Path(text).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
            and re.search(r"\.(jsonl|json|csv|parquet|gz)$", text, re.IGNORECASE) is None)


def _missing(path: Path) -> Problem:
    hint = f" (for the hub dataset {str(path)!r}, give `hub: {path}` instead of `path:`)" if is_hub_id(str(path)) else ""
    return Problem(str(path), None, "path", f"no such file or directory{hint}")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


@contextmanager
def _reading(path: Path):
    """A file that breaks off or is not what its name says: a DataError naming it."""
    try:
        yield
    except EOFError:
        raise DataError([Problem(str(path), None, "gzip", "truncated: the compressed data ends early "
                                 "(an interrupted download or copy?)")]) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError([Problem(str(path), None, "gzip", f"not a valid gzip file ({exc})")]) from None
    except OSError as exc:
        raise DataError([Problem(str(path), None, "path", f"cannot read: {exc.strerror or exc}")]) from None


def _first_char(path: Path) -> str:
    with _reading(path), _open_bytes(path) as f:
        return f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")[:1]


def _decode(raw: bytes, file: str, line: int) -> str | Problem:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(file, line, "encoding", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                               f"at column {exc.start + 1})")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with _reading(path), _open_bytes(path) as f:
        for number, raw in enumerate(f, start=1):
            text = _decode(raw, str(path), number)
            if isinstance(text, Problem):
                yield number, text
            elif text.strip():
                text = text.removeprefix("\ufeff") if number == 1 else text  # a UTF-8 byte order mark
                yield number, _parse_object(text, str(path), number)


def _parse_object(text: str, file: str, line: int) -> dict | Problem:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(file, line, "json", f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Problem(file, line, "json", "invalid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return Problem(file, line, "json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_rows(path: Path) -> Iterator[Row]:
    with _reading(path), _open_bytes(path) as f:
        raw = f.read()
    bad = [p for n, line in enumerate(raw.split(b"\n"), 1)
           if isinstance(p := _decode(line, str(path), n), Problem)]
    if bad:
        raise DataError(bad)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError([Problem(str(path), exc.lineno, "json", f"invalid JSON: {exc.msg} "
                                 f"at column {exc.colno}")]) from None
    except RecursionError:
        raise DataError([Problem(str(path), None, "json", "invalid JSON: nested too deeply")]) from None
    if not isinstance(data, list):
        raise DataError([Problem(str(path), None, "json", "expected a JSON array of objects "
                                 f"(or one object per line), got {type(data).__name__}")])
    for number, obj in enumerate(data, start=1):
        yield number, obj if isinstance(obj, dict) else Problem(
            str(path), number, "json", f"expected an object, got {type(obj).__name__}", "record")


@contextmanager
def _quiet_datasets():
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_with_datasets(builder: str, path: Path, **options: Any):
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as exc:  # the libraries raise many types for a malformed file
            raise DataError([Problem(str(path), None, builder, f"cannot read: {_root(exc)}")]) from None


def _root(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}".strip()


def _csv_rows(path: Path) -> Iterator[Row]:
    """Every cell is read as text (an answer "5" stays a string; labels and numbers are
    converted by the row checks); only empty cells are missing."""
    import datasets

    with _reading(path), _open_bytes(path) as f:
        lines = list(f)
    bad = [p for n, raw in enumerate(lines, 1) if isinstance(p := _decode(raw, str(path), n), Problem)]
    if bad:
        raise DataError(bad)
    header = next(csv.reader([lines[0].decode("utf-8-sig")])) if lines else []
    features = datasets.Features({name: datasets.Value("string") for name in header})
    ds = _load_with_datasets("csv", path, features=features, keep_default_na=False, na_values=[""])
    # Row numbers count the header as line 1 (lines differ only where a quoted cell spans lines).
    return ((i + 2, row) for i, row in enumerate(ds))


def _parquet_rows(path: Path) -> Iterator[Row]:
    return enumerate(_load_with_datasets("parquet", path), start=1)


def _datasets_dir_rows(path: Path, split: str) -> Iterator[Row]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError([Problem(str(path), None, "datasets", f"cannot read: {_root(exc)}")]) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError([Problem(str(path), None, "split", f"no split {split!r} "
                                     f"(splits: {', '.join(ds)})")])
        ds = ds[split]
    return enumerate(ds, start=1)


def hub_rows(name: str, subset: str | None, split: str, revision: str | None) -> Iterator[Row]:
    """Rows of a Hugging Face hub dataset (or a local directory in hub layout), through
    ``datasets.load_dataset``; a DataError naming it when it cannot be had."""
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, subset, split=split, revision=revision)
        except Exception as exc:  # offline, unknown id, unknown split or subset, bad files
            hint = "" if Path(name).is_dir() else ("; a hub dataset id that could not be reached or read: "
                                                  "offline, point at a local copy instead (`path:` to its "
                                                  "files or to a `datasets` save_to_disk directory)")
            first = next(iter(str(exc).splitlines()), "")
            raise DataError([Problem(name, None, "hub", f"cannot load ({type(exc).__name__}: {first}){hint}")]) from None
    return enumerate(ds, start=1)


# ---------------------------------------------------------------------------------------------
# HH-RLHF transcripts

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def is_transcript(text: Any) -> bool:
    return isinstance(text, str) and "\n\nAssistant:" in text


def parse_transcript(text: str) -> list[Message]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> [user "hi", assistant "hello"]. Consecutive
    turns of one speaker (a few HH-RLHF transcripts have them) are joined with a blank line.
    Raises ValueError on text before the first turn."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    messages: list[Message] = []
    for role, body in zip(parts[1::2], parts[2::2]):
        if messages and messages[-1].role == _ROLE[role]:
            joined = "\n\n".join(t for t in (messages[-1].content, body.strip()) if t)
            messages[-1] = Message(_ROLE[role], joined)
        else:
            messages.append(Message(_ROLE[role], body.strip()))
    return messages
