"""An independent judge of a policy's answers (``JudgeConfig``): a function
``(prompts, responses) -> scores`` the stages never optimise, reported beside the proxy rewards
so that a policy gaming its reward models shows (Gao et al. 2022). The quickstart world's gold
judge and a user's hook live here; a reward-model judge is ``reward_model.model.load_judge``.
Torch-free."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from rlhf.config import JudgeConfig, RecipeError
from rlhf.data.records import Prompt

Judge = Callable[[Sequence[Prompt], Sequence[str]], list[float]]


def gold_judge(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """The world's gold utility of each answer (``rlhf.world.judge.utility``)."""
    from rlhf.world.judge import has_gold, judge, utility

    if prompts and not has_gold(prompts):
        raise RecipeError("judge.gold: these prompts carry no gold judge meta ({task, answer}, as the quickstart "
                          "world's do); use judge.reward_model_from or judge.hook instead")
    return [utility(judge(p, r)) for p, r in zip(prompts, responses, strict=True)]


def user_hook(key: str, ref: str, convert: Callable = lambda x: x) -> Callable[..., list]:
    """The user's ``module:function`` of recipe key ``key``, called with lists and its answer
    read as a list (each item through ``convert``); anything it raises becomes a RecipeError
    naming the key and the hook."""
    from rlhf.data.load import _import_hook

    fn = _import_hook(ref)

    def call(*args: Sequence) -> list:
        try:
            return [convert(x) for x in fn(*(list(a) for a in args))]
        except Exception as exc:  # a user's hook may raise anything
            raise RecipeError(f"{key}: {ref} failed: {type(exc).__name__}: {exc}") from exc

    return call


def hook_judge(ref: str) -> Judge:
    """The user's ``module:function``, its answer checked: one finite number per response."""
    fn = user_hook("judge.hook", ref, float)

    def scores(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        out = fn(prompts, responses)
        if len(out) != len(responses) or not all(math.isfinite(x) for x in out):
            raise RecipeError(f"judge.hook: {ref} must return one finite number per response "
                              f"({len(responses)}), got {len(out)} values")
        return out

    return scores


def text_judge(cfg: JudgeConfig) -> Judge | None:
    """The gold or hook judge of ``cfg``; None for no judge or a reward-model one."""
    if cfg.gold:
        return gold_judge
    return hook_judge(cfg.hook) if cfg.hook else None


def diverging(proxy: Sequence[float], judge: Sequence[float], n: int) -> bool:
    """Whether, over the last ``n`` evaluations, the proxy reward rose at each one while the
    judge fell at each one (over-optimisation). proxy [.5, .6, .7], judge [.8, .7, .6], n = 2:
    True; n = 3: False (only 2 changes)."""
    if len(proxy) < n + 1:
        return False
    steps = range(len(proxy) - n, len(proxy))
    return all(proxy[i] > proxy[i - 1] and judge[i] < judge[i - 1] for i in steps)
