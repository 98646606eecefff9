"""Loading sources into canonical records: ``load_source`` (one source, every problem collected),
``load_data`` (a stage's ``DataConfig``: all sources, the fail/skip policy, the mixture) and
``read_records`` (a canonical file the toolkit wrote, any problem fatal).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf.data.config import DataConfig, SourceConfig
from rlhf.data.formats import UNITS, Row, detect_format, hub_rows, read_rows
from rlhf.data.mixing import mix
from rlhf.data.records import RECORD_TYPES, DataError, Problem, Record, to_dict
from rlhf.data.parse import parse_row


@dataclass
class Loaded:
    """What one source gave: its good records, how many rows were read, the problems found."""

    records: list[Record]
    rows: int
    problems: list[Problem]
    bad_rows: int


@dataclass
class LoadedData:
    """A stage's data: the mixed records and, per source and per mixture part, the counts the
    manifest records (``counts()``)."""

    records: list[Record]
    sources: dict[str, dict[str, int]]  # name -> {"rows", "skipped", "used"}
    parts: dict[str, int] = field(default_factory=dict)  # part name -> rows taken

    def counts(self) -> dict[str, Any]:
        return {"rows": len(self.records), "sources": self.sources, "parts": self.parts}


def load_source(src: SourceConfig, kind: str) -> Loaded:
    """Read and check every row of a source. Raises DataError only when the source cannot be
    read at all (missing file, unknown format, failing hook); row problems are returned."""
    if kind not in RECORD_TYPES:
        raise ValueError(f"kind: expected one of {', '.join(RECORD_TYPES)}, got {kind!r}")
    if src.hub is not None:
        file, fmt, rows = src.hub, "hub", hub_rows(src.hub, src.subset, src.split, src.revision)
    elif src.hook is not None:
        file, fmt, rows = src.hook, "hook", _hook_rows(src, kind)
    else:
        fmt = detect_format(src.path) if src.format == "auto" else src.format
        file, rows = str(src.path), read_rows(src.path, fmt, src.split)
    records, problems, n_rows, bad = [], [], 0, 0
    for number, row in rows:
        n_rows += 1
        if isinstance(row, Problem):
            found = [row]
        else:
            record, found = parse_row(kind, row, src, file, number, UNITS[fmt])
            if record is not None:
                records.append(record)
        problems += found
        bad += bool(found)
    return Loaded(records, n_rows, problems, bad)


def load_data(cfg: DataConfig, kind: str, seed: int) -> LoadedData:
    """All sources of a stage, checked and mixed. With ``on_error: fail`` any bad row raises
    DataError listing every problem of every source; with ``skip`` bad rows are dropped and
    counted."""
    loaded = {src.name: load_source(src, kind) for src in cfg.sources}
    problems = [p for one in loaded.values() for p in one.problems]
    if problems and cfg.on_error == "fail":
        bad = sum(one.bad_rows for one in loaded.values())
        raise DataError(problems, f"set data.on_error=skip to drop these {bad} rows; they are "
                        "counted in the manifest")
    records, parts, used = mix({name: one.records for name, one in loaded.items()}, cfg.mixture, seed)
    sources = {name: {"rows": one.rows, "skipped": one.bad_rows, "used": used[name]}
               for name, one in loaded.items()}
    return LoadedData(records, sources, parts)


def read_records(path: str | Path, kind: str, format: str = "auto") -> list[Record]:
    """The records of a canonical data file (e.g. one an earlier stage wrote); any problem
    raises DataError."""
    loaded = load_source(SourceConfig(path=Path(path), format=format), kind)
    if loaded.problems:
        raise DataError(loaded.problems)
    return loaded.records


# ---------------------------------------------------------------------------------------------
# Python hooks


def _hook_rows(src: SourceConfig, kind: str) -> Iterator[Row]:
    fn = _import_hook(src.hook)
    args = [str(src.path)] if src.path is not None else []
    try:
        items = list(fn(*args, **src.hook_args))
    except Exception as exc:
        raise DataError([Problem(src.hook, None, "hook", f"failed: {type(exc).__name__}: {exc}")]) from exc
    record_type = RECORD_TYPES[kind]
    for number, item in enumerate(items, start=1):
        if isinstance(item, record_type):
            yield number, to_dict(item)
        elif isinstance(item, dict):
            yield number, item
        else:
            got = type(item).__name__ if not is_dataclass(item) else f"a {type(item).__name__}"
            yield number, Problem(src.hook, number, "hook", f"expected a {record_type.__name__} "
                                  f"or a dict, got {got}", "record")


def _import_hook(ref: str) -> Callable:
    """``pkg.module:function`` (importable, or in the current directory) or ``file.py:function``."""
    module_name, _, attr = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception as exc:  # a user's module may raise anything while it is imported
        raise DataError([Problem(ref, None, "hook", f"cannot load: {type(exc).__name__}: {exc}")]) from None
