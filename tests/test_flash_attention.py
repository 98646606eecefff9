"""Packed forwards under flash attention, without a GPU: every packed forward (reward-model
training and scoring, PPO's policy and critic, the SFT micro-batch) gives each sequence exactly
what it gets alone, for sdpa, eager and a flash-attention stand-in.

The stand-in, ``varlen_reference``, is registered with transformers' attention interface and
gets what a flash kernel gets: transformers builds it no mask (its mask function is the one of
``flash_attention_2``), and it recovers the sequences' boundaries from the position ids exactly
as ``_flash_attention_forward`` does (``prepare_fa_kwargs_from_position_ids``, and only when the
batch is one row); it then computes causal attention within each segment in plain torch. Like
the real kernel, it keeps nothing apart in a batch of several rows. (Its name has no "flash" in
it: transformers would then try to load a flash kernel when the model is built.)
"""

import pytest
import torch
from transformers import AttentionInterface, LlamaForSequenceClassification
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from rlhf.data import Message, Rendered
from rlhf.logprobs import PackedPolicy, per_token, policy_logprobs
from rlhf.packing import needs_one_row, pack_rows
from rlhf.ppo.rollout import critic_values
from reward_model.data import RMPair, collate as rm_collate, rm_loss
from reward_model.losses import margin_ranking_loss
from reward_model.model import RewardModel
from sft.data import collate as sft_collate, make_rows, sft_loss
from tiny import llama_config, tiny_llama, word_tokenizer

FLASH = "varlen_reference"
ATTENTION = ["sdpa", "eager", FLASH]
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "bye", "ok", "no"]


def varlen_reference(module, query, key, value, attention_mask, scaling=None, position_ids=None, **kwargs):
    """query (B, H, T, D), key and value (B, KV, T, D) -> (B, T, H, D), as a flash kernel returns."""
    assert attention_mask is None  # what flash_attention_mask gives a forward with no padding mask
    batch, heads, length, _ = query.shape
    segment = torch.zeros(batch, length, dtype=torch.long)  # several rows: one segment per row
    if _is_packed_sequence(position_ids, batch):
        (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        segment[0] = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
    groups = heads // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (segment[:, :, None] == segment[:, None, :])  # (B, T, T)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, T, T)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH, varlen_reference)
AttentionMaskInterface.register(FLASH, flash_attention_mask)


def reward_model(attn: str) -> RewardModel:
    torch.manual_seed(0)
    config = llama_config(len(WORDS), max_positions=64, num_labels=1, attn_implementation=attn)
    return RewardModel(LlamaForSequenceClassification(config).eval(), word_tokenizer(WORDS))


def values_alone(rm: RewardModel, seq: list[int]) -> torch.Tensor:
    """The head read at every position of ``seq``, forwarded alone: (len(seq),)."""
    with torch.no_grad():
        return rm.model.score(rm.model.model(input_ids=torch.tensor([seq])).last_hidden_state)[0, :, 0]


def test_the_stand_in_keeps_sequences_apart_only_in_one_row():
    """The leak the packed forwards must avoid: several rows (as ``pack_rows`` builds them) mix
    the sequences of a row; the same sequences in one flattened row do not."""
    lm = tiny_llama(len(WORDS), max_positions=64, attn_implementation=FLASH).eval()
    seqs = [[3, 7, 9, 5], [4, 4], [6, 8]]  # rows [3, 7, 9, 5] and [4, 4, 6, 8]
    packed = pack_rows(seqs)
    with torch.no_grad():
        alone = lm(input_ids=torch.tensor([seqs[2]])).logits[0]
        rows = lm(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        flat = lm(input_ids=packed.input_ids.reshape(1, -1), position_ids=packed.position_ids.reshape(1, -1),
                  use_cache=False).logits
    assert packed.input_ids.shape == (2, 4)
    assert not torch.allclose(rows[1, 2:], alone, atol=1e-3)  # [6, 8] saw [4, 4]
    torch.testing.assert_close(flat[0, 6:], alone, atol=1e-5, rtol=1e-5)


def test_only_flash_attention_needs_one_row():
    assert needs_one_row(llama_config(8, attn_implementation="flash_attention_2"))
    assert needs_one_row(llama_config(8, attn_implementation=FLASH))
    assert not needs_one_row(llama_config(8, attn_implementation="sdpa"))
    assert not needs_one_row(llama_config(8, attn_implementation="eager"))


@pytest.mark.parametrize("attn", ATTENTION)
def test_reward_model_training_forward_equals_each_sequence_alone(attn):
    rm = reward_model(attn)
    pairs = [RMPair([1, 5, 6, 7, 8], [1, 5, 9], 1.0), RMPair([1, 6], [1, 7, 7, 8], 0.0), RMPair([1, 8, 9], [1], 0.5)]
    batch = rm_collate(pairs)  # lengths 5, 3, 2, 4, 3, 1 in rows 5 wide: [5], [4, 1], [3, 2], [3, pad]
    assert batch.input_ids.shape == (4, 5)
    chosen = torch.stack([values_alone(rm, p.chosen_ids)[-1] for p in pairs])
    rejected = torch.stack([values_alone(rm, p.rejected_ids)[-1] for p in pairs])
    loss, stats = rm_loss(rm, batch)
    torch.testing.assert_close(loss, margin_ranking_loss(chosen, rejected, batch.margins).sum(), atol=1e-5, rtol=1e-5)
    assert stats["accuracy"] == (chosen > rejected).sum()


@pytest.mark.parametrize("attn", ATTENTION)
def test_reward_scores_equal_each_response_alone(attn):
    rm = reward_model(attn)
    q = [Message("user", "hi")]
    prompts = [q, q, q, [*q, Message("assistant", "ok hi bye"), Message("user", "bye no")]]
    responses = ["hello", "no", "ok hi bye hello", "ok"]
    seqs = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    assert pack_rows(seqs).input_ids.shape == (3, 15)  # lengths 6, 6, 9, 15: [15], [9, 6], [6, pad]
    alone = torch.stack([values_alone(rm, s)[-1] for s in seqs])
    torch.testing.assert_close(rm.score(prompts, responses), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.score(prompts, responses, batch_tokens=20), alone, atol=1e-5, rtol=1e-5)


# Rollouts of 6, 6, 4, 2 and 3 tokens: rows 6 wide [6], [6], [4, 2], [3, pad]
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 5], [1], [1, 6]]
RESPONSES = [[8, 9], [3, 4, 5, 2], [6], [7], [2]]


@pytest.mark.parametrize("attn", ATTENTION)
def test_ppo_logprobs_equal_each_rollout_alone(attn):
    lm = tiny_llama(len(WORDS), max_positions=64, attn_implementation=attn).eval()
    policy = PackedPolicy(lm)
    got = per_token(lambda b: policy_logprobs(policy, b, temperature=0.7), PROMPTS, RESPONSES, tokens=64)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        with torch.no_grad():
            logits = lm(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(got[i, : len(r)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_ppo_values_equal_each_rollout_alone(attn):
    critic = reward_model(attn)
    got = per_token(lambda b: critic_values(critic, b), PROMPTS, RESPONSES, tokens=64)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = values_alone(critic, p + r)[len(p) - 1 : -1]  # V(state before each response token)
        torch.testing.assert_close(got[i, : len(r)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_sft_micro_batch_loss_equals_each_example_alone(attn):
    model = tiny_llama(len(WORDS), max_positions=64, pad_token_id=None, attn_implementation=attn)
    examples = [Rendered([1] + [(5 * i + t) % 9 + 1 for t in range(n - 1)], [0, 0] + [1] * (n - 2))
                for i, n in enumerate([5, 9, 3, 7, 4, 6])]
    rows = make_rows(examples, 12, packing=True)
    assert len(rows) < len(examples)
    alone = sum(sft_loss(model, sft_collate(make_rows([e], 12, packing=False)))[0] for e in examples)
    # flattened (what the fine-tune path does under flash attention), and as that path collates
    for flatten in (True, needs_one_row(model.config)):
        torch.testing.assert_close(sft_loss(model, sft_collate(rows, flatten=flatten))[0], alone, atol=1e-5, rtol=1e-5)
