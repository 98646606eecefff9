"""Packing: hand-worked rows and positions, and attention isolation in a real Llama forward."""

import pytest
import torch

from rlhf.packing import best_fit_rows, pack_sequences, restarting_positions
from tiny import tiny_llama


def test_pack_sequences_concatenates_with_restarting_positions():
    packed = pack_sequences([[5, 6, 7], [8, 9]])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.ends == [2, 4]


def test_pack_sequences_pads_as_its_own_block():
    packed = pack_sequences([[5, 6], [7]], pad_id=0, pad_to=6)
    assert packed.input_ids.tolist() == [[5, 6, 7, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 0, 0, 1, 2]]
    assert packed.ends == [1, 2]


def test_pack_sequences_rejects_empty_and_overflow():
    with pytest.raises(ValueError):
        pack_sequences([[1], []])
    with pytest.raises(ValueError):
        pack_sequences([[1, 2, 3]], pad_to=2)


def test_restarting_positions():
    assert restarting_positions([3, 1, 2]) == [0, 1, 2, 0, 0, 1]


def test_best_fit_rows_hand_worked():
    # 5 opens row 0 (free 2); 4 opens row 1 (free 3); 3 fits only row 1; 2 fills row 0.
    assert best_fit_rows([3, 5, 2, 4], capacity=7) == [[1, 2], [0, 3]]


def test_best_fit_rows_respects_capacity_and_keeps_every_sequence():
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    rows = best_fit_rows(lengths, capacity=64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= sum(lengths) // 64 + 3  # nearly full rows
    with pytest.raises(ValueError):
        best_fit_rows([65], capacity=64)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(attn):
    model = tiny_llama(50, max_positions=64, pad_token_id=None, attn_implementation=attn).eval()
    seqs = [[3, 7, 9, 11], [4, 4], [20, 21, 22], [1]]
    packed = pack_sequences(seqs, pad_to=12)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                           use_cache=False).logits[0]
        start = 0
        for seq, end in zip(seqs, packed.ends):
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits[start : end + 1], alone, atol=1e-5, rtol=1e-5)
            start = end + 1
