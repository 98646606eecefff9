"""Seconds per PPO iteration: our PPO stage vs TRL's ``PPOTrainer``.

TRL 1.x dropped PPO; the last release that ships ``PPOTrainer`` (``trl.experimental.ppo``) is
1.12.0. It runs in a separate virtual environment that this script creates on first use
(``--trl-venv``, default ``/tmp/rlhf-bench-venv-trl``) with torch, transformers, accelerate
and datasets pinned to the versions installed here.

Both sides get the same world: the same randomly initialised Llama policy (and reference),
a reward model built from it (TRL's reward and value models, our helpfulness RM and critic;
ours also scores with a second, safety RM and gates), the same prompt token ids, prompts per
iteration, response length (``max_new_tokens``, stop at EOS), mini-batch, micro-batch,
one PPO epoch, fp32 on the CPU. TRL steps the optimizer once per iteration when it has several
mini-batches (its gradient accumulation spans the whole rollout batch); ours once per
mini-batch, so ours does more optimizer steps, not fewer. The first ``--warmup`` iterations of
each side are not timed; the median of the rest is reported.

    HF_HUB_OFFLINE=1 python benchmarks/ppo_vs_trl.py [--iterations 4] [--prompts 64]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.12.0"  # the last release with PPOTrainer
PINNED = ("torch", "transformers", "accelerate", "datasets")


def word_tokenizer(vocab: int):
    """Words ``w<id>`` (plus the chat markers) one token each: decoding and re-encoding a
    response gives back its ids, as a subword tokenizer of a real vocabulary would."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]"]
    words += [f"w{i}" for i in range(len(words), vocab)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_world(root: Path, args) -> dict:
    """Policy + tokenizer, two reward models, a prompt file; returns the root and prompt ids.
    Prompts are 8-200 words, log-normal (median about 55): conversations vary in length."""
    from rlhf.data import render_prompt
    from rlhf.models import build_model
    from reward_model.model import RewardModel, init_reward_model

    rng = random.Random(0)
    tokenizer = word_tokenizer(args.vocab)
    lengths = [min(200, max(8, int(rng.lognormvariate(4.0, 0.8)))) for _ in range(args.num_prompts)]
    texts = [" ".join(f"w{rng.randrange(6, args.vocab)}" for _ in range(n)) for n in lengths]
    policy = root / "sft" / "model"
    build_model(args.size, len(tokenizer), max_positions=512).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    for name, seed in (("rm_h", 1), ("rm_s", 2)):
        out = root / name / "model"
        RewardModel(init_reward_model(policy, tokenizer.pad_token_id, seed=seed), tokenizer).save_pretrained(out)
        tokenizer.save_pretrained(out)
    for stage, name in (("sft", "sft"), ("reward_model", "rm_h"), ("reward_model", "rm_s")):
        (root / name / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete"}))
    with open(root / "prompts.jsonl", "w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": text}], "is_safety": i % 4 == 0}) + "\n")
    ids = [render_prompt([{"role": "user", "content": t}], tokenizer) for t in texts]
    return {"root": str(root), "prompt_ids": ids}


# ---------------------------------------------------------------------------------------------
# Ours


def run_ours(root: Path, args) -> tuple[list[dict], list[float]]:
    """Our per-iteration metrics and CPU seconds (read at each iteration's metrics line)."""
    from rlhf.artifacts import StageRun
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.stage import run
    from rlhf.config import validate

    marks, log = [time.process_time()], StageRun.log

    def timed_log(self, step, **metrics):
        marks.append(time.process_time())
        log(self, step, **metrics)

    cfg = validate(PPOConfig, {
        "stage": "ppo", "output_dir": str(root / "ours"),
        "policy_from": str(root / "sft"), "helpfulness_rm_from": str(root / "rm_h"), "safety_rm_from": str(root / "rm_s"),
        "data": {"sources": [{"path": str(root / "prompts.jsonl")}], "max_prompt_length": 512},
        "generation": {"max_new_tokens": args.response_length, "batch_size": args.prompts},
        "ppo": {"iterations": args.warmup + args.iterations, "prompts_per_iteration": args.prompts, "beta": 0.05,
                "forward_tokens": 4096},
        "train": {"lr": 1e-5, "batch_size": args.mini_batch, "micro_batch_size": args.micro_batch, "save_every": 10**6},
    }, "benchmark")
    StageRun.log = timed_log
    try:
        out = run(cfg)
    finally:
        StageRun.log = log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cpu = [b - a for a, b in zip(marks, marks[1:])]
    return rows[args.warmup :], cpu[args.warmup :]


# ---------------------------------------------------------------------------------------------
# TRL, in its own virtual environment


def trl_python(venv: Path) -> Path:
    """The TRL venv's python, created with pinned versions on first use."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = [f"{name}=={version(name)}" for name in PINNED]
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", *pins], check=True)
    return python


def run_trl(python: Path, world: dict, args) -> tuple[list[float], list[float]]:
    """TRL's wall and CPU seconds per iteration."""
    spec = Path(world["root"]) / "trl_job.json"
    spec.write_text(json.dumps({**vars(args), **world}, default=str))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(python), __file__, "--trl-worker", str(spec)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"TRL worker failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["wall"][args.warmup :], out["cpu"][args.warmup :]


def trl_worker(spec_path: str) -> None:
    """Runs inside the TRL venv: imports nothing from this repository."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    job = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(job["threads"])
    root = Path(job["root"])
    policy_dir, rm_dir = root / "sft" / "model", root / "rm_h" / "model"
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time()))

    iterations = job["warmup"] + job["iterations"]
    config = PPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["prompts"] // job["micro_batch"], num_mini_batches=job["prompts"] // job["mini_batch"],
        num_ppo_epochs=1, total_episodes=job["prompts"] * iterations, response_length=job["response_length"],
        local_rollout_forward_batch_size=job["prompts"], stop_token="eos", temperature=1.0, learning_rate=1e-5,
        kl_coef=0.05, report_to=[], save_strategy="no", logging_steps=1, num_sample_generations=0, seed=0,
        disable_tqdm=True, use_cpu=True,
    )
    train = datasets.Dataset.from_dict({"input_ids": job["prompt_ids"]})
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(policy_dir),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm_dir),
        train_dataset=train, eval_dataset=train.select(range(2)), callbacks=[Clock()],
    )
    trainer.train()
    steps = list(zip(marks, marks[1:]))
    print(json.dumps({"wall": [b[0] - a[0] for a, b in steps], "cpu": [b[1] - a[1] for a, b in steps]}))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--trl-venv", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-venv-trl")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64, help="prompts (rollouts) per iteration")
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--size", default="medium", help="a size of rlhf.models.SIZES")
    parser.add_argument("--vocab", type=int, default=32000, help="Llama 2's vocabulary size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side (1: CPU time is compute time)")
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    import torch

    torch.set_num_threads(args.threads)
    python = trl_python(args.trl_venv)
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp), args)
        ours, ours_cpu = run_ours(Path(tmp), args)
        trl, trl_cpu = run_trl(python, world, args)
    med = statistics.median
    ours_s, trl_s = med(r["time_iteration"] for r in ours), med(trl)
    split = {k: med(r[f"time_{k}"] for r in ours) for k in ("generation", "scoring", "forward", "training")}
    print(json.dumps({
        "benchmark": "ppo_vs_trl", "trl_version": TRL_VERSION, "device": "cpu", "threads": args.threads,
        "model": {"size": args.size, "vocab": args.vocab},
        "prompts_per_iteration": args.prompts, "mini_batch": args.mini_batch, "micro_batch": args.micro_batch,
        "response_length": args.response_length, "timed_iterations": args.iterations,
        "ours_s_per_iteration": round(ours_s, 3), "trl_s_per_iteration": round(trl_s, 3),
        "speedup": round(trl_s / ours_s, 2),
        "ours_cpu_s_per_iteration": round(med(ours_cpu), 3), "trl_cpu_s_per_iteration": round(med(trl_cpu), 3),
        "speedup_cpu_time": round(med(trl_cpu) / med(ours_cpu), 2),
        "ours_time_split_s": {k: round(v, 3) for k, v in split.items()},
        "ours_response_length": statistics.mean(r["response_length"] for r in ours),
    }, indent=2))


if __name__ == "__main__":
    main()
