"""Rejection sampling fine-tuning with a best-so-far pool (Llama 2, Sec. 3.2.3).

1. sample K responses per prompt from the policy (``rlhf.generation``): prompts are cut into
   buckets of similar length; whole buckets go round-robin to the processes, and each bucket is
   written to ``samples/`` when done, so an interrupted run samples only the buckets left and the
   samples are the same whatever the process count;
2. score every response with both reward models and gate them (``rlhf.rewards.safety_gate``):
   R_c = R_s if the prompt is a safety prompt or R_s < threshold, else R_h (probabilities);
3. the pool: the previous round's pool (``pool_from``), re-scored under the current reward models
   when they differ from the ones that scored it, keeps each prompt's best response so far; this
   round's best of K replaces an entry only if its R_c is higher;
4. report: the expected max and median R_c of k samples out of the K, k = 1..K, averaged over
   prompts, per prompt category (Fig. 7); an optional temperature sweep (Fig. 8); what the round
   changed in the pool;
5. fine-tune the policy (or ``student_from``: distillation) on the whole pool with SFT's rows and
   loss (loss on the sampled answer only), on the shared training loop.

Stage directory: ``samples/`` (bucket shards), ``samples.jsonl`` (every sample with its scores),
``pool.jsonl`` (the pool after this round), ``model/``, ``report/``, ``manifest.json``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any, Sequence

import torch

from reward_model.model import load_reward_model
from rlhf.artifacts import StageRun, model_dir, read_manifest, write_json_atomic
from rlhf.data import (
    DataError, Message, Problem, Prompt, SFTExample, load_data, read_jsonl_rows, render_prompt, to_dict, write_jsonl_rows,
)
from rlhf.generation import length_buckets, row_seed, sample
from rlhf.models import inference_dtype, load_policy
from rlhf.progress import Progress
from rlhf.rejection_sampling.config import RejectionSamplingConfig
from rlhf.rewards import safety_gate
from rlhf.training import make_accelerator
from sft.stage import fine_tune_generated

POOL = "pool.jsonl"


@dataclass
class Item:
    """A prompt to sample: its pool key, the record, its rendered ids."""

    key: str
    prompt: Prompt
    ids: list[int]


# ---------------------------------------------------------------------------------------------
# 1. Prompts and samples


def prompt_key(prompt: Prompt) -> str:
    """The pool's key of a prompt across rounds: its id, or a hash of its conversation."""
    if prompt.id:
        return str(prompt.id)
    blob = json.dumps(to_dict(prompt)["prompt"], ensure_ascii=False, sort_keys=True)
    return "sha1:" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def prepare_prompts(prompts: Sequence[Prompt], tokenizer: Any, cfg: RejectionSamplingConfig) -> tuple[list[Item], dict[str, int]]:
    """Rendered prompts, each key once; prompts over ``sampling.max_prompt_length`` left out."""
    items, seen = [], set()
    counts = {"prompts": len(prompts), "duplicates": 0, "too_long": 0}
    for prompt in prompts:
        key = prompt_key(prompt)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        ids = render_prompt(prompt.messages, tokenizer, cfg.data.template)
        if len(ids) > cfg.sampling.max_prompt_length:
            counts["too_long"] += 1
            continue
        items.append(Item(key, prompt, ids))
    counts["sampled"] = len(items)
    return items, counts


def gather_dict(accelerator, mine: dict) -> dict:
    """The union of every process's dict."""
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return {k: v for part in gather_object([mine]) for k, v in part.items()}


def sample_bucket(policy, tokenizer, bucket: Sequence[Item], k: int, temperature: float,
                  cfg: RejectionSamplingConfig, round_no: int) -> dict[str, dict[str, list]]:
    """key -> {"responses": K texts, "tokens": K lengths}; row j of a prompt is seeded with
    (seed, key, round, j), so it draws the same tokens in any batch."""
    rows = [item.ids for item in bucket for _ in range(k)]
    seeds = [row_seed(cfg.seed, item.key, round_no, j) for item in bucket for j in range(k)]
    s = cfg.sampling
    out = sample(policy, tokenizer, rows, seeds, s.max_new_tokens, temperature, s.top_p, batch_size=len(rows))
    return {item.key: {"responses": out.texts[i * k : (i + 1) * k],
                       "tokens": [len(r) for r in out.response_ids[i * k : (i + 1) * k]]}
            for i, item in enumerate(bucket)}


def sample_all(accelerator, policy, tokenizer, items: Sequence[Item], k: int, temperature: float,
               cfg: RejectionSamplingConfig, round_no: int, out: Path) -> tuple[dict[str, dict], int]:
    """Every prompt's K samples (key -> ``sample_bucket``'s entry), and the tokens generated now.
    Bucket b is sampled by process b % world and written to ``out/bucket-b.jsonl``; a bucket
    already there (an interrupted run) is read back instead."""
    rank, world = accelerator.process_index, accelerator.num_processes
    buckets = length_buckets([len(item.ids) for item in items], max(1, cfg.sampling.batch_size // k))
    out.mkdir(parents=True, exist_ok=True)
    mine, generated = {}, 0
    progress = Progress(len(buckets), f"sampling {k} per prompt, T={temperature:g}")
    for b in range(rank, len(buckets), world):
        path = out / f"bucket-{b:05d}.jsonl"
        if not path.exists():
            found = sample_bucket(policy, tokenizer, [items[i] for i in buckets[b]], k, temperature, cfg, round_no)
            write_jsonl_rows(path, [{"key": key, **v} for key, v in found.items()])
            generated += sum(sum(v["tokens"]) for v in found.values())
        mine.update({row["key"]: {"responses": row["responses"], "tokens": row["tokens"]} for row in read_jsonl_rows(path)})
        progress.update(world)
    progress.close()
    return gather_dict(accelerator, mine), int(accelerator.reduce(torch.tensor(generated, device=accelerator.device), "sum"))


# ---------------------------------------------------------------------------------------------
# 2. Scores


@dataclass
class RewardModels:
    helpfulness: torch.nn.Module
    safety: torch.nn.Module
    fingerprints: dict[str, str]  # which reward models scored: {"helpfulness": fp, "safety": fp}


def score_pairs(accelerator, rms: RewardModels, prompts: Sequence[Prompt], responses: Sequence[str],
                threshold: float) -> list[dict[str, Any]]:
    """R_h, R_s (probabilities), R_c and whether the gate chose R_s, per pair; the pairs are
    split over the processes and gathered."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(responses), world))
    conversations, texts = [prompts[i].messages for i in mine], [responses[i] for i in mine]
    helpfulness = rms.helpfulness.probabilities(conversations, texts)  # (n,)
    safety = rms.safety.probabilities(conversations, texts)  # (n,)
    gated = safety_gate(helpfulness, safety, torch.tensor([prompts[i].is_safety for i in mine], dtype=torch.bool), threshold)
    scores = {i: {"helpfulness": float(h), "safety": float(s), "reward": float(r), "used_safety": bool(u)}
              for i, h, s, r, u in zip(mine, helpfulness, safety, gated.reward, gated.used_safety)}
    scores = gather_dict(accelerator, scores)
    return [scores[i] for i in range(len(responses))]


def score_samples(accelerator, rms: RewardModels, items: Sequence[Item], samples: dict[str, dict],
                  threshold: float) -> dict[str, list[dict]]:
    """key -> the scores of its K samples, in sample order."""
    prompts = [item.prompt for item in items for _ in samples[item.key]["responses"]]
    responses = [r for item in items for r in samples[item.key]["responses"]]
    flat = iter(score_pairs(accelerator, rms, prompts, responses, threshold))
    return {item.key: [next(flat) for _ in samples[item.key]["responses"]] for item in items}


def best_of(rewards: Sequence[float]) -> int:
    """Index of the highest reward (the first one on ties)."""
    return max(range(len(rewards)), key=lambda j: (rewards[j], -j))


# ---------------------------------------------------------------------------------------------
# 3. The best-so-far pool


def pool_entry(item: Item, response: str, scores: dict, round_no: int, model: dict, reward_models: dict) -> dict:
    """A pool row: the prompt record, the response and its scores, which round and model
    produced it, which reward models scored it."""
    return {"key": item.key, **to_dict(item.prompt), "response": response, **scores, "round": round_no,
            "model": model, "reward_models": reward_models}


def entry_prompt(entry: dict) -> Prompt:
    return Prompt([Message(m["role"], m["content"]) for m in entry["prompt"]], entry.get("is_safety", False),
                  entry.get("source", ""), entry.get("id"), entry.get("meta") or {})


def read_pool(stage_dir: Path) -> dict[str, dict]:
    """key -> entry of a previous round's pool."""
    path = Path(stage_dir) / POOL
    if not path.is_file():
        raise DataError([Problem(str(path), None, "pool", "missing: pool_from must be a finished rejection_sampling stage")])
    pool = {}
    for entry in read_jsonl_rows(path):
        pool[entry["key"]] = entry
    return pool


def rescore_stale(accelerator, rms: RewardModels, pool: dict[str, dict], threshold: float) -> int:
    """Re-score, in place, the entries that other reward models scored; returns how many."""
    stale = [key for key, entry in pool.items() if entry.get("reward_models") != rms.fingerprints]
    scores = score_pairs(accelerator, rms, [entry_prompt(pool[k]) for k in stale], [pool[k]["response"] for k in stale], threshold)
    for key, new in zip(stale, scores):
        pool[key] = {**pool[key], **new, "reward_models": rms.fingerprints}
    return len(stale)


def update_pool(pool: dict[str, dict], best: dict[str, dict]) -> tuple[dict[str, dict], dict[str, int]]:
    """The pool after a round: a candidate replaces its prompt's entry only if its reward is
    strictly higher (both scored by the same reward models); new prompts are added."""
    updated = dict(pool)
    counts = {"improved": 0, "added": 0, "kept": 0, "not_sampled": len(set(pool) - set(best))}
    for key, candidate in best.items():
        old = pool.get(key)
        if old is None:
            counts["added"] += 1
        elif candidate["reward"] > old["reward"]:
            counts["improved"] += 1
        else:
            counts["kept"] += 1
            continue
        updated[key] = candidate
    return updated, counts


def pool_examples(pool: dict[str, dict]) -> list[SFTExample]:
    """Fine-tuning conversations: each prompt followed by its pool response."""
    return [SFTExample([*entry_prompt(e).messages, Message("assistant", e["response"])], source="rejection_sampling", id=k)
            for k, e in pool.items()]


# ---------------------------------------------------------------------------------------------
# 4. Report: best of k (Fig. 7), temperature sweep (Fig. 8)


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


def prompt_categories(items: Sequence[Item]) -> dict[str, list[str]]:
    """Category -> keys: all, helpfulness / safety prompts, and each source when there are several."""
    cats = {"all": [i.key for i in items], "helpfulness": [i.key for i in items if not i.prompt.is_safety],
            "safety": [i.key for i in items if i.prompt.is_safety]}
    sources = sorted({i.prompt.source for i in items})
    if len(sources) > 1:
        cats.update({f"source:{s}": [i.key for i in items if i.prompt.source == s] for s in sources})
    return {name: keys for name, keys in cats.items() if keys}


def average_curves(rewards: dict[str, list[float]], keys: Sequence[str]) -> dict[str, Any]:
    curves = [best_of_k_curve(rewards[k]) for k in keys]
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]  # noqa: E731
    return {"prompts": len(keys), "max": mean([c["max"] for c in curves]), "median": mean([c["median"] for c in curves])}


def plot_curves(path: Path, curves: dict[str, dict], title: str, median: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, c) in enumerate(curves.items()):
        ks = range(1, len(c["max"]) + 1)
        ax.plot(ks, c["max"], "-o", ms=3, color=f"C{i}", label=f"{name} max")
        if median:
            ax.plot(ks, c["median"], "--", color=f"C{i}", label=f"{name} median")
    ax.set_xlabel("samples per prompt (k)"), ax.set_ylabel("reward R_c"), ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: RejectionSamplingConfig) -> Path:
    stage = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, stage.dir)
    previous = read_pool(cfg.pool_from) if cfg.pool_from else {}
    round_no = cfg.round or _previous_round(cfg.pool_from, previous) + 1
    # 1. sample K responses per prompt (and the temperature sweep), bucket by bucket
    dtype = inference_dtype(cfg.train.mixed_precision, accelerator.device)
    policy, tokenizer = load_policy(cfg.policy_from, accelerator.device, dtype)
    records = load_data(cfg.data, "prompts", cfg.seed).records[: cfg.data.max_prompts]
    items, counts = prepare_prompts(records, tokenizer, cfg)
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
    rms = _load_reward_models(cfg, stage, accelerator.device, dtype)
    scores = score_samples(accelerator, rms, items, samples, cfg.gate_threshold)
    sweep_scores = {t: score_samples(accelerator, rms, sweep_items, s, cfg.gate_threshold) for t, s in sweep.items()}
    rescored = rescore_stale(accelerator, rms, previous, cfg.gate_threshold)
    reward_models = rms.fingerprints
    del rms
    _free_memory()
    model = {"path": str(cfg.policy_from), "fingerprint": stage.inputs["policy_from"]["fingerprint"]}
    best = {}
    for item in items:
        j = best_of([s["reward"] for s in scores[item.key]])
        best[item.key] = pool_entry(item, samples[item.key]["responses"][j], scores[item.key][j], round_no, model, reward_models)
    pool, changes = update_pool(previous, best)
    changes["rescored"] = rescored
    # 4. report (before training, so a long fine-tuning run can be watched with it)
    summary = _report(stage.dir, items, samples, scores, sweep_scores, changes, round_no) if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        write_jsonl_rows(stage.dir / POOL, list(pool.values()))
    # 5. fine-tune on the pool
    source = model_dir(cfg.student_from or cfg.policy_from)
    train_metrics, data_counts = fine_tune_generated(stage, accelerator, source, pool_examples(pool), cfg)
    tokens = sum(sum(v["tokens"]) for v in samples.values())
    metrics = {
        "round": round_no, "prompts_sampled": len(items), "samples": len(items) * cfg.sampling.k,
        "best_reward_mean": _mean(max(s["reward"] for s in scores[i.key]) for i in items),
        "sample_reward_mean": _mean(s["reward"] for i in items for s in scores[i.key]),
        "pool_size": len(pool), "pool_reward_mean": _mean(e["reward"] for e in pool.values()),
        **{f"pool_{k}": v for k, v in changes.items()},
        "response_tokens_mean": tokens / max(1, len(items) * cfg.sampling.k),
        "sampling_tokens_per_s": generated / sampling_s if generated else None,
        **train_metrics,
    }
    return stage.finish(metrics, round=round_no, data={**counts, **data_counts}, report=summary.get("categories_max_at_K"))


def _report(out: Path, items, samples, scores, sweep_scores, changes, round_no) -> dict:
    """report/summary.json, best_of_k.png (Fig. 7), temperature_sweep.png (Fig. 8);
    samples.jsonl with every sample's scores."""
    write_jsonl_rows(out / "samples.jsonl", [{"key": i.key, "is_safety": i.prompt.is_safety, "responses": samples[i.key]["responses"],
                                          "scores": scores[i.key]} for i in items])
    rewards = {key: [s["reward"] for s in rows] for key, rows in scores.items()}
    curves = {name: average_curves(rewards, keys) for name, keys in prompt_categories(items).items()}
    sweep = {f"{t:g}": average_curves({k: [s["reward"] for s in v] for k, v in sc.items()}, list(sc))
             for t, sc in sweep_scores.items() if sc}
    summary = {"round": round_no, "best_of_k": curves, "temperature_sweep": sweep, "pool": changes,
               "categories_max_at_K": {name: c["max"][-1] for name, c in curves.items()}}
    (out / "report").mkdir(exist_ok=True)
    write_json_atomic(out / "report" / "summary.json", summary)
    plot_curves(out / "report" / "best_of_k.png", curves, "Reward of the best of k samples (Fig. 7)")
    if sweep:
        plot_curves(out / "report" / "temperature_sweep.png", {f"T={t}": c for t, c in sweep.items()},
                    "Best of k by temperature (Fig. 8)", median=False)
    return summary


def _previous_round(pool_from: Path | None, pool: dict[str, dict]) -> int:
    manifest = read_manifest(pool_from) if pool_from else None
    if manifest and "round" in manifest:
        return int(manifest["round"])
    return max((int(e.get("round", 0)) for e in pool.values()), default=0)


def _load_reward_models(cfg: RejectionSamplingConfig, stage: StageRun, device, dtype) -> RewardModels:
    return RewardModels(
        load_reward_model(cfg.helpfulness_rm_from, device, dtype=dtype),
        load_reward_model(cfg.safety_rm_from, device, dtype=dtype),
        {"helpfulness": stage.inputs["helpfulness_rm_from"]["fingerprint"], "safety": stage.inputs["safety_rm_from"]["fingerprint"]},
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
