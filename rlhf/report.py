"""The progress report of a pipeline or a run of rounds: ``report/README.md``, PNG plots and
``report/summary.json`` (keys documented in the README's "Reading the report").

It only reads what the stages wrote: reward models' ``eval/summary.json`` (accuracy, length
bias), the evaluate stage's ``eval/summary.json`` (policies' rewards, win rates, response
lengths, KL, gold and judge scores), rejection sampling's ``report/summary.json`` (best of k,
the judge's score of the chosen sample) and PPO's ``metrics.jsonl`` (health per iteration,
proxy reward and judge score against KL, over-optimisation warnings) and manifest (the iteration
whose policy it kept). ``stage_summary`` gives the runner each stage's closing lines from the
same readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from rlhf.artifacts import read_manifest, stage_state, write_json_atomic

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# PPO's health per iteration (metrics.jsonl), plotted so that a collapse shows early.
PPO_HEALTH = ("kl", "entropy", "clip_fraction", "explained_variance", "response_length", "truncation_rate",
              "safety_scored", "advantage_mean", "advantage_std")
PPO_CURVES = ("reward_c", "judge", "eval_reward", "eval_judge")  # against KL from the start policy
HELD_OUT = ("eval_reward", "eval_judge")  # PPO's held-out metrics, of the kept and of the last iteration


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _round_dirs(root: Path) -> list[tuple[str, Path, list[str], str | None]]:
    """(label, pipeline dir, batch ids, the stage whose output is the round's policy) of each
    round; a plain pipeline is one round (without a round policy)."""
    if (root / "rounds").is_dir():
        found = []
        for path in sorted((root / "rounds").glob("[0-9][0-9][0-9]")):
            info = _read_json(path / "round.json") or {}
            found.append((f"round {path.name}", path, info.get("batches", []), info.get("policy")))
        return found
    return [(root.name, root, [], None)]


def _stages(round_dir: Path) -> list[tuple[str, Path, str]]:
    plan = yaml.safe_load((round_dir / "pipeline.yaml").read_text()) if (round_dir / "pipeline.yaml").exists() else None
    if plan:
        return [(s["name"], round_dir / s["name"], s["stage"]) for s in plan["stages"]]
    return []


def ppo_summary(stage_dir: Path) -> dict[str, Any]:
    """Per iteration (``iterations``): the PPO_HEALTH and PPO_CURVES metrics logged; the
    iterations at which the stage warned of over-optimisation (``diverging_at``); and the
    iteration whose policy it saved (``kept``, see ``kept_iteration``)."""
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    keys = ("step", *PPO_HEALTH, *PPO_CURVES)
    return {"iterations": [{k: r[k] for k in keys if k in r} for r in rows],
            "diverging_at": [r["step"] for r in rows if r.get("judge_diverging")],
            "kept": kept_iteration((read_manifest(stage_dir) or {}).get("metrics") or {})}


def kept_iteration(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Which PPO iteration's policy is the stage's ``model/``, from the record in its manifest's
    ``metrics`` (``rlhf.ppo.stage.final_metrics``; None without one): ``iteration`` (0 is the
    start policy), ``of`` (the last iteration run), ``by`` (``reward``, ``judge`` or ``last``),
    ``min_se`` (the standard errors a new best had to gain by; 0: any gain),
    and the held-out ``eval_reward`` / ``eval_judge`` of the kept and (``last``) of the last
    iteration."""
    if "kept_iteration" not in metrics:
        return None
    kept, of = metrics["kept_iteration"], metrics["last_iteration"]
    last = metrics if kept == of else {key: metrics.get(f"last_{key}") for key in HELD_OUT}
    return {"iteration": kept, "of": of, "by": metrics["kept_by"], "min_se": metrics.get("kept_min_se", 0.0),
            **{key: metrics.get(key) for key in HELD_OUT},
            "last": {key: last.get(key) for key in HELD_OUT}}


def rs_summary(stage_dir: Path) -> dict[str, Any]:
    """Per prompt category: the reward R_c of one sample and the best of K (max, median), the
    judge's score of one sample, of the one the reward models chose among K and of its own best of
    K, and how often R_c orders two samples as the judge does (``judge_agreement``)."""
    report = _read_json(stage_dir / "report" / "summary.json") or {}
    return {name: {"prompts": c["prompts"], "K": len(c["max"]), "reward_1": c["max"][0], "max_K": c["max"][-1],
                   "median_K": c["median"][-1], "judge_1": c.get("judge_mean"),
                   "judge_chosen_K": (c.get("judge_of_chosen") or [None])[-1], "judge_best_K": c.get("judge_best"),
                   "judge_agreement": c.get("judge_agreement")}
            for name, c in report.get("best_of_k", {}).items()}


def rm_summary(stage_dir: Path) -> dict[str, Any] | None:
    """A reward model's held-out accuracy, overall, per rating and per test set, and its length bias."""
    evaluation = _read_json(stage_dir / "eval" / "summary.json")
    if not evaluation:
        return None
    return {"accuracy": evaluation.get("accuracy"), "per_rating": evaluation.get("per_rating", {}),
            "pairs": evaluation.get("pairs"), "length_bias": evaluation.get("length_bias", {}),
            "test_sets": evaluation.get("test_sets", {})}


def round_summary(label: str, round_dir: Path, batches: list[str], policy: str | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = {"round": label, "dir": str(round_dir), "batches": batches, "policy": policy,
                               "stages": {}, "reward_models": {}, "policies": {}, "ppo": {}, "rejection_sampling": {}}
    for name, stage_dir, kind in _stages(round_dir):
        manifest = read_manifest(stage_dir) or {}
        summary["stages"][name] = {"stage": kind, "state": stage_state(stage_dir), "metrics": manifest.get("metrics", {})}
        if summary["stages"][name]["state"] != "complete":
            continue
        if kind == "reward_model" and (rm := rm_summary(stage_dir)):
            summary["reward_models"][name] = rm
        elif kind == "ppo":
            summary["ppo"][name] = ppo_summary(stage_dir)
        elif kind == "rejection_sampling":
            summary["rejection_sampling"][name] = rs_summary(stage_dir)
        elif kind == "evaluate" and (evaluation := _read_json(stage_dir / "eval" / "summary.json")):
            summary["policies"] = evaluation["policies"]
            summary["baseline"] = evaluation.get("baseline")
    return summary


def collect(root: Path) -> dict[str, Any]:
    rounds = [round_summary(*r) for r in _round_dirs(Path(root))]
    return {"run": str(root), "rounds": rounds, "progress": progress(rounds)}


PROGRESS_KEYS = ("combined_reward", "judge_score")  # with the gold scores, per round


def progress(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: its policy's scores on the held-out prompts (the proxy ``R_c`` under
    that round's reward models, the judge, the gold judge), after a row for the policy round 1
    started from (its evaluate stage's ``previous``). Rounds without a policy (a plain
    pipeline) or not yet evaluated give none."""
    rows = []
    for i, rnd in enumerate(rounds):
        if i == 0 and "previous" in rnd["policies"]:
            rows.append(_progress_row("start", "previous", rnd["policies"]["previous"]))
        if rnd.get("policy") in rnd["policies"]:
            rows.append(_progress_row(rnd["round"], rnd["policy"], rnd["policies"][rnd["policy"]]))
    return rows


def _progress_row(label: str, policy: str, scores: dict[str, Any]) -> dict[str, Any]:
    return {"round": label, "policy": policy, **{k: scores.get(k) for k in PROGRESS_KEYS},
            "gold": scores.get("gold"), "gold_sampled": scores.get("gold_sampled")}


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
              ("judge_1", "judge of 1"), ("judge_chosen_K", "judge of chosen of K"),
              ("judge_best_K", "judge's own best of K"), ("judge_agreement", "R_c-judge agreement")]
GOLD_COLUMNS = [("helpfulness", "gold helpfulness"), ("safety", "gold safety"), ("false_refusal", "false refusals")]
SAMPLED_GOLD_COLUMNS = [(key, f"sampled {name.removeprefix('gold ')}") for key, name in GOLD_COLUMNS]


def _test_set_lines(reward_models: dict[str, dict]) -> list[str]:
    """Each reward model's accuracy per held-out or test set, where it has several: a set of
    comparisons of the policy's own answers (a preferences stage's pairs) shows how well the
    reward model ranks what the policy actually says."""
    rows = [[name, test_set, accuracy] for name, rm in reward_models.items() if len(rm.get("test_sets") or {}) > 1
            for test_set, accuracy in rm["test_sets"].items()]
    if not rows:
        return []
    return ["Reward-model accuracy per held-out set (a source of comparisons of the policy's own answers "
            "shows how well it ranks what the policy says):", "", *_table(["reward model", "set", "accuracy"], rows), ""]


def markdown(summary: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# Progress report: {summary['run']}", ""] + _progress_lines(summary.get("progress", []))
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
            lines += _test_set_lines(rnd["reward_models"])
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
            lines += _table(header, rows) + [""] + _by_task_lines(rnd["policies"])
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _by_task_lines(policies: dict[str, dict[str, Any]]) -> list[str]:
    """Gold helpfulness per helpful task, a row per policy (greedy answers)."""
    by_task = {name: (p.get("gold") or {}).get("by_task") or {} for name, p in policies.items()}
    tasks = list(dict.fromkeys(t for scores in by_task.values() for t in scores))
    if not tasks:
        return []
    rows = [[name, *(scores.get(t) for t in tasks)] for name, scores in by_task.items()]
    return ["Gold helpfulness by task (greedy answers):", ""] + _table(["policy", *tasks], rows) + [""]


def _progress_lines(rows: list[dict[str, Any]]) -> list[str]:
    if len(rows) < 2:
        return []
    header = ["round", "policy", "R_c (its round's RMs)", "judge", *(h for _, h in GOLD_COLUMNS), "sampled helpfulness"]
    table = [[r["round"], r["policy"], *(r[k] for k in PROGRESS_KEYS), *((r["gold"] or {}).get(k) for k, _ in GOLD_COLUMNS),
              (r["gold_sampled"] or {}).get("helpfulness")] for r in rows]
    return ["## Progress over rounds", "", "Each round's policy on the held-out prompts (the judge and the gold "
            "judge score every round alike; R_c is under that round's own reward models):", ""] + _table(header, table) + [""]


def _training_lines(rnd: dict[str, Any]) -> list[str]:
    """Rejection sampling's best of K beside the judge; PPO's over-optimisation warnings."""
    lines = []
    for name, cats in rnd.get("rejection_sampling", {}).items():
        lines += [f"{name}: reward of one sample and of the best of K, and the judge's score of the sample the "
                  "reward models chose (proxy up, judge flat: the reward models are being gamed), beside the judge's "
                  "own best of K (the ceiling) and how often R_c orders two samples of a prompt as the judge does "
                  "(0.5: blind there):", ""]
        lines += _table(["category", *(h for _, h in RS_COLUMNS)], [[c, *(v.get(k) for k, _ in RS_COLUMNS)]
                                                                     for c, v in cats.items()]) + [""]
    for name, ppo in rnd.get("ppo", {}).items():
        lines += _kept_lines(name, ppo.get("kept"))
        if ppo["diverging_at"]:
            lines += [f"**Warning ({name})**: the proxy reward rose while the judge's score fell for several "
                      f"evaluations in a row (at iterations {', '.join(map(str, ppo['diverging_at']))}): "
                      "over-optimisation of the reward models.", ""]
    return lines


KEPT_BY = {"reward": "held-out reward R_c", "judge": "held-out judge score"}


def kept_sentence(kept: dict[str, Any]) -> str:
    """Which iteration's policy PPO kept, and why."""
    if kept["by"] == "last":
        return f"kept the last iteration, {kept['iteration']} (no early_stop.data: nothing held out to choose by)"
    if kept["iteration"] == 0:
        margin = f" by more than {kept['min_se']:g} standard errors" if kept.get("min_se") else ""
        return (f"kept iteration 0 of {kept['of']}: the start policy, as no iteration beat its "
                f"{KEPT_BY[kept['by']]}{margin}")
    return f"kept iteration {kept['iteration']} of {kept['of']}, the best {KEPT_BY[kept['by']]}"


def _kept_lines(name: str, kept: dict[str, Any] | None) -> list[str]:
    """The PPO iteration whose policy is the stage's model (and the evaluation's), with its
    held-out metrics beside the last iteration's."""
    if kept is None:
        return []
    after = "" if kept["by"] == "last" or kept["iteration"] == kept["of"] else ", not the last one's"
    lines = [f"{name}: {kept_sentence(kept)}; its model/ is that iteration's policy{after}.", ""]
    if kept["by"] == "last":
        return lines
    rows = [["kept", kept["iteration"], kept["eval_reward"], kept["eval_judge"]]]
    if kept["of"] != kept["iteration"]:
        rows.append(["last (not kept)", kept["of"], kept["last"]["eval_reward"], kept["last"]["eval_judge"]])
    return lines + _table(["policy", "iteration", "held-out R_c", "held-out judge"], rows) + [""]


# ---------------------------------------------------------------------------------------------
# The closing lines the runner prints after each stage


def stage_summary(stage_dir: Path, kind: str) -> list[str]:
    """What a finished stage achieved, in a line or a few, from what it wrote (the readers of
    the report): a reward model's accuracy per rating, rejection sampling's gain of the best of
    K over one sample, PPO's kept iteration, the evaluation's line per policy; else the final
    training loss, if any."""
    lines = {"reward_model": _rm_closing, "rejection_sampling": _rs_closing, "ppo": _ppo_closing,
             "evaluate": _evaluate_closing}.get(kind, lambda _: [])(Path(stage_dir))
    metrics = (read_manifest(stage_dir) or {}).get("metrics", {})
    if not lines and "loss" in metrics:
        lines = [f"done: final loss {metrics['loss']:.4g} after {metrics.get('steps')} steps"]
    return lines


def _rm_closing(stage_dir: Path) -> list[str]:
    rm = rm_summary(stage_dir)
    if not rm:
        return []
    ratings = ", ".join(f"{r} {_fmt(v.get('accuracy'))}" for r, v in rm["per_rating"].items() if r in RATINGS)
    metrics = (read_manifest(stage_dir) or {}).get("metrics", {})
    gate = (f"; calibrated gate_threshold {metrics['gate_threshold']:.4g} (recall {_fmt(metrics.get('gate_recall'))}, "
            f"precision {_fmt(metrics.get('gate_precision'))})") if metrics.get("gate_threshold") is not None else ""
    return [f"done: held-out accuracy {_fmt(rm['accuracy'])} on {rm['pairs']} pairs"
            + (f"; by rating: {ratings}" if ratings else "") + gate]


def _rs_closing(stage_dir: Path) -> list[str]:
    rs = rs_summary(stage_dir).get("all")
    if not rs:
        return []
    line = (f"done: R_c of the best of {rs['K']} samples {_fmt(rs['max_K'])} vs one sample {_fmt(rs['reward_1'])} "
            f"({rs['max_K'] - rs['reward_1']:+.3f})")
    if rs["judge_1"] is not None:
        line += f"; judge of the chosen sample {_fmt(rs['judge_chosen_K'])} vs one sample {_fmt(rs['judge_1'])}"
    if rs["judge_best_K"] is not None:
        line += f" and its own best {_fmt(rs['judge_best_K'])}; R_c-judge agreement {_fmt(rs['judge_agreement'])}"
    return [line]


def _ppo_closing(stage_dir: Path) -> list[str]:
    kept = ppo_summary(stage_dir)["kept"]
    if not kept:
        return []
    scores = ", ".join(f"{label} {_fmt(kept[key])}" for key, label in (("eval_reward", "held-out R_c"), ("eval_judge", "judge"))
                       if kept.get(key) is not None)
    return [f"done: {kept_sentence(kept)}" + (f" ({scores})" if scores else "")]


EVALUATE_LINE = ("combined_reward", "win_rate_vs_baseline", "kl_from_baseline", "response_length", "judge_score")


def _evaluate_closing(stage_dir: Path) -> list[str]:
    evaluation = _read_json(stage_dir / "eval" / "summary.json")
    if not evaluation:
        return []
    labels = dict(POLICY_COLUMNS)
    return [f"done: {evaluation.get('prompts')} held-out prompts, baseline {evaluation.get('baseline')}"] + [
        f"{name}: " + ", ".join(f"{labels[key]} {_fmt(p[key])}" for key in EVALUATE_LINE if p.get(key) is not None)
        for name, p in evaluation["policies"].items()]


# ---------------------------------------------------------------------------------------------
# Plots


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # with the 10 default colours: 40 distinct points


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_outside(ax, **options: Any) -> None:
    """The legend to the right of the axes, where it covers no point (``save_figure`` keeps it
    in the image)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **options)


def save_figure(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return str(path)


def rm_accuracy_figure(reward_models: dict[str, dict]):
    """Accuracy per rating, a bar per reward model."""
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    width = 0.8 / len(reward_models)
    for i, (name, rm) in enumerate(reward_models.items()):
        acc = [rm["per_rating"].get(r, {}).get("accuracy") or 0 for r in RATINGS]
        ax.bar([x + i * width for x in range(len(RATINGS))], acc, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(RATINGS))], [r.replace("_", "\n") for r in RATINGS])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.set_title("Reward models by rating")
    legend_outside(ax)
    return fig


def win_rates_figure(policies: list[tuple[str, dict]]):
    """Each policy's helpfulness and harmlessness win rates against the baseline (Fig. 11): a
    hollow marker of its own per policy, named in the legend (labels beside the points overlap,
    and the baseline itself sits at 0.5, 0.5 with whatever matches it)."""
    points = [(label, p.get("helpfulness_win_rate_vs_baseline"), p.get("safety_win_rate_vs_baseline"))
              for label, p in policies]
    points = [(label, x, y) for label, x, y in points if x is not None and y is not None]
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 5))
    for i, (label, x, y) in enumerate(points):
        ax.scatter(x, y, s=60, marker=MARKERS[i % len(MARKERS)], facecolors="none", edgecolors=f"C{i % 10}",
                   linewidths=1.5, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--"), ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("helpfulness win rate vs baseline (helpfulness RM)")
    ax.set_ylabel("harmlessness win rate vs baseline (safety RM)")
    ax.set_xlim(*_around_half([x for _, x, _ in points])), ax.set_ylim(*_around_half([y for _, _, y in points]))
    ax.set_title("Win rates (Fig. 11)")
    legend_outside(ax, title="policy", title_fontsize=7)
    return fig


def _around_half(values: list[float]) -> tuple[float, float]:
    """Axis limits that hold ``values`` and 0.5 (the baseline's own rate) with a margin, within
    [0, 1]: close policies get the room to stand apart."""
    low, high = min(*values, 0.5), max(*values, 0.5)
    pad = max(0.05, 0.1 * (high - low))
    return max(0.0, low - pad), min(1.0, high + pad)


def gold_figure(policies: list[tuple[str, dict]]):
    """The gold judge's scores, a row per policy (top to bottom in order, so the names never
    overlap); greedy answers solid, sampled ones dashed and hollow a little below them (equal
    scores stay visible)."""
    if not any(p.get("gold") for _, p in policies):
        return None
    fig, ax = pyplot().subplots(figsize=(8, max(2.5, 1.3 + 0.45 * len(policies))))
    rows = list(range(len(policies)))
    for (key, name), color in zip(GOLD_COLUMNS, ("C0", "C1", "C2")):
        for gold, style, fill, shift, label in (("gold", "o-", color, -0.12, name),
                                                ("gold_sampled", "s--", "none", 0.12, f"{name} (sampled)")):
            values = [(p.get(gold) or {}).get(key) for _, p in policies]
            if any(v is not None for v in values):
                ax.plot([math.nan if v is None else v for v in values], [r + shift for r in rows], style,
                        color=color, mfc=fill, label=label)
    ax.set_yticks(rows, [label for label, _ in policies], fontsize=7)
    ax.set_ylim(len(policies) - 0.5, -0.5)  # the first policy on top
    ax.set_xlim(0, 1), ax.set_xlabel("share of held-out prompts"), ax.set_title("Gold judge on held-out prompts")
    legend_outside(ax)
    return fig


def progress_figure(rows: list[dict[str, Any]]):
    """Gold helpfulness, gold safety and the judge of each round's policy (solid; the scores
    every round shares) beside the proxy R_c (dashed: each round under its own reward models)."""
    if len(rows) < 2:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4))
    x = list(range(len(rows)))
    curves = [("gold helpfulness", [(r["gold"] or {}).get("helpfulness") for r in rows], "o-"),
              ("gold safety", [(r["gold"] or {}).get("safety") for r in rows], "s-"),
              ("judge", [r["judge_score"] for r in rows], "^-"),
              ("R_c (proxy)", [r["combined_reward"] for r in rows], "v--")]
    for label, values, style in curves:
        if any(v is not None for v in values):
            ax.plot(x, [math.nan if v is None else v for v in values], style, label=label)
    ax.set_xticks(x, [r["round"] for r in rows], fontsize=7)
    ax.set_ylabel("score on held-out prompts"), ax.set_title("Progress over rounds (judge beside proxy)")
    legend_outside(ax)
    return fig


def ppo_figures(rows: list[dict], kept: dict[str, Any] | None) -> dict[str, Any]:
    """``health``: PPO_HEALTH per iteration; ``overoptimization``: the proxy reward and the
    judge's score against the KL from the start policy. The kept iteration is marked."""
    rows = [r if "kl" in r or r["step"] else {"kl": 0.0, **r} for r in rows]  # step 0: the start policy
    rows = [r for r in rows if "kl" in r]
    if not rows:
        return {}
    plt, mark = pyplot(), kept["iteration"] if kept else None
    fig, axes = plt.subplots(3, 3, figsize=(10, 7), sharex=True)
    for ax, key in zip(axes.flat, PPO_HEALTH):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), "-o", ms=2)
        if mark is not None:
            ax.axvline(mark, color="grey", lw=0.8, ls=":")
        ax.set_title(key, fontsize=8), ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # an offset ("+6.855") would sit on the title
    fig.supxlabel("iteration" + (f" (dotted: iteration {mark}, the kept policy)" if mark is not None else ""))
    figures = {"health": fig}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in zip(PPO_CURVES, ("o", "s", "^", "v")):  # points: the sampled KL need not grow steadily
        points = [(r["kl"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, ms=4, label=key, alpha=0.8)
    kept_points = [(r["kl"], r[key]) for r in rows if r["step"] == mark for key in ("eval_reward", "eval_judge") if key in r]
    if kept_points:
        ax.scatter(*zip(*kept_points), s=140, facecolors="none", edgecolors="black", label=f"kept (iteration {mark})")
    ax.set_xlabel("KL from the start policy (nats per response)"), ax.set_ylabel("score")
    ax.set_title("Proxy reward and judge vs KL (Gao et al. 2022, Fig. 1)", fontsize=10)
    legend_outside(ax)
    figures["overoptimization"] = fig
    return figures


def _plots(summary: dict[str, Any], out: Path) -> list[str]:
    latest = summary["rounds"][-1] if summary["rounds"] else None
    policies = [(f"{r['round']}: {name}", p) for r in summary["rounds"] for name, p in r["policies"].items()]
    figures = {"rm_accuracy": rm_accuracy_figure(latest["reward_models"]) if latest and latest["reward_models"] else None,
               "win_rates": win_rates_figure(policies), "gold": gold_figure(policies),
               "rounds": progress_figure(summary.get("progress", []))}
    for rnd in summary["rounds"]:
        for name, ppo in rnd.get("ppo", {}).items():
            prefix = f"{rnd['round']}_{name}".replace(" ", "_")
            figures.update({f"{prefix}_{kind}": fig for kind, fig in ppo_figures(ppo["iterations"], ppo.get("kept")).items()})
    return [save_figure(fig, out / f"{stem}.png") for stem, fig in figures.items() if fig is not None]


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
