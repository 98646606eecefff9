"""The evaluate stage: policies compared on held-out prompts (Llama 2, Sec. 3.4).

For every policy: its answers (greedy by default, ``sampling``) scored by both reward models and combined by the safety
gate; win rates against the baseline and against the policy before it under these (the latest)
reward models, overall (R_c), on helpfulness prompts (R_h) and on safety prompts (R_s), the
Fig. 11 axes; the KL from the baseline, estimated on sampled responses; and, when the prompts
carry a gold judge's task info (the quickstart world), gold helpfulness, safety and false
refusals of the greedy answers and of ``gold_samples`` sampled answers per prompt; with a
``judge`` (not the reward models above), its mean score of the answers and its win rate against
the baseline. Writes
``eval/summary.json`` (read by the report) and ``eval/responses.jsonl``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from reward_model.model import load_judge, load_reward_model
from rlhf.artifacts import StageRun
from rlhf.data import Prompt, render_prompt, write_jsonl_rows
from rlhf.data.load import load_data
from rlhf.evaluate.config import EvaluateConfig
from rlhf.generation import row_seed, sample
from rlhf.logprobs import PackedPolicy, per_token, policy_logprobs
from rlhf.models import default_device, load_policy
from rlhf.progress import Progress
from rlhf.rewards import resolve_gate_threshold, safety_gate
from rlhf.world.gold import sampled_gold
from rlhf.world.judge import has_gold, summarize


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Share of prompts where ``a`` scores above ``b``, ties counting half; None if empty."""
    if a.numel() == 0:
        return None
    return float((a > b).float().mean() + 0.5 * (a == b).float().mean())


def _responses(path: Path, prompts: list[Prompt], cfg: EvaluateConfig, baseline, device) -> dict[str, Any]:
    """The policy's answers, and the KL from the baseline on sampled ones (sum over tokens, mean
    over prompts, k1 estimator: log pi - log pi_0 of the sampled tokens)."""
    model, tokenizer = load_policy(path, device)
    prompt_ids = [render_prompt(p.messages, tokenizer, cfg.prompts.template) for p in prompts]
    seeds = [row_seed(cfg.seed, i) for i in range(len(prompts))]
    s = cfg.sampling
    generate = partial(sample, model, tokenizer, prompt_ids, seeds, s.max_new_tokens, top_p=s.top_p, batch_size=s.batch_size)
    answers, sampled = generate(temperature=s.temperature), generate(temperature=cfg.kl_temperature, top_p=1.0)
    responses = [r or [tokenizer.eos_token_id] for r in sampled.response_ids]
    logprob = partial(per_token, prompt_ids=prompt_ids, response_ids=responses, tokens=8192, device=device)
    with torch.no_grad():
        kl = logprob(partial(policy_logprobs, PackedPolicy(model), temperature=cfg.kl_temperature))
        kl -= logprob(partial(policy_logprobs, PackedPolicy(baseline), temperature=cfg.kl_temperature))
        gold, gold_sampled = _gold(model, tokenizer, prompts, prompt_ids, answers.texts, cfg)
    lengths = [len(r) for r in answers.response_ids]
    return {"texts": answers.texts, "finished": answers.finished, "lengths": lengths, "kl": float(kl.sum(-1).mean()),
            "gold": gold, "gold_sampled": gold_sampled}


def _gold(model, tokenizer, prompts: list[Prompt], prompt_ids, texts: list[str], cfg: EvaluateConfig) -> tuple:
    """The gold judge's scores of the answers and of ``gold_samples`` sampled answers per
    prompt (None, None without a gold judge)."""
    if cfg.gold == "off" or (cfg.gold == "auto" and not has_gold(prompts)):
        return None, None
    sampled = (sampled_gold(model, tokenizer, prompts, prompt_ids, cfg.gold_samples, cfg.gold_temperature,
                            cfg.sampling.max_new_tokens, cfg.seed, cfg.sampling.batch_size) if cfg.gold_samples else None)
    return summarize(prompts, texts), sampled


def _scores(prompts: list[Prompt], answers: dict, rms: dict, threshold: float, judge=None) -> dict[str, torch.Tensor]:
    """Both rewards and R_c of ``answers`` (``_responses``): a truncated answer is read without
    the EOS it never generated; and the ``judge``'s scores when there is one."""
    messages, texts, finished = [p.messages for p in prompts], answers["texts"], answers["finished"]
    help_ = rms["helpfulness"].probabilities(messages, texts, finished=finished)
    safe = rms["safety"].probabilities(messages, texts, finished=finished)
    is_safety = torch.tensor([p.is_safety for p in prompts])
    gated = safety_gate(help_, safe, is_safety, threshold)
    judged = {"judge": torch.tensor(judge(prompts, texts), dtype=torch.float)} if judge else {}
    return {"helpfulness": help_, "safety": safe, "combined": gated.reward, "is_safety": is_safety, **judged}


def _compare(mine: dict, other: dict) -> dict[str, float | None]:
    safety = mine["is_safety"]
    return {
        "overall": win_rate(mine["combined"], other["combined"]),
        "helpfulness": win_rate(mine["helpfulness"][~safety], other["helpfulness"][~safety]),
        "safety": win_rate(mine["safety"][safety], other["safety"][safety]),
        **({"judge": win_rate(mine["judge"], other["judge"])} if "judge" in mine else {}),
    }


def run(cfg: EvaluateConfig) -> Path:
    stage = StageRun(cfg).start()
    threshold = resolve_gate_threshold(cfg.gate_threshold, cfg.safety_rm_from)
    device = default_device()
    prompts = load_data(cfg.prompts, "prompts", cfg.seed).records[: cfg.max_prompts]
    rms = {"helpfulness": load_reward_model(cfg.helpfulness_rm_from, device),
           "safety": load_reward_model(cfg.safety_rm_from, device)}
    judge = load_judge(cfg.judge, device)
    baseline_path = cfg.baseline_from or next(iter(cfg.policies.values()))
    baseline, _ = load_policy(baseline_path, device)
    progress = Progress(len(cfg.policies), "evaluate policies")
    results: dict[str, dict] = {}
    for name, path in cfg.policies.items():
        out = _responses(path, prompts, cfg, baseline, device)
        results[name] = {**out, "scores": _scores(prompts, out, rms, threshold, judge)}
        progress.update(1, policy=name)
    same = [name for name, path in cfg.policies.items() if Path(path) == Path(baseline_path)]
    if same:
        baseline_scores = results[same[0]]["scores"]
    else:
        answers = _responses(baseline_path, prompts, cfg, baseline, device)
        baseline_scores = _scores(prompts, answers, rms, threshold, judge)
    summary = {"baseline": str(baseline_path), "prompts": len(prompts), "gate_threshold": threshold, "policies": {}}
    previous = None
    for name, res in results.items():
        scores = res["scores"]
        vs_base = _compare(scores, baseline_scores)
        vs_prev = _compare(scores, results[previous]["scores"]) if previous else {}
        summary["policies"][name] = {
            "helpfulness_reward": float(scores["helpfulness"].mean()),
            "safety_reward": float(scores["safety"].mean()),
            "combined_reward": float(scores["combined"].mean()),
            "win_rate_vs_baseline": vs_base["overall"],
            "helpfulness_win_rate_vs_baseline": vs_base["helpfulness"],
            "safety_win_rate_vs_baseline": vs_base["safety"],
            "win_rate_vs_previous": vs_prev.get("overall"),
            "judge_score": float(scores["judge"].mean()) if "judge" in scores else None,
            "judge_win_rate_vs_baseline": vs_base.get("judge"),
            "kl_from_baseline": res["kl"],
            "response_length": sum(res["lengths"]) / max(1, len(res["lengths"])),
            "truncation_rate": 1 - sum(res["finished"]) / max(1, len(res["finished"])),
            "gold": res["gold"],
            "gold_sampled": res["gold_sampled"],
        }
        previous = name
    _write(stage.dir / "eval", summary, prompts, results)
    return stage.finish({name: {k: v for k, v in p.items() if not k.startswith("gold")} | (p["gold"] or {})
                         | {f"sampled_{k}": v for k, v in (p["gold_sampled"] or {}).items() if k != "n"}
                         for name, p in summary["policies"].items()} | {"gate_threshold": threshold})


def _write(out: Path, summary: dict, prompts: list[Prompt], results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt.messages[-1].content, "is_safety": prompt.is_safety}
        for name, res in results.items():
            row[name] = res["texts"][i]
            row[f"{name}_combined"] = round(float(res["scores"]["combined"][i]), 4)
        rows.append(row)
    write_jsonl_rows(out / "responses.jsonl", rows)
