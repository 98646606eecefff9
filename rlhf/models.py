"""Models and tokenizers: load local Hugging Face checkpoints, and make a base model from
nothing (a tokenizer trained in-process, a randomly initialised Llama of a named size).

The ``base_model`` stage writes ``model/`` (weights + tokenizer) either way, so the stages after
it read one kind of directory whether the user brought a checkpoint or the quickstart made one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from rlhf.artifacts import StageRun, resolve_input
from rlhf.data.records import DataError, Problem

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# The Llama 2 chat markers become single tokens (the renderer writes them as text).
CHAT_MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]

# Llama-architecture sizes: (hidden, layers, attention heads, key/value heads, MLP width).
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 192),
    "small": (128, 4, 4, 2, 384),
    "medium": (256, 6, 8, 4, 768),
    "20m": (512, 6, 8, 4, 1536),
}


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """A causal LM from a local directory (never the hub)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype, local_files_only=True, **kwargs)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``: every string encodes (no unknown
    characters), BOS/EOS/PAD are special tokens and the chat markers single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(CHAT_MARKERS)
    return tokenizer


def build_model(size: str, vocab_size: int, seed: int = 0, max_positions: int = 512, tie_embeddings: bool = False,
                bos_id: int = 1, eos_id: int = 2, pad_id: int = 0):
    """A randomly initialised Llama of a named size (see ``SIZES``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)


def read_corpus(paths: Iterable[Path]) -> list[str]:
    """Every string value in JSONL files (every line of other files). A line that is not UTF-8
    or not JSON raises ``DataError`` naming the file and line."""
    texts: list[str] = []
    for path in map(Path, paths):
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                    texts += _strings(json.loads(line)) if path.suffix == ".jsonl" else [line]
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise DataError([Problem(str(path), number, "corpus", f"{type(exc).__name__}: {exc}")]) from exc
    return texts


def run_base_model(cfg) -> Path:
    """The base_model stage: copy a local checkpoint, or build tokenizer + model from scratch."""
    paths = cfg.tokenizer.corpus if cfg.tokenizer else []
    corpus = read_corpus(resolve_input(f"tokenizer.corpus.{i}", p, ()) for i, p in enumerate(paths))
    run = StageRun(cfg).start()
    out = run.dir / "model"
    if cfg.from_pretrained is not None:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(cfg.from_pretrained, out)
        model, tokenizer = load_causal_lm(out), load_tokenizer(out)
    else:
        tokenizer = train_tokenizer(corpus, cfg.tokenizer.vocab_size)
        model = build_model(
            cfg.model.size, len(tokenizer), cfg.seed, cfg.model.max_positions, cfg.model.tie_embeddings,
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    metrics = {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
    return run.finish(metrics)
