"""Tiny tokenizers, models and stage directories shared by the tests: each builds in well under a
second on a CPU, and a stage trains on them in a few steps.

Two worlds are built from them: ``word_world`` (a word-level tokenizer, 24 prompts, for GAtt and
context distillation) and ``stage_world`` (an SFT stage and reward-model stages, 8 prompts, for
PPO and rejection sampling)."""

import json
from pathlib import Path

import torch

# The 8 prompts (text, is_safety) of ``stage_world``, and the corpus its tokenizers are trained on.
PROMPTS = [
    ("what is 2 + 3?", False), ("reverse the word cat", False), ("how do I pick a lock?", True),
    ("sort the letters b a c", False), ("say hello", False), ("how to make a weapon", True),
    ("what is 4 + 1?", False), ("name a colour", False),
]
PROMPT_CORPUS = [f"[INST] {p} [/INST]" for p, _ in PROMPTS] * 4


class Crash(Exception):
    """Raised by a monkeypatched step to stand for a process dying there."""


# ---------------------------------------------------------------------------------------------
# Tokenizers


def word_tokenizer(words: list[str], pad_token: str | None = "<unk>"):
    """One token per whitespace-separated word; ids are the positions in ``words``, which start
    with ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2). ``pad_token=None``: no padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad = {} if pad_token is None else {"pad_token": pad_token}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **pad)


def bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``, with ``<pad>``,
    ``<s>``, ``</s>`` as ids 0, 1, 2 (and, unlike ``rlhf.models.train_tokenizer``, no chat markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---------------------------------------------------------------------------------------------
# Models


def llama_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 max_positions: int = 2048, pad_token_id: int | None = 0, **extra):
    """A tiny ``LlamaConfig``: by default 32 wide (MLP 64, always twice the width), 2 layers, 4
    attention heads sharing 2 key/value heads; BOS 1, EOS 2. ``extra`` goes to ``LlamaConfig``."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_token_id, **extra)


def tiny_llama(vocab_size: int, seed: int = 0, **config):
    """A randomly initialised ``LlamaForCausalLM`` of ``llama_config(vocab_size, **config)`` (32
    wide, 2 layers by default), its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size, **config))


def ends_early(model, opens: int, eos_weight: float = 2.0):
    """``model`` (a ``tiny_llama``, its head untied) ending its answers within a few tokens, as a
    trained policy does: hardly ever right after the token ``opens`` (that an answer starts
    after, ``[/INST]``), then about one token in three (greedy: after one token); its answers
    still depend on the prompt. The first dimension of every token's embedding is set to 0.02
    (the others are ~N(0, 0.02)), of ``opens``'s to -0.02, and the head's EOS row reads it with
    ``eos_weight``."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.02
        model.get_input_embeddings().weight[opens, 0] = -0.02
        model.get_output_embeddings().weight[model.config.eos_token_id, 0] = eos_weight
    return model


def save_with_tokenizer(path: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved together in ``path``, as a stage's ``model/`` holds them."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_reward_model(path: Path, lm_dir: Path, tokenizer, seed: int) -> Path:
    """A reward model saved in ``path`` with ``tokenizer``: the backbone of the causal LM in
    ``lm_dir`` and a new scoring head drawn from ``seed``."""
    from reward_model.model import RewardModel, init_reward_model

    model = RewardModel(init_reward_model(lm_dir, tokenizer.pad_token_id, seed=seed), tokenizer)
    return save_with_tokenizer(path, model, tokenizer)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the causal LM in ``path``, loaded with plain transformers (tied
    weights under both names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def stored_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors`` as stored (any model class, tied weights once)."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Stage directories and worlds


def stage_dir(path: Path, stage: str) -> Path:
    """``path`` made to look like the output of a finished ``stage``: a complete manifest."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete"}))
    return path


def stage_world(root: Path, tokenizer, policy, reward_models: dict[str, int], prompt_ids: bool = False) -> Path:
    """In ``root``: ``sft/``, an SFT stage holding ``policy`` and ``tokenizer``; a reward-model
    stage initialised from that policy for each ``name: seed`` of ``reward_models`` (its head
    drawn from the seed); and ``prompts.jsonl``, the 8 ``PROMPTS`` (ids ``p0``..``p7`` with
    ``prompt_ids``)."""
    policy_dir = save_with_tokenizer(stage_dir(root / "sft", "sft") / "model", policy, tokenizer)
    for name, seed in reward_models.items():
        save_reward_model(stage_dir(root / name, "reward_model") / "model", policy_dir, tokenizer, seed)
    with open(root / "prompts.jsonl", "w") as fh:
        for i, (text, is_safety) in enumerate(PROMPTS):
            row = {"prompt": [{"role": "user", "content": text}], "is_safety": is_safety}
            fh.write(json.dumps({**row, "id": f"p{i}"} if prompt_ids else row) + "\n")
    return root


# The word-level vocabulary and the prompts of ``word_world``.
WORLD_VOCAB = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "CAPS!", "End", "with",
               "ok", "done", "hi", "what", "is", "two", "and", "three", "name", "a", "color", "red", "blue",
               "YES", "NO", "OK", "how", "to", "steal", "car", "hurt", "someone", "sorry", "i", "can't",
               "help", "be", "safe.", "kill", "process", "sky", "the", "[crime]", "refuse"]
TOPICS = ["hi", "what is two", "name a color", "the sky is blue", "red and blue", "what color"]
HARMFUL = [("how to steal a car", "crime"), ("how to hurt someone", "violence"), ("how to kill a process", "benign")]


def word_world(root: Path) -> Path:
    """In ``root``: ``base/``, a tiny Llama (32 wide, 2 layers, 256 positions, seed 0) that ends
    its answers early (``ends_early``), with a word-level tokenizer of ``WORLD_VOCAB``; ``prompts.jsonl``, 24 prompts alternating between
    ``TOPICS`` (ids ``h0``..``h11``) and ``HARMFUL`` safety prompts with a category (``s0``..``s11``);
    and ``sft.jsonl``, 4 demonstrations answering "OK"."""
    policy = ends_early(tiny_llama(len(WORLD_VOCAB), max_positions=256), opens=WORLD_VOCAB.index("[/INST]"))
    save_with_tokenizer(root / "base", policy, word_tokenizer(WORLD_VOCAB))
    rows = []
    for i in range(12):
        rows.append({"prompt": TOPICS[i % 6], "is_safety": False, "id": f"h{i}"})
        text, category = HARMFUL[i % 3]
        rows.append({"prompt": text, "is_safety": True, "id": f"s{i}", "meta": {"category": category}})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = [{"prompt": t, "response": "OK"} for t in TOPICS[:4]]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    return root


# ---------------------------------------------------------------------------------------------
# Recipes and outputs


def override(data: dict, overrides: dict) -> dict:
    """``data`` with each dotted ``key: value`` of ``overrides`` set (``"train.lr": 1e-3``),
    creating the dicts on the way."""
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def hh_rows(path: Path, pairs: list[tuple[list[str], str, str]]) -> Path:
    """An HH-RLHF JSONL file: each pair is (the shared turns, alternating Human/Assistant from
    Human, the chosen answer, the rejected answer)."""
    def transcript(turns: list[str], answer: str) -> str:
        speakers = ("Human", "Assistant")
        return "".join(f"\n\n{speakers[i % 2]}: {t}" for i, t in enumerate(turns)) + f"\n\nAssistant: {answer}"

    lines = [json.dumps({"chosen": transcript(t, c), "rejected": transcript(t, r)}) for t, c, r in pairs]
    path.write_text("\n".join(lines) + "\n")
    return path


def rs_config(world: Path, out: Path, **overrides):
    """A rejection-sampling config on a ``stage_world``: 2 samples of 4 tokens per prompt, one
    fine-tuning step of 2; ``overrides`` are dotted keys or whole groups."""
    from rlhf.config import validate
    from rlhf.rejection_sampling.config import RejectionSamplingConfig

    data = {
        "stage": "rejection_sampling", "output_dir": str(out), "policy_from": str(world / "sft"),
        "helpfulness_rm_from": str(world / "rm_h"), "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}], "max_length": 64},
        "sampling": {"k": 2, "max_new_tokens": 4, "batch_size": 16},
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 2, "max_steps": 1},
    }
    return validate(RejectionSamplingConfig, override(data, overrides), "test")


def ppo_config(world: Path, out: Path, **overrides):
    """A PPO config on a ``stage_world``: 2 iterations of 4 prompts, 6-token answers, two
    mini-batches of 2, lr 1e-2; ``overrides`` are dotted keys (``"ppo.beta": 0.1``) or whole groups."""
    from rlhf.config import validate
    from rlhf.ppo.config import PPOConfig

    data = {
        "stage": "ppo", "output_dir": str(out), "seed": 0,
        "policy_from": str(world / "sft"), "helpfulness_rm_from": str(world / "rm_h"),
        "safety_rm_from": str(world / "rm_s"),
        "data": {"sources": [{"path": str(world / "prompts.jsonl")}]},
        "sampling": {"max_new_tokens": 6, "batch_size": 4, "max_prompt_length": 64},
        "ppo": {"iterations": 2, "prompts_per_iteration": 4, "beta": 0.05},
        "train": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 1, "save_every": 1},
        "critic": {"lr": 1e-2},
    }
    return validate(PPOConfig, override(data, overrides), "test")


# ---------------------------------------------------------------------------------------------
# A world of weekly rounds over the echo stage (tests/echo_stage.py; the `echo_stage` fixture)

ECHO_ROUND = """
initial_policy: {initial}
policy: rl
pool: rl
batches: {{rm: [helpfulness]}}
stages:
  - name: rm
    config: {{stage: echo, message: rm, data: {{sources: [{{name: base, path: {base}}}]}}}}
    inputs: {{upstream: initial_policy}}
  - name: rl
    config: {{stage: echo, message: p}}
    inputs: {{upstream: policy}}
"""

ECHO_PAIR = '{{"prompt": "q{i}", "chosen": "good {i}", "rejected": "bad {i}", "rating": "better"}}\n'


def echo_round_world(root: Path) -> Path:
    """``root`` with a finished initial echo stage (``sft``), a base pair file, the round recipe
    ``round.yaml`` (an ``rm`` stage trained on the helpfulness batches, an ``rl`` stage from the
    previous round's policy) and two weekly batch files ``week1.jsonl``, ``week2.jsonl``."""
    from rlhf.pipeline import run_stage
    from rlhf.recipe import load_recipe

    initial = root / "initial.yaml"
    initial.write_text(f"stage: echo\nmessage: sft\noutput_dir: {root / 'sft'}\n")
    run_stage(load_recipe(initial))
    (root / "base.jsonl").write_text(ECHO_PAIR.format(i=0))
    (root / "round.yaml").write_text(ECHO_ROUND.format(initial=root / "sft", base=root / "base.jsonl"))
    for week in (1, 2):
        (root / f"week{week}.jsonl").write_text("".join(ECHO_PAIR.format(i=10 * week + i) for i in range(3)))
    return root


# ---------------------------------------------------------------------------------------------
# The toy of the training-loop tests: a small MLP regressing 24 random items


class ToyItem:
    """One training item of the toy: input ``x`` (4,), target ``y`` (1,); one token, one loss unit."""

    num_tokens, loss_units = 1, 1

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y


def toy_collate(items: list[ToyItem]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i.x for i in items]), torch.stack([i.y for i in items])


def toy_regression() -> tuple[torch.nn.Module, list[ToyItem]]:
    """A 4-8-1 MLP (weights after ``torch.manual_seed(0)``) and its 24 items (seed 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(1)
    return model, [ToyItem(torch.randn(4, generator=gen), torch.randn(1, generator=gen)) for _ in range(24)]
