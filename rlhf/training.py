"""The training loop shared by the supervised stages (SFT, reward models), on Accelerate.

Why our own loop and not ``transformers.Trainer``: the loss is normalised by the number of loss
units (answer tokens, pairs) in the whole global batch, so packed == unpacked and N processes ==
1 process exactly; the data position is a pure function of (seed, step), so a resumed run
replays exactly the batches an uninterrupted run would see; and items are pre-tokenised and
packed once, so the hot loop only collates tensors.

Data order: epoch ``e`` visits the items in ``epoch_order(n, seed, e)``; optimizer step ``s``
takes global batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. A global batch of
``batch_size`` items is cut into equal contiguous shares, one per process, and each share into
micro-batches of ``micro_batch_size`` (gradient accumulation).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from rlhf.artifacts import StageRun
from rlhf.progress import Progress
from rlhf.config import LoraConfig, ModelConfig, RecipeError, TrainConfig


class TrainItem(Protocol):
    num_tokens: int  # real (non-padding) tokens, for tokens/s
    loss_units: int  # what the loss is averaged over: answer tokens (SFT), pairs (reward models)


# A loss function returns the SUM of per-unit losses of a micro-batch and extra sums to log
# (each divided by the global batch's units in the metrics, e.g. correct pairs -> accuracy).
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# Pure pieces: schedule and data order


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    return min(total, max(math.ceil(cfg.warmup_ratio * total), cfg.min_warmup_steps))


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1, then cosine / linear decay to ``min_ratio`` at the last step, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def plan_steps(num_items: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). An incomplete last batch is dropped."""
    if num_items < cfg.batch_size:
        raise RecipeError(
            f"train.batch_size: {cfg.batch_size} is more than the {num_items} training items"
        )
    per_epoch = num_items // cfg.batch_size
    total = math.ceil(cfg.epochs * per_epoch)
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_items))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def micro_batches(batch: Sequence[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's share of a global batch, cut into micro-batches."""
    share = len(batch) // world
    mine = list(batch[rank * share : (rank + 1) * share])
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def check_batching(cfg: TrainConfig, world: int) -> None:
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise RecipeError(
            f"train.batch_size: {cfg.batch_size} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size} x {world} processes"
        )


# ---------------------------------------------------------------------------------------------
# Accelerate, models, optimizer


def make_accelerator(cfg: TrainConfig, report_to: Sequence[str] = (), project_dir: Path | None = None):
    """An Accelerator for one stage. Several stages may run in one process (a pipeline), each
    with its own precision, so the shared AcceleratorState is reset (the process group stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    AcceleratorState._reset_state(reset_partial_state=False)
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    trackers = [name for name in report_to if available[name]]
    for name in set(report_to) - set(trackers):
        print(f"[rlhf] report_to: {name} is not installed; not logging to it")
    cpu = not torch.cuda.is_available()
    precision = cfg.mixed_precision
    if cpu and precision == "fp16":
        print("[rlhf] train.mixed_precision: fp16 needs a GPU; training in fp32")
        precision = "no"
    return Accelerator(
        cpu=cpu, mixed_precision=precision, log_with=trackers or None, project_dir=project_dir
    )


def prepare_model(
    model: torch.nn.Module, model_cfg: ModelConfig, task_type: str | None = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
) -> torch.nn.Module:
    """Apply gradient checkpointing and LoRA adapters as the recipe asks."""
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = model_cfg.lora
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type=task_type, modules_to_save=modules_to_save,
        )
        model = get_peft_model(model, peft_cfg)
        if model_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` off, in train mode too: dropout modules (LoRA's included) and
    the attention dropout rate transformers' attention layers read from ``attention_dropout``.
    RL stages train so: a sample's log-probs must not change between scoring and updating."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def save_model(accelerator, model, tokenizer, out_dir: Path, lora: LoraConfig) -> None:
    """Save in Hugging Face format: plain weights, LoRA merged into them, or the adapter
    (whose config records its base). Every process calls this (sharded states are gathered)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if lora.enabled and lora.merge:
            unwrapped, state_dict = unwrapped.merge_and_unload(), None
        unwrapped.save_pretrained(out_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(checkpoints: Path) -> Path | None:
    done = sorted(p for p in checkpoints.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int) -> None:
    """Model, optimizer, scheduler and RNG states; the directory appears complete or not at all."""
    final = checkpoints / f"step-{step:08d}"
    tmp = checkpoints / f".step-{step:08d}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of this step, from an earlier run
        os.replace(tmp, final)
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator, checkpoints: Path) -> int:
    """Load the newest complete checkpoint, if any; return the optimizer step to continue from."""
    path = latest_checkpoint(checkpoints)
    if path is None:
        return 0
    accelerator.load_state(str(path))
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    accelerator.print(f"[rlhf] resumed from {path} (step {step})")
    return step


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    extras: dict[str, torch.Tensor]


def _accumulate(accelerator, model, items, indices, collate, loss_fn, scale) -> StepResult:
    """Forward and backward over this process's micro-batches of one global batch."""
    from accelerate.utils import send_to_device

    chunks = micro_batches(indices, accelerator.process_index, accelerator.num_processes, scale["micro"])
    loss_sum = torch.zeros((), device=accelerator.device)
    extras: dict[str, torch.Tensor] = {}
    for j, chunk in enumerate(chunks):
        batch = send_to_device(collate([items[i] for i in chunk]), accelerator.device)
        sync = j == len(chunks) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            micro_loss, micro_extras = loss_fn(model, batch)
            # DDP averages gradients over processes; x world restores the global-units mean.
            accelerator.backward(micro_loss * scale["world"] / scale["units"])
        loss_sum += micro_loss.detach().float()
        for key, value in micro_extras.items():
            extras[key] = extras.get(key, 0) + value.detach().float()
    return StepResult(loss_sum, extras)


def _start(run: StageRun, model: torch.nn.Module, cfg: TrainConfig, total: int, accelerator) -> tuple:
    """The optimizer and lr schedule of ``total`` steps, prepared by accelerate, the run resumed
    from its last checkpoint: (model, optimizer, scheduler, the step to start from)."""
    optimizer = make_optimizer(model, cfg)
    factor = partial(
        lr_factor, total=total, warmup=warmup_steps(total, cfg), schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step
    step = resume(accelerator, run.checkpoints)
    run.truncate_metrics(step)
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(run.dir.name)
    model.train()
    return model, optimizer, scheduler, step


def train_loop(
    run: StageRun,
    model: torch.nn.Module,
    items: Sequence[TrainItem],
    collate: Callable[[list], Any],
    loss_fn: LossFn,
    cfg: TrainConfig,
    seed: int,
    accelerator,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model`` on ``items``; return the final metrics. Resumes from ``run.checkpoints``."""
    check_batching(cfg, accelerator.num_processes)
    steps_per_epoch, total = plan_steps(len(items), cfg)
    model, optimizer, scheduler, step = _start(run, model, cfg, total, accelerator)
    progress = Progress(total, desc, initial=step)
    metrics: dict[str, float] = {}
    tokens_seen, train_seconds = 0, 0.0
    while step < total:
        # 1. this step's global batch, from the data order of its epoch
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(len(items), seed, epoch)
        indices = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        units = max(1, sum(items[i].loss_units for i in indices))
        tokens = sum(items[i].num_tokens for i in indices)
        # 2. forward/backward over the micro-batches, then one optimizer step
        start = time.perf_counter()
        scale = {"micro": cfg.micro_batch_size, "world": accelerator.num_processes, "units": units}
        result = _accumulate(accelerator, model, items, indices, collate, loss_fn, scale)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # 3. metrics over all processes
        names = ["loss", *sorted(result.extras)]
        sums = accelerator.reduce(torch.stack([result.loss_sum, *(result.extras[k] for k in names[1:])]), "sum")
        seconds = time.perf_counter() - start
        tokens_seen, train_seconds = tokens_seen + tokens, train_seconds + seconds
        metrics = {name: float(value) / units for name, value in zip(names, sums)}
        metrics.update(lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens / seconds, epoch=step / steps_per_epoch)
        if step % cfg.log_every == 0 or step == total:
            run.log(step, **metrics)
            accelerator.log(metrics, step=step)
        progress.update(1, loss=metrics["loss"], lr=lr)
        # 4. checkpoint (the final weights are saved by the stage itself)
        if step % cfg.save_every == 0 and step < total:
            save_checkpoint(accelerator, run.checkpoints, step, cfg.keep_checkpoints)
    progress.close()
    for tracker in accelerator.trackers:  # not end_training(): later stages need the process group
        tracker.finish()
    return {
        **{k: metrics[k] for k in metrics if k not in ("lr", "grad_norm", "tokens_per_s", "epoch")},
        "steps": total,
        "tokens_per_s": tokens_seen / train_seconds if train_seconds else 0.0,
    }
