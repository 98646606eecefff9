"""Preference collection (Llama 2, Sec. 3.2.1): each prompt's answers sampled from the policy,
comparisons drawn among its distinct answers, and an annotator's label of each.

1. sample ``sampling.k`` answers per prompt (``rlhf.prompt_sampling``: bucketed, resumable,
   the same answers whatever the process count);
2. draw up to ``pairs_per_prompt`` comparisons per prompt among its distinct finished answers
   (``draw_comparisons``);
3. the ``annotator`` hook labels them (chosen, rejected, rating, safety labels); the pairs are
   written to ``pairs.jsonl`` with ``batch`` set, for a reward_model stage's ``pairs_from``.

Stage directory: ``samples/`` (bucket shards), ``pairs.jsonl``, ``manifest.json`` (counts by
rating).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from rlhf.artifacts import StageRun
from rlhf.config import PAIRS, RecipeError
from rlhf.data import PreferencePair, Prompt, load_data, to_dict, write_jsonl_rows
from rlhf.generation import row_seed
from rlhf.judge import user_hook
from rlhf.models import inference_dtype, load_policy
from rlhf.preferences.config import PreferencesConfig
from rlhf.prompt_sampling import Item, prepare_prompts, sample_all
from rlhf.training import make_accelerator

Annotator = Callable[[Sequence[Prompt], Sequence[str], Sequence[str]], list[PreferencePair | None]]


def wanted(prompt: Prompt, kind: str) -> bool:
    """Whether a prompt is of the ``data.kind`` compared."""
    return kind == "all" or prompt.is_safety == (kind == "safety")


def draw_comparisons(items: Sequence[Item], samples: dict[str, dict], per_prompt: int, seed: int) -> list[tuple[Item, str, str]]:
    """Up to ``per_prompt`` (item, answer a, answer b) per prompt, drawn without repeats among the
    pairs of its distinct non-empty finished answers (in order of first appearance), seeded per
    prompt: ``["3", "3", "4", "5"]`` has the pairs (3, 4), (3, 5), (4, 5)."""
    out = []
    for item in items:
        s = samples[item.key]
        distinct = list(dict.fromkeys(r for r, done in zip(s["responses"], s["finished"]) if done and r.strip()))
        pairs = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]]
        rng = random.Random(row_seed(seed, item.key, "comparisons"))
        out += [(item, a, b) for a, b in rng.sample(pairs, min(per_prompt, len(pairs)))]
    return out


def load_annotator(ref: str) -> Annotator:
    """The user's hook, its answer checked: one PreferencePair (or None) per comparison, ordering
    exactly the two answers it was given."""
    fn = user_hook("annotator", ref)

    def labels(prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[PreferencePair | None]:
        out = fn(prompts, a, b)
        if len(out) != len(a):
            raise RecipeError(f"annotator: {ref} must return one pair (or None) per comparison ({len(a)}), got {len(out)}")
        for i, pair in enumerate(out):
            if pair is not None and (not isinstance(pair, PreferencePair) or {pair.chosen, pair.rejected} != {a[i], b[i]}):
                raise RecipeError(f"annotator: {ref}: item {i} must be None or a PreferencePair whose chosen and "
                                  f"rejected are the two answers {a[i]!r} and {b[i]!r}, got {pair!r}")
        return out

    return labels


def broadcast(accelerator, value):
    """The main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def run(cfg: PreferencesConfig) -> Path:
    stage = StageRun(cfg).start()
    accelerator = make_accelerator(cfg, cfg.report_to, stage.dir)
    annotate = load_annotator(cfg.annotator)
    policy, tokenizer = load_policy(cfg.policy_from, accelerator.device,
                                    inference_dtype(cfg.mixed_precision, accelerator.device))
    records = [p for p in load_data(cfg.data, "prompts", cfg.seed).records if wanted(p, cfg.data.kind)]
    items, counts = prepare_prompts(records[: cfg.data.max_prompts], tokenizer, cfg,
                                    getattr(policy.config, "max_position_embeddings", None))
    # round 0: other seeds than rejection sampling's rounds draw from the same policy
    samples, _ = sample_all(accelerator, policy, tokenizer, items, cfg.sampling.k, cfg.sampling.temperature, cfg, 0,
                            stage.dir / "samples")
    comparisons = draw_comparisons(items, samples, cfg.pairs_per_prompt, cfg.seed)
    labelled = None  # the annotator (an LLM-as-judge, say) labels once, on the main process
    if accelerator.is_main_process:
        labelled = annotate([c[0].prompt for c in comparisons], [c[1] for c in comparisons], [c[2] for c in comparisons])
    labelled = broadcast(accelerator, labelled)
    batch = cfg.batch or stage.dir.name
    pairs = [{**to_dict(p), "batch": batch} for p in labelled if p is not None]
    if accelerator.is_main_process:
        write_jsonl_rows(stage.dir / PAIRS, pairs)
    with_pairs = {c[0].key for c in comparisons}
    metrics = {"prompts_sampled": len(items), "prompts_without_comparison": len(items) - len(with_pairs),
               "comparisons": len(comparisons), "pairs": len(pairs), "unlabelled": len(comparisons) - len(pairs),
               "by_rating": dict(Counter(p.get("rating") for p in pairs))}
    accelerator.print(f"[rlhf] {stage.name}: {len(pairs)} pairs from {len(items)} prompts ({metrics['by_rating']}); "
                      f"{metrics['prompts_without_comparison']} prompts had fewer than two distinct answers")
    return stage.finish(metrics, data=counts, batch=batch)
