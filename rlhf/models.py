"""Models and tokenizers: the one loader of policies (local Hugging Face checkpoints, stage
directories, or Hugging Face hub model ids), the one rule for the dtype and device of models
that only run forwards, and a base model from nothing (a tokenizer trained in-process, a
randomly initialised Llama of a named size).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from rlhf.artifacts import InputError, model_dir
from rlhf.data.chat import CHAT_MARKERS
from rlhf.data.formats import is_hub_id

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Llama-architecture sizes: (hidden, layers, attention heads, key/value heads, MLP width).
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 192),
    "small": (128, 4, 4, 2, 384),
    "medium": (256, 6, 8, 4, 768),
    "20m": (512, 6, 8, 4, 1536),
}


@contextmanager
def _loading(source: str | Path, what: str):
    """A damaged or incomplete model directory, or a hub model that cannot be had, becomes an
    InputError naming it, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, EOFError, SafetensorError) as exc:  # what transformers raises for them
        first = next(iter(str(exc).splitlines()), "")
        hint = (f"a Hugging Face hub model id: to use a local copy, download it where there is internet "
                f"(`hf download {source} --local-dir DIR`) and give DIR" if is_hub_id(str(source)) else
                "expected a Hugging Face model directory (config.json, weights, tokenizer files) or a finished stage")
        raise InputError(f"{source}: cannot load {what} ({type(exc).__name__}: {first}); {hint}") from None


def _pretrained(path: str | Path) -> tuple[str | Path, dict[str, Any]]:
    """What ``from_pretrained`` is given for ``path``: a hub model id (``org/name``, no local
    path) as it is, fetched or read from the hub cache; else the local directory, no hub access."""
    return (str(path), {}) if is_hub_id(str(path)) else (Path(path), {"local_files_only": True})


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory (or a hub model id), with a pad token (EOS when it
    has none)."""
    from transformers import AutoTokenizer

    source, hub = _pretrained(path)
    with _loading(source, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                attn_implementation: str | None = None) -> tuple[Any, Any]:
    """A causal LM (a policy stage directory's ``model/``, a Hugging Face model directory, or a
    hub model id) on ``device`` in ``dtype`` (``"auto"``: the checkpoint's), in eval mode, and
    its tokenizer."""
    from transformers import AutoModelForCausalLM

    source = model_dir(Path(path))
    if not source.is_dir() and not is_hub_id(str(path)):
        gone = f"; {path} is a finished stage whose model/ is gone: run that stage again" if source != Path(path) else ""
        raise InputError(f"{source}: no such directory{gone}")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # a local directory by its absolute path: a LoRA adapter trained on it records that path as
    # its base, so the adapter loads (AutoPeftModelForCausalLM) from any working directory
    name, hub = _pretrained(source.resolve() if source.is_dir() else path)
    with _loading(name, "a causal LM"):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **hub, **kwargs)
    return model.to(device).eval(), load_tokenizer(name)


def fit_max_length(data: Any, model: Any, stage: str, say: Callable[[str], None]) -> Any:
    """A stage's ``data`` config whose ``max_length`` the model can take: unchanged when it is at
    most the model's ``max_position_embeddings``; else an InputError (``longer_than_model:
    fail``) or, with a warning through ``say``, a copy clamped to the limit (``clamp``)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or data.max_length <= limit:
        return data
    over = f"{stage}: data.max_length {data.max_length} exceeds the model's max_position_embeddings {limit}"
    if data.longer_than_model == "fail":
        raise InputError(f"{over}; set data.max_length to at most {limit}, or data.longer_than_model=clamp "
                         "to use the model's limit")
    say(f"[rlhf] warning: {over}; using data.max_length={limit} (data.longer_than_model=clamp)")
    return data.model_copy(update={"max_length": limit})


def inference_dtype(mixed_precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of a model that only runs forwards (a sampler, a reward model): bf16 when the
    stage trains in bf16 on a GPU, else float32 (CPUs run bf16 slower, and fp16 weights
    overflow)."""
    return torch.bfloat16 if mixed_precision == "bf16" and torch.device(device).type == "cuda" else torch.float32


def default_device() -> torch.device:
    """The GPU when there is one (commands that run outside a launcher), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    tokenizer.add_tokens(list(CHAT_MARKERS))  # single tokens (the renderer writes them as text)
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


