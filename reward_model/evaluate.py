"""Evaluating a reward model on preference pairs, the way Llama 2 reports it (Sec. 3.2.2):
accuracy overall and per rating (Table 8), per safety-label category, the recall of unsafe
responses at a score threshold, calibration (predicted preference probability vs observed),
length bias (``length_bias``: how much the rewards follow response length), and the safety
gate's threshold calibrated on the labelled responses (``calibrated_gate``: the operating point
of a recall, as Llama 2 chose its 0.15 for its safety reward model).

``eval/`` holds ``metrics.json`` ({test set: results}), ``summary.json`` (every test set pooled,
and ``gate``), ``report.md`` and two plots. The pure functions take rewards as tensors;
``evaluate_sets`` scores the pairs first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.data import PreferencePair, SourceConfig, load_source, safety_category
from rlhf.data.records import RATINGS
from reward_model.model import RewardModel

CATEGORIES = ("safe_vs_unsafe", "both_safe", "both_unsafe", "unsafe_vs_safe")


def accuracy_by(chosen: torch.Tensor, rejected: torch.Tensor, groups: Sequence[str | None], order: Sequence[str]) -> dict[str, dict]:
    """Accuracy (share of pairs with r_chosen > r_rejected) per group, in ``order``, then any
    pair without a group as ``unlabelled``; groups with no pair are left out.

    chosen, rejected: (N,) rewards; groups: N labels (None = unlabelled)
    """
    correct = (chosen > rejected).tolist()
    table = {}
    for name in [*order, None]:
        hits = [c for c, g in zip(correct, groups) if g == name]
        if hits:
            table[name or "unlabelled"] = {"accuracy": sum(hits) / len(hits), "pairs": len(hits)}
    return table


def unsafe_recall(rewards: torch.Tensor, unsafe: torch.Tensor, threshold: float) -> dict[str, float | int]:
    """Responses flagged unsafe by sigmoid(r) < threshold: recall and precision of the unsafe ones
    (None where there is no unsafe or no flagged response), and ``safe_flagged``, the share of the
    safe responses flagged (None without a safe one): what the safety gate takes from the
    helpfulness reward model.

    rewards: (M,) reward logits; unsafe: (M,) bool labels
    """
    flagged = torch.sigmoid(rewards.float()) < threshold
    hits = int((flagged & unsafe).sum())
    n_unsafe, n_flagged = int(unsafe.sum()), int(flagged.sum())
    n_safe = len(unsafe) - n_unsafe
    return {
        "threshold": threshold, "unsafe": n_unsafe, "flagged": n_flagged,
        "recall": hits / n_unsafe if n_unsafe else None, "precision": hits / n_flagged if n_flagged else None,
        "safe": n_safe, "safe_flagged": (n_flagged - hits) / n_safe if n_safe else None,
    }


def gate_threshold_at_recall(rewards: torch.Tensor | Sequence[float], unsafe: torch.Tensor | Sequence[bool],
                             recall: float) -> float | None:
    """The safety gate's threshold (probability scale) at which ``sigmoid(r) < threshold`` flags
    the share ``recall`` of the unsafe responses; None without an unsafe response.

    With p = sigmoid(r), u_1 <= ... <= u_n the p of the n unsafe responses and k = ceil(recall * n)
    (at least 1): halfway between u_k and the next higher score, which is the smallest unsafe
    score above u_k, or where no unsafe one is above (k = n, or ties up to the top) the smallest
    score of any response above u_k, or else 1. So it flags every unsafe response scoring at most
    u_k (at least k of the n) and none above, and it sits between two scores, not on one.

    rewards: (M,) reward logits; unsafe: (M,) bool labels
    """
    p = torch.sigmoid(torch.as_tensor(rewards, dtype=torch.float64))
    unsafe = torch.as_tensor(unsafe, dtype=torch.bool)
    scores = p[unsafe].sort().values  # (n,)
    if not len(scores):
        return None
    k = max(1, math.ceil(round(recall * len(scores), 9)))  # round: 0.55 * 20 is 11.000000000000002
    low = float(scores[k - 1])
    above = scores[scores > low]
    if not len(above):
        above = p[p > low]
    return (low + (float(above.min()) if len(above) else 1.0)) / 2


def calibration(chosen: torch.Tensor, rejected: torch.Tensor, bins: int) -> dict[str, Any]:
    """Predicted P(a preferred to b) = sigmoid(r_a - r_b) against how often a was preferred.
    Each pair counts in both orders, (chosen, rejected) observed 1 and (rejected, chosen)
    observed 0, so the curve is symmetric about 0.5. Also the expected calibration error."""
    p = torch.sigmoid((chosen - rejected).double())
    predicted = torch.cat([p, 1 - p])  # (2N,)
    observed = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = torch.clamp((predicted * bins).long(), max=bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        if n:
            pred, obs = float(predicted[mask].mean()), float(observed[mask].mean())
            rows.append({"bin": [b / bins, (b + 1) / bins], "predicted": pred, "observed": obs, "count": n})
            ece += n / len(predicted) * abs(pred - obs)
    return {"bins": rows, "ece": ece}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None for fewer than 2 points or a constant series.
    [1, 2, 3] vs [1, 3, 2]: cov 1/3, variances 2/3 and 2/3 -> 0.5."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    vx, vy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else None


def length_bias(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[int],
                rejected_lengths: Sequence[int]) -> dict[str, Any]:
    """``reward_length_correlation``: Pearson correlation of reward with response length over
    every response of the pairs; ``longer_wins``: the accuracy of the length-only baseline "the
    longer answer is the chosen one" (equal lengths count half), to set beside the reward
    model's accuracy."""
    pairs = len(chosen_lengths)
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_lengths, rejected_lengths))
    return {"reward_length_correlation": pearson([*map(float, chosen), *map(float, rejected)],
                                                 [*chosen_lengths, *rejected_lengths]),
            "longer_wins": wins / pairs if pairs else None}


def response_length(text: str) -> int:
    """The length a length bias is measured in: words (the same for every tokenizer)."""
    return len(text.split())


def evaluate_rewards(
    chosen: torch.Tensor, rejected: torch.Tensor, pairs: Sequence[PreferencePair], threshold: float, bins: int
) -> dict[str, Any]:
    """Every metric of one test set from the rewards of its pairs."""
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "accuracy": int((chosen > rejected).sum()) / max(1, len(pairs)),
        "per_rating": accuracy_by(chosen, rejected, [p.rating for p in pairs], RATINGS),
        "mean_reward_chosen": float(chosen.mean()) if len(pairs) else 0.0,
        "mean_reward_rejected": float(rejected.mean()) if len(pairs) else 0.0,
        "calibration": calibration(chosen, rejected, bins),
        "length_bias": length_bias(chosen.tolist(), rejected.tolist(), [response_length(p.chosen) for p in pairs],
                                   [response_length(p.rejected) for p in pairs]),
    }
    categories = [safety_category(p) for p in pairs]
    if any(c is not None for c in categories):
        result["per_safety_category"] = accuracy_by(chosen, rejected, categories, CATEGORIES)
        result["unsafe_recall"] = unsafe_recall(*labelled_responses(chosen, rejected, pairs), threshold)
    return result


def labelled_responses(chosen: torch.Tensor, rejected: torch.Tensor, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards (M,) and unsafe labels (M,) of the responses of the pairs with both safety
    labels: the chosen responses, then the rejected ones."""
    labelled = [i for i, p in enumerate(pairs) if safety_category(p) is not None]
    rewards = torch.cat([chosen[labelled], rejected[labelled]])
    unsafe = torch.tensor([not pairs[i].chosen_safe for i in labelled] + [not pairs[i].rejected_safe for i in labelled],
                          dtype=torch.bool)
    return rewards, unsafe


NO_UNSAFE = ("no held-out or test response is labelled unsafe (chosen_safe / rejected_safe false), so no "
             "threshold can be read off; set gate_threshold to a number where this reward model is used")


def calibrated_gate(labelled: dict[str, tuple[torch.Tensor, torch.Tensor]], recall: float) -> dict[str, Any]:
    """The safety gate's threshold at ``recall`` (``gate_threshold_at_recall``) over the labelled
    responses (``labelled_responses``) of every test set pooled, its ``unsafe_recall`` there (the
    recall and precision it reaches), and per test set (``test_sets``) the ``unsafe_recall`` at
    it; ``threshold`` None and a ``note`` without an unsafe response."""
    rewards = torch.cat([r for r, _ in labelled.values()]) if labelled else torch.empty(0)
    unsafe = torch.cat([u for _, u in labelled.values()]) if labelled else torch.empty(0, dtype=torch.bool)
    threshold = gate_threshold_at_recall(rewards, unsafe, recall)
    if threshold is None:
        return {"recall_target": recall, "threshold": None, "note": NO_UNSAFE}
    return {"recall_target": recall, **unsafe_recall(rewards, unsafe, threshold),
            "test_sets": {name: unsafe_recall(r, u, threshold) for name, (r, u) in labelled.items()}}


def pair_rewards(rm: RewardModel, pairs: Sequence[PreferencePair], batch_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N,), (N,) of the chosen and rejected responses."""
    seqs = [rm.encode(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
    rewards = rm.score_ids(seqs, batch_tokens) if seqs else torch.empty(0)
    return rewards[0::2], rewards[1::2]


def evaluate_sets(rm: RewardModel, tests: dict[str, Sequence[PreferencePair]], threshold: float = 0.15,
                  gate_recall: float = 0.55, bins: int = 10, batch_tokens: int = 8192) -> tuple[dict[str, dict], dict[str, Any]]:
    """The results of every test set ({name: results}; a labelled one also holds ``gate``, its
    ``unsafe_recall`` at the calibrated threshold) and the gate calibrated on them all
    (``calibrated_gate``)."""
    results, labelled = {}, {}
    for name, pairs in tests.items():
        chosen, rejected = pair_rewards(rm, pairs, batch_tokens)
        results[name] = evaluate_rewards(chosen, rejected, pairs, threshold, bins)
        if "unsafe_recall" in results[name]:
            labelled[name] = labelled_responses(chosen, rejected, pairs)
    gate = calibrated_gate(labelled, gate_recall)
    for name, at_gate in gate.get("test_sets", {}).items():
        results[name]["gate"] = at_gate
    return results, gate


# ---------------------------------------------------------------------------------------------
# Report: eval/metrics.json, report.md, accuracy_by_rating.png, calibration.png


def _pct(table: dict, key: str) -> str:
    return f"{100 * table[key]['accuracy']:.1f} ({table[key]['pairs']})" if key in table else "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _gate_lines(results: dict[str, dict], gate: dict[str, Any] | None) -> list[str]:
    """The calibrated safety gate: its threshold, recall and precision pooled, and per test set
    the share of safe responses it flags beside the share ``eval.unsafe_threshold`` flags."""
    if gate is None:
        return []
    if gate["threshold"] is None:
        return ["", "## Safety gate", "", f"No calibrated gate threshold: {gate['note']}."]
    rows = [f"| {name} | {_ratio(g['recall'])} | {_ratio(g['precision'])} | {_share(g['safe_flagged'])} "
            f"| {_share(results[name]['unsafe_recall']['safe_flagged'])} |" for name, g in gate["test_sets"].items()]
    at = results[next(iter(gate["test_sets"]))]["unsafe_recall"]["threshold"]  # eval.unsafe_threshold
    return ["", "## Safety gate", "",
            f"Calibrated gate threshold (`gate_threshold: calibrated`): {gate['threshold']:.4g}, where sigmoid(r) below "
            f"it flags at least {_share(gate['recall_target'])} of the unsafe responses of every test set pooled "
            f"(`eval.gate_recall`; Llama 2 set 0.15 where its safety reward model had recall 0.55, precision 0.89): "
            f"recall {_ratio(gate['recall'])}, precision {_ratio(gate['precision'])} ({gate['flagged']} flagged, "
            f"{gate['unsafe']} unsafe).", "",
            f"| test set | unsafe recall | precision | safe responses flagged | flagged at {at} |", "|---" * 5 + "|",
            *rows]


def markdown(results: dict[str, dict], gate: dict[str, Any] | None = None) -> str:
    """Table 8 shape: one row per test set, accuracy % (pairs) per rating; then safety, and the
    calibrated safety gate (``calibrated_gate``) when given."""
    cols = [c for c in (*RATINGS, "unlabelled") if any(c in r["per_rating"] for r in results.values())]
    lines = [
        "# Reward model evaluation", "", "Accuracy % (pairs) per preference rating (Llama 2, Table 8).", "",
        "| test set | " + " | ".join(c.replace("_", " ") for c in cols) + " | avg |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_pct(r["per_rating"], c) for c in cols)
                     + f" | {100 * r['accuracy']:.1f} ({r['pairs']}) |")
    for name, r in results.items():
        if "per_safety_category" in r:
            u = r["unsafe_recall"]
            lines += ["", f"## {name}: safety", "", "| " + " | ".join(CATEGORIES) + " |", "|---" * len(CATEGORIES) + "|",
                      "| " + " | ".join(_pct(r["per_safety_category"], c) for c in CATEGORIES) + " |", "",
                      f"Unsafe responses flagged by sigmoid(r) < {u['threshold']}: recall {_ratio(u['recall'])}, "
                      f"precision {_ratio(u['precision'])} ({u['flagged']} flagged, {u['unsafe']} unsafe)."]
    lines += ["", "Length bias (correlation of reward with response length in words; accuracy of \"the longer "
              "answer wins\"): " + ", ".join(f"{name} {_ratio(r['length_bias']['reward_length_correlation'])}, "
                                             f"{_ratio(r['length_bias']['longer_wins'])}"
                                             for name, r in results.items() if "length_bias" in r)]
    lines += ["", "Calibration (expected calibration error): "
              + ", ".join(f"{name} {r['calibration']['ece']:.3f}" for name, r in results.items())]
    return "\n".join([*lines, *_gate_lines(results, gate), ""])


def plot(results: dict[str, dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(results))
    for k, (name, r) in enumerate(results.items()):
        keys = [c for c in (*RATINGS, "unlabelled") if c in r["per_rating"]]
        xs = [list((*RATINGS, "unlabelled")).index(c) + k * width for c in keys]
        ax.bar(xs, [100 * r["per_rating"][c]["accuracy"] for c in keys], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(5)], ["sig. better", "better", "slightly", "negligibly", "unlabelled"])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set(ylabel="accuracy %", title="Reward model accuracy by preference rating", ylim=(0, 100))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_rating.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for name, r in results.items():
        rows = r["calibration"]["bins"]
        ax.plot([b["predicted"] for b in rows], [b["observed"] for b in rows], marker="o", label=name)
    ax.set(xlabel="predicted P(preferred) = sigmoid(r_a - r_b)", ylabel="observed share preferred",
           title="Calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "calibration.png", dpi=100)
    plt.close(fig)


def pooled(results: dict[str, dict]) -> dict[str, Any]:
    """Accuracy overall and per rating over the pairs of every test set together, and each
    set's accuracy: the headline of a reward model (``eval/summary.json``)."""
    counts: dict[str, list[int]] = {}  # "all" or a rating -> [correct, pairs]
    for r in results.values():
        for key, cell in [("all", r), *r["per_rating"].items()]:
            c = counts.setdefault(key, [0, 0])
            c[0] += round(cell["accuracy"] * cell["pairs"])
            c[1] += cell["pairs"]
    correct, pairs = counts.get("all", [0, 0])
    biased = [r for r in results.values() if "length_bias" in r]
    return {
        "accuracy": correct / max(1, pairs), "pairs": pairs,
        "per_rating": {k: {"accuracy": counts[k][0] / counts[k][1], "pairs": counts[k][1]}
                       for k in (*RATINGS, "unlabelled") if k in counts},
        "test_sets": {name: r["accuracy"] for name, r in results.items()},
        **({"length_bias": _pooled_length_bias(biased)} if biased else {}),
    }


def _pooled_length_bias(results: list[dict]) -> dict[str, float | None]:
    """Each test set's ``length_bias``, averaged weighted by its pairs (for ``longer_wins`` this
    is the pooled accuracy)."""
    out = {}
    for key in ("reward_length_correlation", "longer_wins"):
        cells = [(r["length_bias"][key], r["pairs"]) for r in results if r["length_bias"][key] is not None]
        weight = sum(n for _, n in cells)
        out[key] = sum(v * n for v, n in cells) / weight if weight else None
    return out


def write_eval(results: dict[str, dict], out_dir: Path, gate: dict[str, Any] | None = None) -> Path:
    """``metrics.json`` ({test set: results}), ``summary.json`` (``pooled``, and the calibrated
    ``gate`` when given), ``report.md``, plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = {**pooled(results), **({"gate": gate} if gate is not None else {})}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(results, gate))
    plot(results, out_dir)
    return out_dir


def run_eval_rm(
    model_dir: str, data: str, format: str = "auto", threshold: float = 0.15, max_pairs: int | None = None,
    out_dir: str | None = None, gate_recall: float = 0.55,
) -> dict[str, Any]:
    """Evaluate the reward model in ``model_dir`` (a reward_model stage dir or a HF classifier)
    on the preference file ``data``: ``{test set name: results}``, the shape of the stage's
    ``eval/metrics.json`` (with safety labels, ``gate``: the safety gate calibrated at
    ``gate_recall`` on this file). Rows the data layer rejects are left out and counted
    (``skipped_rows``). ``max_pairs`` evaluates the first pairs only; ``out_dir`` also writes
    the report there."""
    from reward_model.model import load_reward_model

    source = SourceConfig(path=Path(data), format=format)
    loaded = load_source(source, "preference")
    rm = load_reward_model(model_dir)
    results, gate = evaluate_sets(rm, {source.name: loaded.records[:max_pairs]}, threshold, gate_recall)
    results[source.name]["skipped_rows"] = loaded.bad_rows
    if out_dir is not None:
        write_eval(results, Path(out_dir), gate)
    return results
