"""The reward-model stage: a causal-LM checkpoint -> a scalar reward model trained on
preference pairs with the margin ranking loss, then evaluated on held-out and test pairs.

Reads top to bottom: build the reward model from the checkpoint, load and mix the pairs (held-out
pairs of every source set aside first), tokenize once, train with the shared loop
(``rlhf.training``), save ``model/``, evaluate the saved model into ``eval/``, write the manifest.
Our own loop rather than TRL's ``RewardTrainer``: chosen and rejected of a micro-batch are packed
into one row and scored in one forward with no padding, the loss is averaged over the global
batch's pairs (N processes == 1), and resuming replays exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.artifacts import StageRun, model_dir
from rlhf.chat_template import warn_chat_format
from rlhf.models import fit_max_length, load_tokenizer
from rlhf.training import make_accelerator, prepare_model, save_model, train_loop
from reward_model.config import RewardModelConfig
from reward_model.data import build_pairs, collate, load_pairs, rm_loss
from reward_model.evaluate import evaluate_sets, write_eval
from reward_model.model import RewardModel, classifier_pad_id, init_reward_model, load_reward_model


def run(cfg: RewardModelConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    # 1. reward model: the checkpoint's backbone (every weight) + a new scalar head
    source = model_dir(cfg.model_from)
    tokenizer = load_tokenizer(source)
    hf = init_reward_model(source, classifier_pad_id(tokenizer), cfg.seed, attn_implementation=cfg.model.attn_implementation)
    cfg = cfg.model_copy(update={"data": fit_max_length(cfg.data, hf, run.name, accelerator.print)})
    hf = prepare_model(hf, cfg.model, task_type="SEQ_CLS", modules_to_save=["score"])
    model = RewardModel(hf, tokenizer, cfg.data.template, cfg.data.max_length)
    # 2. data: held-out pairs of each source set aside, the rest mixed, tokenized once
    data, tests = load_pairs(cfg.data, cfg.seed)
    warn_chat_format(accelerator.print, run.name, tokenizer, cfg.data.template, data.records, cfg)
    items, counts = build_pairs(data.records, tokenizer, cfg.data, cfg.loss)
    drawn = data.parts or {name: c["used"] for name, c in data.sources.items()}
    accelerator.print(
        f"[rlhf] {run.name}: {counts['pairs']} training pairs ({', '.join(f'{k} {v}' for k, v in drawn.items())}; "
        f"truncated {counts['truncated']}, dropped {counts['dropped_overlong']})"
    )
    # 3. train, then save the model in Hugging Face format
    metrics = train_loop(run, model, items, collate, rm_loss, cfg.train, cfg.seed, accelerator, desc=run.name)
    save_model(accelerator, model, tokenizer, run.dir / "model", cfg.model.lora, cfg.data.template)
    # 4. evaluate the saved model on held-out and test pairs; calibrate the safety gate on them
    results, gate = evaluate(cfg, run.dir, tests, accelerator.device) if accelerator.is_main_process and tests else ({}, None)
    accelerator.wait_for_everyone()
    return run.finish({**metrics, **eval_metrics(results, gate)}, data={**data.counts(), **counts})


def evaluate(cfg: RewardModelConfig, out: Path, tests: dict[str, list], device) -> tuple[dict[str, dict], dict]:
    """Results per test set and the calibrated gate, from the saved model (what later stages will load)."""
    rm = load_reward_model(out / "model", device)
    e = cfg.eval
    results, gate = evaluate_sets(rm, tests, e.unsafe_threshold, e.gate_recall, e.calibration_bins, e.batch_tokens)
    write_eval(results, out / "eval", gate)
    return results, gate


def eval_metrics(results: dict[str, dict], gate: dict | None) -> dict:
    """The manifest's evaluation metrics: each test set's accuracy; the calibrated safety gate,
    ``gate_threshold`` (what ``gate_threshold: calibrated`` reads; None without a held-out or test
    response labelled unsafe) with the ``gate_recall`` and ``gate_precision`` it reaches; and the
    share of each test set's safe responses it flags (``eval/NAME/gate_safe_flagged``)."""
    gate = gate or {"threshold": None}
    return {**{f"eval/{name}/accuracy": r["accuracy"] for name, r in results.items()},
            "gate_threshold": gate["threshold"], "gate_recall": gate.get("recall"), "gate_precision": gate.get("precision"),
            **{f"eval/{name}/gate_safe_flagged": g["safe_flagged"] for name, g in gate.get("test_sets", {}).items()}}
