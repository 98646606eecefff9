"""Log-probabilities of response tokens under a policy, from packed forwards.

Prompt + response sequences are held as token-id lists; forwards pack whole sequences into rows
as long as the longest one (``rlhf.packing.pack_rows``: restarting positions, no sequence
attends to another, attention no costlier than padding) and read the outputs only at the ``K``
positions that predict a response token: the vocabulary projection is never computed for prompt
tokens or padding. Used by PPO (policy, reference, critic) and the evaluation (KL).

    row:      [p p p r r | p p r r r r]      (R, W)
    predict:  the position before each response token (the last prompt token predicts r_0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from rlhf.packing import length_chunks, pack_rows, packed_hidden


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(token) from logits (B, T, V) of the positions that predict ``tokens`` (B, T);
    ``lse`` = logsumexp(logits) over the vocabulary when already computed."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse  # (B, T)


class PackedResponses(NamedTuple):
    input_ids: torch.Tensor  # (R, W) prompt + response sequences, several per row
    position_ids: torch.Tensor  # (R, W) restarting at 0 for each sequence
    predict: torch.Tensor  # (K, 2) (row, column) of the output predicting each response token
    targets: torch.Tensor  # (K,) the response tokens
    rows: torch.Tensor  # (K,) rollout (row of the (B, T) tensors) of each response token
    steps: torch.Tensor  # (K,) index t of each response token in its response


def pack_responses(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], rows: Sequence[int],
    device: torch.device | str = "cpu",
) -> PackedResponses:
    """Prompt + response sequences ``rows`` packed, with the indices that map outputs back to (B, T)."""
    packed = pack_rows([prompt_ids[i] + response_ids[i] for i in rows])
    predict, row_of, step_of = [], [], []
    for i, (r, end) in zip(rows, packed.ends.tolist()):
        n = len(response_ids[i])
        predict += [(r, c) for c in range(end - n, end)]
        row_of += [i] * n
        step_of += range(n)
    ids = packed.input_ids.to(device)
    predict_t = torch.tensor(predict, device=device)
    return PackedResponses(
        ids, packed.position_ids.to(device), predict_t, ids[predict_t[:, 0], predict_t[:, 1] + 1],
        torch.tensor(row_of, device=device), torch.tensor(step_of, device=device),
    )


class PackedPolicy(torch.nn.Module):
    """The policy (a Hugging Face causal LM, possibly with LoRA) with a packed forward that
    projects to the vocabulary only where a response token is predicted."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids (R, W); predict (K, 2) -> logits (K, V)."""
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = packed_hidden(getattr(hf, hf.base_model_prefix), input_ids, position_ids)  # (R, W, H)
        return hf.get_output_embeddings()(hidden[predict[:, 0], predict[:, 1]])

    # Saving, in the shape ``rlhf.training.save_model`` expects of a model

    def save_pretrained(self, out_dir: str | Path, state_dict: dict | None = None, **kwargs: Any) -> None:
        if state_dict is not None:  # keys of this wrapper: "model.<key of the HF model>"
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(out_dir, state_dict=state_dict, **kwargs)

    def merge_and_unload(self) -> torch.nn.Module:
        return self.model.merge_and_unload()


def policy_logits(policy: PackedPolicy, batch: PackedResponses, temperature: float = 1.0) -> torch.Tensor:
    """Logits (K, V) that predict each response token, at the sampling temperature (PPO's
    ratios compare the distributions the tokens were sampled from), in float32: bf16 logits
    divided by T would round differently from the float32 ones of an autocast policy."""
    logits = policy(batch.input_ids, batch.position_ids, batch.predict).float()  # (K, V)
    return logits if temperature == 1 else logits / temperature  # no copy at T = 1 (fp32 outputs)


def policy_logprobs(policy: PackedPolicy, batch: PackedResponses, temperature: float = 1.0) -> torch.Tensor:
    return token_logprobs(policy_logits(policy, batch, temperature), batch.targets)  # (K,)


def per_token(
    fn: Callable[[PackedResponses], torch.Tensor], prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]], tokens: int, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``fn`` over all rollouts, about ``tokens`` tokens a forward, as (B, T) with 0 after each
    response's end. No gradients."""
    out = torch.zeros(len(response_ids), max(map(len, response_ids)), device=device)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    with torch.no_grad():
        for rows in length_chunks(lengths, tokens):
            batch = pack_responses(prompt_ids, response_ids, rows, device)
            out[batch.rows, batch.steps] = fn(batch).float()
    return out
