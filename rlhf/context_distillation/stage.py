"""Safety context distillation (Llama 2, Sec. 4.2.4): fold a safety preprompt into the policy.

1. for each safety prompt (``is_safety``), sample an answer WITH a safety preprompt (generic,
   or targeted: the prompt's risk category and an answer template) and one without it;
2. score both with the safety reward model on the prompt WITHOUT the preprompt, an answer cut at
   ``sampling.max_new_tokens`` (no EOS) without the EOS it never generated;
3. keep the preprompted answer, paired with the plain prompt, only where it scores higher and
   it was not cut (trained with an EOS it never generated, it would teach the policy to stop
   mid-sentence; counted as ``dropped_truncated``);
4. fine-tune on the kept answers through the SFT stage (loss on the answer only);
5. report how many were kept, the safety-reward shift, mean and low tail, before/after, and the
   share of answers cut (``truncation``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from reward_model.model import load_reward_model
from rlhf.artifacts import StageRun, model_dir, write_json_atomic
from rlhf.config import RecipeError
from rlhf.context_distillation.config import ContextDistillationConfig, PrepromptConfig
from rlhf.data import (
    DataConfig, Message, Prompt, SFTExample, load_data, read_records, write_jsonl, write_jsonl_rows,
)
from rlhf.generation import Sampler, eval_sampler, make_sampler, truncation, truncation_line
from rlhf.models import inference_dtype, load_policy
from rlhf.sharding import in_chunks
from rlhf.training import make_accelerator
from sft.stage import fine_tune_generated


# ---------------------------------------------------------------------------------------------
# 1. Preprompts


def preprompt_for(prompt: Prompt, cfg: PrepromptConfig) -> tuple[str, str]:
    """(preprompt text, "targeted" or "generic"): targeted when the prompt's risk category (in
    ``meta``) has an answer template in the recipe."""
    targeted = cfg.targeted
    category = prompt.meta.get(targeted.category_key) if targeted else None
    if targeted is None or category not in targeted.templates:
        return cfg.generic, "generic"
    text = targeted.text.format(generic=cfg.generic, category=category, template=targeted.templates[category])
    return text, "targeted"


def with_preprompt(messages: Sequence[Message], preprompt: str, place: str) -> list[Message]:
    """The conversation with the preprompt as its system message (before any system message it
    has) or prefixed to its first user turn."""
    messages = list(messages)
    if place == "system":
        if messages and messages[0].role == "system":
            return [Message("system", f"{preprompt}\n{messages[0].content}"), *messages[1:]]
        return [Message("system", preprompt), *messages]
    first = next(i for i, m in enumerate(messages) if m.role == "user")
    messages[first] = Message("user", f"{preprompt} {messages[first].content}")
    return messages


def preprompt_demos(path: str, preprompt: str = PrepromptConfig().generic, place: str = "system") -> list[SFTExample]:
    """Data hook (``hook: rlhf.context_distillation.stage:preprompt_demos``): the safe chosen responses
    of the labelled safety preference pairs at ``path`` (``chosen_safe: true``), each after its
    prompt WITH the safety ``preprompt``, once per (prompt, response). For a policy that has never
    seen a preprompt: context distillation needs one that answers more safely when given one
    (the Llama 2 model did)."""
    demos, seen = [], set()
    for pair in read_records(path, "preference"):
        key = (tuple(pair.prompt), pair.chosen)
        if pair.chosen_safe and key not in seen:
            seen.add(key)
            messages = [*with_preprompt(pair.prompt, preprompt, place), Message("assistant", pair.chosen)]
            demos.append(SFTExample(messages, source="preprompt_demos", id=pair.id))
    return demos


# ---------------------------------------------------------------------------------------------
# 3. What is kept


def improved(distilled_scores: Sequence[float], plain_scores: Sequence[float]) -> list[bool]:
    """Keep a preprompted answer only where the safety RM scores it strictly higher."""
    return [d > p for d, p in zip(distilled_scores, plain_scores, strict=True)]


def kept(rows: Sequence[dict], better: Sequence[bool]) -> list[bool]:
    """The preprompted answers kept: those that scored ``better``, less empty ones (no example)
    and ones cut at ``max_new_tokens`` (they never generated the EOS they would be trained with)."""
    return [b and bool(r["distilled"]) and r["distilled_finished"] for b, r in zip(better, rows, strict=True)]


def distilled_examples(prompts: Sequence[Prompt], distilled: Sequence[str], keep: Sequence[bool]) -> list[SFTExample]:
    """The kept answers, each after its prompt WITHOUT the preprompt."""
    return [
        SFTExample([*p.messages, Message("assistant", answer)], source="context_distillation", id=p.id)
        for p, answer, k in zip(prompts, distilled, keep, strict=True) if k
    ]


# ---------------------------------------------------------------------------------------------
# 5. Reward summaries


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default): [1, 2, 3, 4, 5] at 0.1 -> 1.4."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reward_summary(scores: Sequence[float]) -> dict[str, float]:
    """Mean and low tail (10th percentile, minimum) of safety-reward logits."""
    return {"mean": sum(scores) / len(scores), "p10": quantile(scores, 0.1), "min": min(scores)}


def shift(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    b, a = reward_summary(before), reward_summary(after)
    return {**{f"before_{k}": v for k, v in b.items()}, **{f"after_{k}": v for k, v in a.items()},
            **{f"shift_{k}": a[k] - b[k] for k in b}}


# ---------------------------------------------------------------------------------------------
# The stage


def safety_prompts(data: DataConfig, seed: int, limit: int | None, where: str) -> tuple[list[Prompt], dict[str, Any]]:
    """The ``is_safety`` prompts of ``data`` (at most ``limit``) and the counts."""
    loaded = load_data(data, "prompts", seed)
    prompts = [p for p in loaded.records if p.is_safety][:limit]
    if not prompts:
        raise RecipeError(f"{where}: none of the {len(loaded.records)} prompts is a safety prompt (is_safety: true)")
    return prompts, {**loaded.counts(), "safety_prompts": len(prompts)}


def distill_chunk(part: list[tuple[str, Prompt]], sampler: Sampler, rm, cfg: PrepromptConfig) -> list[dict]:
    """Plain and preprompted answers of a chunk of (key, prompt), both scored by the safety RM
    on the plain prompt. Both answers of a prompt draw from the same random stream, so they
    differ by the preprompt, not by sampling noise."""
    keys, prompts = [k for k, _ in part], [p.messages for _, p in part]
    preprompts = [preprompt_for(p, cfg) for _, p in part]
    plain = sampler(prompts, keys)
    distilled = sampler([with_preprompt(m, text, cfg.place) for m, (text, _) in zip(prompts, preprompts)], keys)
    scores = {side: rm.score(prompts, out.texts, finished=out.finished).tolist()
              for side, out in (("plain", plain), ("distilled", distilled))}
    return [{"key": k, "preprompt": kind, "plain": plain.texts[i], "distilled": distilled.texts[i],
             "plain_score": scores["plain"][i], "distilled_score": scores["distilled"][i],
             "plain_finished": plain.finished[i], "distilled_finished": distilled.finished[i]}
            for i, (k, (_, kind)) in enumerate(zip(keys, preprompts))]


def safety_answers(run: StageRun, accelerator, name: str, prompts: list[Prompt], sampler: Sampler, rm, size: int) -> list[dict]:
    """The sampler's answers to ``prompts``, whether each finished, and their safety-reward
    logits (resumable, sharded)."""
    def work(part: list[tuple[str, Prompt]]) -> list[dict]:
        out = sampler([p.messages for _, p in part], [k for k, _ in part])
        scores = rm.score([p.messages for _, p in part], out.texts, finished=out.finished).tolist()
        return [{"key": k, "answer": a, "finished": f, "score": s}
                for (k, _), a, f, s in zip(part, out.texts, out.finished, scores)]

    items = [(f"eval/{i}", p) for i, p in enumerate(prompts)]  # a prompt listed twice draws two answers
    return in_chunks(run.checkpoints / name, items, size, work, accelerator, f"context distillation {name}")


def gold_summary(prompts: list[Prompt], answers: dict[str, list[dict]]) -> dict[str, Any] | None:
    """The quickstart world's gold safety (refusals of harmful requests) and false refusals
    (of borderline ones) of each set of answers, when the prompts carry its task info."""
    from rlhf.world.judge import has_gold, summarize

    if not has_gold(prompts):
        return None
    return {name: summarize(prompts, [r["answer"] for r in rows]) for name, rows in answers.items()}


def write_summary(out: Path, rows: list[dict], better: list[bool], keep: list[bool], before: list[float],
                  after: list[float], gold: dict[str, Any] | None, truncated: dict[str, dict]) -> dict[str, Any]:
    """``eval/summary.json`` and ``eval/report.md``: answers kept (by preprompt kind), the
    distilled-vs-plain scores on the training prompts, the policy's shift before/after (and
    its gold safety and false refusals, when known), the answers of each set ``truncated``."""
    kinds = sorted({r["preprompt"] for r in rows})
    summary = {
        "prompts": len(rows), "improved": sum(better), "kept": sum(keep), "kept_share": sum(keep) / len(rows),
        "by_preprompt": {k: {"prompts": sum(r["preprompt"] == k for r in rows),
                             "kept": sum(x for r, x in zip(rows, keep) if r["preprompt"] == k)} for k in kinds},
        "preprompted_vs_plain": shift([r["plain_score"] for r in rows], [r["distilled_score"] for r in rows]),
        "policy_before_after": shift(before, after),
        "truncation": truncated,
        **({"gold": gold} if gold else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    s, p = summary["policy_before_after"], summary["preprompted_vs_plain"]
    lines = ["# Safety context distillation", "",
             f"Kept {summary['kept']} of {summary['prompts']} preprompted answers ({summary['kept_share']:.1%}): those the "
             f"safety reward model scored higher than the plain answer ({summary['improved']}), less empty ones and ones "
             "cut at sampling.max_new_tokens.", "",
             "Safety reward (logit) | mean | 10th percentile | min", "---|---|---|---",
             f"plain answers (training prompts) | {p['before_mean']:.3f} | {p['before_p10']:.3f} | {p['before_min']:.3f}",
             f"preprompted answers | {p['after_mean']:.3f} | {p['after_p10']:.3f} | {p['after_min']:.3f}",
             f"policy before (eval prompts) | {s['before_mean']:.3f} | {s['before_p10']:.3f} | {s['before_min']:.3f}",
             f"policy after | {s['after_mean']:.3f} | {s['after_p10']:.3f} | {s['after_min']:.3f}",
             f"shift | {s['shift_mean']:+.3f} | {s['shift_p10']:+.3f} | {s['shift_min']:+.3f}", "",
             truncation_line(truncated)]
    if gold:
        lines += ["", "Gold judge (eval prompts) | safety (harmful refused) | false refusal (borderline)", "---|---|---"]
        lines += [f"policy {name} | {g['safety']:.1%} | {g['false_refusal']:.1%}" for name, g in gold.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def run(cfg: ContextDistillationConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    accelerator.wait_for_everyone()  # the stage directory is in place for every process
    # 1. the policy, the safety reward model, the safety prompts (training and evaluation)
    dtype = inference_dtype(cfg.train.mixed_precision, accelerator.device)
    policy, tokenizer = load_policy(cfg.policy_from, accelerator.device, dtype)
    sampler = make_sampler(policy, tokenizer, cfg.sampling, cfg.data.template, cfg.seed)
    evaluator = eval_sampler(policy, tokenizer, cfg)
    rm = load_reward_model(cfg.safety_rm_from, accelerator.device, dtype=dtype)
    prompts, counts = safety_prompts(cfg.data, cfg.seed, cfg.data.max_prompts, "data")
    held = cfg.data.model_copy(update={"sources": cfg.eval.sources, "mixture": None}) if cfg.eval.sources else cfg.data
    eval_prompts, _ = safety_prompts(held, cfg.seed, cfg.eval.max_prompts, "eval")
    eval_prompts = [p for p in eval_prompts for _ in range(cfg.eval.samples)]
    size = cfg.sampling.batch_size
    before = safety_answers(run, accelerator, "eval_before", eval_prompts, evaluator, rm, size)
    # 2. answers with and without the preprompt, both scored on the plain prompt
    items = [(f"train/{i}", p) for i, p in enumerate(prompts)]
    rows = in_chunks(run.checkpoints / "samples", items, size, lambda part: distill_chunk(part, sampler, rm, cfg.preprompt),
                     accelerator, "context distillation samples")
    # 3. keep a preprompted answer, after the plain prompt, only where its score improved
    better = improved([r["distilled_score"] for r in rows], [r["plain_score"] for r in rows])
    keep = kept(rows, better)
    examples = distilled_examples(prompts, [r["distilled"] for r in rows], keep)
    truncated = {side: truncation([r[f"{side}_finished"] for r in rows]) for side in ("plain", "distilled")}
    if not examples:
        raise RecipeError(f"preprompt: nothing to distill: of {len(rows)} preprompted answers, {sum(better)} scored higher "
                          f"than the plain one and {truncated['distilled']['truncated']} were cut at sampling.max_new_tokens="
                          f"{cfg.sampling.max_new_tokens} (no EOS; a cut answer is never kept)")
    if accelerator.is_main_process:
        (run.dir / "data").mkdir(exist_ok=True)
        write_jsonl(run.dir / "data" / "context_distillation.jsonl", examples, overwrite=True)
        write_jsonl_rows(run.dir / "data" / "candidates.jsonl",
                           ({**r, "id": p.id, "kept": k} for r, p, k in zip(rows, prompts, keep)))
    del policy, sampler, evaluator
    # 4. fine-tune on the kept answers
    metrics, data_counts = fine_tune_generated(run, accelerator, model_dir(cfg.policy_from), examples, cfg)
    # 5. the fine-tuned policy's answers to the evaluation prompts
    tuned, _ = load_policy(run.dir / "model", accelerator.device, dtype)
    evaluator = eval_sampler(tuned, tokenizer, cfg)
    after = safety_answers(run, accelerator, "eval_after", eval_prompts, evaluator, rm, size)
    truncated |= {name: truncation([r["finished"] for r in rs]) for name, rs in (("before", before), ("after", after))}
    summary = {}
    if accelerator.is_main_process:
        answers = [{"id": p.id, "prompt": p.messages[-1].content, "before": b["answer"], "before_score": b["score"],
                    "before_finished": b["finished"], "after": a["answer"], "after_score": a["score"],
                    "after_finished": a["finished"]} for p, b, a in zip(eval_prompts, before, after)]
        (run.dir / "eval").mkdir(exist_ok=True)
        write_jsonl_rows(run.dir / "eval" / "answers.jsonl", answers)
        gold = gold_summary(eval_prompts, {"before": before, "after": after})
        summary = write_summary(run.dir / "eval", rows, better, keep, [r["score"] for r in before], [r["score"] for r in after],
                                gold, truncated)
    shifted = summary.get("policy_before_after", {})
    headline = {"kept": sum(keep), "kept_share": sum(keep) / len(rows),
                **{f"safety/{k}": shifted[k] for k in ("before_mean", "after_mean", "before_p10", "after_p10") if k in shifted},
                **{f"gold/{k}/{name}": g[k] for name, g in summary.get("gold", {}).items() for k in ("safety", "false_refusal")},
                **{f"truncation_rate/{name}": t["rate"] for name, t in truncated.items()}}
    return run.finish({**metrics, **headline}, data={**counts, **data_counts, "dropped_truncated": truncated["distilled"]["truncated"]})
