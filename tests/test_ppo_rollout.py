import pytest
import torch

from rlhf.ppo.rollout import collate, generate, length_groups, per_token, response_logprobs


def test_collate_pads_prompts_left_and_responses_right():
    batch = collate([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert batch.responses.tolist() == [[8, 0, 0], [9, 10, 11]]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_length_groups_longest_first():
    assert length_groups([3, 9, 1, 5, 7], 2) == [[1, 4], [3, 0], [2]]


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_padded_grouped_logprobs_equal_unpadded_forwards(tiny_lm):
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    responses = [[11, 12], [13, 14, 15, 2], [16]]
    got = per_token(lambda b: response_logprobs(tiny_lm, b, temperature=0.7), prompts, responses,
                    pad_id=0, group_size=2, device="cpu")
    assert got.shape == (3, 4)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = tiny_lm(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(got[i, : len(r)], expected, atol=1e-5)
        assert (got[i, len(r):] == 0).all()


class _Tok:
    eos_token_id, pad_token_id = 2, 0


def test_generate_cuts_after_eos_and_is_seeded(tiny_lm):
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    torch.manual_seed(3)
    a = generate(tiny_lm, prompts, _Tok(), max_new_tokens=12, batch_size=2)
    torch.manual_seed(3)
    b = generate(tiny_lm, prompts, _Tok(), max_new_tokens=12, batch_size=2)
    assert a == b and len(a) == 3
    for r in a:
        assert 1 <= len(r) <= 12
        assert 2 not in r[:-1]  # nothing after the first EOS
