"""The prompts a stage samples and their K samples each, bucket by bucket (rejection sampling,
preference collection): prompts are cut into buckets of similar length; whole buckets go
round-robin to the processes, and each bucket is written to the stage's ``samples/`` when done,
so an interrupted run samples only the buckets left and the samples are the same whatever the
process count. A stage's config gives ``seed``, ``data.template`` and ``sampling``
(``max_prompt_length``, ``max_new_tokens``, ``top_p``, ``batch_size``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.data import Prompt, read_jsonl_rows, render_prompt, to_dict, write_jsonl_rows
from rlhf.generation import check_fits, length_buckets, row_seed, sample
from rlhf.progress import Progress


@dataclass
class Item:
    """A prompt to sample: its pool key, the record, its rendered ids."""

    key: str
    prompt: Prompt
    ids: list[int]


def prompt_key(prompt: Prompt) -> str:
    """The pool's key of a prompt across rounds: its id, or a hash of its conversation."""
    if prompt.id:
        return str(prompt.id)
    blob = json.dumps(to_dict(prompt)["prompt"], ensure_ascii=False, sort_keys=True)
    return "sha1:" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def prepare_prompts(prompts: Sequence[Prompt], tokenizer: Any, cfg: Any,
                    positions: int | None = None) -> tuple[list[Item], dict[str, int]]:
    """Rendered prompts, each key once; prompts over ``sampling.max_prompt_length`` left out.
    An InputError when the longest plus ``sampling.max_new_tokens`` exceeds the policy's
    ``positions`` (every process checks every prompt, so all stop together, before sampling)."""
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
    check_fits([len(i.ids) for i in items], cfg.sampling.max_new_tokens, positions)
    counts["sampled"] = len(items)
    return items, counts


def gather_dict(accelerator, mine: dict) -> dict:
    """The union of every process's dict."""
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return {k: v for part in gather_object([mine]) for k, v in part.items()}


def sample_bucket(policy, tokenizer, bucket: Sequence[Item], k: int, temperature: float,
                  cfg: Any, round_no: int) -> dict[str, dict[str, list]]:
    """key -> {"responses": K texts, "response_ids": their K generated ids, "tokens": K lengths,
    "finished": K flags (ended with EOS)}; row j of a prompt is seeded with (seed, key, round, j),
    so it draws the same tokens in any batch."""
    rows = [item.ids for item in bucket for _ in range(k)]
    seeds = [row_seed(cfg.seed, item.key, round_no, j) for item in bucket for j in range(k)]
    s = cfg.sampling
    out = sample(policy, tokenizer, rows, seeds, s.max_new_tokens, temperature, s.top_p, batch_size=len(rows))
    return {item.key: {"responses": out.texts[i * k : (i + 1) * k], "response_ids": out.response_ids[i * k : (i + 1) * k],
                       "tokens": [len(r) for r in out.response_ids[i * k : (i + 1) * k]],
                       "finished": out.finished[i * k : (i + 1) * k]}
            for i, item in enumerate(bucket)}


def sample_all(accelerator, policy, tokenizer, items: Sequence[Item], k: int, temperature: float,
               cfg: Any, round_no: int, out: Path) -> tuple[dict[str, dict], int]:
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
        mine.update({row.pop("key"): row for row in read_jsonl_rows(path)})
        progress.update(world)
    progress.close()
    return gather_dict(accelerator, mine), int(accelerator.reduce(torch.tensor(generated, device=accelerator.device), "sum"))
