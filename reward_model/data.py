"""Preference pairs -> training items: held-out split, mixing, tokenizing, margins, collation.

Each pair is tokenized once, before training, as two sequences (prompt + chosen, prompt +
rejected). A micro-batch of pairs is collated into packed rows holding every chosen and
rejected sequence (restarting position ids keep them apart; ``rlhf.packing.pack_rows``),
so both sides are scored in one forward and short sequences fill rows instead of padding.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from rlhf.data import DataConfig, DataError, LoadedData, PreferencePair, Problem, load_data, mix
from reward_model.config import RMDataConfig, RMLossConfig
from reward_model.losses import margin_ranking_loss, margin_table, pair_margin
from reward_model.model import response_ids
from rlhf.packing import pack_rows


@dataclass
class RMPair:
    """One tokenized preference pair; ``margin`` is m(rating) of its loss."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    loss_units = 1  # the loss is averaged over pairs


class RMBatch(NamedTuple):
    """A micro-batch of B pairs packed into rows: sequences chosen_1, rejected_1, chosen_2, ...

    input_ids, position_ids: (R, T) T = the longest sequence; the others fill the rows
    ends:                    (2B, 2) (row, index) of each sequence's last token, chosen at even slots
    margins:                 (B,)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ends: torch.Tensor
    margins: torch.Tensor


def collate(pairs: Sequence[RMPair]) -> RMBatch:
    packed = pack_rows([ids for p in pairs for ids in (p.chosen_ids, p.rejected_ids)])
    return RMBatch(*packed, torch.tensor([p.margin for p in pairs], dtype=torch.float32))


def rm_loss(model: torch.nn.Module, batch: RMBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the margin ranking loss over the pairs of a micro-batch, and the correct pairs."""
    rewards = model(batch.input_ids, batch.position_ids, batch.ends)  # (2B,)
    chosen, rejected = rewards[0::2], rewards[1::2]  # (B,), (B,)
    loss = margin_ranking_loss(chosen, rejected, batch.margins).sum()
    return loss, {"accuracy": (chosen > rejected).float().sum()}


# ---------------------------------------------------------------------------------------------
# Records: held-out split and mixture


def prompt_rank(pair: PreferencePair, seed: int) -> str:
    """Where a pair's prompt falls in the seeded order the held-out split takes prompts in: a
    hash of (seed, prompt conversation), so the same prompt ranks the same in every source."""
    text = json.dumps([seed, [[m.role, m.content] for m in pair.prompt]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def split_held_out(pools: dict[str, list], fraction: float, seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """(training pools, held-out pairs) by source, split by prompt so that no prompt is both
    trained on and held out (PKU-SafeRLHF has up to a dozen pairs per prompt): each source
    holds out its first prompts in ``prompt_rank`` order until ``round(fraction * n)`` of its
    pairs are (exactly that many when its prompts are distinct), and a prompt held out in one
    source is held out in every source."""
    ranks = {name: [prompt_rank(pair, seed) for pair in rows] for name, rows in pools.items()}
    held = set().union(*(_held_prompts(r, fraction) for r in ranks.values()))
    train, held_out = {}, {}
    for name, rows in pools.items():
        train[name] = [pair for pair, rank in zip(rows, ranks[name]) if rank not in held]
        if len(train[name]) < len(rows):
            held_out[name] = [pair for pair, rank in zip(rows, ranks[name]) if rank in held]
    return train, held_out


def _held_prompts(ranks: list[str], fraction: float) -> set[str]:
    """The prompts (by rank) one source holds out: the first ones until ``round(fraction * n)``
    of its pairs are, never every one (something is left to train on)."""
    pairs = Counter(ranks)
    held, count = set(), 0
    for rank in sorted(pairs)[:-1]:
        if count >= round(fraction * len(ranks)):
            break
        held.add(rank)
        count += pairs[rank]
    return held


def source_pools(cfg: DataConfig, seed: int) -> tuple[LoadedData, dict[str, list[PreferencePair]]]:
    """Every pair of every source, unmixed, by configured source name (a row's own ``source``
    label may differ), with the data layer's checks and counts."""
    every = load_data(cfg.model_copy(update={"mixture": None}), "preference", seed)
    pools, start = {}, 0
    for name, counts in every.sources.items():  # unmixed: every source's rows, in source order
        pools[name], start = every.records[start : start + counts["used"]], start + counts["used"]
    return every, pools


def load_pairs(cfg: RMDataConfig, seed: int) -> tuple[LoadedData, dict[str, list[PreferencePair]]]:
    """The stage's training pairs (held-out pairs taken out of every source first, then the
    mixture drawn from the rest) and the test sets: ``held_out.<source>`` and each of
    ``eval_sources`` by name."""
    every, pools = source_pools(cfg, seed)
    train, held_out = split_held_out(pools, cfg.eval_fraction, seed)
    records, parts, used = mix(train, cfg.mixture, seed)
    sources = {name: {**counts, "used": used[name], "held_out": len(held_out.get(name, []))}
               for name, counts in every.sources.items()}
    tests = {f"held_out.{name}": pairs for name, pairs in held_out.items()}
    if cfg.eval_sources:
        tests.update(source_pools(cfg.model_copy(update={"sources": cfg.eval_sources}), seed)[1])
    return LoadedData(records, sources, parts), tests


# ---------------------------------------------------------------------------------------------
# Tokenizing


def build_pairs(
    records: Sequence[PreferencePair], tokenizer: Any, data: RMDataConfig, loss: RMLossConfig
) -> tuple[list[RMPair], dict[str, int]]:
    """Training items and the counts the manifest records: truncated / dropped overlong pairs,
    pairs per rating, pairs whose margin came from their own margin column."""
    table = margin_table(loss.margin)
    items, counts = [], {"truncated": 0, "dropped_overlong": 0, "margin_from_column": 0}
    ratings: dict[str, int] = defaultdict(int)
    for n, pair in enumerate(records, start=1):
        try:
            seqs = [response_ids(pair.prompt, text, tokenizer, data.template) for text in (pair.chosen, pair.rejected)]
        except ValueError as exc:
            raise DataError([Problem(pair.source or "preference data", None, "prompt", f"{pair.id or f'record {n}'}: {exc}")]) from None
        if max(map(len, seqs)) > data.max_length:
            if data.overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            seqs = [s[-data.max_length :] for s in seqs]
        counts["margin_from_column"] += loss.margin_column and pair.margin is not None
        ratings[pair.rating or "unrated"] += 1
        items.append(RMPair(seqs[0], seqs[1], pair_margin(pair.rating, pair.margin, table, loss.margin_column)))
    if not items:
        raise DataError([Problem("preference data", None, "chosen", f"all {len(records)} pairs are longer than data.max_length")])
    return items, {"pairs": len(items), **counts, "ratings": dict(ratings), "tokens": sum(i.num_tokens for i in items)}
