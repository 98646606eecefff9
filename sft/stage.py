"""The SFT stage: fine-tune a causal LM on conversations, with the loss on the answers only.

Reads top to bottom: load the model and data, tokenize and pack once, train with the shared
loop (``rlhf.training``), save ``model/`` and the manifest. Our own loop rather than
``SFTTrainer``: rows are packed once with per-example attention isolation, logits are computed
only at answer positions, the loss is normalised by the global batch's answer tokens (packed ==
unpacked, N processes == 1), and resuming replays exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from rlhf.artifacts import StageRun, model_dir
from rlhf.data import load_data
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.training import make_accelerator, prepare_model, save_model, train_loop
from sft.config import SFTConfig
from sft.data import build_rows, collate, sft_loss


def run(cfg: SFTConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    # 1. model and tokenizer
    source = model_dir(cfg.model_from)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, attn_implementation=cfg.model.attn_implementation)
    model = prepare_model(model, cfg.model)
    # 2. data: rendered, fitted to max_length and packed once
    data = load_data(cfg.data, "sft", cfg.seed)
    rows, counts = build_rows(data.records, tokenizer, cfg.data)
    accelerator.print(
        f"[rlhf] sft: {counts['examples_used']}/{counts['examples']} examples in {counts['packed_rows']} rows "
        f"(truncated {counts['truncated']}, dropped {counts['dropped_overlong'] + counts['dropped_no_loss']})"
    )
    # 3. train, then save the model in Hugging Face format
    flatten = cfg.model.attn_implementation == "flash_attention_2"  # varlen: one row per micro-batch
    metrics = train_loop(
        run, model, rows, partial(collate, flatten=flatten), sft_loss, cfg.train, cfg.seed, accelerator, desc="sft"
    )
    save_model(accelerator, model, tokenizer, run.dir / "model", cfg.model.lora)
    return run.finish(metrics, data={**data.counts(), **counts})
