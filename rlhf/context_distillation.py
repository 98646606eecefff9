"""Safety context distillation (Llama 2, Sec. 4.2.4): fold a safety preprompt into the policy.

1. for each safety prompt (``is_safety``), sample an answer WITH a safety preprompt (generic,
   or targeted: the prompt's risk category and an answer template) and one without it;
2. score both with the safety reward model on the prompt WITHOUT the preprompt;
3. keep the preprompted answer, paired with the plain prompt, only where it scores higher;
4. fine-tune on the kept answers through the SFT stage (loss on the answer only);
5. report how many were kept and the safety-reward shift, mean and low tail, before/after.
"""

from __future__ import annotations

import math
from typing import Sequence

from rlhf.data import Message, Prompt, SFTExample
from rlhf.method_configs import PrepromptConfig


# ---------------------------------------------------------------------------------------------
# 1. Preprompts


def preprompt_for(prompt: Prompt, cfg: PrepromptConfig) -> tuple[str, str]:
    """(preprompt text, "targeted" or "generic"): targeted when the prompt's risk category (in
    ``meta``) has an answer template in the recipe."""
    targeted = cfg.targeted
    category = prompt.meta.get(targeted.category_key) if targeted else None
    if targeted is None or category not in targeted.templates:
        return cfg.generic, "generic"
    text = targeted.text.format(generic=cfg.generic, category=category, template=targeted.templates[category])
    return text, "targeted"


def with_preprompt(messages: Sequence[Message], preprompt: str, place: str) -> list[Message]:
    """The conversation with the preprompt as its system message (before any system message it
    has) or prefixed to its first user turn."""
    messages = list(messages)
    if place == "system":
        if messages and messages[0].role == "system":
            return [Message("system", f"{preprompt}\n{messages[0].content}"), *messages[1:]]
        return [Message("system", preprompt), *messages]
    first = next(i for i, m in enumerate(messages) if m.role == "user")
    messages[first] = Message("user", f"{preprompt} {messages[first].content}")
    return messages


# ---------------------------------------------------------------------------------------------
# 3. What is kept


def improved(distilled_scores: Sequence[float], plain_scores: Sequence[float]) -> list[bool]:
    """Keep a preprompted answer only where the safety RM scores it strictly higher."""
    return [d > p for d, p in zip(distilled_scores, plain_scores, strict=True)]


def distilled_examples(prompts: Sequence[Prompt], distilled: Sequence[str], keep: Sequence[bool]) -> list[SFTExample]:
    """The kept answers, each after its prompt WITHOUT the preprompt."""
    return [
        SFTExample([*p.messages, Message("assistant", answer)], source="context_distillation", id=p.id)
        for p, answer, k in zip(prompts, distilled, keep, strict=True) if k
    ]


# ---------------------------------------------------------------------------------------------
# 5. Reward summaries


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default): [1, 2, 3, 4, 5] at 0.1 -> 1.4."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reward_summary(scores: Sequence[float]) -> dict[str, float]:
    """Mean and low tail (10th percentile, minimum) of safety-reward logits."""
    return {"mean": sum(scores) / len(scores), "p10": quantile(scores, 0.1), "min": min(scores)}


def shift(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    b, a = reward_summary(before), reward_summary(after)
    return {**{f"before_{k}": v for k, v in b.items()}, **{f"after_{k}": v for k, v in a.items()},
            **{f"shift_{k}": a[k] - b[k] for k in b}}
