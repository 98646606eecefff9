"""Rollouts: responses sampled from the policy, and what PPO needs from the frozen models.

A rollout batch is held as token-id lists (prompt, response) plus per-token tensors ``(B, T)``
right-padded to the longest response. Forwards collate rows on demand in length-sorted groups,
each padded only to its own longest prompt and response:

    input_ids = [pad ... pad | prompt | response | pad ... pad]     (B, P + T)

so the logits that predict the response are the ``T + 1`` last positions less the last one
(``logits_to_keep``: the vocabulary projection is never computed for prompt tokens).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from rlhf.ppo.losses import token_logprobs


class SequenceBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, P + T) left-padded prompts, then right-padded responses
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T) counting real tokens from 0
    responses: torch.Tensor  # (B, T) generated tokens (pad after the end)
    response_mask: torch.Tensor  # (B, T) 1 on generated tokens


def collate(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int,
    device: torch.device | str = "cpu",
) -> SequenceBatch:
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(len(r) for r in response_ids)
    rows, masks = [], []
    for p, r in zip(prompt_ids, response_ids):
        left, right = width_p - len(p), width_r - len(r)
        rows.append([pad_id] * left + list(p) + list(r) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
    input_ids = torch.tensor(rows, device=device)
    attention_mask = torch.tensor(masks, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(
        input_ids, attention_mask, position_ids, input_ids[:, width_p:], attention_mask[:, width_p:]
    )


def length_groups(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Row indices cut into groups of at most ``size``, longest first, so groups pad little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


# ---------------------------------------------------------------------------------------------
# Forwards


def response_logits(model, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits (B, T, V) of the positions that predict each response token, at the sampling
    temperature (PPO's ratios compare the distributions the tokens were sampled from)."""
    width = batch.responses.shape[1]
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False,
    )
    return out.logits[:, :-1] / temperature


def response_logprobs(model, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
    return token_logprobs(response_logits(model, batch, temperature), batch.responses)  # (B, T)


def per_token(
    fn: Callable[[SequenceBatch], torch.Tensor], prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]], pad_id: int, group_size: int, device,
) -> torch.Tensor:
    """``fn`` over the rows in length-sorted groups, reassembled to (B, T) (0 on padding)."""
    out = torch.zeros(len(response_ids), max(map(len, response_ids)), device=device)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    with torch.no_grad():
        for group in length_groups(lengths, group_size):
            batch = collate([prompt_ids[i] for i in group], [response_ids[i] for i in group], pad_id, device)
            values = fn(batch).float() * batch.response_mask
            out[group, : values.shape[1]] = values
    return out


@contextmanager
def reference(policy, ref_model) -> Iterator[torch.nn.Module]:
    """The frozen reference pi_0: ``ref_model``, or (LoRA) the policy with its adapter off."""
    if ref_model is not None:
        yield ref_model
        return
    with policy.disable_adapter():
        yield policy


# ---------------------------------------------------------------------------------------------
# Generation


def generate(
    model, prompt_ids: Sequence[list[int]], tokenizer, max_new_tokens: int, temperature: float = 1.0,
    top_p: float = 1.0, batch_size: int = 64, greedy: bool = False,
) -> list[list[int]]:
    """One response per prompt, cut after its first EOS (kept: the policy learns to stop).
    Sampling uses torch's global generator (the caller seeds it)."""
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    device = next(model.parameters()).device
    responses: list[list[int]] = [[] for _ in prompt_ids]
    for group in length_groups([len(p) for p in prompt_ids], batch_size):
        batch = collate([prompt_ids[i] for i in group], [[pad]] * len(group), pad, device)
        prompts, attention = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        out = model.generate(
            input_ids=prompts, attention_mask=attention, do_sample=not greedy,
            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True,
            **sampling,
        )
        for i, row in zip(group, out[:, prompts.shape[1] :].tolist()):
            responses[i] = row[: row.index(eos) + 1] if eos in row else row
    return responses


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
