"""Mixing sources as a recipe's ``mixture`` says, deterministically for a seed.

Each part pools the rows of its sources (in source order) and draws its count uniformly without
replacement, with a generator seeded by (seed, part name), so changing one part leaves the
others' draws alone. Drawn rows keep their pool order; stages shuffle for training.
"""

from __future__ import annotations

import random
from typing import Sequence

from rlhf.data.config import MixturePart
from rlhf.data.records import DataError, Problem, Record


def mix(
    pools: dict[str, list[Record]], parts: Sequence[MixturePart] | None, seed: int
) -> tuple[list[Record], dict[str, int], dict[str, int]]:
    """The mixed records, the rows each part took, and the rows each source gave (by the
    names in ``pools``). ``parts=None`` takes every row of every source. Raises DataError when
    a part asks for more rows than its pool holds."""
    if parts is None:
        records = [r for rows in pools.values() for r in rows]
        return records, {}, {name: len(rows) for name, rows in pools.items()}
    part_pools = {p.name: [(s, r) for s in p.sources for r in pools[s]] for p in parts}
    counts = part_counts(parts, {name: len(pool) for name, pool in part_pools.items()})
    picked: list[tuple[str, Record]] = []
    for part in parts:
        pool = part_pools[part.name]
        rng = random.Random(f"{seed}:{part.name}")
        picked += [pool[i] for i in sorted(rng.sample(range(len(pool)), counts[part.name]))]
    used = {name: 0 for name in pools}
    for name, _ in picked:
        used[name] += 1
    return [r for _, r in picked], counts, used


def part_counts(parts: Sequence[MixturePart], available: dict[str, int]) -> dict[str, int]:
    """How many rows each part takes, given how many its pool holds.

    With shares, the mixture size is the largest T with round(T * share) <= available for
    every part: T = min(available / share), so the scarcest part gives all its rows.
    """
    if parts and parts[0].share is not None:
        total = min(available[p.name] / p.share for p in parts)
        return {p.name: min(round(total * p.share), available[p.name]) for p in parts}
    counts: dict[str, int] = {}
    for p in parts:
        n = available[p.name]
        if p.equal_to is not None:
            n = counts[p.equal_to]
        elif isinstance(p.take, float):
            n = round(p.take * n)
        elif isinstance(p.take, int):
            n = p.take
        if n > available[p.name]:
            raise DataError([Problem("mixture", None, p.name, f"needs {n} rows but its sources "
                                     f"({', '.join(p.sources)}) hold {available[p.name]}")])
        counts[p.name] = n
    return counts
