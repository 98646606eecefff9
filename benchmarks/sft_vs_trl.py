"""Our SFT training loop vs TRL's ``SFTTrainer`` (completion-only loss, without and with packing).

Same ~20M-parameter Llama (same initial weights), same pre-tokenized prompt/completion data with
a realistic length spread, the same optimizer (AdamW, betas 0.9/0.95, eps 1e-8, clip 1.0, constant
lr) and number of optimizer steps, and about the
same number of real tokens per step (packed runs take ``rows`` rows of ``max_length``; the
unpacked runs take as many examples as those rows hold on average). ``ours_unpacked`` (our loop
with packing off) separates what packing buys from what the rest of the loop buys. Throughput counts only
real tokens (no padding), counted the same way in every run, from the batches the collators
hand to the model. Every trained model is scored on the same held-out examples (eval_loss).
Model-FLOPs utilisation is against a float32 matmul peak measured here, both per CPU-second.

    HF_HUB_OFFLINE=1 python benchmarks/sft_vs_trl.py [--steps 5] [--rows 4] [--max-length 512] [--threads 1]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from rlhf.data import Rendered
from rlhf.training import make_accelerator, train_loop
from rlhf.artifacts import StageRun
from sft.config import SFTConfig
from sft.data import collate, make_rows, sft_loss


def make_examples(n: int, vocab: int, seed: int) -> list[Rendered]:
    """Prompts of 8-200 tokens and answers of 8-300 (log-normal; all fit 512 tokens). Answers
    copy the prompt folded onto 64 tokens, so a few steps already lower the loss (the answer
    vocabulary) and more steps can learn the copy."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        p = min(200, max(8, int(rng.lognormvariate(4.0, 0.8))))
        c = min(300, max(8, int(rng.lognormvariate(4.3, 0.7))))
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(p - 1)]
        answer = [4 + prompt[1 + i % (p - 1)] % 64 for i in range(c - 1)] + [2]
        examples.append(Rendered(prompt + answer, [0] * p + [1] * c))
    return examples


def make_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def make_tokenizer(vocab: int):
    """TRL needs a tokenizer object (pad/eos ids); the data is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def matmul_peak(seconds: float = 3.0) -> float:
    """float32 FLOPs per CPU-second of a large square matmul, with the threads the runs use
    (best of several; CPU time, like the runs' tokens_per_cpu_s, so busy cores do not skew it)."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        with Clock() as clock:
            for _ in range(4):
                a @ b
        best = max(best, 4 * 2 * n**3 / clock.cpu)
    return best


@torch.no_grad()
def eval_loss(model, examples: list[Rendered]) -> float:
    """Mean answer-token loss on held-out examples, one per row (the same for every run)."""
    model.eval()
    rows = make_rows(examples, max(len(e.ids) for e in examples), packing=False)
    total = sum(float(sft_loss(model, collate([r]))[0]) for r in rows)
    return total / sum(r.loss_units for r in rows)


def flops_per_token(model, examples: list[Rendered]) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (the input embedding is a lookup)
    plus attention scores and values, 12 x layers x hidden x the mean causal context."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    tokens = sum(len(e.ids) for e in examples)
    context = sum(len(e.ids) * (len(e.ids) + 1) / 2 for e in examples) / tokens
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * context


class CountingCollate:
    """Our collate, counting the real tokens of the rows it batches (padding excluded)."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, rows):
        self.tokens += sum(r.num_tokens for r in rows)
        return collate(rows)


def examples_per_step(examples: list[Rendered], args) -> int:
    """Unpacked runs take as many examples per step as ``args.rows`` packed rows hold."""
    return round(args.rows * len(examples) * args.max_length / sum(len(e.ids) for e in examples))


def run_ours(model, examples, args, packing: bool, workdir: Path) -> dict:
    rows = make_rows(examples, args.max_length, packing)
    batch = args.rows if packing else examples_per_step(examples, args)
    init = workdir / "init"
    model.save_pretrained(init)
    source = workdir / "data.jsonl"
    source.write_text("{}\n")
    cfg = SFTConfig(
        output_dir=workdir / f"ours_packing_{packing}", model_from=init,
        data={"sources": [{"path": source}], "max_length": args.max_length, "packing": packing},
        train={"lr": args.lr, "max_steps": args.steps, "epochs": 100, "batch_size": batch,
               "micro_batch_size": batch, "weight_decay": 0.0, "warmup_ratio": 0.0, "eps": 1e-8,
               "schedule": "constant",
               "save_every": 10**6, "log_every": 10**6},
    )
    counting = CountingCollate()
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train)
    with Clock() as clock:
        metrics = train_loop(run, model, rows, counting, sft_loss, cfg.train, args.seed, accelerator)
    return _result(counting.tokens, clock, metrics["loss"], rows_per_step=batch), model


def run_trl(model, examples, tokenizer, args, packing: bool, workdir: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig, SFTTrainer

    data = Dataset.from_list([{"input_ids": e.ids, "completion_mask": e.loss_mask} for e in examples])
    batch = args.rows if packing else examples_per_step(examples, args)
    config = TRLConfig(
        output_dir=str(workdir / f"trl_packing_{packing}"), max_length=args.max_length,
        packing=packing, completion_only_loss=True, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=args.seed, dataloader_pin_memory=False,
        # like ours: float32 on CPU, no activation recomputation (TRL defaults both on)
        bf16=False, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    with Clock() as clock:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # TRL counts the attention-mask ones (unpacked) or the padding-free row length (packed)
    # of the batches it trained on: the real tokens.
    return _result(int(logs[-1]["num_tokens"]), clock, logs[-1]["loss"], rows_per_step=batch), trainer.model


class Clock:
    """Wall time and this process's CPU time (all threads). Other jobs sharing the cores
    stretch the wall time; the CPU time is what the run itself spent."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _result(tokens: int, clock: Clock, loss: float, rows_per_step: int) -> dict:
    return {
        "tokens_per_s": round(tokens / clock.wall, 1), "tokens_per_cpu_s": round(tokens / clock.cpu, 1),
        "seconds": round(clock.wall, 2), "cpu_seconds": round(clock.cpu, 2), "real_tokens": tokens,
        "sequences_per_step": rows_per_step, "last_batch_loss": round(loss, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per global batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    examples = make_examples(args.examples, args.vocab, args.seed)
    held_out = make_examples(32, args.vocab, args.seed + 1)
    base = make_model(args.vocab)
    tokenizer = make_tokenizer(args.vocab)
    peak = matmul_peak()
    runs = {
        "ours": lambda m, d: run_ours(m, examples, args, True, d),
        "ours_unpacked": lambda m, d: run_ours(m, examples, args, False, d),
        "trl": lambda m, d: run_trl(m, examples, tokenizer, args, False, d),
        "trl_packing": lambda m, d: run_trl(m, examples, tokenizer, args, True, d),
    }
    results = {"initial_eval_loss": round(eval_loss(base, held_out), 4)}
    for name, train in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name], trained = train(copy.deepcopy(base), Path(tmp))
        results[name]["eval_loss"] = round(eval_loss(trained, held_out), 4)
    best_trl = max(results["trl"]["tokens_per_s"], results["trl_packing"]["tokens_per_s"])
    best_trl_cpu = max(results["trl"]["tokens_per_cpu_s"], results["trl_packing"]["tokens_per_cpu_s"])
    fpt = flops_per_token(base, examples)
    report = {
        "model_params": sum(p.numel() for p in base.parameters()),
        "threads": torch.get_num_threads(), "steps": args.steps, "max_length": args.max_length,
        "examples": args.examples, "mean_example_tokens": round(sum(len(e.ids) for e in examples) / len(examples), 1),
        **results,
        "ratio_ours_vs_best_trl": round(results["ours"]["tokens_per_s"] / best_trl, 3),
        "ratio_ours_vs_best_trl_cpu_time": round(results["ours"]["tokens_per_cpu_s"] / best_trl_cpu, 3),
        "matmul_peak_gflops_per_cpu_s": round(peak / 1e9, 1),
        "flops_per_token": round(fpt),
        "mfu_ours": round(results["ours"]["tokens_per_cpu_s"] * fpt / peak, 4),
        "mfu_trl_best": round(best_trl_cpu * fpt / peak, 4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
