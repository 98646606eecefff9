"""The progress report and the closing lines: PPO's kept iteration with its own metrics (not the
last iteration's), each stage's closing line, and plots whose labels and legends cover nothing."""

import json
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from rlhf.report import (
    gold_figure, markdown, ppo_figures, ppo_summary, progress_figure, pyplot, rm_accuracy_figure, round_summary, stage_summary,
    win_rates_figure, write_report,
)
from tiny import stage_dir

RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def pipeline_dir(root: Path, stages: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"stages": [{"name": n, "stage": s} for n, s in stages.items()]}))
    return root


def ppo_dir(path: Path, eval_rewards: list[float], kept: int | None = None, by: str = "reward", min_se: float = 0.0) -> Path:
    """A finished PPO stage: held-out evaluations ``eval_rewards`` at iterations 0, 1, ... (the
    judge 0.1 lower), rollout metrics from iteration 1 on; its manifest's metrics those the stage
    writes when it kept iteration ``kept`` by ``by`` (``rlhf.ppo.stage.final_metrics``)."""
    from rlhf.ppo.stage import EarlyStop, final_metrics

    stage_dir(path, "ppo")
    rows = [{"step": i, "eval_reward": r, "eval_judge": round(r - 0.1, 3),
             **({"kl": 0.1 * i, "reward_c": 0.3 + 0.01 * i, "entropy": 6.855 + 1e-4 * i} if i else {})}
            for i, r in enumerate(eval_rewards)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    unstepped = [{k: v for k, v in r.items() if k != "step"} for r in rows]
    early = EarlyStop() if kept is None else EarlyStop(best_iteration=kept, best_metrics=unstepped[kept])
    metrics = final_metrics(unstepped[-1], len(rows) - 1, early, by, min_se)
    (path / "manifest.json").write_text(json.dumps({"stage": "ppo", "status": "complete", "metrics": metrics}))
    return path


# ---------------------------------------------------------------------------------------------
# PPO: the kept iteration


def test_report_names_the_kept_ppo_iteration_and_shows_its_metrics(tmp_path):
    root = pipeline_dir(tmp_path / "run", {"ppo": "ppo"})
    ppo_dir(root / "ppo", [0.5, 0.6, 0.7, 0.55, 0.45], kept=2)
    readme = (write_report(root) / "README.md").read_text()
    assert "ppo: kept iteration 2 of 4, the best held-out reward R_c; its model/ is that iteration's policy, not the last one's." in readme
    assert "| kept | 2 | 0.700 | 0.600 |" in readme  # iteration 2's held-out R_c and judge
    assert "| last (not kept) | 4 | 0.450 | 0.350 |" in readme
    kept = json.loads((root / "report" / "summary.json").read_text())["rounds"][0]["ppo"]["ppo"]["kept"]
    assert kept == {"iteration": 2, "of": 4, "by": "reward", "min_se": 0.0, "eval_reward": 0.7, "eval_judge": 0.6,
                    "last": {"eval_reward": 0.45, "eval_judge": 0.35}}
    assert stage_summary(root / "ppo", "ppo") == [
        "done: kept iteration 2 of 4, the best held-out reward R_c (held-out R_c 0.700, judge 0.600)"]


def test_kept_start_policy_by_the_judge_and_the_last_without_held_out_prompts(tmp_path):
    judged = ppo_dir(tmp_path / "judged", [0.5, 0.4], kept=0, by="judge")
    assert stage_summary(judged, "ppo") == ["done: kept iteration 0 of 1: the start policy, as no iteration beat its "
                                            "held-out judge score (held-out R_c 0.500, judge 0.400)"]
    margin = ppo_dir(tmp_path / "margin", [0.5, 0.52], kept=0, min_se=2.0)
    assert stage_summary(margin, "ppo") == ["done: kept iteration 0 of 1: the start policy, as no iteration beat its "
                                            "held-out reward R_c by more than 2 standard errors (held-out R_c 0.500, "
                                            "judge 0.400)"]
    plain = stage_dir(tmp_path / "plain", "ppo")
    (plain / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "kl": 0.1, "reward_c": 0.3}) + "\n" for i in (1, 2, 3)))
    (plain / "manifest.json").write_text(json.dumps({"stage": "ppo", "status": "complete", "metrics": {
        "kept_iteration": 3, "kept_by": "last", "kl": 0.1, "reward_c": 0.3, "last_iteration": 3}}))
    assert stage_summary(plain, "ppo") == ["done: kept the last iteration, 3 (no early_stop.data: nothing held out to choose by)"]


def test_the_kept_iteration_is_read_from_the_manifest_not_the_logged_rows(tmp_path):
    path = stage_dir(tmp_path / "ppo", "ppo")  # train.log_every: 5; the best evaluation, at 7, was not logged
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "kl": 0.1, "eval_reward": 0.5}) + "\n" for i in (0, 5, 10)))
    (path / "manifest.json").write_text(json.dumps({"stage": "ppo", "status": "complete", "metrics": {
        "kept_iteration": 7, "kept_by": "reward", "eval_reward": 0.8, "kl": 0.2, "last_iteration": 10,
        "last_eval_reward": 0.5, "last_kl": 0.1}}))
    assert stage_summary(path, "ppo") == ["done: kept iteration 7 of 10, the best held-out reward R_c (held-out R_c 0.800)"]
    older = stage_dir(tmp_path / "older", "ppo")  # a manifest without the record: nothing is named, nothing guessed
    (older / "metrics.jsonl").write_text((path / "metrics.jsonl").read_text())
    assert ppo_summary(older)["kept"] is None and stage_summary(older, "ppo") == []


# ---------------------------------------------------------------------------------------------
# Closing lines


def test_closing_lines_of_a_reward_model_rejection_sampling_and_the_evaluation(tmp_path):
    rm = stage_dir(tmp_path / "rm", "reward_model")
    (rm / "eval").mkdir()
    (rm / "eval" / "summary.json").write_text(json.dumps({"accuracy": 0.75, "pairs": 40, "per_rating": {
        "significantly_better": {"accuracy": 0.9}, "better": {"accuracy": 0.8}, "slightly_better": {"accuracy": 0.6}}}))
    assert stage_summary(rm, "reward_model") == [
        "done: held-out accuracy 0.750 on 40 pairs; by rating: significantly_better 0.900, better 0.800, slightly_better 0.600"]
    manifest = json.loads((rm / "manifest.json").read_text())
    manifest["metrics"] = {"gate_threshold": 0.0073312, "gate_recall": 0.552, "gate_precision": 0.924}
    (rm / "manifest.json").write_text(json.dumps(manifest))
    assert stage_summary(rm, "reward_model")[0].endswith(
        "slightly_better 0.600; calibrated gate_threshold 0.007331 (recall 0.552, precision 0.924)")
    rs = stage_dir(tmp_path / "rs", "rejection_sampling")
    (rs / "report").mkdir()
    (rs / "report" / "summary.json").write_text(json.dumps({"best_of_k": {"all": {
        "prompts": 10, "max": [0.4, 0.5, 0.55], "median": [0.4, 0.4, 0.4], "judge_of_chosen": [0.3, 0.32, 0.35], "judge_mean": 0.3}}}))
    assert stage_summary(rs, "rejection_sampling") == [
        "done: R_c of the best of 3 samples 0.550 vs one sample 0.400 (+0.150); judge of the chosen sample 0.350 vs one sample 0.300"]
    (rs / "report" / "summary.json").write_text(json.dumps({"best_of_k": {"all": {
        "prompts": 10, "max": [0.4, 0.5, 0.55], "median": [0.4, 0.4, 0.4], "judge_of_chosen": [0.3, 0.32, 0.35], "judge_mean": 0.3,
        "judge_best": 0.6, "judge_agreement": 0.55}}}))
    assert stage_summary(rs, "rejection_sampling")[0].endswith(
        "judge of the chosen sample 0.350 vs one sample 0.300 and its own best 0.600; R_c-judge agreement 0.550")
    ev = stage_dir(tmp_path / "ev", "evaluate")
    (ev / "eval").mkdir()
    (ev / "eval" / "summary.json").write_text(json.dumps({"baseline": "runs/sft", "prompts": 8, "policies": {
        "sft": {"combined_reward": 0.4, "win_rate_vs_baseline": 0.5, "kl_from_baseline": 0.0},
        "ppo": {"combined_reward": 0.6, "win_rate_vs_baseline": 0.7, "kl_from_baseline": 1.5, "judge_score": 0.45}}}))
    assert stage_summary(ev, "evaluate") == [
        "done: 8 held-out prompts, baseline runs/sft",
        "sft: R_c 0.400, win vs baseline 0.500, KL from baseline 0.000",
        "ppo: R_c 0.600, win vs baseline 0.700, KL from baseline 1.500, judge 0.450"]
    assert stage_summary(stage_dir(tmp_path / "base", "base_model"), "base_model") == []


# ---------------------------------------------------------------------------------------------
# Plots: nothing drawn over anything


def drawn_texts(fig) -> list:
    """The texts a render of ``fig`` shows: tick labels only of ticks inside the axes' view
    (matplotlib keeps labels of ticks it does not draw)."""
    from matplotlib.text import Text

    ticks = [(axis, tick) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]]
    tick_labels = {id(label) for _, tick in ticks for label in (tick.label1, tick.label2)}
    texts = [t for t in fig.findobj(Text) if id(t) not in tick_labels]
    for axis, tick in ticks:
        low, high = sorted(axis.get_view_interval())
        if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
            texts += [tick.label1, tick.label2]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts (tick labels, titles, legend entries, annotations) whose boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


def legend_covers_axes(fig) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return any(ax.get_legend() is not None
               and ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
               for ax in fig.axes)


def crowded_policies() -> list[tuple[str, dict]]:
    """Three rounds of three policies, several at nearly the same win rates."""
    policies = []
    for r in range(1, 4):
        for i, name in enumerate(("sft", "rejection_sampling", "ppo")):
            gold = {"helpfulness": 0.5 + 0.02 * i, "safety": 0.9, "false_refusal": 0.1}
            policies.append((f"round {r:03d}: {name}", {"win_rate_vs_baseline": 0.5,
                "helpfulness_win_rate_vs_baseline": 0.5 + 0.01 * i + 0.01 * r, "safety_win_rate_vs_baseline": 0.5 + 0.01 * r,
                "gold": gold, "gold_sampled": {**gold, "helpfulness": 0.45}}))
    return policies


@pytest.mark.parametrize("figure", ["win_rates", "gold", "rm_accuracy", "ppo_health", "ppo_overoptimization", "rounds"])
def test_plots_keep_labels_apart_and_legends_off_the_points(tmp_path, figure):
    rows = [json.loads(line) for line in (ppo_dir(tmp_path / "ppo", [0.5, 0.6, 0.7, 0.55]) / "metrics.jsonl").read_text().splitlines()]
    reward_models = {name: {"per_rating": {r: {"accuracy": 0.95} for r in RATINGS}} for name in ("rm_helpfulness", "rm_safety")}
    build = {"win_rates": lambda: win_rates_figure(crowded_policies()), "gold": lambda: gold_figure(crowded_policies()),
             "rm_accuracy": lambda: rm_accuracy_figure(reward_models),
             "ppo_health": lambda: ppo_figures(rows, {"iteration": 2})["health"],
             "ppo_overoptimization": lambda: ppo_figures(rows, {"iteration": 2})["overoptimization"],
             "rounds": lambda: progress_figure([{"round": f"round {r:03d}", "judge_score": 0.7, "combined_reward": 0.5,
                                                 "gold": {"helpfulness": 0.7, "safety": 0.9}} for r in range(1, 7)])}
    fig = build[figure]()
    try:
        assert overlapping_texts(fig) == []
        assert not legend_covers_axes(fig)
    finally:
        pyplot().close(fig)


def test_every_policy_is_in_the_win_rate_legend_and_the_kept_iteration_is_marked(tmp_path):
    fig = win_rates_figure(crowded_policies())
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [label for label, _ in crowded_policies()]
    pyplot().close(fig)
    rows = [json.loads(line) for line in (ppo_dir(tmp_path / "ppo", [0.5, 0.6, 0.7]) / "metrics.jsonl").read_text().splitlines()]
    fig = ppo_figures(rows, {"iteration": 2})["overoptimization"]
    assert "kept (iteration 2)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    pyplot().close(fig)


def test_the_report_lists_the_ppo_kept_table_before_the_plots(tmp_path):
    root = pipeline_dir(tmp_path / "run", {"ppo": "ppo"})
    ppo_dir(root / "ppo", [0.5, 0.6], kept=1)
    text = markdown({"run": "r", "rounds": [round_summary("r", root, [])]}, ["r_ppo_health.png"])
    assert text.index("| kept | 1 |") < text.index("![r_ppo_health]")
    assert "last (not kept)" not in text  # the last iteration is the kept one


def test_best_of_k_legend_is_off_the_curves(tmp_path, monkeypatch):
    from rlhf.rejection_sampling import report as rs

    figs = []
    monkeypatch.setattr(rs, "save_figure", lambda fig, path: figs.append(fig))
    curves = {n: {"max": [.4, .5, .9], "median": [.4, .45, .5], "judge_of_chosen": [.3, .35, .4]}
              for n in ("all", "helpfulness", "safety")}
    rs.plot_curves(tmp_path / "b.png", curves, "t")
    assert overlapping_texts(figs[0]) == [] and not legend_covers_axes(figs[0])


# ---------------------------------------------------------------------------------------------
# Weekly rounds: progress per round


def round_dir(root: Path, number: int, policy: str, policies: dict[str, dict]) -> None:
    """A finished round ``number`` whose round policy is the stage ``policy`` and whose evaluate
    stage scored ``policies``."""
    path = pipeline_dir(root / "rounds" / f"{number:03d}", {"evaluate": "evaluate"})
    (path / "round.json").write_text(json.dumps({"batches": [f"{n:03d}" for n in range(1, number + 1)],
                                                 "status": "complete", "policy": policy}))
    stage_dir(path / "evaluate", "evaluate")
    (path / "evaluate" / "eval").mkdir()
    (path / "evaluate" / "eval" / "summary.json").write_text(json.dumps({"policies": policies, "baseline": "sft"}))


def scores(r_c: float, helpfulness: float, safety: float = 1.0) -> dict:
    return {"combined_reward": r_c, "judge_score": helpfulness - 0.1,
            "gold": {"helpfulness": helpfulness, "safety": safety, "false_refusal": 0.0}}


def test_the_report_shows_each_rounds_policy_after_the_start_policy(tmp_path):
    root = tmp_path / "weekly"
    round_dir(root, 1, "rejection_sampling", {"previous": scores(0.4, 0.70, 0.8), "rejection_sampling": scores(0.5, 0.72)})
    round_dir(root, 2, "rejection_sampling", {"previous": scores(0.6, 0.72), "rejection_sampling": scores(0.7, 0.75)})
    round_dir(root, 3, "ppo", {"previous": scores(0.6, 0.75), "rejection_sampling": scores(0.6, 0.76), "ppo": scores(0.65, 0.78)})
    out = write_report(root)
    progress = json.loads((out / "summary.json").read_text())["progress"]
    assert [(r["round"], r["policy"], r["gold"]["helpfulness"]) for r in progress] == [
        ("start", "previous", 0.70), ("round 001", "rejection_sampling", 0.72),
        ("round 002", "rejection_sampling", 0.75), ("round 003", "ppo", 0.78)]
    readme = (out / "README.md").read_text()
    assert "| round 003 | ppo | 0.650 | 0.680 | 0.780 | 1.000 | 0.000 | – |" in readme
    assert (out / "rounds.png").is_file()


def test_a_plain_pipeline_has_no_progress_over_rounds(tmp_path):
    root = pipeline_dir(tmp_path / "run", {"evaluate": "evaluate"})
    stage_dir(root / "evaluate", "evaluate")
    (root / "evaluate" / "eval").mkdir()
    (root / "evaluate" / "eval" / "summary.json").write_text(json.dumps({"policies": {"sft": scores(0.4, 0.7)}}))
    out = write_report(root)
    assert json.loads((out / "summary.json").read_text())["progress"] == []
    assert "Progress over rounds" not in (out / "README.md").read_text() and not (out / "rounds.png").exists()


def test_the_report_shows_gold_helpfulness_by_task_per_policy(tmp_path):
    root = pipeline_dir(tmp_path / "run", {"evaluate": "evaluate"})
    stage_dir(root / "evaluate", "evaluate")
    (root / "evaluate" / "eval").mkdir()
    sft, rs = scores(0.4, 0.7), scores(0.5, 0.75)
    sft["gold"]["by_task"], rs["gold"]["by_task"] = {"add": 0.5, "reverse": 0.9}, {"add": 1.0, "reverse": 0.5}
    (root / "evaluate" / "eval" / "summary.json").write_text(json.dumps({"policies": {"sft": sft, "rs": rs}}))
    readme = (write_report(root) / "README.md").read_text()
    assert "| policy | add | reverse |" in readme
    assert "| sft | 0.500 | 0.900 |" in readme and "| rs | 1.000 | 0.500 |" in readme


def test_the_report_shows_reward_model_accuracy_per_held_out_set(tmp_path):
    root = pipeline_dir(tmp_path / "run", {"rm_one": "reward_model", "rm_two": "reward_model"})
    for name, sets in (("rm_one", {"held_out.helpful": 0.8}),
                       ("rm_two", {"held_out.helpful": 0.82, "held_out.rs_answers": 0.466})):
        stage_dir(root / name, "reward_model")
        (root / name / "eval").mkdir()
        (root / name / "eval" / "summary.json").write_text(json.dumps({"accuracy": 0.8, "per_rating": {}, "test_sets": sets}))
    readme = (write_report(root) / "README.md").read_text()
    assert "| reward model | set | accuracy |" in readme
    assert "| rm_two | held_out.helpful | 0.820 |" in readme and "| rm_two | held_out.rs_answers | 0.466 |" in readme
    assert "| rm_one | held_out.helpful |" not in readme  # one set: the overall accuracy already says it

