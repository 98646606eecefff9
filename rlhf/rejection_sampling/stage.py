"""Rejection sampling fine-tuning with a best-so-far pool (Llama 2, Sec. 3.2.3).

1. sample K responses per prompt from the policy (``rlhf.generation``): prompts are cut into
   buckets of similar length; whole buckets go round-robin to the processes, and each bucket is
   written to ``samples/`` when done, so an interrupted run samples only the buckets left and the
   samples are the same whatever the process count;
2. score every response with both reward models and gate them (``rlhf.rewards.safety_gate``):
   R_c = R_s if the prompt is a safety prompt or R_s < threshold, else R_h (probabilities); a
   reward model that shares the policy's tokens reads the generated ids, another the texts
   (``reward_scoring`` in the manifest); a response cut at ``max_new_tokens`` (no EOS) is scored
   without an EOS and its R_c lowered by ``missing_eos_penalty`` (``rlhf.rewards.penalize_truncated``);
3. the pool (``pool``): the previous round's pool (``pool_from``), re-scored under the current reward models
   when they differ from the ones that scored it, keeps each prompt's best response so far; this
   round's best of K replaces an entry only if its R_c is higher; truncated samples are no
   candidates unless ``pool_truncated`` (the policy would learn to stop mid-sentence);
4. report (``report``): the expected max and median R_c of k samples out of the K, k = 1..K, averaged over
   prompts, per prompt category (Fig. 7); an optional temperature sweep (Fig. 8); what the round
   changed in the pool; with a ``judge``, its score of every sample and of the one the reward
   models chose, k = 1..K (over-optimisation: proxy max of k up, judge of the chosen flat or down);
5. fine-tune the policy (or ``student_from``: distillation) on the whole pool with SFT's rows and
   loss (loss on the sampled answer only), on the shared training loop.

Stage directory: ``samples/`` (bucket shards), ``samples.jsonl`` (every sample with its scores),
``pool.jsonl`` (the pool after this round), ``model/``, ``report/``, ``manifest.json``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from reward_model.model import load_judge, load_reward_model, sample_probabilities, scoring
from rlhf.artifacts import StageRun, model_dir, read_manifest
from rlhf.config import RecipeError
from rlhf.data import Prompt, load_data, write_jsonl_rows
from rlhf.models import inference_dtype, load_policy
from rlhf.prompt_sampling import Item, gather_dict, prepare_prompts, sample_all
from rlhf.rejection_sampling.pool import (
    POOL, entry_finished, entry_prompt, pool_entry, pool_examples, read_pool, scored_by, update_pool,
)
from rlhf.rejection_sampling.config import RejectionSamplingConfig
from rlhf.rejection_sampling.report import sample_truncation, write_report
from rlhf.rewards import penalize_truncated, resolve_gate_threshold, safety_gate
from rlhf.training import make_accelerator
from sft.stage import fine_tune_generated


# ---------------------------------------------------------------------------------------------
# 2. Scores (1., the samples, is ``rlhf.prompt_sampling``)


@dataclass
class RewardModels:
    helpfulness: torch.nn.Module
    safety: torch.nn.Module
    fingerprints: dict[str, str]  # which reward models scored: {"helpfulness": fp, "safety": fp}
    # how each reads generated samples (``reward_model.model.scoring``)
    scoring: dict[str, str] = field(default_factory=lambda: {"helpfulness": "text", "safety": "text"})


def score_pairs(accelerator, rms: RewardModels, prompts: Sequence[Prompt], responses: Sequence[str],
                threshold: float, finished: Sequence[bool] | None = None, penalty: float | None = None,
                ids: tuple[Sequence[list[int]], Sequence[list[int]]] | None = None) -> list[dict[str, Any]]:
    """R_h, R_s (probabilities), R_c and whether the gate chose R_s, per pair; a response not
    ``finished`` (default: all are) is scored without an EOS and its R_c lowered by ``penalty``.
    ``ids``: the (prompt ids, response ids) generated, read by the reward models that share the
    policy's tokens (``rms.scoring``); without them every one reads the texts. The pairs are
    split over the processes and gathered."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(responses), world))
    conversations, texts = [prompts[i].messages for i in mine], [responses[i] for i in mine]
    ended = [True if finished is None else finished[i] for i in mine]
    generated = [[part[i] for i in mine] for part in ids] if ids else [None, None]

    def probabilities(name: str) -> torch.Tensor:  # (n,)
        way = rms.scoring[name] if ids else "text"
        return sample_probabilities(getattr(rms, name), way, conversations, texts, ended, *generated)

    helpfulness, safety = probabilities("helpfulness"), probabilities("safety")
    gated = safety_gate(helpfulness, safety, torch.tensor([prompts[i].is_safety for i in mine], dtype=torch.bool), threshold)
    reward = penalize_truncated(gated.reward, torch.tensor(ended, dtype=torch.bool), penalty)  # (n,)
    scores = {i: {"helpfulness": float(h), "safety": float(s), "reward": float(r), "used_safety": bool(u)}
              for i, h, s, r, u in zip(mine, helpfulness, safety, reward, gated.used_safety)}
    scores = gather_dict(accelerator, scores)
    return [scores[i] for i in range(len(responses))]


def score_samples(accelerator, rms: RewardModels, items: Sequence[Item], samples: dict[str, dict],
                  threshold: float, penalty: float | None = None) -> dict[str, list[dict]]:
    """key -> the scores of its K samples, in sample order."""
    prompts = [item.prompt for item in items for _ in samples[item.key]["responses"]]
    responses = [r for item in items for r in samples[item.key]["responses"]]
    finished = [f for item in items for f in samples[item.key]["finished"]]
    ids = ([item.ids for item in items for _ in samples[item.key]["responses"]],
           [r for item in items for r in samples[item.key]["response_ids"]])
    flat = iter(score_pairs(accelerator, rms, prompts, responses, threshold, finished, penalty, ids))
    return {item.key: [next(flat) for _ in samples[item.key]["responses"]] for item in items}


def best_of(rewards: Sequence[float], eligible: Sequence[bool] | None = None) -> int | None:
    """Index of the highest reward among the ``eligible`` samples (default: all), the first one
    on ties; None when none is eligible."""
    candidates = [j for j in range(len(rewards)) if eligible is None or eligible[j]]
    return max(candidates, key=lambda j: (rewards[j], -j), default=None)


def round_best(items: Sequence[Item], samples: dict[str, dict], scores: dict[str, list[dict]], cfg: RejectionSamplingConfig,
               round_no: int, model: dict, scorer: dict) -> dict[str, dict | None]:
    """key -> the pool entry of its best sample this round; None when all its samples were
    truncated and ``pool_truncated`` is off."""
    best: dict[str, dict | None] = {}
    for item in items:
        s = samples[item.key]
        j = best_of([x["reward"] for x in scores[item.key]], None if cfg.pool_truncated else s["finished"])
        best[item.key] = None if j is None else pool_entry(item, s["responses"][j], s["finished"][j], scores[item.key][j],
                                                            round_no, model, scorer)
    return best


def judge_samples(cfg: RejectionSamplingConfig, device, items: Sequence[Item], samples: dict[str, dict]) -> dict[str, list[float]] | None:
    """key -> the independent judge's scores of its K samples (None without ``judge``)."""
    judge = load_judge(cfg.judge, device)
    if judge is None:
        return None
    prompts = [item.prompt for item in items for _ in samples[item.key]["responses"]]
    flat = iter(judge(prompts, [r for item in items for r in samples[item.key]["responses"]]))
    return {item.key: [next(flat) for _ in samples[item.key]["responses"]] for item in items}


def judge_metrics(items: Sequence[Item], scores: dict[str, list[dict]], judges: dict[str, list[float]] | None) -> dict:
    """The judge's mean score of all samples and of each prompt's best of K under R_c."""
    if judges is None:
        return {}
    chosen = [judges[i.key][best_of([s["reward"] for s in scores[i.key]])] for i in items]
    return {"judge_sample_mean": _mean(j for i in items for j in judges[i.key]), "judge_best_mean": _mean(chosen)}


# ---------------------------------------------------------------------------------------------
# 3. The best-so-far pool (``pool``): re-scored when the reward models changed


def rescore_stale(accelerator, rms: RewardModels, pool: dict[str, dict], threshold: float, penalty: float | None = None) -> int:
    """Re-score, in place, the entries that other reward models, or another gate, scored;
    returns how many."""
    scorer = scored_by(rms.fingerprints, threshold, penalty)
    stale = [key for key, entry in pool.items() if any(entry.get(k) != v for k, v in scorer.items())]
    scores = score_pairs(accelerator, rms, [entry_prompt(pool[k]) for k in stale], [pool[k]["response"] for k in stale],
                         threshold, [entry_finished(pool[k]) for k in stale], penalty)
    for key, new in zip(stale, scores):
        pool[key] = {**pool[key], **new, **scorer}
    return len(stale)


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: RejectionSamplingConfig) -> Path:
    stage = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, stage.dir)
    threshold = resolve_gate_threshold(cfg.gate_threshold, cfg.safety_rm_from, accelerator.print)
    previous = read_pool(cfg.pool_from) if cfg.pool_from else {}
    round_no = cfg.round or _previous_round(cfg.pool_from, previous) + 1
    # 1. sample K responses per prompt (and the temperature sweep), bucket by bucket
    dtype = inference_dtype(cfg.train.mixed_precision, accelerator.device)
    policy, tokenizer = load_policy(cfg.policy_from, accelerator.device, dtype)
    records = load_data(cfg.data, "prompts", cfg.seed).records[: cfg.data.max_prompts]
    items, counts = prepare_prompts(records, tokenizer, cfg, getattr(policy.config, "max_position_embeddings", None))
    start = time.perf_counter()
    samples, generated = sample_all(accelerator, policy, tokenizer, items, cfg.sampling.k, cfg.sampling.temperature,
                                    cfg, round_no, stage.dir / "samples")
    sampling_s = time.perf_counter() - start
    sweep_k, sweep_items = cfg.report.sweep_k or cfg.sampling.k, items[: cfg.report.sweep_prompts]
    sweep = {t: sample_all(accelerator, policy, tokenizer, sweep_items, sweep_k, t, cfg, round_no,
                           stage.dir / "samples" / f"sweep-T{t:g}")[0] for t in cfg.report.temperatures}
    del policy
    _free_memory()
    # 2. score every sample with both reward models, gated; 3. re-score the old pool if needed
    rms = _load_reward_models(cfg, stage, accelerator.device, dtype, tokenizer)
    penalty = cfg.missing_eos_penalty
    scores = score_samples(accelerator, rms, items, samples, threshold, penalty)
    sweep_scores = {t: score_samples(accelerator, rms, sweep_items, s, threshold, penalty) for t, s in sweep.items()}
    rescored = rescore_stale(accelerator, rms, previous, threshold, penalty)
    scorer, reward_scoring = scored_by(rms.fingerprints, threshold, penalty), rms.scoring
    del rms
    judges = judge_samples(cfg, accelerator.device, items, samples)
    _free_memory()
    model = {"path": str(cfg.policy_from), "fingerprint": stage.inputs["policy_from"]["fingerprint"]}
    pool, changes = update_pool(previous, round_best(items, samples, scores, cfg, round_no, model, scorer))
    changes["rescored"] = rescored
    if not pool and changes["only_truncated"]:
        raise RecipeError(f"sampling.max_new_tokens: all {len(items) * cfg.sampling.k} samples were cut at "
                          f"{cfg.sampling.max_new_tokens} tokens (no EOS), so the pool is empty; raise it, or set "
                          "pool_truncated: true to fine-tune on truncated answers")
    # 4. report (before training, so a long fine-tuning run can be watched with it)
    summary = (write_report(stage.dir, items, samples, scores, sweep_scores, changes, round_no, judges)
               if accelerator.is_main_process else {})
    if accelerator.is_main_process:
        write_jsonl_rows(stage.dir / POOL, list(pool.values()))
    # 5. fine-tune on the pool
    source = model_dir(cfg.student_from or cfg.policy_from)
    train_metrics, data_counts = fine_tune_generated(stage, accelerator, source, pool_examples(pool), cfg)
    tokens = sum(sum(v["tokens"]) for v in samples.values())
    metrics = {
        "round": round_no, "gate_threshold": threshold, "prompts_sampled": len(items), "samples": len(items) * cfg.sampling.k,
        "best_reward_mean": _mean(max(s["reward"] for s in scores[i.key]) for i in items),
        "sample_reward_mean": _mean(s["reward"] for i in items for s in scores[i.key]),
        **judge_metrics(items, scores, judges),
        "pool_size": len(pool), "pool_reward_mean": _mean(e["reward"] for e in pool.values()),
        **{f"pool_{k}": v for k, v in changes.items()},
        "response_tokens_mean": tokens / max(1, len(items) * cfg.sampling.k),
        "truncation_rate": sample_truncation(samples)["rate"],
        "sampling_tokens_per_s": generated / sampling_s if generated else None,
        **train_metrics,
    }
    return stage.finish(metrics, round=round_no, data={**counts, **data_counts}, report=summary.get("categories_max_at_K"),
                        reward_scoring=reward_scoring)


def _previous_round(pool_from: Path | None, pool: dict[str, dict]) -> int:
    manifest = read_manifest(pool_from) if pool_from else None
    if manifest and "round" in manifest:
        return int(manifest["round"])
    return max((int(e.get("round", 0)) for e in pool.values()), default=0)


def _load_reward_models(cfg: RejectionSamplingConfig, stage: StageRun, device, dtype, tokenizer) -> RewardModels:
    """Both reward models, their fingerprints, and how each reads the samples of the policy
    (``tokenizer``, ``data.template``)."""
    rms = {"helpfulness": load_reward_model(cfg.helpfulness_rm_from, device, dtype=dtype),
           "safety": load_reward_model(cfg.safety_rm_from, device, dtype=dtype)}
    fingerprints = {name: stage.inputs[f"{name}_rm_from"]["fingerprint"] for name in rms}
    return RewardModels(rms["helpfulness"], rms["safety"], fingerprints, scoring(rms, tokenizer, cfg.data.template))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
