"""Our sampler (``rlhf.generation.sample``) vs a straightforward loop calling
``model.generate(num_return_sequences=K)`` one prompt at a time, and reward-model scoring speed.

Same model (a random Llama, or ``--model DIR``), same rendered chat prompts with a realistic
length spread, same K, max new tokens, temperature and top-p. Throughput counts only real
generated tokens (up to and including each response's EOS, no padding), counted the same way
for both. Scoring: pairs/s of ``RewardModel.score`` (render + packed forward) on the sampled
responses, with a reward model of the same backbone.

    HF_HUB_OFFLINE=1 python benchmarks/sampling.py [--prompts 16] [--k 4] [--max-new-tokens 32]

Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from rlhf.data import Message, render_prompt
from rlhf.generation import pad_id, row_seed, sample


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]"] + [f"w{i}" for i in range(6, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(vocab: int, hidden: int, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(device).eval()


def make_prompts(n: int, vocab: int, seed: int) -> list[list[Message]]:
    """User turns of 4-200 words (log-normal around 30)."""
    rng = random.Random(seed)
    lengths = [min(200, max(4, int(rng.lognormvariate(3.4, 0.8)))) for _ in range(n)]
    return [[Message("user", " ".join(f"w{rng.randrange(6, vocab)}" for _ in range(m)))] for m in lengths]


def real_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def run_baseline(model, tokenizer, prompt_ids, args) -> tuple[int, float]:
    """One ``generate(num_return_sequences=K)`` call per prompt."""
    device = next(model.parameters()).device
    tokens, start = 0, time.perf_counter()
    for ids in prompt_ids:
        out = model.generate(
            input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            do_sample=True, num_return_sequences=args.k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id(tokenizer),
        )
        tokens += real_tokens(out[:, len(ids):].tolist(), tokenizer.eos_token_id)
    return tokens, _sync_time(start)


def run_ours(model, tokenizer, prompt_ids, args) -> tuple[list[list[int]], list[str], float]:
    rows = [ids for ids in prompt_ids for _ in range(args.k)]
    seeds = [row_seed(args.seed, i, k) for i in range(len(prompt_ids)) for k in range(args.k)]
    start = time.perf_counter()
    out = sample(model, tokenizer, rows, seeds, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
    return out.response_ids, out.texts, _sync_time(start)


def _sync_time(start: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def scoring(model, tokenizer, prompts, texts, args) -> dict[str, float]:
    from transformers import LlamaForSequenceClassification

    from reward_model.model import RewardModel

    torch.manual_seed(1)
    config = model.config
    config.num_labels = 1
    rm = RewardModel(LlamaForSequenceClassification(config).to(model.device).eval(), tokenizer)
    rm.score(prompts[:4], texts[:4])  # warm-up
    start = time.perf_counter()
    rm.score(prompts, texts)
    seconds = _sync_time(start)
    return {"pairs": len(texts), "seconds": round(seconds, 3), "pairs_per_s": round(len(texts) / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a Hugging Face causal LM dir (default: a random Llama)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="rows per generate call of our sampler")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        from rlhf.models import load_policy, load_tokenizer

        tokenizer, model = load_tokenizer(args.model), load_policy(args.model, device)[0]
    else:
        tokenizer, model = make_tokenizer(args.vocab), make_model(args.vocab, args.hidden, args.layers, device)
    prompts = make_prompts(args.prompts, len(tokenizer), args.seed)
    prompt_ids = [render_prompt(m, tokenizer) for m in prompts]
    with torch.no_grad():
        run_baseline(model, tokenizer, prompt_ids[:1], args), run_ours(model, tokenizer, prompt_ids[:2], args)  # warm-up
        base_tokens, base_s = run_baseline(model, tokenizer, prompt_ids, args)
        rows, texts, ours_s = run_ours(model, tokenizer, prompt_ids, args)
        scored = scoring(model, tokenizer, [m for m in prompts for _ in range(args.k)], texts, args)
    ours_tokens = real_tokens(rows, tokenizer.eos_token_id)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")} | {"model": str(args.model or "random llama")},
        "prompt_tokens": {"min": min(map(len, prompt_ids)), "max": max(map(len, prompt_ids)),
                          "mean": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1)},
        "baseline_generate_per_prompt": {"tokens": base_tokens, "seconds": round(base_s, 3),
                                         "tokens_per_s": round(base_tokens / base_s, 1)},
        "ours": {"tokens": ours_tokens, "seconds": round(ours_s, 3), "tokens_per_s": round(ours_tokens / ours_s, 1)},
        "ratio": round((ours_tokens / ours_s) / (base_tokens / base_s), 2),
        "scoring": scored,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
