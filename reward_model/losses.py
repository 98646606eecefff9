"""Loss of the reward models (Llama 2, Sec. 3.2.2): a binary ranking loss with a margin that
grows with the annotators' preference strength,

    L = -log sigmoid(r_chosen - r_rejected - m(rating)).

Pure functions; the stage calls them on the rewards of a micro-batch.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from rlhf.data.records import RATING_ALIASES, RATINGS

# Table 27: m(rating), strongest preference first; "unsure" counts as negligibly better.
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}


def margin_table(spec: str | Mapping[str, float]) -> dict[str, float]:
    """A named table (``none``, ``small``, ``large``) or a custom one, keyed by canonical rating."""
    if isinstance(spec, str):
        return dict(MARGIN_TABLES[spec])
    return {RATING_ALIASES.get(k, k): float(v) for k, v in spec.items()}


def pair_margin(
    rating: str | None, margin: float | None, table: Mapping[str, float], use_column: bool = True
) -> float:
    """The margin of one pair: its own numeric ``margin`` when present (and ``use_column``),
    else the table's value for its rating; 0 for a pair with neither."""
    if use_column and margin is not None:
        return float(margin)
    if rating is None:
        return 0.0
    return table[RATING_ALIASES.get(rating, rating)]


def margin_ranking_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected - margin).

    chosen, rejected: (B,) rewards of the preferred and the other response
    margin:           (B,) m(rating) of each pair
    returns:          (B,)
    """
    return -F.logsigmoid(chosen.float() - rejected.float() - margin.float())
