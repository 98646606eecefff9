"""Batched sampling with a KV cache: K responses per prompt, each row seeded on its own.

Rows (a prompt repeated K times for K samples) are cut into buckets of similar prompt length
(``length_buckets``, longest first, so a bucket pads little), left-padded within the bucket and
decoded together on the model's KV cache: one forward over the prompts (vocabulary projection
at the last position only), then one forward per new token. Rows that ended (EOS, kept in the
response) stop being computed: once a quarter of the batch has ended, those rows are dropped
from the batch and the cache.

    prompt_ids     [p p p] [. p p]       left-padded to the bucket's longest prompt (B, W)
    response_ids   [r r e] [r r r]       then pad after each row's EOS                 (B, T)

Seeding: row i draws token t by inverse CDF with the uniform ``u[i, t]`` of its own stream, a
``torch.Generator`` seeded with ``seeds[i]`` (``row_seed(seed, prompt key, round, k)``). A row's
sample depends only on its seed and its own logits, not on the rows it shares a batch with or
on the process that decodes it; logits computed in batches of different shapes differ only by
float rounding. Callers that need bit-identical samples across process counts keep the buckets
fixed (``rlhf.rejection_sampling`` shards whole buckets).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import torch

from rlhf.artifacts import InputError
from rlhf.config import SamplingConfig
from rlhf.data.chat import render_prompt
from rlhf.data.records import Message


def row_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python runs
    (unlike ``hash`` of a string): ``row_seed(seed, prompt_key, round, k)``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def uniform_streams(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(B, steps) float64 uniforms in [0, 1), row i from a generator seeded with ``seeds[i]``."""
    streams = [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(streams) if streams else torch.empty(0, steps, dtype=torch.float64)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Tokens (B,) drawn from softmax(logits / temperature), restricted to the top-p nucleus,
    by inverse CDF: the first token whose cumulative probability exceeds u * (nucleus mass).
    ``temperature == 0`` is greedy.

    probs [0.5, 0.25, 0.25], u = 0.6: cdf [0.5, 0.75, 1.0] -> token 1
    top_p 0.6: nucleus {0, 1} (mass before token 1 is 0.5 < 0.6), cdf [0.5, 0.75] -> u = 0.6
    reads 0.45 -> token 0; u = 0.8 reads 0.6 -> token 1.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)  # (B, V)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # mass before a token < top_p
    cdf = probs.cumsum(-1)  # (B, V)
    picked = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True)
    picked = picked.clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return (picked if order is None else order.gather(-1, picked))[:, 0]


def length_buckets(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices cut into buckets of at most ``size``, longest first (ties keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest: input_ids and attention_mask, both (B, W)."""
    width = max(map(len, prompt_ids))
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompt_ids]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


class Generation(NamedTuple):
    """The rows of one ``generate`` call.

    response_ids:   (B, T) generated tokens; pad after each row's end (its EOS is kept)
    response_mask:  (B, T) 1 on generated tokens
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def responses(self) -> list[list[int]]:
        """Each row's generated tokens, up to and including its EOS."""
        return [row[:n] for row, n in zip(self.response_ids.tolist(), self.response_mask.sum(-1).tolist())]


_CACHE_ARG: dict[type, str] = {}


def _cache_arg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base) not in _CACHE_ARG:
        params = inspect.signature(base.forward).parameters
        _CACHE_ARG[type(base)] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARG[type(base)]


def _last_logits(model, ids, mask, positions, cache) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{_cache_arg(model): cache})
    return out.logits[:, -1].float()  # (b, V)


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], max_new_tokens: int,
    eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
) -> Generation:
    """Sample one response per row of ``prompt_ids`` (one batch), row i with ``seeds[i]``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    prompts, prompt_mask = left_pad(prompt_ids, pad_token_id, device)  # (B, W)
    mask = prompt_mask
    uniforms = uniform_streams(seeds, max_new_tokens).to(device)  # (B, T)
    out = torch.full((len(prompt_ids), max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((len(prompt_ids),), max_new_tokens, device=device)
    rows = torch.arange(len(prompt_ids), device=device)  # rows still in the batch -> row of ``out``
    ended = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, W) left padding does not shift positions
    cache = DynamicCache(config=model.config)
    logits = _last_logits(model, prompts, mask, positions, cache)  # (B, V)
    position = positions[:, -1:]
    steps = max_new_tokens
    for t in range(max_new_tokens):
        # 1. draw the next token of every row still running
        token = torch.where(ended, pad_token_id, draw(logits, uniforms[rows, t], temperature, top_p))
        out[rows[~ended], t] = token[~ended]
        new_end = ~ended & torch.isin(token, eos)
        lengths[rows[new_end]] = t + 1
        ended |= new_end
        if bool(ended.all()) or t + 1 == max_new_tokens:
            steps = t + 1
            break
        # 2. once a quarter of the batch has ended, drop those rows from it and from the cache
        if 4 * int(ended.sum()) >= len(rows):
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            rows, token, position, mask, ended = rows[keep], token[keep], position[keep], mask[keep], ended[keep]
        # 3. one forward for the new tokens
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], -1)
        position = position + 1
        logits = _last_logits(model, token[:, None], mask, position, cache)
    response_mask = (torch.arange(steps, device=device) < lengths[:, None]).long()  # (B, T)
    return Generation(out[:, :steps], response_mask)


class Samples(NamedTuple):
    response_ids: list[list[int]]  # per row, up to and including its EOS
    texts: list[str]  # decoded without special tokens, stripped
    finished: list[bool]  # per row: it ended with EOS (False: cut at max_new_tokens, truncated)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_fits(prompt_lengths: Sequence[int], max_new_tokens: int, limit: int | None) -> None:
    """An InputError unless the longest prompt plus ``max_new_tokens`` fits in ``limit``
    positions (the model's ``max_position_embeddings``; None: no limit): past it a model reads
    positions it was never trained on (RoPE extrapolates, silently). The whole prompt + response
    counts, as the forwards over the samples (PPO's log-probs, the reward models) read it.

    lengths [3, 5], 3 new tokens: limit 8 fits exactly; limit 7 -> "a prompt of 5 tokens + ... 3 = 8 exceeds ... 7"
    """
    longest = max(prompt_lengths, default=0)
    if limit is None or longest + max_new_tokens <= limit:
        return
    raise InputError(
        f"sampling: a prompt of {longest} tokens + sampling.max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
        f"exceeds the model's max_position_embeddings {limit}; lower sampling.max_new_tokens (eval-gold: "
        "--max-new-tokens) or use shorter prompts (rejection_sampling and ppo leave out prompts over "
        "sampling.max_prompt_length; the other stages sample every prompt whole, gatt its dialogues of data.turns "
        "and eval.turns user turns)")


def sample(
    model: torch.nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
    max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
) -> Samples:
    """One response per row of ``prompt_ids`` (repeat a prompt K times for K samples, each
    with its own seed): rows bucketed by prompt length, ``batch_size`` rows per ``generate``;
    an InputError first when a prompt + ``max_new_tokens`` would not fit in the model's
    positions (``check_fits``)."""
    lengths = [len(p) for p in prompt_ids]
    check_fits(lengths, max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    responses: list[list[int]] = [[] for _ in prompt_ids]
    for bucket in length_buckets(lengths, batch_size):
        out = generate(model, [prompt_ids[i] for i in bucket], [seeds[i] for i in bucket], max_new_tokens,
                       tokenizer.eos_token_id, pad_id(tokenizer), temperature, top_p)
        for i, response in zip(bucket, out.responses()):
            responses[i] = response
    texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
    return Samples(responses, texts, [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses])


def truncation(finished: Sequence[bool]) -> dict[str, Any]:
    """How many answers were cut at ``max_new_tokens`` (no EOS): samples, truncated, rate.

    [True, False, True, True] -> {"samples": 4, "truncated": 1, "rate": 0.25}"""
    cut = list(finished).count(False)
    return {"samples": len(finished), "truncated": cut, "rate": cut / len(finished) if finished else 0.0}


# A sampler answers a batch of conversations (each ending with a user turn); ``keys`` name each
# one (its random stream), so a conversation gets the same answer whatever batch it is in. Its
# ``Samples`` say which answers finished: one cut at ``max_new_tokens`` is neither scored nor
# trained on as a finished answer.
Sampler = Callable[[list[list[Message]], list[str]], Samples]


def make_sampler(model, tokenizer, cfg: SamplingConfig, template: str, seed: int) -> Sampler:
    """Answers from ``model`` (``rlhf.generation``), conversation ``key`` drawing from its own
    seeded stream."""
    def sampler(conversations: list[list[Message]], keys: list[str]) -> Samples:
        ids = [render_prompt(c, tokenizer, template) for c in conversations]
        seeds = [row_seed(seed, key) for key in keys]
        return sample(model, tokenizer, ids, seeds, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)

    return sampler


def eval_sampler(model, tokenizer, cfg) -> Sampler:
    """The sampler of a generation stage's evaluation (GAtt, context distillation): the stage's
    ``sampling`` at ``eval.temperature``."""
    return make_sampler(model, tokenizer, cfg.sampling.at_temperature(cfg.eval.temperature), cfg.data.template, cfg.seed)


def truncation_line(rates: dict[str, dict]) -> str:
    """The report line of truncation rates: ``{name: {"rate", "truncated", "samples"}}`` ->
    "Answers cut at sampling.max_new_tokens (no EOS): before 5.0% (1 of 20), ..."."""
    return "Answers cut at sampling.max_new_tokens (no EOS): " + ", ".join(
        f"{name} {t['rate']:.1%} ({t['truncated']} of {t['samples']})" for name, t in rates.items())
