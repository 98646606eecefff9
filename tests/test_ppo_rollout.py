import pytest
import torch

from rlhf.logprobs import PackedPolicy, pack_responses, per_token, policy_logprobs
from tiny import tiny_llama


def test_pack_maps_each_response_token_to_the_position_that_predicts_it():
    prompts, responses = [[5, 6], [7], [1, 2, 3]], [[8], [9, 10, 11], [4]]
    batch = pack_responses(prompts, responses, rows=[1, 0])
    # rows as wide as the longest sequence (4): [7, 9, 10, 11] and [5, 6, 8, pad]; rollout 1's
    # response starts at column 1 (predicted from column 0), rollout 0's token 8 sits at (1, 2)
    assert batch.input_ids.tolist() == [[7, 9, 10, 11], [5, 6, 8, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert batch.predict.tolist() == [[0, 0], [0, 1], [0, 2], [1, 1]]
    assert batch.targets.tolist() == [9, 10, 11, 8]
    assert batch.rows.tolist() == [1, 1, 1, 0]
    assert batch.steps.tolist() == [0, 1, 2, 0]


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(32, hidden_size=16).eval()


def test_packed_logprobs_equal_separate_forwards(tiny_lm):
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    responses = [[11, 12], [13, 14, 15, 2], [16]]
    # forwards of about 10 tokens: rollouts of 6, 6 and 4 tokens -> [6], [6, 4] (a row of 6
    # holding the 4-token rollout and padding)
    policy = PackedPolicy(tiny_lm)
    got = per_token(lambda b: policy_logprobs(policy, b, temperature=0.7), prompts, responses, tokens=10)
    assert got.shape == (3, 4)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = tiny_lm(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(got[i, : len(r)], expected, atol=1e-5)
        assert (got[i, len(r):] == 0).all()
