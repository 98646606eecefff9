"""``rlhf eval-gold MODEL_DIR``: a policy's answers to the quickstart world's held-out prompts,
scored by the gold judge (``rlhf.world.judge``): its greedy answers and, optionally, several
sampled answers per prompt (the expected gold scores under sampling, which move less with a
single flipped greedy answer than the greedy scores do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rlhf.data.records import Prompt

EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "eval_prompts.jsonl"


def sampled_gold(model: Any, tokenizer: Any, prompts: Sequence[Prompt], prompt_ids: Sequence[Sequence[int]],
                 samples: int, temperature: float, max_new_tokens: int, seed: int = 0, batch_size: int = 64) -> dict:
    """``judge.summarize`` over ``samples`` answers per prompt sampled at ``temperature`` (each
    row seeded by (seed, sample, prompt), so the same policy gives the same answers), plus the
    ``samples`` and ``temperature`` used; its counts ``n`` are answers, not prompts."""
    from rlhf.generation import row_seed, sample
    from rlhf.world.judge import summarize

    seeds = [row_seed("gold", seed, n, i) for n in range(samples) for i in range(len(prompts))]
    texts = sample(model, tokenizer, [*prompt_ids] * samples, seeds, max_new_tokens, temperature=temperature,
                   batch_size=batch_size).texts
    return {**summarize([*prompts] * samples, texts), "samples": samples, "temperature": temperature}


def evaluate_gold(model_dir: str | Path, prompts_path: str | Path | None = None, max_new_tokens: int = 32,
                  batch_size: int = 64, samples: int = 0, temperature: float = 0.7) -> dict:
    """Gold helpfulness, safety and false-refusal rate (``judge.summarize``) of the greedy
    answers of a policy (a stage directory or a Hugging Face model directory) to the prompts
    of ``prompts_path`` (default: the bundled ``data/quickstart/eval_prompts.jsonl``); with
    ``samples``, also ``"sampled"``: the same over that many sampled answers per prompt."""
    import torch

    from rlhf.artifacts import InputError, model_dir as hf_dir
    from rlhf.data import read_records, render_prompt
    from rlhf.generation import sample
    from rlhf.models import default_device, load_policy
    from rlhf.world.judge import summarize

    path = hf_dir(Path(model_dir))
    if not (path / "config.json").is_file():
        raise InputError(f"{model_dir}: not a policy stage directory or a Hugging Face model directory "
                         f"(no {path / 'config.json'})")
    model, tokenizer = load_policy(path, default_device())
    prompts = read_records(prompts_path or EVAL_PROMPTS, "prompts")
    prompt_ids = [render_prompt(p.messages, tokenizer) for p in prompts]
    with torch.no_grad():
        texts = sample(model, tokenizer, prompt_ids, [0] * len(prompts), max_new_tokens, temperature=0,
                       batch_size=batch_size).texts
        result = summarize(prompts, texts)
        if samples:
            result["sampled"] = sampled_gold(model, tokenizer, prompts, prompt_ids, samples, temperature,
                                             max_new_tokens, batch_size=batch_size)
    return result
