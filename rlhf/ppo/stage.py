"""The PPO stage (Llama 2, Sec. 3.2.3): optimise the safety-gated reward with a KL penalty.

One iteration: sample a response to each of ``prompts_per_iteration`` prompts, score it with
both reward models and gate (a reward model that shares the policy's tokens reads the generated
ids, another the decoded text re-rendered: the manifest's ``reward_scoring``; a response cut at
``max_new_tokens`` is scored without an EOS and lowered by ``missing_eos_penalty``), whiten,
subtract the KL penalty per token, estimate advantages with GAE, then run ``train.epochs`` PPO
epochs over mini-batches of ``train.batch_size`` rollouts (one optimizer step per mini-batch, for
the policy and the critic each). The math lives in
``rlhf.rewards`` and ``rlhf.ppo.losses``; this module wires it. An independent ``judge``, never
optimised, scores the rollouts and the held-out answers beside the proxy reward (``judge``,
``eval_judge``); early stopping may go by it, and a proxy rising while the judge falls warns.
With held-out prompts (``early_stop.data``) ``model/`` is the policy of the best evaluation
(iteration 0: the start policy), and the manifest's metrics are that iteration's
(``final_metrics``), the last iteration's beside them as ``last_NAME``.

Several processes: each samples, scores and runs the frozen forwards for its share of the
prompts, then every process gathers the whole iteration's rollouts, so the reward, whitening and
GAE see the full batch, and each global mini-batch is split into equal shares (as in
``rlhf.training``): N processes compute what one process would.

Exact resume: response i of iteration k is sampled with its own seed (seed, k, i) (see
``rlhf.generation``). A checkpoint of iteration k (``step-k``: policy, critic, both optimizers,
schedulers, early-stop state) is written only after the rollouts of iteration k passed the checks
(finite, KL under ``ppo.max_kl``), so every checkpoint on disk holds a good policy.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

from reward_model.model import RewardModel, load_judge, load_reward_model, sample_probabilities, scoring
from rlhf.artifacts import Diverged, InputError, StageRun, model_dir, read_manifest
from rlhf.chat_template import warn_chat_format
from rlhf.tracking import start_trackers
from rlhf.config import RecipeError
from rlhf.data import Prompt, render_prompt
from rlhf.data.load import load_data
from rlhf.generation import Samples, check_fits, row_seed, sample
from rlhf.judge import Judge, diverging
from rlhf.logprobs import PackedPolicy, pack_responses, per_token, policy_logits, policy_logprobs, token_logprobs
from rlhf.models import inference_dtype, load_policy
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.losses import entropy, explained_variance, gae, policy_loss, value_loss
from rlhf.ppo.rollout import critic_values, reference
from rlhf.progress import Progress
from rlhf.prompt_sampling import gather_dict
from rlhf.rewards import kl_penalty, logit, penalize_truncated, resolve_gate_threshold, safety_gate, token_rewards, whiten
from rlhf.training import (
    disable_dropout, epoch_order, latest_checkpoint, lr_factor, make_accelerator, make_optimizer, micro_batches,
    prepare_model, register_json_state, resume, save_checkpoint, save_model, warmup_steps,
)


class TrainingStopped(Diverged):
    """PPO stopped on a divergence; the message says why and names the last good checkpoint (a
    user-facing error: the CLI prints it and exits 2)."""


@dataclass
class Models:
    tokenizer: Any
    policy: PackedPolicy
    ref: PackedPolicy | None  # None: the LoRA policy with its adapter switched off
    critic: RewardModel  # read at every response position: V(state before each token)
    helpfulness: RewardModel
    safety: RewardModel
    scoring: dict[str, str]  # how each reward model reads the samples (``reward_model.model.scoring``)
    judge: Judge | None = None  # the independent judge (``cfg.judge``), never optimised


@dataclass
class Rollouts:
    """Rollouts of one iteration (a process's share, or all of them once gathered).
    Per-token tensors are (B, T), 0 after each response's end; per-rollout ones (B,)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: torch.Tensor  # (B, T) log pi_old
    ref_logprobs: torch.Tensor  # (B, T) log pi_0
    values: torch.Tensor  # (B, T) V_old
    r_h: torch.Tensor  # (B,) helpfulness RM, probability scale
    r_s: torch.Tensor  # (B,) safety RM, probability scale
    r_c: torch.Tensor  # (B,) the gated reward R_c (lowered by missing_eos_penalty where truncated)
    used_safety: torch.Tensor  # (B,) 1 where R_c = R_s
    is_safety: torch.Tensor  # (B,) 1 on safety prompts
    finished: torch.Tensor  # (B,) 1 where the response ended with EOS, 0 where cut at max_new_tokens
    judge: torch.Tensor  # (B,) the independent judge's score; NaN without a judge

    @property
    def mask(self) -> torch.Tensor:  # (B, T) 1 on generated tokens
        lengths = torch.tensor([len(r) for r in self.response_ids], device=self.logprobs.device)
        return (torch.arange(self.logprobs.shape[1], device=lengths.device) < lengths[:, None]).float()


@dataclass
class EarlyStop:
    """Held-out reward bookkeeping; saved in checkpoints (``state_dict``) so resume matches."""

    best: float = -math.inf
    best_iteration: int = -1
    best_scores: list = field(default_factory=list)  # the best evaluation's per-prompt scores (``beats``)
    best_metrics: dict = field(default_factory=dict)  # the metrics of the best evaluation's iteration
    bad_evals: int = 0
    proxy: list = field(default_factory=list)  # the proxy reward of each evaluation (for ``diverging``)
    judged: list = field(default_factory=list)  # the judge's mean score of each evaluation

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def collect_rollouts(accelerator, models, batch: list, seeds: list[int], cfg: PPOConfig, timer: Timer) -> Rollouts:
    """This process's rollouts of one iteration, with the frozen policy and critic."""
    prompt_ids = [ids for _, ids in batch]
    policy = accelerator.unwrap_model(models.policy).eval()
    critic = accelerator.unwrap_model(models.critic).eval()
    with torch.no_grad(), accelerator.autocast():
        # 1. generate
        with timer("generation"):
            samples = generate(policy, prompt_ids, seeds, models.tokenizer, cfg)
        # 2. score with both reward models and gate (probability scale); a truncated response
        #    is read without an EOS and its R_c lowered by missing_eos_penalty
        with timer("scoring"):
            r_h, r_s = score_both(models, batch, samples, cfg, accelerator.device)
            is_safety = torch.tensor([float(p.is_safety) for p, _ in batch], device=accelerator.device)
            finished = torch.tensor(samples.finished, dtype=torch.float, device=accelerator.device)
            gated = safety_gate(r_h, r_s, is_safety, cfg.gate_threshold)
            r_c = penalize_truncated(gated.reward, finished, cfg.missing_eos_penalty)
            judged = judge_scores(models.judge, [p for p, _ in batch], samples.texts, accelerator.device)
        # 3. log pi_old, log pi_0 and V_old per generated token
        with timer("forward"):
            forward = dict(prompt_ids=prompt_ids, response_ids=samples.response_ids,
                           tokens=cfg.ppo.forward_tokens, device=accelerator.device)
            logprobs = per_token(lambda b: policy_logprobs(policy, b, cfg.sampling.temperature), **forward)
            with reference(policy, models.ref) as ref:
                ref_logprobs = per_token(lambda b: policy_logprobs(ref, b, cfg.sampling.temperature), **forward)
            values = per_token(lambda b: critic_values(critic, b), **forward)
    return Rollouts(prompt_ids, samples.response_ids, logprobs, ref_logprobs, values,
                    r_h, r_s, r_c, gated.used_safety.float(), is_safety, finished, judged)


def run(cfg: PPOConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    cfg = cfg.model_copy(update={"gate_threshold": resolve_gate_threshold(cfg.gate_threshold, cfg.safety_rm_from, accelerator.print)})
    world, rank = accelerator.num_processes, accelerator.process_index
    check_sizes(cfg, world)
    models = load_models(cfg, accelerator.device)
    prompts, counts = load_prompts(cfg.data, cfg, models)
    warn_chat_format(accelerator.print, run.name, models.tokenizer, cfg.data.template, [p for p, _ in prompts], cfg)
    held_out = load_prompts(cfg.early_stop.data, cfg, models)[0] if cfg.early_stop.data else None
    optimizers, schedulers, early, start = start_training(accelerator, run, models, held_out, cfg)
    progress = Progress(cfg.ppo.iterations, run.name, initial=start)
    metrics: dict[str, float] = {}
    done = start  # iterations done
    for iteration in range(start, cfg.ppo.iterations):
        torch.manual_seed(row_seed(cfg.seed, "ppo-train", iteration, rank))  # dropout, if any
        timer, began = Timer(), time.perf_counter()
        order = iteration_prompts(len(prompts), cfg.ppo.prompts_per_iteration, cfg.seed, iteration)
        mine = micro_batches(range(len(order)), rank, world, len(order))[0]  # places in the iteration
        batch = [prompts[order[k]] for k in mine]
        seeds = [row_seed(cfg.seed, "ppo", iteration, k) for k in mine]  # response k: its own seed
        # 1-3. generate, score and gate, log pi_old / log pi_0 / V_old per token; all processes'
        ro = gather(accelerator, collect_rollouts(accelerator, models, batch, seeds, cfg, timer))
        # 4. per-token rewards: WHITEN(LOGIT(R_c)) on the last token, -beta * KL on every token
        mask = ro.mask  # (B, T)
        kl = kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.ppo.kl_estimator) * mask  # (B, T)
        rewards = token_rewards(whiten(logit(ro.r_c)), kl, mask, cfg.ppo.beta)  # (B, T)
        check_rollouts(run, iteration, kl, rewards, ro.values, cfg.ppo.max_kl)
        if iteration % cfg.train.save_every == 0 and iteration != start:
            save_checkpoint(accelerator, run.checkpoints, iteration, cfg.train.keep_checkpoints)
        # 5. GAE; advantages whitened over the iteration's rollouts
        raw_advantages, returns = gae(rewards, ro.values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        advantages = whiten(raw_advantages, mask) * mask if cfg.ppo.whiten_advantages else raw_advantages
        # 6. PPO epochs over mini-batches: one optimizer step per mini-batch for each model
        with timer("training"):
            stats = ppo_epochs(accelerator, models, optimizers, schedulers, ro, advantages, returns, cfg, iteration, run)
        # 7. metrics; held-out reward and early stop
        done = iteration + 1
        metrics = {**rollout_metrics(ro, kl, returns, raw_advantages), **stats,
                   **{f"time_{k}": round(v, 3) for k, v in timer.seconds.items()}}
        stop = False
        if held_out and (done % cfg.early_stop.every == 0 or done == cfg.ppo.iterations):
            stop = record_evaluation(accelerator, models, held_out, early, metrics, done, run, cfg)
        elif not held_out and "judge" in metrics:  # no held-out prompts: the rollouts are the evaluations
            note_trend(accelerator, early, metrics, metrics["reward_c"], metrics["judge"], done, cfg)
        metrics["time_iteration"] = round(time.perf_counter() - began, 3)
        if done % cfg.train.log_every == 0 or done == cfg.ppo.iterations or stop:
            run.log(done, **metrics)
            accelerator.log(metrics, step=done)
        progress.update(1, reward=metrics["reward_c"], kl=metrics["kl"])
        if stop:
            accelerator.print(f"[rlhf] {run.name}: held-out {cfg.early_stop.metric} has not improved for "
                              f"{cfg.early_stop.patience} evaluations; stopped after iteration {done}")
            break
    progress.close()
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
        tracker.finish()
    kept = {**final_metrics(metrics, done, early, cfg.early_stop.metric, cfg.early_stop.min_improvement_se),
            "gate_threshold": cfg.gate_threshold}
    return finish(accelerator, run, models, early, kept, counts, cfg)


# ---------------------------------------------------------------------------------------------
# Setup


def check_sizes(cfg: PPOConfig, world: int) -> None:
    for key, value in (("ppo.prompts_per_iteration", cfg.ppo.prompts_per_iteration), ("train.batch_size", cfg.train.batch_size)):
        if value % world:
            raise RecipeError(f"{key}: {value} is not a multiple of the {world} processes")


def critic_source(cfg: PPOConfig) -> Path:
    """The critic's initial weights: ``critic_from`` (a reward model, or the critic of an
    earlier PPO stage), else the helpfulness reward model."""
    path = Path(cfg.critic_from or cfg.helpfulness_rm_from)
    manifest = read_manifest(path) or {}
    return path / "critic" if manifest.get("stage") == "ppo" else model_dir(path)


def check_critic_positions(source: Path, critic_config: Any, policy_config: Any) -> None:
    """The critic reads every packed prompt + response the policy samples, and sampling stops only
    at the policy's max_position_embeddings: a critic with fewer positions would read positions
    it was never trained on (RoPE extrapolates, silently)."""
    critic_limit = getattr(critic_config, "max_position_embeddings", None)
    policy_limit = getattr(policy_config, "max_position_embeddings", None)
    if critic_limit is not None and policy_limit is not None and critic_limit < policy_limit:
        raise InputError(f"critic_from: {source}: the critic has {critic_limit} positions, fewer than the policy's "
                         f"{policy_limit}, and reads every prompt + response the policy samples; start the critic "
                         "from a reward model with at least the policy's max_position_embeddings")


def load_models(cfg: PPOConfig, device: torch.device) -> Models:
    """The policy and critic (trained, dropout off: the log-probs and values of the rollouts and
    of the updates come from the same function), the reference in the policy's own dtype (its
    log-probs take the policy's precision path, so KL starts at 0), the reward models."""
    attn = cfg.policy.attn_implementation
    model, tokenizer = load_policy(cfg.policy_from, attn_implementation=attn)
    policy = PackedPolicy(disable_dropout(prepare_model(model, cfg.policy)))
    # a LoRA policy is its own reference (adapter off): no second copy of the weights
    ref = None if cfg.policy.lora.enabled else freeze(PackedPolicy(load_policy(cfg.policy_from, attn_implementation=attn)[0]), device)
    critic = load_reward_model(critic_source(cfg), attn_implementation=cfg.critic.attn_implementation)
    if critic.tokenizer.get_vocab() != tokenizer.get_vocab():  # it reads values at the policy's tokens
        raise InputError(f"critic_from: {critic_source(cfg)}: its tokenizer is not the policy's, so its values "
                         "would be read at other tokens; start the critic from a reward model trained on this policy")
    check_critic_positions(critic_source(cfg), critic.model.config, model.config)
    critic.model = disable_dropout(prepare_model(critic.model, cfg.critic, task_type="SEQ_CLS", modules_to_save=["score"]))
    rm_device = "cpu" if cfg.ppo.offload_reward_models else device
    frozen = {"dtype": inference_dtype(cfg.train.mixed_precision, device)}
    helpfulness = freeze(load_reward_model(cfg.helpfulness_rm_from, **frozen), rm_device)
    safety = freeze(load_reward_model(cfg.safety_rm_from, **frozen), rm_device)
    ways = scoring({"helpfulness": helpfulness, "safety": safety}, tokenizer, cfg.data.template)
    return Models(tokenizer, policy, ref, critic.train(), helpfulness, safety, ways, load_judge(cfg.judge, device))


def start_training(accelerator, run: StageRun, models: Models, held_out, cfg: PPOConfig) -> tuple[list, list, EarlyStop, int]:
    """Optimizers and schedulers prepared by accelerate, the run resumed from its last checkpoint
    (a fresh start evaluates the policy before PPO: the first candidate for the best). Returns
    them, the early-stop state and the iteration to start from."""
    optimizers, schedulers = make_optimizers(cfg, models)
    models.policy, models.critic, *optimizers = accelerator.prepare(models.policy, models.critic, *optimizers)
    early = EarlyStop()
    register_json_state(accelerator, *schedulers, early)  # JSON, not a pickle a checkpoint could plant
    start = resume(accelerator, run.checkpoints)
    run.truncate_metrics(start if start else -1)  # a fresh start logs its step-0 evaluation again
    start_trackers(accelerator, run)
    if held_out and start == 0:
        metrics: dict[str, Any] = {}
        record_evaluation(accelerator, models, held_out, early, metrics, 0, run, cfg)
        run.log(0, **metrics)
    return optimizers, schedulers, early, start


def freeze(model: torch.nn.Module, device) -> torch.nn.Module:
    return model.requires_grad_(False).eval().to(device)


def load_prompts(data_cfg, cfg: PPOConfig, models: Models) -> tuple[list[tuple[Prompt, list[int]]], dict]:
    """Prompts with their rendered ids; those over ``sampling.max_prompt_length`` are left out.
    An InputError when the longest plus ``sampling.max_new_tokens`` exceeds the policy's
    positions (every process checks every prompt, so all stop together, before any iteration)."""
    data = load_data(data_cfg, "prompts", cfg.seed)
    encoded = [(p, render_prompt(p.messages, models.tokenizer, cfg.data.template)) for p in data.records]
    kept = [(p, ids) for p, ids in encoded if len(ids) <= cfg.sampling.max_prompt_length]
    if not kept:
        raise RecipeError(f"sampling.max_prompt_length: none of the {len(encoded)} prompts fits in "
                          f"{cfg.sampling.max_prompt_length} tokens")
    check_fits([len(ids) for _, ids in kept], cfg.sampling.max_new_tokens,
               getattr(models.policy.model.config, "max_position_embeddings", None))
    return kept, {**data.counts(), "dropped_overlong": len(encoded) - len(kept)}


def make_optimizers(cfg: PPOConfig, models: Models) -> tuple[list, list]:
    """AdamW for the policy and the critic (``critic.lr``), and their lr schedules."""
    critic_train = cfg.train.model_copy(update={"lr": cfg.critic.lr or cfg.train.lr})
    optimizers = [make_optimizer(models.policy, cfg.train), make_optimizer(models.critic, critic_train)]
    steps = cfg.ppo.iterations * int(cfg.train.epochs) * (cfg.ppo.prompts_per_iteration // cfg.train.batch_size)
    factor = partial(lr_factor, total=steps, warmup=warmup_steps(steps, cfg.train), schedule=cfg.train.schedule,
                     min_ratio=cfg.train.min_lr_ratio)
    return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]


def iteration_prompts(n: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Prompt indices of an iteration: the next places in a stream of epochs, each a shuffle."""
    start = iteration * per_iteration
    orders: dict[int, list[int]] = {}
    for k in range(start, start + per_iteration):
        orders.setdefault(k // n, epoch_order(n, seed, k // n))
    return [orders[k // n][k % n] for k in range(start, start + per_iteration)]


# ---------------------------------------------------------------------------------------------
# Rollouts


def generate(policy: PackedPolicy, prompt_ids: list[list[int]], seeds: list[int], tokenizer, cfg: PPOConfig, greedy: bool = False):
    g = cfg.sampling
    return sample(policy.model, tokenizer, prompt_ids, seeds, g.max_new_tokens, 0.0 if greedy else g.temperature,
                  g.top_p, g.batch_size)


@contextmanager
def on_device(model: torch.nn.Module, device, offload: bool):
    """``model`` on ``device`` for the block; back to the CPU after it when ``offload``."""
    if offload:
        model.to(device)
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")


def score_both(models: Models, batch: list[tuple[Prompt, list[int]]], samples: Samples, cfg: PPOConfig, device) -> list[torch.Tensor]:
    """R_h, R_s (B,): sigmoid of each reward model's logit for the samples to the (prompt, prompt
    ids) of ``batch``, read from the generated ids where it shares the policy's tokens, else from
    the texts (``models.scoring``); a response cut at max_new_tokens is read at its last token,
    without the EOS it never generated."""
    conversations, prompt_ids = [p.messages for p, _ in batch], [ids for _, ids in batch]
    out = []
    for name in ("helpfulness", "safety"):
        rm = getattr(models, name)
        with on_device(rm, device, cfg.ppo.offload_reward_models):
            scores = sample_probabilities(rm, models.scoring[name], conversations, samples.texts, samples.finished,
                                          prompt_ids, samples.response_ids, cfg.ppo.forward_tokens)
            out.append(scores.float().to(device))
    return out


def judge_scores(judge: Judge | None, prompts: list[Prompt], texts: list[str], device) -> torch.Tensor:
    """(B,) the independent judge's scores of the responses; NaN without a judge."""
    if judge is None:
        return torch.full((len(texts),), math.nan, device=device)
    return torch.tensor(judge(prompts, texts), dtype=torch.float, device=device)


def gather(accelerator, mine: Rollouts) -> Rollouts:
    """Every process's rollouts, in the order of the iteration's prompts."""
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    parts = {}
    for f in fields(mine):
        value = getattr(mine, f.name)
        if isinstance(value, list):
            parts[f.name] = gather_object(value)
        else:  # per-token tensors are padded to the longest response of any process
            parts[f.name] = accelerator.gather(accelerator.pad_across_processes(value, dim=1) if value.ndim == 2 else value)
    return Rollouts(**parts)


def stopped(run: StageRun, iteration: int, reason: str) -> TrainingStopped:
    last = latest_checkpoint(run.checkpoints)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return TrainingStopped(f"ppo stopped at iteration {iteration + 1}: {reason}; {keep}. Lower train.lr "
                           "or raise ppo.beta and run again (a changed recipe starts afresh).")


def check_rollouts(run: StageRun, iteration: int, kl, rewards, values, max_kl: float | None) -> None:
    """Stop on non-finite rollouts or a policy too far from the reference (every process sees
    the same gathered rollouts, so every process stops)."""
    bad = int(sum((~torch.isfinite(t)).sum() for t in (kl, rewards, values)))
    if bad:
        raise stopped(run, iteration, f"{bad} non-finite rewards, KL or values")
    mean_kl = float(kl.sum(1).mean())
    if max_kl is not None and mean_kl > max_kl:
        raise stopped(run, iteration, f"KL to the reference {mean_kl:.3f} > ppo.max_kl {max_kl}")


# ---------------------------------------------------------------------------------------------
# PPO update

STATS = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")


def ppo_epochs(accelerator, models: Models, optimizers, schedulers, ro: Rollouts, advantages, returns,
               cfg: PPOConfig, iteration: int, run: StageRun) -> dict[str, float]:
    """``train.epochs`` passes over the rollouts in global mini-batches of ``train.batch_size``,
    each split into equal shares per process and micro-batches of ``train.micro_batch_size``.
    Losses are averaged over the generated tokens of the global mini-batch."""
    models.policy.train()
    models.critic.train()
    world, rank, epochs = accelerator.num_processes, accelerator.process_index, int(cfg.train.epochs)
    mask, n = ro.mask, len(ro.response_ids)
    sums = torch.zeros(len(STATS) + 1, device=accelerator.device)
    norms = []
    for epoch in range(epochs):
        order = epoch_order(n, cfg.seed, iteration * epochs + epoch)
        for first in range(0, n, cfg.train.batch_size):
            mini = order[first : first + cfg.train.batch_size]
            scale = world / mask[mini].sum()  # DDP averages over processes; x world -> per global token
            chunks = micro_batches(mini, rank, world, cfg.train.micro_batch_size)
            for j, rows in enumerate(chunks):
                with ExitStack() as stack:
                    if j < len(chunks) - 1:  # sync gradients on the last micro-batch only
                        stack.enter_context(accelerator.no_sync(models.policy))
                        stack.enter_context(accelerator.no_sync(models.critic))
                    sums += micro_step(accelerator, models, ro, advantages, returns, rows, cfg, scale)
            norms.append(optimizer_step(accelerator, models, optimizers, schedulers, cfg, iteration, run))
    totals = accelerator.reduce(sums, "sum")
    stats = {name: float(totals[i] / totals[-1]) for i, name in enumerate(STATS)}
    stats["grad_norm_policy"], stats["grad_norm_critic"] = (sum(n[k] for n in norms) / len(norms) for k in (0, 1))
    stats["lr"] = schedulers[0].get_last_lr()[0]
    return stats


def micro_step(accelerator, models: Models, ro: Rollouts, advantages, returns, rows: list[int], cfg: PPOConfig, scale) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the sums of STATS and its token count."""
    batch = pack_responses(ro.prompt_ids, ro.response_ids, rows, accelerator.device)
    at = (batch.rows, batch.steps)  # each generated token of the micro-batch, (K,)
    with accelerator.autocast():
        logits = policy_logits(models.policy, batch, cfg.sampling.temperature)  # (K, V)
        values = critic_values(models.critic, batch).float()  # (K,)
    lse = torch.logsumexp(logits.float(), dim=-1)  # (K,) shared by log-probs and entropy
    logprobs = token_logprobs(logits, batch.targets, lse)  # (K,)
    pg = policy_loss(logprobs, ro.logprobs[at], advantages[at], cfg.ppo.clip)
    vf = value_loss(values, ro.values[at], returns[at], cfg.ppo.value_clip)
    with torch.set_grad_enabled(cfg.ppo.entropy_coef > 0):
        ent = entropy(logits, lse)  # (K,)
    loss = pg.loss.sum() + vf.loss.sum() - cfg.ppo.entropy_coef * ent.sum()
    accelerator.backward(loss * scale)
    parts = (pg.loss, vf.loss, pg.clipped.float(), vf.clipped.float(), pg.approx_kl, ent)
    return torch.stack([*(p.detach().sum() for p in parts), torch.tensor(float(batch.targets.numel()), device=logits.device)])


def optimizer_step(accelerator, models: Models, optimizers, schedulers, cfg: PPOConfig, iteration: int, run) -> tuple[float, float]:
    clip = cfg.train.grad_clip or float("inf")
    norms = tuple(float(accelerator.clip_grad_norm_(m.parameters(), clip)) for m in (models.policy, models.critic))
    if not all(math.isfinite(n) for n in norms):  # gradients are all-reduced: every process agrees
        raise stopped(run, iteration, f"non-finite gradient norm (policy {norms[0]}, critic {norms[1]})")
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for scheduler in schedulers:
        scheduler.step()
    return norms


# ---------------------------------------------------------------------------------------------
# Metrics, evaluation, output


def rollout_metrics(ro: Rollouts, kl: torch.Tensor, returns: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Means over the iteration's rollouts. ``safety_scored``: share of rollouts scored by R_s;
    ``gate_share``: share of those sent there by the gate (R_s < threshold on a helpfulness
    prompt); ``kl``: KL(pi || pi_0) per response, summed over its tokens; ``truncation_rate``:
    share of responses cut at ``sampling.max_new_tokens`` (no EOS); ``advantage_mean`` /
    ``advantage_std``: GAE advantages over the generated tokens, before whitening; ``judge``: the
    independent judge's mean score of the responses (with a judge)."""
    mask, used = ro.mask, ro.used_safety
    gated = (used * (1 - ro.is_safety)).sum()
    tokens = advantages[mask.bool()]  # (N,) one per generated token
    judged = {"judge": float(ro.judge.mean())} if not bool(torch.isnan(ro.judge).any()) else {}
    return {**judged, "advantage_mean": float(tokens.mean()), "advantage_std": float(tokens.std(correction=0)),
        "reward_h": float(ro.r_h.mean()), "reward_s": float(ro.r_s.mean()), "reward_c": float(ro.r_c.mean()),
        "safety_scored": float(used.mean()), "gate_share": float(gated / used.sum()) if used.sum() else 0.0,
        "kl": float(kl.sum(1).mean()), "kl_per_token": float(kl.sum() / mask.sum()),
        "response_length": float(mask.sum(1).mean()), "truncation_rate": float(1 - ro.finished.mean()),
        "explained_variance": explained_variance(ro.values, returns, mask),
    }


def evaluate(accelerator, models: Models, held_out: list[tuple[Prompt, list[int]]],
             cfg: PPOConfig) -> tuple[list[float], list[float] | None]:
    """Per held-out prompt, in their order (all processes): the gated reward R_c (truncated
    responses penalised, as in the rollouts) of the greedy response, and the judge's score of it
    (None without a judge)."""
    n = min(len(held_out), cfg.early_stop.max_prompts)
    places = range(accelerator.process_index, n, accelerator.num_processes)
    mine = [held_out[i] for i in places]
    policy = accelerator.unwrap_model(models.policy).eval()
    scores = {}
    if mine:
        with torch.no_grad(), accelerator.autocast():
            samples = generate(policy, [ids for _, ids in mine], [0] * len(mine), models.tokenizer, cfg, greedy=True)
            r_h, r_s = score_both(models, mine, samples, cfg, accelerator.device)
        is_safety = torch.tensor([float(p.is_safety) for p, _ in mine], device=accelerator.device)
        gated = safety_gate(r_h, r_s, is_safety, cfg.gate_threshold)
        finished = torch.tensor(samples.finished, device=accelerator.device)
        reward = penalize_truncated(gated.reward, finished, cfg.missing_eos_penalty)
        judged = judge_scores(models.judge, [p for p, _ in mine], samples.texts, accelerator.device)
        scores = dict(zip(places, zip(reward.tolist(), judged.tolist())))
    every = gather_dict(accelerator, scores)
    rewards, judged = ([every[i][k] for i in range(n)] for k in (0, 1))
    return rewards, (judged if models.judge else None)


def record_evaluation(accelerator, models: Models, held_out, early: EarlyStop, metrics: dict, done: int,
                      run: StageRun, cfg: PPOConfig) -> bool:
    """Evaluate on the held-out prompts into ``metrics`` (``eval_reward``, ``eval_judge``),
    update early stopping on ``early_stop.metric`` and the over-optimisation trend; True to stop."""
    rewards, judged = evaluate(accelerator, models, held_out, cfg)
    metrics["eval_reward"] = sum(rewards) / len(rewards)
    if judged is not None:
        metrics["eval_judge"] = sum(judged) / len(judged)
        note_trend(accelerator, early, metrics, metrics["eval_reward"], metrics["eval_judge"], done, cfg)
    scores = judged if cfg.early_stop.metric == "judge" else rewards
    return update_early_stop(early, scores, metrics, done, accelerator, run, cfg)


def note_trend(accelerator, early: EarlyStop, metrics: dict, proxy: float, judge: float, done: int, cfg: PPOConfig) -> None:
    """Record an evaluation's proxy reward and judge score; warn (terminal, ``judge_diverging``
    in ``metrics``) when the proxy rose while the judge fell at each of the last
    ``early_stop.warn_diverging`` evaluations."""
    early.proxy.append(proxy)
    early.judged.append(judge)
    n = cfg.early_stop.warn_diverging
    if diverging(early.proxy, early.judged, n):
        metrics["judge_diverging"] = True
        accelerator.print(f"[rlhf] ppo: warning: at iteration {done} the proxy reward has risen while the judge's "
                          f"score fell for {n} evaluations in a row: the policy is over-optimising its reward "
                          "models (keep an earlier checkpoint, raise ppo.beta, or set early_stop.metric: judge)")


def beats(scores: list[float], best_scores: list[float], best: float, min_se: float) -> bool:
    """Whether an evaluation's per-prompt scores beat the best evaluation's on the same prompts:
    their mean difference d is above 0 and above ``min_se`` standard errors of d (paired over the
    prompts). Without the best's scores (the first evaluation) their mean must beat ``best``."""
    if not best_scores:
        return sum(scores) / len(scores) > best
    diffs = [a - b for a, b in zip(scores, best_scores)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return mean > 0 and mean > min_se * se


def update_early_stop(early: EarlyStop, scores: list[float], metrics: dict, done: int, accelerator, run: StageRun,
                      cfg: PPOConfig) -> bool:
    """Record a held-out evaluation (per-prompt scores of ``early_stop.metric``); checkpoint a
    new best (``beats``, with its iteration's ``metrics``); True when patience ran out."""
    if beats(scores, early.best_scores, early.best, cfg.early_stop.min_improvement_se):
        early.best, early.best_scores = sum(scores) / len(scores), list(scores)
        early.best_iteration, early.bad_evals, early.best_metrics = done, 0, dict(metrics)
        save_checkpoint(accelerator, run.checkpoints / "best", done, keep=1)
        return False
    early.bad_evals += 1
    return cfg.early_stop.patience is not None and early.bad_evals >= cfg.early_stop.patience


def final_metrics(metrics: dict[str, Any], last: int, early: EarlyStop, metric: str, min_se: float = 0.0) -> dict[str, Any]:
    """The manifest's final metrics: those of the policy saved in ``model/``. ``kept_iteration``
    and ``kept_by`` (``early_stop.metric``, or ``last`` with nothing held out), then the metrics
    of the kept iteration (its held-out ``eval_reward`` / ``eval_judge``, and the metrics of the
    rollouts it trained on, sampled before its update, as ``metrics.jsonl`` logs them at its step;
    iteration 0, the start policy, has only the held-out ones); ``last_iteration``
    and, where the kept iteration is not the last, the last iteration's ``metrics`` as
    ``last_NAME``; ``kept_min_se`` where a new best had to beat the best by ``min_se`` standard
    errors (``early_stop.min_improvement_se``)."""
    by = "last" if early.best_iteration < 0 else metric
    rule = {"kept_min_se": min_se} if min_se and by != "last" else {}
    if early.best_iteration < 0 or early.best_iteration == last:
        return {"kept_iteration": last, "kept_by": by, **rule, **metrics, "last_iteration": last}
    return {"kept_iteration": early.best_iteration, "kept_by": metric, **rule, **early.best_metrics, "last_iteration": last,
            **{f"last_{key}": value for key, value in metrics.items()}}


def finish(accelerator, run: StageRun, models: Models, early: EarlyStop, metrics, counts, cfg: PPOConfig) -> Path:
    """Save ``model/`` (the policy: the best held-out one when evaluating) and ``critic/``; the
    manifest's ``metrics`` (``final_metrics``) are the saved policy's."""
    if early.best_iteration >= 0:
        accelerator.load_state(str(latest_checkpoint(run.checkpoints / "best")))
    save_model(accelerator, models.policy, models.tokenizer, run.dir / "model", cfg.policy.lora, cfg.data.template)
    save_model(accelerator, models.critic, models.tokenizer, run.dir / "critic", cfg.critic.lora, cfg.data.template)
    extra = ({"best_iteration": early.best_iteration, "best_eval_reward": early.best,
              "early_stop_metric": cfg.early_stop.metric} if early.best_iteration >= 0 else {})
    return run.finish(metrics, data=counts, reward_scoring=models.scoring, **extra)
