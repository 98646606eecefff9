"""Packing: several token sequences in one row, each seeing only itself.

A packed row concatenates sequences and restarts ``position_ids`` at 0 for each one. With no
``attention_mask``, transformers (``masking_utils.find_packed_sequence_indices``) reads the
restarts and builds a block-diagonal causal mask, so no sequence attends to another and each
gets exactly the logits it would get alone: the packed loss equals the unpacked loss.
Pass ``use_cache=False`` in the forward: with a cache (the default, even in train mode)
transformers skips the packed-sequence detection and the sequences attend to each other.

Flash-attention kernels get no mask: they read the sequences' boundaries from the restarts
themselves, and only in a batch of one row (``_flash_attention_forward``); rows of a batch of
several are not kept apart. ``packed_hidden`` therefore hands them the rows flattened into one
(``needs_one_row``), and sdpa and eager the rows as they are.

Used by every forward over several sequences: SFT and the fine-tuning stages (examples packed
into rows of ``max_length``), the reward models (chosen and rejected sequences scored in one
forward, read at each sequence's last token), and the policy, reference and critic forwards
of PPO and the evaluation (``rlhf.logprobs``).
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence

import torch


class Packed(NamedTuple):
    """Sequences concatenated into one row.

    input_ids:    (1, T) the sequences back to back, then padding up to ``pad_to``
    position_ids: (1, T) 0..len-1 for each sequence; padding restarts too, so it forms its own
                  block and attends to nothing real
    ends:         index in the row of each sequence's last token, in input order
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ends: list[int]


def restarting_positions(lengths: Sequence[int]) -> list[int]:
    """[3, 2] -> [0, 1, 2, 0, 1]."""
    return [p for n in lengths for p in range(n)]


def pack_sequences(seqs: Sequence[Sequence[int]], pad_id: int = 0, pad_to: int | None = None) -> Packed:
    """Concatenate ``seqs`` (token id lists, none empty) into one row.

    ``pad_to`` pads the row on the right to that length (to stack rows of a batch); padding
    must then be masked out of any loss. Example: ``pack_sequences([[5, 6, 7], [8, 9]])`` gives
    input_ids [[5, 6, 7, 8, 9]], position_ids [[0, 1, 2, 0, 1]], ends [2, 4].
    """
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        raise ValueError("pack_sequences needs at least one sequence and no empty ones")
    total = sum(lengths)
    pad = 0 if pad_to is None else pad_to - total
    if pad < 0:
        raise ValueError(f"sequences hold {total} tokens, more than pad_to={pad_to}")
    ids = [t for s in seqs for t in s] + [pad_id] * pad
    positions = restarting_positions(lengths + ([pad] if pad else []))
    ends = (torch.tensor(lengths).cumsum(0) - 1).tolist()
    return Packed(torch.tensor([ids]), torch.tensor([positions]), ends)


def best_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``capacity`` tokens (best-fit decreasing:
    longest first, each into the fullest row it still fits). Rows keep the input order inside.

    Example: lengths [3, 5, 2, 4], capacity 7 -> [[1, 2], [0, 3]]
    (5 opens row 0; 4 opens row 1; 3 fits only row 1 (free 3); 2 fits row 0 (free 2)).
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the row capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            slot = (capacity - lengths[i], len(rows) - 1)
        else:
            left, row = free.pop(k)
            rows[row].append(i)
            slot = (left - lengths[i], row)
        if slot[0] > 0:
            bisect.insort(free, slot)
    return [sorted(r) for r in rows]


class PackedRows(NamedTuple):
    """Sequences best-fit into rows as long as the longest one.

    input_ids, position_ids: (R, T) positions restart at 0 for each sequence; the tail of a
                             row is padding, a block of its own that no sequence attends to
    ends:                    (N, 2) (row, index) of each sequence's last token, in input order
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ends: torch.Tensor


def pack_rows(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> PackedRows:
    """Best-fit (``best_fit_rows``) into rows of the longest length. Example:
    lengths [4, 1, 2, 3] -> rows [0], [1, 3], [2], 4 tokens wide (1 fills row 1 after 3;
    row 2 ends in 2 padding tokens)."""
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    ids, positions, ends = [], [], [None] * len(seqs)
    for r, group in enumerate(best_fit_rows(lengths, width)):
        packed = pack_sequences([seqs[i] for i in group], pad_id, pad_to=width)
        ids.append(packed.input_ids)
        positions.append(packed.position_ids)
        for i, end in zip(group, packed.ends):
            ends[i] = (r, end)
    return PackedRows(torch.cat(ids), torch.cat(positions), torch.tensor(ends))


def needs_one_row(config) -> bool:
    """Whether the model's attention keeps packed sequences apart only in a batch of one row:
    a flash-attention kernel, which transformers gives no mask (``flash_attention_mask``, the
    mask function of ``flash_attention_2`` and of the flash kernels from the hub)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    return ALL_MASK_ATTENTION_FUNCTIONS.get(config._attn_implementation) is flash_attention_mask


def packed_hidden(backbone: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (R, T, H) of packed rows (R, T) (``PackedRows``), each sequence seeing
    only itself. ``backbone`` is a Hugging Face base model (``LlamaModel``); under flash attention
    it runs the rows flattened into one (1, R * T) row, where each row's padding, its positions
    restarting too, stays a block of its own."""
    rows = input_ids.shape
    if needs_one_row(backbone.config):
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
    # use_cache=False: with a cache transformers ignores the restarts and lets sequences attend
    # to each other
    hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden.reshape(*rows, -1)  # (R, T, H)


def length_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices by decreasing length, cut into chunks of at most ``budget`` tokens (a longer
    sequence alone); similar lengths share a chunk, so its rows waste little padding."""
    chunks: list[list[int]] = []
    total = budget
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if total + lengths[i] > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += lengths[i]
    return chunks
