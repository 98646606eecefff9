"""``rlhf eval-gold MODEL_DIR``: a policy's greedy answers to the quickstart world's held-out
prompts, scored by the gold judge (``rlhf.world.judge``)."""

from __future__ import annotations

from pathlib import Path

EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "eval_prompts.jsonl"


def evaluate_gold(model_dir: str | Path, prompts_path: str | Path | None = None, max_new_tokens: int = 32,
                  batch_size: int = 64) -> dict:
    """Gold helpfulness, safety and false-refusal rate (``judge.summarize``) of the greedy
    answers of a policy (a stage directory or a Hugging Face model directory) to the prompts
    of ``prompts_path`` (default: the bundled ``data/quickstart/eval_prompts.jsonl``)."""
    import torch

    from rlhf.artifacts import model_dir as hf_dir
    from rlhf.data import read_records, render_prompt
    from rlhf.generation import sample
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.world.judge import summarize

    path = hf_dir(Path(model_dir))
    tokenizer, model = load_tokenizer(path), load_causal_lm(path).eval()
    prompts = read_records(prompts_path or EVAL_PROMPTS, "prompts")
    prompt_ids = [render_prompt(p.messages, tokenizer) for p in prompts]
    with torch.no_grad():
        texts = sample(model, tokenizer, prompt_ids, [0] * len(prompts), max_new_tokens, temperature=0,
                       batch_size=batch_size).texts
    return summarize(prompts, texts)
