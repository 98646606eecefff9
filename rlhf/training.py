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
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from rlhf.artifacts import (
    Diverged, InputError, StageRun, normalize_modes, remove_tree, write_json_atomic, write_text_atomic, writing,
)
from rlhf.chat_template import set_chat_template
from rlhf.progress import Progress
from rlhf.tracking import TENSORBOARD_DIR, start_trackers
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
    with its own precision, so the shared AcceleratorState is reset (the process group stays).
    Its trackers (``report_to``, started by ``rlhf.tracking.start_trackers``) write in
    ``project_dir``, the stage directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

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
    where = None if project_dir is None else ProjectConfiguration(
        project_dir=str(project_dir), logging_dir=str(Path(project_dir) / TENSORBOARD_DIR))
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=trackers or None, project_config=where)
    fallback = sharding_fallback(os.environ, accelerator.distributed_type.value, accelerator.num_processes)
    if fallback:
        accelerator.print(f"[rlhf] warning: {fallback}")
    return accelerator


# What ``accelerate launch`` sets for a sharding config: its name and the distributed type that honours it.
SHARDING_ENV = {"ACCELERATE_USE_FSDP": ("FSDP", "FSDP"), "ACCELERATE_USE_DEEPSPEED": ("DeepSpeed", "DEEPSPEED")}


def sharding_fallback(env: Mapping[str, str], distributed_type: str, processes: int) -> str | None:
    """What to say when the launcher's sharding config (FSDP, DeepSpeed) is not what runs
    (accelerate drops it on a machine without GPUs and runs on, exit 0), or None."""
    for var, (name, honoured) in SHARDING_ENV.items():
        if env.get(var, "false").lower() == "true" and distributed_type != honoured:
            instead = f"plain DDP over {processes} CPU processes" if processes > 1 else "a single process"
            return (f"the accelerate config asks for {name} (distributed_type: {honoured}), but {instead} runs "
                    f"instead (accelerate drops {name} without a GPU): every process holds the whole model, its "
                    f"gradients and optimizer state; nothing is sharded. Launch with recipes/accelerate/ddp.yaml "
                    "to say what runs, or on GPUs to shard")
    return None


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


def save_model(accelerator, model, tokenizer, out_dir: Path, lora: LoraConfig, template: str) -> None:
    """Save in Hugging Face format: plain weights, LoRA merged into them, or the adapter
    (whose config records its base's absolute path), with the tokenizer, whose chat template
    becomes the chat format ``template`` the model trained on (``rlhf.chat_template``). Every
    process calls this (sharded states are gathered)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if lora.enabled and lora.merge:
            unwrapped, state_dict = unwrapped.merge_and_unload(), None
        with writing(out_dir):
            unwrapped.save_pretrained(out_dir, state_dict=state_dict)
            if tokenizer is not None:
                set_chat_template(tokenizer, template)
                tokenizer.save_pretrained(out_dir)
            normalize_modes(out_dir)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Checkpoints


TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its step and its files
JSON_STATE = "state.json"  # the states of the objects given to register_json_state


def register_json_state(accelerator, *objects) -> None:
    """Checkpoint ``objects`` (lr schedulers, early-stop bookkeeping: anything whose
    ``state_dict`` holds plain values) as JSON. Not accelerate's register_for_checkpointing: it
    pickles them and loads the pickle with weights_only=False, so a file planted in a checkpoint
    would run code on resume."""

    def save(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            write_text_atomic(Path(output_dir) / JSON_STATE, json.dumps([o.state_dict() for o in objects]))

    def load(models, input_dir) -> None:
        states = json.loads((Path(input_dir) / JSON_STATE).read_text())
        if not isinstance(states, list) or len(states) != len(objects):
            raise ValueError(f"{JSON_STATE}: expected the states of {len(objects)} objects")
        for obj, state in zip(objects, states):
            obj.load_state_dict(state)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from, or None. Its trainer_state.json lists
    every file with its size, so a file missing, cut short or added (planted) since is found
    before anything is loaded."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        step, files = state["step"], state.get("files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {TRAINER_STATE} ({type(exc).__name__}: {exc})"
    if not isinstance(step, int) or not isinstance(files, dict):
        return f"{TRAINER_STATE} holds no step and file list"
    found = _files(path)
    found.pop(TRAINER_STATE)
    for name, size in files.items():
        if found.get(name) != size:
            return f"{name} is missing" if name not in found else f"{name} has {found[name]} bytes, not {size}"
    extra = sorted(set(found) - set(files))
    return f"holds files it was not written with: {', '.join(extra)}" if extra else None


def _candidates(checkpoints: Path) -> list[Path]:
    """Checkpoints oldest first; a directory without trainer_state.json was never finished."""
    return sorted(p for p in checkpoints.glob("step-*") if (p / TRAINER_STATE).exists())


def latest_checkpoint(checkpoints: Path) -> Path | None:
    usable = [p for p in _candidates(checkpoints) if checkpoint_problem(p) is None]
    return usable[-1] if usable else None


def save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int) -> None:
    """Model, optimizer, registered (JSON) and RNG states. Written under a temporary name and
    renamed, so a checkpoint appears complete or not at all; the ones beyond ``keep`` are
    renamed away before they are deleted, so a kill never leaves half of one."""
    final = checkpoints / f"step-{step:08d}"
    tmp = checkpoints / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    accelerator.wait_for_everyone()
    with writing(tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(tmp):
            normalize_modes(tmp)
            write_json_atomic(tmp / TRAINER_STATE, {"step": step, "files": _files(tmp)})
        remove_tree(final)  # a stale copy of this step, from an earlier run
        os.replace(tmp, final)
        for old in _candidates(checkpoints)[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()


def resume(accelerator, checkpoints: Path) -> int:
    """Load the newest usable checkpoint; return the optimizer step to continue from (0: none).
    A broken one (a kill or a full disk while it was written or deleted, a damaged file) is
    skipped with a warning for the one before it."""
    failed_load = False
    for path in reversed(_candidates(checkpoints)):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                accelerator.load_state(str(path))
            except Exception as exc:  # torch, safetensors and accelerate raise many types on damage
                problem, failed_load = f"cannot be loaded ({type(exc).__name__}: {next(iter(str(exc).splitlines()), '')})", True
        if problem is None:
            step = json.loads((path / TRAINER_STATE).read_text())["step"]
            accelerator.print(f"[rlhf] resumed from {path} (step {step})")
            return step
        accelerator.print(f"[rlhf] warning: skipping checkpoint {path}: {problem}")
    if failed_load:  # the model may hold part of a broken checkpoint: starting over needs a fresh process
        raise InputError(f"{checkpoints}: no checkpoint can be loaded; delete that directory and run the "
                         "same command again to train this stage from the start")
    return 0


# ---------------------------------------------------------------------------------------------
# The loop


def diverged(run: StageRun, what: str) -> Diverged:
    last = latest_checkpoint(run.checkpoints)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return Diverged(f"{run.cfg.stage}: training stopped: {what}; {keep}. Lower train.lr (or set train.grad_clip) "
                    "and run again (a changed recipe starts afresh)")


def check_finite(run: StageRun, step: int, metrics: dict[str, float]) -> None:
    """Stop on a non-finite loss or gradient norm (every process sees the same reduced values)."""
    for name in ("loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
            raise diverged(run, f"the {name.replace('_', ' ')} is non-finite ({metrics[name]}) at step {step}")


def check_weights(accelerator, run: StageRun, model: torch.nn.Module, step: int) -> None:
    """Stop before non-finite weights are checkpointed or saved (a finite loss can be followed
    by an update that overflows)."""
    bad = torch.zeros((), device=accelerator.device)
    for param in model.parameters():
        bad += (~torch.isfinite(param.detach())).sum()
    if float(accelerator.reduce(bad, "sum")):
        raise diverged(run, f"non-finite weights after step {step}")


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
    register_json_state(accelerator, scheduler)  # stepped once per optimizer step
    step = resume(accelerator, run.checkpoints)
    run.truncate_metrics(step)
    start_trackers(accelerator, run)
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
        check_finite(run, step, metrics)
        if step % cfg.log_every == 0 or step == total:
            run.log(step, **metrics)
            accelerator.log(metrics, step=step)
        progress.update(1, loss=metrics["loss"], lr=lr)
        # 4. checkpoint (the final weights are saved by the stage itself); never a diverged one
        if step % cfg.save_every == 0 and step < total:
            check_weights(accelerator, run, model, step)
            save_checkpoint(accelerator, run.checkpoints, step, cfg.keep_checkpoints)
    check_weights(accelerator, run, model, step)
    progress.close()
    for tracker in accelerator.trackers:  # not end_training(): later stages need the process group
        tracker.finish()
    return {
        **{k: metrics[k] for k in metrics if k not in ("lr", "grad_norm", "tokens_per_s", "epoch")},
        "steps": total,
        "tokens_per_s": tokens_seen / train_seconds if train_seconds else 0.0,
    }
