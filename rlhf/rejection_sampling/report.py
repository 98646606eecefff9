"""The rejection sampling report: reward of the best of k samples, max and median, k = 1..K
(the paper's Fig. 7), per prompt category, with an independent judge's score of the sample the
reward models chose (over-optimisation: Gao et al. 2022), the temperature sweep (Fig. 8), and how many samples
were cut at the token limit."""

from __future__ import annotations

from itertools import combinations
from math import comb
from pathlib import Path
from typing import Any, Sequence

from rlhf.artifacts import write_json_atomic
from rlhf.data import write_jsonl_rows
from rlhf.generation import truncation
from rlhf.report import legend_outside, pyplot, save_figure
from rlhf.prompt_sampling import Item


def subset_order_statistic(values: Sequence[float], k: int, j: int) -> float:
    """E[j-th smallest of k values drawn without replacement from ``values``] (1 <= j <= k):
    sum_i v_(i) C(i-1, j-1) C(K-i, k-j) / C(K, k) over the sorted values v_(1) <= ... <= v_(K).

    [1, 2, 4], k = 2, j = 2 (the max of 2): subsets {1,2} {1,4} {2,4} -> (2 + 4 + 4) / 3 = 10/3.
    """
    xs, n = sorted(values), len(values)
    return sum(x * comb(i, j - 1) * comb(n - 1 - i, k - j) for i, x in enumerate(xs)) / comb(n, k)


def best_of_k_curve(rewards: Sequence[float]) -> dict[str, list[float]]:
    """Expected max and median reward of k of the K samples, k = 1..K (exact over all subsets,
    so the curve carries no noise from the sample order)."""
    n = len(rewards)
    maxima = [subset_order_statistic(rewards, k, k) for k in range(1, n + 1)]
    medians = [(subset_order_statistic(rewards, k, (k + 1) // 2) + subset_order_statistic(rewards, k, k // 2 + 1)) / 2
               for k in range(1, n + 1)]
    return {"max": maxima, "median": medians}


def chosen_judge_curve(rewards: Sequence[float], judges: Sequence[float]) -> list[float]:
    """E[judge score of the highest-reward sample among k of the K], k = 1..K, exact over all
    subsets (ties go to the first sample, as ``best_of``): with the samples in increasing order
    of (reward, -index), sum_i judge_(i) C(i-1, k-1) / C(K, k).

    rewards [1, 3, 2], judges [.1, .5, .9], k = 2: subsets {0,1} {0,2} {1,2} choose samples
    1, 2, 1 -> (.5 + .9 + .5) / 3 = 19/30; k = 1: the mean .5; k = 3: sample 1, .5."""
    n = len(rewards)
    order = sorted(range(n), key=lambda j: (rewards[j], -j))
    return [sum(judges[j] * comb(i, k - 1) for i, j in enumerate(order)) / comb(n, k) for k in range(1, n + 1)]


def judge_agreement(rewards: Sequence[float], judges: Sequence[float]) -> tuple[float, int]:
    """Over the pairs of one prompt's samples that the judge orders (unequal judge scores): how
    many the reward orders the same way (a reward tie counts a half), and how many there are.
    rewards [1, 3, 2], judges [.1, .5, .5]: pairs (0, 1) and (0, 2) are ordered, both agree -> (2, 2)."""
    agree, ordered = 0.0, 0
    for a, b in combinations(range(len(rewards)), 2):
        if judges[a] != judges[b]:
            ordered += 1
            same_way = (rewards[a] - rewards[b]) * (judges[a] - judges[b])
            agree += 1.0 if same_way > 0 else 0.5 if same_way == 0 else 0.0
    return agree, ordered


def prompt_categories(items: Sequence[Item]) -> dict[str, list[str]]:
    """Category -> keys: all, helpfulness / safety prompts, each source and each ``meta["task"]``
    (the quickstart world's prompts carry one) when there are several: where the reward models
    rank the policy's samples as the judge does, and where they are blind."""
    cats = {"all": [i.key for i in items], "helpfulness": [i.key for i in items if not i.prompt.is_safety],
            "safety": [i.key for i in items if i.prompt.is_safety]}
    for field, value_of in (("source", lambda i: i.prompt.source), ("task", lambda i: i.prompt.meta.get("task"))):
        values = sorted({value_of(i) for i in items} - {None})
        if len(values) > 1:
            cats.update({f"{field}:{v}": [i.key for i in items if value_of(i) == v] for v in values})
    return {name: keys for name, keys in cats.items() if keys}


def average_curves(rewards: dict[str, list[float]], keys: Sequence[str],
                   judges: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Fig. 7's max and median curves averaged over the prompts of ``keys``; with ``judges``,
    also ``judge_of_chosen`` (``chosen_judge_curve``), ``judge_mean`` (a random sample's),
    ``judge_best`` (the judge's own best of K: what a reward model that agreed with it would choose)
    and ``judge_agreement`` (``judge_agreement`` pooled over the prompts; None where the judge
    orders no pair)."""
    curves = [best_of_k_curve(rewards[k]) for k in keys]
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]  # noqa: E731
    out = {"prompts": len(keys), "max": mean([c["max"] for c in curves]), "median": mean([c["median"] for c in curves])}
    if judges:
        out["judge_of_chosen"] = mean([chosen_judge_curve(rewards[k], judges[k]) for k in keys])
        out["judge_mean"] = out["judge_of_chosen"][0]
        out["judge_best"] = sum(max(judges[k]) for k in keys) / len(keys)
        agree, ordered = map(sum, zip(*(judge_agreement(rewards[k], judges[k]) for k in keys)))
        out["judge_agreement"] = agree / ordered if ordered else None
    return out


def plot_curves(path: Path, curves: dict[str, dict], title: str, median: bool = True) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for i, (name, c) in enumerate(curves.items()):
        ks = range(1, len(c["max"]) + 1)
        ax.plot(ks, c["max"], "-o", ms=3, color=f"C{i}", label=f"{name} max")
        if median:
            ax.plot(ks, c["median"], "--", color=f"C{i}", label=f"{name} median")
        if "judge_of_chosen" in c:
            ax.plot(ks, c["judge_of_chosen"], ":", marker="x", ms=3, color=f"C{i}", label=f"{name} judge of chosen")
    ax.set_xlabel("samples per prompt (k)"), ax.set_ylabel("reward R_c"), ax.set_title(title)
    legend_outside(ax)
    save_figure(fig, path)


def sample_truncation(samples: dict[str, dict]) -> dict[str, Any]:
    """How many of the samples were cut at ``max_new_tokens`` (no EOS): samples, truncated, rate."""
    return truncation([f for v in samples.values() for f in v["finished"]])


def write_report(out: Path, items, samples, scores, sweep_scores, changes, round_no, judges=None) -> dict:
    """report/summary.json, best_of_k.png (Fig. 7, with the judge's score of the chosen sample
    when ``judges``: key -> the judge's scores of its K samples), temperature_sweep.png (Fig. 8);
    samples.jsonl with every sample's scores (and judge scores) and whether it ended with EOS."""
    write_jsonl_rows(out / "samples.jsonl", [{"key": i.key, "is_safety": i.prompt.is_safety, "responses": samples[i.key]["responses"],
                                          "finished": samples[i.key]["finished"], "scores": scores[i.key],
                                          **({"judge": judges[i.key]} if judges else {})} for i in items])
    rewards = {key: [s["reward"] for s in rows] for key, rows in scores.items()}
    curves = {name: average_curves(rewards, keys, judges) for name, keys in prompt_categories(items).items()}
    sweep = {f"{t:g}": average_curves({k: [s["reward"] for s in v] for k, v in sc.items()}, list(sc))
             for t, sc in sweep_scores.items() if sc}
    summary = {"round": round_no, "best_of_k": curves, "temperature_sweep": sweep, "pool": changes,
               "truncation": sample_truncation(samples),
               "categories_max_at_K": {name: c["max"][-1] for name, c in curves.items()}}
    (out / "report").mkdir(exist_ok=True)
    write_json_atomic(out / "report" / "summary.json", summary)
    plotted = {name: c for name, c in curves.items() if not name.startswith("task:")}  # tasks: the table only
    plot_curves(out / "report" / "best_of_k.png", plotted, "Reward of the best of k samples (Fig. 7)"
                + (";\njudge score of the sample chosen" if judges else ""))
    if sweep:
        plot_curves(out / "report" / "temperature_sweep.png", {f"T={t}": c for t, c in sweep.items()},
                    "Best of k by temperature (Fig. 8)", median=False)
    return summary
