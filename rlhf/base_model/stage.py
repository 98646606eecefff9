"""The base_model stage: copy a local checkpoint in, fetch one from the Hugging Face hub, or
build a tokenizer and a randomly initialised Llama from scratch. Either way it writes ``model/``
(weights + tokenizer), so the stages after it read one kind of directory whether the user brought
a checkpoint or the quickstart made one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhf.artifacts import InputError, StageRun, resolve_input
from rlhf.base_model.config import BaseModelConfig
from rlhf.data.records import DataError, Problem
from rlhf.data.formats import is_hub_id
from rlhf.models import build_model, load_policy, train_tokenizer


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


def refuse_symlink_loops(root: Path) -> None:
    """A link to a directory that holds it would be copied (followed) forever."""
    for dirpath, dirnames, _ in os.walk(root):  # links to directories are listed, not entered
        for link in (Path(dirpath) / name for name in dirnames):
            if link.is_symlink() and link.resolve() in (link.parent.resolve(), *link.parent.resolve().parents):
                raise InputError(f"{link}: a symbolic link to a directory that holds it (a loop); remove it "
                                 "(from_pretrained is copied, following links)")


def copy_pretrained(source: Path, out: Path) -> tuple[Any, Any]:
    """A local checkpoint copied to ``out`` as it is, or a hub model saved there in its own
    dtype (only the files transformers loads, not the whole repository); its model and tokenizer."""
    if out.exists():
        shutil.rmtree(out)
    if not is_hub_id(str(source)):
        shutil.copytree(source, out)
        return load_policy(out)
    model, tokenizer = load_policy(source, dtype="auto")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


def run(cfg: BaseModelConfig) -> Path:
    """The base_model stage: copy a checkpoint in, or build tokenizer + model from scratch."""
    paths = cfg.tokenizer.corpus if cfg.tokenizer else []
    corpus = read_corpus(resolve_input(f"tokenizer.corpus.{i}", p, ()) for i, p in enumerate(paths))
    if cfg.from_pretrained is not None and not is_hub_id(str(cfg.from_pretrained)):
        refuse_symlink_loops(cfg.from_pretrained)
    run = StageRun(cfg).start()
    out = run.dir / "model"
    if cfg.from_pretrained is not None:
        model, tokenizer = copy_pretrained(cfg.from_pretrained, out)
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
