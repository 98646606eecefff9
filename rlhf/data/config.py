"""Recipe models of the data a stage reads: sources, their mixture, and what to do with bad rows.

A stage's ``data:`` group subclasses (or holds) ``DataConfig``:

    data:
      sources:
        - {name: helpful, path: data/helpful_pairs.jsonl}
        - {name: safety, path: data/safety_pairs.jsonl}
        - {name: hh_harmless, path: hh/harmless-base.train.jsonl.gz}
      mixture:                       # helpfulness reward model (Llama 2, Sec. 3.2.2)
        - {name: main, sources: [helpful]}                                 # all of it
        - {name: rest, sources: [safety, hh_harmless], equal_to: main}     # as many, uniformly
      on_error: fail

Torch-free: recipes validate without importing the data libraries.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from rlhf.data.records import RATING_ALIASES, RATINGS
from rlhf.config import Strict, Template

RatingLabel = Literal[
    "significantly_better", "better", "slightly_better", "negligibly_better", "unsure"
]
# Canonical fields a column mapping may rename (which ones a kind reads: see data/README_formats.md).
FIELDS = (
    "messages", "prompt", "response", "chosen", "rejected", "rating", "margin", "chosen_safe",
    "rejected_safe", "is_safety", "meta", "source", "batch", "id",
)
_COMPRESSION = (".gz",)


class ScoreGapRating(Strict):
    """``rating`` derived from two score columns: the gap ``score(chosen) - score(rejected)``
    gets the strongest rating whose smallest gap it reaches."""

    chosen: str = Field(description="Column of the chosen response's score (`a.b` reads key b of "
                        "object column a, e.g. `metadata.score_chosen`).")
    rejected: str = Field(description="Column of the rejected response's score (`a.b` as for `chosen`).")
    gaps: dict[RatingLabel, float] = Field(
        min_length=1, description="Smallest gap of each rating, e.g. `{significantly_better: 4, "
        "better: 2, slightly_better: 1, negligibly_better: 0.5}`; stronger ratings need larger "
        "gaps. A gap below every entry (a tie) or a negative one is a problem of the row.")

    @model_validator(mode="after")
    def _check(self) -> "ScoreGapRating":
        table = self.table()
        gaps = list(table.values())
        if len(table) != len(self.gaps) or min(gaps) <= 0 or any(a <= b for a, b in zip(gaps, gaps[1:])):
            raise ValueError("gaps: expected one positive gap per rating, larger for stronger ratings "
                             f"({' > '.join(RATINGS)}), got {self.gaps}")
        return self

    def table(self) -> dict[str, float]:
        """Canonical rating -> smallest gap, strongest first (``unsure`` is negligibly_better)."""
        canonical = {RATING_ALIASES.get(k, k): v for k, v in self.gaps.items()}
        return {r: canonical[r] for r in RATINGS if r in canonical}

    def rating(self, gap: float) -> str | None:
        """The rating of a score gap; None for a gap below every entry."""
        return next((r for r, smallest in self.table().items() if gap >= smallest), None)


Format = Literal["auto", "jsonl", "json", "csv", "parquet", "datasets", "hh-rlhf"]
FORMATS: tuple[str, ...] = get_args(Format)


class SourceConfig(Strict):
    """One data source: a file or directory in a known format, or a Python hook."""

    path: Path | None = Field(
        None, description="File or directory to read (JSONL, JSON, CSV, Parquet, a `datasets` "
        "save_to_disk directory, HH-RLHF transcripts; `.gz` allowed for JSON/JSONL/CSV). "
        "Passed to the hook as its first argument when `hook` is set.")
    format: Format = Field(
        "auto", description="`auto` picks by name: a directory is a `datasets` dir, "
        "`.jsonl[.gz]` JSONL, `.json` a JSON array (or JSONL when it starts with `{`), `.csv`, "
        "`.parquet`. Preference rows with no prompt whose responses hold "
        "`\\n\\nAssistant:` turns are read as HH-RLHF transcripts; `hh-rlhf` requires that.")
    hook: str | None = Field(
        None, description="`module:function` or `path/to/file.py:function` returning an "
        "iterable of records (rlhf.data dataclasses) or of rows (dicts in the canonical or "
        "column-mapped shape), called as `function([path,] **hook_args)`.")
    hook_args: dict[str, Any] = Field({}, description="Keyword arguments for the hook.")
    hub: str | None = Field(
        None, description="A Hugging Face hub dataset id (e.g. `Anthropic/hh-rlhf`), or a local "
        "directory in hub layout, read with `datasets.load_dataset` (with `split`, `subset`, "
        "`revision`); instead of `path`. Rows are read as from any other format.")
    subset: str | None = Field(None, description="`hub`: the dataset's configuration (subset) name.")
    revision: str | None = Field(None, description="`hub`: a branch, tag or commit of the dataset repo.")
    name: str | None = Field(
        None, description="Source name (used by `mixture`, stored on each record, counted in "
        "the manifest). Default: the file name without its extensions, or the hook function.")
    columns: dict[str, str] = Field(
        {}, description="Canonical field -> the user's column name, e.g. "
        "`{prompt: question, chosen: good, rejected: bad}`; `a.b` reads key b of object column a, "
        "`a.0` item 0 of list column a (`{chosen: response.0, rejected: response.1}`). Unmapped "
        "fields use their own name.")
    ratings: dict[int | str, RatingLabel] | None = Field(
        None, description="The user's rating labels -> canonical ratings, e.g. "
        "`{1: significantly_better, 2: better, 3: slightly_better, 4: negligibly_better}`. "
        "Canonical labels (any case, spaces or hyphens for underscores, `unsure`) are always "
        "accepted; any other label is a problem.")
    rating_from_scores: ScoreGapRating | None = Field(
        None, description="Preference sources: derive `rating` from a score column per response "
        "(instead of a `rating` column), e.g. `{chosen: metadata.score_chosen, rejected: "
        "metadata.score_rejected, gaps: {significantly_better: 4, better: 2, slightly_better: 1, "
        "negligibly_better: 0.5}}`.")
    chosen_safe: bool | None = Field(
        None, description="Preference sources: `chosen_safe` of rows that do not state it (e.g. "
        "true for PKU-SafeRLHF pairs built with the safe response chosen).")
    rejected_safe: bool | None = Field(
        None, description="Preference sources: `rejected_safe` of rows that do not state it.")
    is_safety: bool | None = Field(
        None, description="Prompt sources: `is_safety` of rows that do not state it (e.g. true "
        "for AdvBench). Without it, rows must state `is_safety`.")
    batch: str | None = Field(
        None, description="Preference sources: batch id of rows that do not state one "
        "(e.g. the week the comparisons were collected).")
    split: str = Field("train", description="Split to read when a `datasets` dir or a `hub` "
                       "dataset holds several.")

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        if self.hub is not None and (self.path is not None or self.hook is not None):
            raise ValueError("give `hub` alone, or `path` and/or `hook`")
        if self.path is None and self.hook is None and self.hub is None:
            raise ValueError("give `path`, `hook`, or both (the path is passed to the hook), or `hub`")
        if self.hook is not None and not re.fullmatch(r"[^:\s]+:[A-Za-z_]\w*", self.hook):
            raise ValueError(f"hook {self.hook!r}: expected module:function")
        if self.hook is not None and (missing := missing_module(self.hook)):
            raise ValueError(f"hook {self.hook!r}: {missing}")
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise ValueError(f"columns: unknown field(s) {', '.join(unknown)}; "
                             f"fields are {', '.join(FIELDS)}")
        if self.name is None:
            self.name = self.hub.rstrip("/").rsplit("/", 1)[-1] if self.hub else default_source_name(self.path, self.hook)
        return self

    def rating_table(self) -> dict[str, str]:
        """The ``ratings`` table with string keys and canonical values."""
        return {str(k): RATING_ALIASES.get(v, v) for k, v in (self.ratings or {}).items()}


def missing_module(ref: str) -> str | None:
    """What is wrong with the module of a ``module:function`` (or ``file.py:function``) reference
    a recipe names, found without running it (the recipe check runs no user code); None if it is
    there. Its parent packages are imported, as Python does to find it."""
    module = ref.rpartition(":")[0]
    if module.endswith(".py"):
        return None if Path(module).is_file() else f"no file {module}"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a name like "a..b"
        found = False
    # the hook loader also looks in the current directory
    found = found or importlib.machinery.PathFinder.find_spec(module.split(".")[0], [os.getcwd()]) is not None
    return None if found else f"no module named {module!r} (importable, or in the current directory)"


def default_source_name(path: Path | None, hook: str | None) -> str:
    if path is None:
        return hook.rsplit(":", 1)[1]
    name = path.name
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return name.split(".", 1)[0] or name


class MixturePart(Strict):
    """One part of a mixture: rows drawn uniformly, without replacement, from the pooled rows
    of ``sources``. Give at most one of ``take``, ``equal_to``, ``share`` (none = all rows)."""

    name: str | None = Field(None, description="Part name (default: its sources joined by '+').")
    sources: list[str] = Field(min_length=1, description="Names of the sources pooled here.")
    take: Literal["all"] | int | float | None = Field(
        None, description="`all`, a row count (int), or a fraction of the pool (float in (0, 1]).")
    equal_to: str | None = Field(
        None, description="As many rows as an earlier part took (Llama 2's helpfulness RM: "
        "all helpfulness data + an equal amount sampled from the rest).")
    share: float | None = Field(
        None, gt=0, le=1, description="Share of the mixture (then every part gives a share, "
        "summing to 1). The mixture is the largest that no part's pool runs short of, so at "
        "least one part uses all its rows (Llama 2's safety RM: safety 0.9, helpfulness 0.1).")

    @model_validator(mode="after")
    def _check(self) -> "MixturePart":
        given = [k for k in ("take", "equal_to", "share") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of take, equal_to, share (got {', '.join(given)})")
        take = self.take
        if isinstance(take, bool) or (isinstance(take, int) and take <= 0):
            raise ValueError(f"take: expected 'all', a positive row count or a fraction, got {take!r}")
        if isinstance(take, float) and not 0 < take <= 1:
            raise ValueError(f"take: a fraction must be in (0, 1], got {take}")
        if self.name is None:
            self.name = "+".join(self.sources)
        return self


class DataConfig(Strict):
    """The data a stage reads: one or more sources, optionally mixed."""

    sources: list[SourceConfig] = Field(min_length=1, description="The data sources.")
    mixture: list[MixturePart] | None = Field(
        None, description="How to draw from the sources; unset = every row of every source. "
        "Each source belongs to exactly one part.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="`fail`: any bad row stops the stage before training, listing every "
        "problem. `skip`: bad rows are dropped and counted (per source, in the manifest).")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: duplicate source name(s) {', '.join(dupes)}; set `name`")
        if self.mixture is not None:
            check_mixture(self.mixture, names)
        return self


def check_mixture(parts: list[MixturePart], source_names: list[str]) -> None:
    """Raise ValueError if the parts do not name each source exactly once, refer to an unknown
    or later part, or mix shares with other rules."""
    used = [s for p in parts for s in p.sources]
    unknown = sorted(set(used) - set(source_names))
    if unknown:
        raise ValueError(f"mixture: unknown source(s) {', '.join(unknown)}")
    twice = sorted({s for s in used if used.count(s) > 1})
    if twice:
        raise ValueError(f"mixture: source(s) {', '.join(twice)} in more than one part")
    unused = [s for s in source_names if s not in used]
    if unused:
        raise ValueError(f"mixture: source(s) {', '.join(unused)} not in any part")
    seen: list[str] = []
    for part in parts:
        if part.name in seen:
            raise ValueError(f"mixture: duplicate part name {part.name!r}")
        if part.equal_to is not None and part.equal_to not in seen:
            raise ValueError(f"mixture: part {part.name!r}: equal_to must name an earlier part, "
                             f"got {part.equal_to!r}")
        seen.append(part.name)
    shares = [p.share for p in parts if p.share is not None]
    if shares and len(shares) != len(parts):
        raise ValueError("mixture: when one part gives a share, every part must")
    if shares and abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"mixture: shares must sum to 1, got {sum(shares):g}")


class LengthLimit(Strict):
    """How a stage's ``max_length`` meets the model's ``max_position_embeddings``."""

    longer_than_model: Literal["fail", "clamp"] = Field(
        "fail", description="When max_length exceeds the model's max_position_embeddings: `fail` "
        "stops the stage before training; `clamp` warns and uses the model's limit.")


class PromptDataConfig(DataConfig):
    """Prompts (conversations ending with a user turn, tagged ``is_safety``) and their chat format."""

    template: Template = Field(
        "llama2", description="Chat format: Llama 2's [INST] format, or the tokenizer's template.")
