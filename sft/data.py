"""SFT examples -> training rows: render, fit to ``max_length``, pack, collate.

Every example is tokenized once, before training. Its loss mask becomes next-token
``targets`` (the token to predict at each position, ``IGNORE`` where there is no loss) before
packing, so a row of several examples needs no boundary logic: the last token of one
example predicts nothing, never the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from rlhf.data import DataError, Message, Problem, Rendered, SFTExample, render
from rlhf.data.chat import unfinished
from sft.config import SFTDataConfig
from rlhf.packing import best_fit_rows, pack_sequences

IGNORE = -100  # target of positions without loss


def next_token_targets(ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """targets[t] = ids[t + 1] where loss_mask[t + 1] == 1, else IGNORE; the last is IGNORE.

    ids [1, 5, 6, 7, 2] with mask [0, 0, 1, 1, 1] -> [IGNORE, 6, 7, 2, IGNORE]
    """
    return [i if m else IGNORE for i, m in zip(ids[1:], loss_mask[1:])] + [IGNORE]


@dataclass
class SFTRow:
    """One training row: one example, or several packed back to back.

    input_ids:    (T,) the examples' tokens
    position_ids: (T,) restarting at 0 for each example (keeps them apart in attention)
    targets:      (T,) next-token targets, IGNORE where there is no loss
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    num_examples: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def loss_units(self) -> int:
        return int((self.targets != IGNORE).sum())


class SFTBatch(NamedTuple):
    """Rows padded on the right to the longest; padding restarts its positions (its own block)
    and has no targets.

    input_ids, position_ids, targets: (B, T)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor


def tokenize(examples: Sequence[SFTExample], tokenizer: Any, cfg: SFTDataConfig) -> list[Rendered]:
    """Each example rendered and masked; one not ``finished`` without its last answer's EOS."""
    rendered = []
    for n, example in enumerate(examples, start=1):
        try:
            out = render(example.messages, tokenizer, cfg.template, cfg.loss_on)
            rendered.append(out if example.finished else unfinished(out, tokenizer.eos_token_id))
        except ValueError as exc:
            where = example.id or f"record {n}"
            raise DataError([Problem(example.source or "sft data", None, "messages", f"{where}: {exc}")]) from None
    return rendered


def without_first_exchange(messages: Sequence[Message]) -> list[Message] | None:
    """The conversation less its first user turn and the answers to it, a system prompt kept;
    None when only one exchange is left."""
    head = list(messages[:1]) if messages[0].role == "system" else []
    body = messages[len(head):]
    later = next((i for i, m in enumerate(body) if i > 0 and m.role == "user"), None)
    return None if later is None else [*head, *body[later:]]


def keep_ends(examples: Sequence[SFTExample], rendered: list[Rendered], tokenizer: Any,
              cfg: SFTDataConfig) -> tuple[list[Rendered], int]:
    """Overlong examples re-rendered without their earliest exchanges until they fit (or one is
    left); returns the examples and how many lost turns."""
    out, shortened = [], 0
    for example, first in zip(examples, rendered):
        r, messages = first, example.messages
        while len(r.ids) > cfg.max_length and (messages := without_first_exchange(messages)) is not None:
            r = tokenize([replace(example, messages=messages)], tokenizer, cfg)[0]
        shortened += r is not first
        out.append(r)
    return out, shortened


def fit_length(rendered: list[Rendered], max_length: int, overlong: str) -> tuple[list[Rendered], dict[str, int]]:
    """Cut (``truncate``, and ``keep_end`` once turns are dropped) or leave out (``drop``)
    examples over ``max_length``; leave out any
    example left with no loss token. Returns the kept examples and the counts."""
    kept, counts = [], {"truncated": 0, "dropped_overlong": 0, "dropped_no_loss": 0}
    for r in rendered:
        if len(r.ids) > max_length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            r = Rendered(r.ids[:max_length], r.loss_mask[:max_length])
        if not any(r.loss_mask[1:]):
            counts["dropped_no_loss"] += 1
            continue
        kept.append(r)
    return kept, counts


def make_rows(rendered: list[Rendered], max_length: int, packing: bool) -> list[SFTRow]:
    """Pack examples into rows of at most ``max_length`` tokens, or one example per row."""
    lengths = [len(r.ids) for r in rendered]
    groups = best_fit_rows(lengths, max_length) if packing else [[i] for i in range(len(rendered))]
    rows = []
    for group in groups:
        packed = pack_sequences([rendered[i].ids for i in group])
        targets = [t for i in group for t in next_token_targets(rendered[i].ids, rendered[i].loss_mask)]
        rows.append(SFTRow(packed.input_ids[0], packed.position_ids[0], torch.tensor(targets), len(group)))
    return rows


def build_rows(
    examples: Sequence[SFTExample], tokenizer: Any, cfg: SFTDataConfig
) -> tuple[list[SFTRow], dict[str, int]]:
    """The stage's training rows and the counts its manifest records."""
    rendered, kept_end = tokenize(examples, tokenizer, cfg), 0
    if cfg.overlong == "keep_end":
        rendered, kept_end = keep_ends(examples, rendered, tokenizer, cfg)
    kept, counts = fit_length(rendered, cfg.max_length, cfg.overlong)
    if not kept:
        raise DataError([Problem("sft data", None, "messages", f"none of the {len(examples)} "
                                 "examples has an answer token within data.max_length")])
    rows = make_rows(kept, cfg.max_length, cfg.packing)
    tokens = sum(r.num_tokens for r in rows)
    counts = {
        "examples": len(examples), "examples_used": len(kept), "kept_end": kept_end, **counts,
        "packed_rows": len(rows),
        "tokens": tokens, "loss_tokens": sum(r.loss_units for r in rows),
        "row_fill": round(tokens / (len(rows) * cfg.max_length), 4),
    }
    return rows, counts


def collate(rows: list[SFTRow], flatten: bool = False) -> SFTBatch:
    """Stack rows, padded to the longest; or, with ``flatten``, put them all in one row of
    (1, sum of lengths) with no padding at all. Flash-attention kernels need the latter: they
    keep packed sequences apart only in a batch of one row (and then cost nothing extra), while
    sdpa and eager build a mask quadratic in the row length, so rows stay rows."""
    if flatten:
        return SFTBatch(*(torch.cat([getattr(r, f) for r in rows])[None] for f in SFTBatch._fields))
    width = max(r.num_tokens for r in rows)
    pads = [width - r.num_tokens for r in rows]
    return SFTBatch(
        torch.stack([F.pad(r.input_ids, (0, p)) for r, p in zip(rows, pads)]),
        torch.stack([torch.cat([r.position_ids, torch.arange(p)]) for r, p in zip(rows, pads)]),
        torch.stack([F.pad(r.targets, (0, p), value=IGNORE) for r, p in zip(rows, pads)]),
    )


def sft_loss(model: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the next-token cross-entropy over the answer tokens of a micro-batch.

    Logits are computed only at positions with a target (``logits_to_keep`` as a boolean
    mask), so prompt and padding positions skip the vocabulary projection. No attention mask:
    the restarting position ids make transformers build the per-example causal mask, which
    needs ``use_cache=False``.
    """
    keep = batch.targets != IGNORE  # (B, T)
    logits = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep
    ).logits  # (N, V), N = answer tokens in the micro-batch
    loss = F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")
    return loss, {}
