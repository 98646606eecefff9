"""The SFT stage, and the one fine-tuning path every stage that trains a policy on
conversations goes through (rejection sampling, Ghost Attention, context distillation).

Reads top to bottom: load the model and data, tokenize and pack once, train with the shared
loop (``rlhf.training``), save ``model/`` and the manifest. Our own loop rather than
``SFTTrainer``: rows are packed once with per-example attention isolation, logits are computed
only at answer positions, the loss is normalised by the global batch's answer tokens (packed ==
unpacked, N processes == 1), and resuming replays exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

from rlhf.artifacts import StageRun
from rlhf.chat_template import warn_chat_format
from rlhf.data import SFTExample, load_data
from rlhf.models import fit_max_length, load_policy
from rlhf.packing import needs_one_row
from rlhf.training import make_accelerator, prepare_model, save_model, train_loop
from sft.config import SFTConfig
from sft.data import build_rows, collate, sft_loss


def fine_tune(run: StageRun, accelerator, source: Path, examples: Sequence[SFTExample], cfg: Any) -> tuple[dict, dict]:
    """Fine-tune the causal LM at ``source`` on ``examples``: ``cfg.data`` renders them (masked,
    fitted to ``max_length``, packed), ``cfg.train`` and ``cfg.model`` drive the shared loop,
    which resumes from ``run.checkpoints``; saves ``model/``. Returns the training metrics and
    the data counts."""
    # 1. model and tokenizer
    model, tokenizer = load_policy(source, attn_implementation=cfg.model.attn_implementation)
    data_cfg = fit_max_length(cfg.data, model, run.name, accelerator.print)
    model = prepare_model(model, cfg.model)
    # 2. data: rendered, fitted to max_length and packed once (after a warning if the tokenizer
    #    breaks the chat markers or drops characters)
    warn_chat_format(accelerator.print, run.name, tokenizer, cfg.data.template, examples, cfg)
    rows, counts = build_rows(examples, tokenizer, data_cfg)
    accelerator.print(
        f"[rlhf] {run.name}: {counts['examples_used']}/{counts['examples']} examples in {counts['packed_rows']} rows "
        f"(truncated {counts['truncated']}, dropped {counts['dropped_overlong'] + counts['dropped_no_loss']})"
    )
    # 3. train (flash attention keeps packed examples apart only in one flattened row per
    #    micro-batch), then save the model in Hugging Face format
    flatten = needs_one_row(model.config)
    metrics = train_loop(run, model, rows, partial(collate, flatten=flatten), sft_loss, cfg.train, cfg.seed,
                         accelerator, desc=f"{run.name} fine-tune")
    save_model(accelerator, model, tokenizer, run.dir / "model", cfg.model.lora, cfg.data.template)
    return metrics, counts


def fine_tune_generated(run: StageRun, accelerator, source: Path, generated: Sequence[SFTExample], cfg: Any) -> tuple[dict, dict]:
    """``fine_tune`` for the stages that generate their examples: the generated ones plus the
    ``data.replay`` SFT conversations, counted apart."""
    replay = load_data(cfg.data.replay, "sft", cfg.seed).records if cfg.data.replay else []
    metrics, counts = fine_tune(run, accelerator, source, [*generated, *replay], cfg)
    return metrics, {"generated_examples": len(generated), "replay_examples": len(replay), **counts}


def run(cfg: SFTConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    data = load_data(cfg.data, "sft", cfg.seed)
    metrics, counts = fine_tune(run, accelerator, cfg.model_from, data.records, cfg)
    return run.finish(metrics, data={**data.counts(), **counts})
