"""The progress report of a pipeline or a run of rounds: ``report/README.md``, PNG plots and
``report/summary.json`` (keys documented in the README's "Reading the report").

It only reads what the stages wrote: reward models' ``eval/summary.json`` (accuracy, length
bias), the evaluate stage's ``eval/summary.json`` (policies' rewards, win rates, response
lengths, KL, gold and judge scores), rejection sampling's ``report/summary.json`` (best of k,
the judge's score of the chosen sample) and PPO's ``metrics.jsonl`` (health per iteration,
proxy reward and judge score against KL, over-optimisation warnings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf.artifacts import read_manifest, stage_state, write_json_atomic

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# PPO's health per iteration (metrics.jsonl), plotted so that a collapse shows early.
PPO_HEALTH = ("kl", "entropy", "clip_fraction", "explained_variance", "response_length", "truncation_rate",
              "safety_scored", "advantage_mean", "advantage_std")
PPO_CURVES = ("reward_c", "judge", "eval_reward", "eval_judge")  # against KL from the start policy


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _round_dirs(root: Path) -> list[tuple[str, Path, list[str]]]:
    """(label, pipeline dir, batch ids) of each round; a plain pipeline is one round."""
    if (root / "rounds").is_dir():
        found = []
        for path in sorted((root / "rounds").glob("[0-9][0-9][0-9]")):
            info = _read_json(path / "round.json") or {}
            found.append((f"round {path.name}", path, info.get("batches", [])))
        return found
    return [(root.name, root, [])]


def _stages(round_dir: Path) -> list[tuple[str, Path, str]]:
    plan = yaml.safe_load((round_dir / "pipeline.yaml").read_text()) if (round_dir / "pipeline.yaml").exists() else None
    if plan:
        return [(s["name"], round_dir / s["name"], s["stage"]) for s in plan["stages"]]
    return []


def ppo_summary(stage_dir: Path) -> dict[str, Any]:
    """Per iteration (``iterations``): the PPO_HEALTH and PPO_CURVES metrics logged; and the
    iterations at which the stage warned of over-optimisation (``judge_diverging``)."""
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    keys = ("step", *PPO_HEALTH, *PPO_CURVES)
    return {"iterations": [{k: r[k] for k in keys if k in r} for r in rows],
            "diverging_at": [r["step"] for r in rows if r.get("judge_diverging")]}


def rs_summary(stage_dir: Path) -> dict[str, Any]:
    """Per prompt category: the reward R_c of one sample and the best of K (max, median), and the
    judge's score of one sample and of the one the reward models chose among K."""
    report = _read_json(stage_dir / "report" / "summary.json") or {}
    return {name: {"prompts": c["prompts"], "reward_1": c["max"][0], "max_K": c["max"][-1], "median_K": c["median"][-1],
                   "judge_1": c.get("judge_mean"), "judge_chosen_K": (c.get("judge_of_chosen") or [None])[-1]}
            for name, c in report.get("best_of_k", {}).items()}


def round_summary(label: str, round_dir: Path, batches: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"round": label, "dir": str(round_dir), "batches": batches,
                               "stages": {}, "reward_models": {}, "policies": {}, "ppo": {}, "rejection_sampling": {}}
    for name, stage_dir, kind in _stages(round_dir):
        manifest = read_manifest(stage_dir) or {}
        summary["stages"][name] = {"stage": kind, "state": stage_state(stage_dir), "metrics": manifest.get("metrics", {})}
        if summary["stages"][name]["state"] != "complete":
            continue
        evaluation = _read_json(stage_dir / "eval" / "summary.json")
        if kind == "reward_model" and evaluation:
            summary["reward_models"][name] = {
                "accuracy": evaluation.get("accuracy"),
                "per_rating": evaluation.get("per_rating", {}),
                "pairs": evaluation.get("pairs"),
                "length_bias": evaluation.get("length_bias", {}),
            }
        elif kind == "ppo":
            summary["ppo"][name] = ppo_summary(stage_dir)
        elif kind == "rejection_sampling":
            summary["rejection_sampling"][name] = rs_summary(stage_dir)
        elif kind == "evaluate" and evaluation:
            summary["policies"] = evaluation["policies"]
            summary["baseline"] = evaluation.get("baseline")
    return summary


def collect(root: Path) -> dict[str, Any]:
    return {"run": str(root), "rounds": [round_summary(*r) for r in _round_dirs(Path(root))]}


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


POLICY_COLUMNS = [
    ("helpfulness_reward", "R_h"), ("safety_reward", "R_s"), ("combined_reward", "R_c"),
    ("win_rate_vs_baseline", "win vs baseline"), ("win_rate_vs_previous", "win vs previous"),
    ("response_length", "response length"), ("kl_from_baseline", "KL from baseline"),
    ("judge_score", "judge"), ("judge_win_rate_vs_baseline", "judge win vs baseline"),
]
RS_COLUMNS = [("prompts", "prompts"), ("reward_1", "R_c of 1"), ("max_K", "max of K"), ("median_K", "median of K"),
              ("judge_1", "judge of 1"), ("judge_chosen_K", "judge of chosen of K")]
GOLD_COLUMNS = [("helpfulness", "gold helpfulness"), ("safety", "gold safety"), ("false_refusal", "false refusals")]
SAMPLED_GOLD_COLUMNS = [(key, f"sampled {name.removeprefix('gold ')}") for key, name in GOLD_COLUMNS]


def markdown(summary: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# Progress report: {summary['run']}", ""]
    for rnd in summary["rounds"]:
        lines += [f"## {rnd['round']}", ""]
        if rnd["batches"]:
            lines += [f"Preference batches: {', '.join(rnd['batches'])}", ""]
        states = [[name, s["stage"], s["state"]] for name, s in rnd["stages"].items()]
        lines += _table(["stage", "kind", "state"], states) + [""]
        if rnd["reward_models"]:
            rows = [[name, rm["accuracy"], *(rm["per_rating"].get(r, {}).get("accuracy") for r in RATINGS),
                     *(rm.get("length_bias", {}).get(k) for k in ("reward_length_correlation", "longer_wins"))]
                    for name, rm in rnd["reward_models"].items()]
            lines += ["Reward-model accuracy on held-out pairs, per rating; length bias: the correlation of reward "
                      "with response length (words), and the accuracy of \"the longer answer wins\":", ""]
            lines += _table(["reward model", "overall", *RATINGS, "length corr", "longer wins"], rows) + [""]
        lines += _training_lines(rnd)
        if rnd["policies"]:
            gold = [(key, columns) for key, columns in (("gold", GOLD_COLUMNS), ("gold_sampled", SAMPLED_GOLD_COLUMNS))
                    if any(p.get(key) for p in rnd["policies"].values())]
            header = ["policy"] + [h for _, h in POLICY_COLUMNS] + [h for _, columns in gold for _, h in columns]
            rows = []
            for name, p in rnd["policies"].items():
                row = [name] + [p.get(k) for k, _ in POLICY_COLUMNS]
                row += [(p.get(key) or {}).get(k) for key, columns in gold for k, _ in columns]
                rows.append(row)
            lines += [f"Policies on held-out prompts (baseline: {rnd.get('baseline')}; rewards on the "
                      "probability scale under this round's reward models):", ""]
            lines += _table(header, rows) + [""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _training_lines(rnd: dict[str, Any]) -> list[str]:
    """Rejection sampling's best of K beside the judge; PPO's over-optimisation warnings."""
    lines = []
    for name, cats in rnd.get("rejection_sampling", {}).items():
        lines += [f"{name}: reward of one sample and of the best of K, and the judge's score of the sample the "
                  "reward models chose (proxy up, judge flat: the reward models are being gamed):", ""]
        lines += _table(["category", *(h for _, h in RS_COLUMNS)], [[c, *(v.get(k) for k, _ in RS_COLUMNS)]
                                                                     for c, v in cats.items()]) + [""]
    for name, ppo in rnd.get("ppo", {}).items():
        if ppo["diverging_at"]:
            lines += [f"**Warning ({name})**: the proxy reward rose while the judge's score fell for several "
                      f"evaluations in a row (at iterations {', '.join(map(str, ppo['diverging_at']))}): "
                      "over-optimisation of the reward models.", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Plots


def _plots(summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    latest = summary["rounds"][-1] if summary["rounds"] else None
    policies = [(f"{r['round']}: {name}", p) for r in summary["rounds"] for name, p in r["policies"].items()]
    if latest and latest["reward_models"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(latest["reward_models"])
        for i, (name, rm) in enumerate(latest["reward_models"].items()):
            acc = [rm["per_rating"].get(r, {}).get("accuracy") or 0 for r in RATINGS]
            ax.bar([x + i * width for x in range(len(RATINGS))], acc, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(RATINGS))], [r.replace("_", "\n") for r in RATINGS])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.legend(), ax.set_title("Reward models by rating")
        written.append(_save(fig, out / "rm_accuracy.png"))
    if any(p.get("win_rate_vs_baseline") is not None for _, p in policies):
        fig, ax = plt.subplots(figsize=(5, 5))
        for label, p in policies:
            x, y = p.get("helpfulness_win_rate_vs_baseline"), p.get("safety_win_rate_vs_baseline")
            if x is not None and y is not None:
                ax.scatter(x, y), ax.annotate(label, (x, y), fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--"), ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("helpfulness win rate vs baseline (helpfulness RM)")
        ax.set_ylabel("harmlessness win rate vs baseline (safety RM)")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.set_title("Win rates (Fig. 11)")
        written.append(_save(fig, out / "win_rates.png"))
    if any(p.get("gold") for _, p in policies):
        fig, ax = plt.subplots(figsize=(max(5, len(policies) * 1.2), 3.5))
        for (key, name), color in zip(GOLD_COLUMNS, ("C0", "C1", "C2")):
            for gold, style, label in (("gold", "o-", name), ("gold_sampled", "s--", f"{name} (sampled)")):
                values = [(p.get(gold) or {}).get(key) for _, p in policies]
                if any(v is not None for v in values):
                    ax.plot([lbl for lbl, _ in policies], values, style, color=color, label=label)
        ax.set_ylim(0, 1), ax.legend(fontsize=7), ax.set_title("Gold judge on held-out prompts")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        written.append(_save(fig, out / "gold.png"))
    for rnd in summary["rounds"]:
        for name, ppo in rnd.get("ppo", {}).items():
            written += _ppo_plots(plt, ppo["iterations"], out / f"{rnd['round']}_{name}".replace(" ", "_"))
    return written


def _ppo_plots(plt, rows: list[dict], prefix: Path) -> list[str]:
    """``<prefix>_health.png``: PPO_HEALTH per iteration; ``<prefix>_overoptimization.png``: the
    proxy reward and the judge's score against the KL from the start policy."""
    rows = [r if "kl" in r or r["step"] else {"kl": 0.0, **r} for r in rows]  # step 0: the start policy
    rows = [r for r in rows if "kl" in r]
    if not rows:
        return []
    fig, axes = plt.subplots(3, 3, figsize=(10, 7), sharex=True)
    for ax, key in zip(axes.flat, PPO_HEALTH):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), "-o", ms=2)
        ax.set_title(key, fontsize=8), ax.tick_params(labelsize=7)
    fig.supxlabel("iteration")
    written = [_save(fig, Path(f"{prefix}_health.png"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in zip(PPO_CURVES, ("o", "s", "^", "v")):  # points: the sampled KL need not grow steadily
        points = [(r["kl"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, ms=4, label=key, alpha=0.8)
    ax.set_xlabel("KL from the start policy (nats per response)"), ax.set_ylabel("score")
    ax.legend(fontsize=7), ax.set_title("Proxy reward and judge vs KL (Gao et al. 2022, Fig. 1)")
    return written + [_save(fig, Path(f"{prefix}_overoptimization.png"))]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def write_report(root: Path) -> Path:
    """Write ``root/report/``: README.md, summary.json and the plots. Returns the directory."""
    root = Path(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = collect(root)
    plots = _plots(summary, out)
    write_json_atomic(out / "summary.json", summary)
    (out / "README.md").write_text(markdown(summary, plots))
    print(f"[rlhf] report: {out / 'README.md'}")
    return out
