"""Reward-model training throughput: our stage's loop vs TRL's ``RewardTrainer`` (margin column).

Both sides train the same reward model (same initial weights: a Llama classifier built with
``reward_model.model.init_reward_model``) on the same pre-tokenized pairs with the same margins,
in the same order (TRL reads a dataset laid out in our data order, sequentially), with the
same optimizer (AdamW, constant lr, no weight decay, grad clip 1.0), batch and number of steps,
fp32 on the CPU. TRL pads chosen and rejected to the longest sequence of the batch and runs
them as one batch; ours packs them into rows as long as the longest sequence (no row holds
padding except at its tail). Pairs/s is over the whole training call. Equal loss: the per-step
losses of both runs (identical weights and batch at step 1, then the same updates).

Data: synthetic pairs with a realistic length spread (default), or ``--data FILE --model DIR``:
a preference file the data layer reads, rendered with the Llama 2 chat format and the
tokenizer of the causal LM in ``DIR`` (e.g. HH-RLHF and tinystories-656k).

    HF_HUB_OFFLINE=1 python benchmarks/rm_vs_trl.py [--steps 8] [--batch 8] [--threads 1]
    HF_HUB_OFFLINE=1 python benchmarks/rm_vs_trl.py --data ../shared/realdata/hh-rlhf/helpful-base.test.jsonl.gz \
        --model ../shared/realdata/models/tinystories-656k

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from rlhf.artifacts import StageRun
from rlhf.training import epoch_order, make_accelerator, train_loop
from reward_model.config import RewardModelConfig
from reward_model.data import RMPair, build_pairs, collate, rm_loss
from reward_model.losses import MARGIN_TABLES
from reward_model.model import RewardModel, classifier_pad_id, init_reward_model


def synthetic_pairs(n: int, vocab: int, seed: int) -> list[RMPair]:
    """Prompts of 8-200 tokens, responses of 8-300 (log-normal, like chat data), small-table margins."""
    rng = random.Random(seed)
    length = lambda mu, cap: min(cap, max(8, int(rng.lognormvariate(mu, 0.8))))  # noqa: E731
    margins = list(MARGIN_TABLES["small"].values())
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(length(4.0, 200) - 1)]
        chosen, rejected = ([rng.randrange(4, vocab) for _ in range(length(4.3, 300) - 1)] + [2] for _ in range(2))
        pairs.append(RMPair(prompt + chosen, prompt + rejected, rng.choice(margins)))
    return pairs


def synthetic_world(root: Path, args) -> Path:
    """A randomly initialised Llama (hidden ``--hidden``, ``--layers``) and a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, args.vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return root / "lm"


def real_pairs(data: Path, model: Path, args) -> list[RMPair]:
    from rlhf.data import SourceConfig, load_source
    from rlhf.models import load_tokenizer

    records = load_source(SourceConfig(path=data), "preference").records[: args.pairs]
    cfg = RewardModelConfig(model_from=model, data={"sources": [{"path": data}], "max_length": args.max_length, "overlong": "drop"})
    return build_pairs(records, load_tokenizer(model), cfg.data, cfg.loss)[0]


class Clock:
    """Wall time and this process's CPU time (other jobs on the cores stretch only the wall time)."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_ours(lm: Path, pairs: list[RMPair], args, workdir: Path) -> tuple[Clock, list[float]]:
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(lm)
    model = RewardModel(init_reward_model(lm, classifier_pad_id(tokenizer), seed=1), tokenizer)
    cfg = RewardModelConfig(
        output_dir=workdir / "ours", model_from=lm, data={"sources": [{"path": lm / "config.json"}]},
        train={"lr": args.lr, "schedule": "constant", "warmup_ratio": 0.0, "min_warmup_steps": 0, "max_steps": args.steps,
               "batch_size": args.batch, "micro_batch_size": args.batch, "weight_decay": 0.0, "save_every": 10**6},
    )
    run = StageRun(cfg).start()
    with Clock() as clock:
        train_loop(run, model, pairs, collate, rm_loss, cfg.train, args.seed, make_accelerator(cfg.train))
    losses = [json.loads(line)["loss"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    return clock, losses


def run_trl(lm: Path, pairs: list[RMPair], args, workdir: Path) -> tuple[Clock, list[float]]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(lm)
    model = init_reward_model(lm, classifier_pad_id(tokenizer), seed=1)
    tokenizer.pad_token_id = model.config.pad_token_id  # TRL pads with the tokenizer's pad id
    order = epoch_order(len(pairs), args.seed, 0)[: args.steps * args.batch]  # our data order
    data = Dataset.from_list([{"chosen_ids": pairs[i].chosen_ids, "rejected_ids": pairs[i].rejected_ids,
                               "margin": pairs[i].margin} for i in order])
    config = RewardConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        seed=args.seed, dataloader_pin_memory=False, bf16=False, gradient_checkpointing=False,
        max_length=None, pad_to_multiple_of=None, train_sampling_strategy="sequential",
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    with Clock() as clock:
        trainer.train()
    return clock, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="preference file (with --model)")
    parser.add_argument("--model", type=Path, help="causal LM directory (with --data)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both runs (1: steadier on shared cores)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lm = args.model or synthetic_world(workdir, args)
        pairs = real_pairs(args.data, lm, args) if args.data else synthetic_pairs(args.pairs, args.vocab, args.seed)
        ours, our_losses = run_ours(lm, pairs, args, workdir)
        trl, trl_losses = run_trl(lm, pairs, args, workdir)
    n = args.steps * args.batch
    order = epoch_order(len(pairs), args.seed, 0)[:n]
    real = sum(pairs[i].num_tokens for i in order)
    padded = sum(2 * len(order[s : s + args.batch]) * max(max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
                                                         for i in order[s : s + args.batch]) for s in range(0, n, args.batch))
    result = {
        "data": str(args.data or "synthetic"), "threads": args.threads, "pairs_trained": n, "batch_pairs": args.batch, "steps": args.steps,
        "real_tokens": real, "trl_padded_tokens": padded,
        "ours": {"pairs_per_s": round(n / ours.wall, 2), "pairs_per_cpu_s": round(n / ours.cpu, 2), "seconds": round(ours.wall, 2)},
        "trl": {"pairs_per_s": round(n / trl.wall, 2), "pairs_per_cpu_s": round(n / trl.cpu, 2), "seconds": round(trl.wall, 2)},
        "ratio": round(trl.wall / ours.wall, 2), "ratio_cpu": round(trl.cpu / ours.cpu, 2),
        "loss": {"ours": [round(x, 5) for x in our_losses], "trl": [round(x, 5) for x in trl_losses],
                 "max_abs_diff": round(max(abs(a - b) for a, b in zip(our_losses, trl_losses)), 6)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
