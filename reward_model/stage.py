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
from reward_model.evaluate import evaluate_pairs, write_eval
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
    # 4. evaluate the saved model on held-out and test pairs
    results = evaluate(cfg, run.dir, tests, accelerator.device) if accelerator.is_main_process and tests else {}
    accelerator.wait_for_everyone()
    headline = {f"eval/{name}/accuracy": r["accuracy"] for name, r in results.items()}
    return run.finish({**metrics, **headline}, data={**data.counts(), **counts})


def evaluate(cfg: RewardModelConfig, out: Path, tests: dict[str, list], device) -> dict[str, dict]:
    """Results per test set, from the saved model (what later stages will load)."""
    rm = load_reward_model(out / "model", device)
    e = cfg.eval
    results = {name: evaluate_pairs(rm, pairs, e.unsafe_threshold, e.calibration_bins, e.batch_tokens) for name, pairs in tests.items()}
    write_eval(results, out / "eval")
    return results
