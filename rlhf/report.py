"""The progress report of a pipeline or a run of rounds: ``report/README.md``, PNG plots and
``report/summary.json`` (keys documented in the README's "Reading the report").

It only reads what the stages wrote: reward models' ``eval/summary.json`` and the evaluate
stage's ``eval/summary.json`` (policies' rewards, win rates, KL, gold scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf.artifacts import read_manifest, stage_state, write_json_atomic

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


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


def round_summary(label: str, round_dir: Path, batches: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"round": label, "dir": str(round_dir), "batches": batches,
                               "stages": {}, "reward_models": {}, "policies": {}}
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
            }
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
    ("kl_from_baseline", "KL from baseline"),
]
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
            rows = [[name, rm["accuracy"], *(rm["per_rating"].get(r, {}).get("accuracy") for r in RATINGS)]
                    for name, rm in rnd["reward_models"].items()]
            lines += ["Reward-model accuracy on held-out pairs, per rating:", ""]
            lines += _table(["reward model", "overall", *RATINGS], rows) + [""]
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
    return written


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
