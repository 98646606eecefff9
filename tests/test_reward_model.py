"""The reward model: built from a causal-LM checkpoint with every weight carried over (tied
embeddings included), packed scoring == one sequence at a time, saved models reload."""


import pytest
import torch

from rlhf.data import Message
from reward_model.model import RewardModel
from rlhf.packing import length_chunks
from tiny import llama_config, word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "bye", "ok", "no"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def test_packed_scores_equal_one_sequence_at_a_time(tokenizer):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    hf = LlamaForSequenceClassification(llama_config(len(WORDS), max_positions=64, num_labels=1)).eval()
    rm = RewardModel(hf, tokenizer)
    q = [Message("user", "hi")]
    prompts, responses = [q, q, [*q, Message("assistant", "ok"), Message("user", "bye")]], ["hello", "no no", "ok"]
    packed = rm.score(prompts, responses)
    rows = rm.score(prompts, responses, batch_tokens=12)  # several forwards
    alone = torch.stack([hf(input_ids=torch.tensor([rm.encode(p, r)])).logits[0, 0]
                         for p, r in zip(prompts, responses)]).detach()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.probabilities(prompts, responses), torch.sigmoid(alone), atol=1e-5, rtol=1e-5)


def test_length_chunks_longest_first_within_budget():
    # lengths by index 5, 9, 3, 4, 12 -> longest first 12, 9, 5, 4, 3 with budget 13:
    # 12 alone (12 + 9 > 13), 9 alone (9 + 5 > 13), then 5 + 4 + 3 = 12
    assert length_chunks([5, 9, 3, 4, 12], 13) == [[4], [1], [0, 3, 2]]
    assert length_chunks([20], 8) == [[0]]  # a sequence over the budget goes alone
