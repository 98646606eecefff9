"""SFT rows: answer-only targets, overlong handling, packing, collation, packed == unpacked loss."""

import pytest
import torch

from rlhf.data import Message, Rendered, SFTExample
from sft.config import SFTDataConfig
from sft.data import IGNORE, build_rows, collate, fit_length, make_rows, next_token_targets, sft_loss
from tiny import tiny_llama, word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
         "hi", "hello", "add", "two", "and", "three", "five", "bye", "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word; ids are the positions in WORDS."""
    return word_tokenizer(WORDS)


def example(*turns: str) -> SFTExample:
    roles = ["user", "assistant"] * len(turns)
    return SFTExample([Message(r, t) for r, t in zip(roles, turns)], source="test")


def data_cfg(**kw) -> SFTDataConfig:
    return SFTDataConfig(sources=[{"path": "unused.jsonl"}], **kw)


def test_next_token_targets_hand_worked():
    # <s> [INST] hi [/INST] hello </s>: the answer "hello </s>" is predicted from [/INST] and hello.
    assert next_token_targets([1, 3, 7, 4, 8, 2], [0, 0, 0, 0, 1, 1]) == [IGNORE, IGNORE, IGNORE, 8, 2, IGNORE]


def predicted(rows) -> list[int]:
    return [int(t) for r in rows for t in r.targets if t != IGNORE]


@pytest.mark.parametrize("loss_on, expected", [
    ("all", [8, 2, 13, 2, 15, 2]),  # hello </s>, five </s>, ok </s>
    ("last", [15, 2]),  # ok </s>
])
def test_targets_cover_exactly_the_assistant_tokens(tokenizer, loss_on, expected):
    conversation = example("hi", "hello", "add two and three", "five", "bye", "ok")
    rows, counts = build_rows([conversation], tokenizer, data_cfg(max_length=64, loss_on=loss_on))
    assert predicted(rows) == expected
    assert counts["loss_tokens"] == len(expected)


def test_fit_length_truncates_drops_and_counts():
    long = Rendered([1, 3, 7, 4, 8, 8, 8, 2], [0, 0, 0, 0, 1, 1, 1, 1])
    prompt_heavy = Rendered([1, 3, 7, 7, 7, 4, 8, 2], [0, 0, 0, 0, 0, 0, 1, 1])
    short = Rendered([1, 3, 7, 4, 8, 2], [0, 0, 0, 0, 1, 1])
    kept, counts = fit_length([long, prompt_heavy, short], max_length=6, overlong="truncate")
    assert [r.ids for r in kept] == [[1, 3, 7, 4, 8, 8], short.ids]
    assert counts == {"truncated": 2, "dropped_overlong": 0, "dropped_no_loss": 1}
    kept, counts = fit_length([long, prompt_heavy, short], max_length=6, overlong="drop")
    assert kept == [short]
    assert counts == {"truncated": 0, "dropped_overlong": 2, "dropped_no_loss": 0}


def rendered(lengths: list[int]) -> list[Rendered]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, len(WORDS), (n,), generator=g).tolist()
        out.append(Rendered(ids, [0] * (n // 2) + [1] * (n - n // 2)))
    return out


def test_make_rows_packs_within_max_length_and_keeps_every_token():
    examples = rendered([5, 9, 3, 7, 12, 4, 6, 2])
    packed = make_rows(examples, max_length=16, packing=True)
    assert all(r.num_tokens <= 16 for r in packed)
    assert sum(r.num_tokens for r in packed) == 48
    assert sum(r.num_examples for r in packed) == 8 and len(packed) == 3
    unpacked = make_rows(examples, max_length=16, packing=False)
    assert [r.num_tokens for r in unpacked] == [5, 9, 3, 7, 12, 4, 6, 2]
    assert sum(r.loss_units for r in packed) == sum(r.loss_units for r in unpacked)


def test_collate_pads_as_an_isolated_block_without_targets():
    rows = make_rows(rendered([3, 2, 4]), max_length=5, packing=True)  # [4], [3, 2]
    batch = collate(rows)
    assert batch.input_ids.shape == (2, 5)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch.targets[0, 3:].tolist() == [IGNORE, IGNORE]


def test_packed_loss_equals_unpacked_loss():
    model = tiny_llama(len(WORDS), max_positions=64, pad_token_id=None)
    examples = rendered([5, 9, 3, 7, 12, 4, 6, 2, 11, 8])
    packed, unpacked = make_rows(examples, 16, True), make_rows(examples, 16, False)
    assert len(packed) < len(unpacked)
    loss_packed, _ = sft_loss(model, collate(packed))
    loss_unpacked, _ = sft_loss(model, collate(unpacked))
    units = sum(r.loss_units for r in packed)
    torch.testing.assert_close(loss_packed / units, loss_unpacked / units, atol=1e-5, rtol=1e-5)
    # and the same, one example at a time, with no padding at all
    one_by_one = sum(sft_loss(model, collate([r]))[0] for r in unpacked)
    torch.testing.assert_close(loss_packed / units, one_by_one / units, atol=1e-5, rtol=1e-5)
    # and with the whole micro-batch flattened into one row (as flash attention needs)
    flat = collate(packed, flatten=True)
    assert flat.input_ids.shape == (1, sum(r.num_tokens for r in packed))
    torch.testing.assert_close(sft_loss(model, flat)[0] / units, loss_unpacked / units, atol=1e-5, rtol=1e-5)
