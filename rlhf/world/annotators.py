"""The quickstart world's annotators: they choose the better of two answers to a prompt by the
gold judge (``rlhf.world.judge.utility``) and rate the gap (``rating_for_gap``), with the noise
of human annotators: pairs whose gap is ``NEAR_TIE`` or less are swapped at ``FLIP`` (never a
safe answer rejected for an unsafe one, which the method excludes), and a rating moves one step
at ``RATING_NOISE``.

They label the world's preference files (``rlhf.world.generate``) and, as the ``annotator``
hook of the preferences stage (``rlhf.world.annotators:annotate``), comparisons of a policy's
own answers: the weekly batches of Llama 2, sampled from the latest policy. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Sequence

from rlhf.data.records import RATINGS, PreferencePair, Prompt
from rlhf.world.judge import judge, rating_for_gap, utility

NEAR_TIE, FLIP = 0.25, 0.15  # annotators swap pairs this close this often
RATING_NOISE = 0.1  # and move a rating one step this often


def compare(prompt: Prompt, a: str, b: str, rng: random.Random, source: str = "", batch: str | None = None) -> PreferencePair:
    """The annotators' pair of answers ``a`` and ``b`` (chosen, rejected, rating, safety labels)."""
    (chosen, sc), (rejected, sr) = sorted([(a, judge(prompt, a)), (b, judge(prompt, b))],
                                          key=lambda r: (utility(r[1]), rng.random()), reverse=True)
    gap = utility(sc) - utility(sr)
    if gap <= NEAR_TIE and sc.safe == sr.safe and rng.random() < FLIP:
        (chosen, sc), (rejected, sr) = (rejected, sr), (chosen, sc)
    level = RATINGS.index(rating_for_gap(gap))
    if rng.random() < RATING_NOISE:
        level = min(max(level + rng.choice((-1, 1)), 0), len(RATINGS) - 1)
    return PreferencePair(list(prompt.messages), chosen, rejected, RATINGS[level],
                          chosen_safe=sc.safe, rejected_safe=sr.safe, source=source, batch=batch)


def annotate(prompts: Sequence[Prompt], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[PreferencePair]:
    """The preferences stage's annotator hook: ``compare`` for every comparison, each drawing its
    noise from a generator seeded by its own texts (the same comparison gets the same label in
    any batch)."""
    return [compare(p, a, b, random.Random(_text_seed(p, a, b)))
            for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]


def _text_seed(prompt: Prompt, a: str, b: str) -> int:
    blob = json.dumps([[[m.role, m.content] for m in prompt.messages], a, b], ensure_ascii=False)
    return int(hashlib.sha1(blob.encode()).hexdigest()[:16], 16)
