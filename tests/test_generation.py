import pytest
import torch

from rlhf.artifacts import InputError
from rlhf.generation import check_fits, draw, generate, left_pad, length_buckets, row_seed, sample, uniform_streams
from tiny import tiny_llama, word_world

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(32, hidden_size=16).eval()


class _Tok:
    eos_token_id, pad_token_id = EOS, PAD

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(t) for t in row if t > 2) for row in ids]


PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15], [1, 3]]


def _logits(probs):
    return torch.log(torch.tensor(probs))


def test_draw_inverse_cdf_hand_worked():
    logits = _logits([[0.5, 0.25, 0.25]] * 3)
    u = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    # cdf [0.5, 0.75, 1.0]: 0.2 -> 0, 0.6 -> 1, 0.9 -> 2
    assert draw(logits, u).tolist() == [0, 1, 2]
    # nucleus of top_p 0.6 = {0, 1} (mass 0.75); u reads u * 0.75: 0.15 -> 0, 0.45 -> 0, 0.675 -> 1
    assert draw(logits, u, top_p=0.6).tolist() == [0, 0, 1]
    # top_p 0.5: only token 0 (the mass before token 1 is 0.5, not < 0.5)
    assert draw(logits, u, top_p=0.5).tolist() == [0, 0, 0]
    assert draw(_logits([[0.1, 0.7, 0.2]]), torch.tensor([0.99]), temperature=0).tolist() == [1]


def test_draw_frequencies_follow_the_tempered_distribution():
    # evenly spaced uniforms give each token a share of draws equal to its probability (+-1/N)
    n = 1000
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = draw(torch.log(probs).expand(n, 4), u, temperature=2.0)
    tempered = torch.softmax(torch.log(probs) / 2.0, -1)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / n, tempered, atol=1.5 / n)


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "p1", 1, 0) == row_seed(0, "p1", 1, 0) < 2**63
    assert len({row_seed(0, "p1", 1, k) for k in range(8)} | {row_seed(1, "p1", 1, 0)}) == 9
    a = uniform_streams([row_seed(0, "x")], 5)
    assert a.shape == (1, 5) and torch.equal(a, uniform_streams([row_seed(0, "x")], 5))


def test_length_buckets_and_left_padding():
    assert length_buckets([3, 9, 1, 5, 7], 2) == [[1, 4], [3, 0], [2]]
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_equals_transformers_generate(tiny_lm):
    ids, mask = left_pad(PROMPTS, PAD)
    ref = tiny_lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                           eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    out = generate(tiny_lm, PROMPTS, [0] * len(PROMPTS), 10, EOS, PAD, temperature=0)
    expected = [row[: row.index(EOS) + 1] if EOS in row else row for row in ref.tolist()]
    assert out.responses() == expected


def test_samples_depend_on_the_row_seed_only(tiny_lm):
    # 5 prompts x 4 samples, decoded in one batch, in buckets of 3, and one row at a time: the
    # same rows; rows end at different steps, so rows are dropped from the batch on the way
    rows = [p for p in PROMPTS for _ in range(4)]
    seeds = [row_seed(7, i, k) for i in range(len(PROMPTS)) for k in range(4)]
    batch = sample(tiny_lm, _Tok(), rows, seeds, max_new_tokens=30, batch_size=len(rows))
    small = sample(tiny_lm, _Tok(), rows, seeds, max_new_tokens=30, batch_size=3)
    alone = [generate(tiny_lm, [r], [s], 30, EOS, PAD).responses()[0] for r, s in zip(rows, seeds)]
    assert batch.response_ids == small.response_ids == alone
    lengths = {len(r) for r in alone}
    assert len(lengths) > 2 and any(r[-1] == EOS for r in alone)  # some ended early, at various steps
    assert all(EOS not in r[:-1] for r in alone)
    assert len({tuple(r) for r in alone[:4]}) > 1  # the K samples of a prompt differ
    other = sample(tiny_lm, _Tok(), rows, [s + 1 for s in seeds], max_new_tokens=30)
    assert other.response_ids != batch.response_ids


def test_generation_tensors_line_up(tiny_lm):
    out = generate(tiny_lm, PROMPTS[:3], [1, 2, 3], 12, EOS, PAD)
    lengths = [len(r) for r in out.responses()]
    assert out.response_ids.shape == out.response_mask.shape == (3, max(lengths))
    assert out.response_mask.sum(-1).tolist() == lengths
    assert (out.response_ids[out.response_mask == 0] == PAD).all()


def test_multiple_eos_ids(tiny_lm):
    out = generate(tiny_lm, PROMPTS, [5] * len(PROMPTS), 30, [EOS, 3, 4, 5], PAD)
    for r in out.responses():
        assert not set(r[:-1]) & {EOS, 3, 4, 5}


def test_check_fits_hand_worked():
    check_fits([3, 5], 3, 8)  # 5 + 3 = 8 positions: fits exactly
    check_fits([3, 500], 300, None)  # a model without max_position_embeddings: no limit
    check_fits([], 8, 8)
    with pytest.raises(InputError) as err:
        check_fits([3, 5], 3, 7)  # the longest prompt is one over
    assert str(err.value).startswith("sampling: a prompt of 5 tokens + sampling.max_new_tokens 3 = 8 exceeds the "
                                     "model's max_position_embeddings 7; lower sampling.max_new_tokens")
    assert "sampling.max_prompt_length" in str(err.value) and "\n" not in str(err.value)


def test_sample_past_the_models_positions_raises_before_generating():
    model = tiny_llama(32, hidden_size=16, max_positions=8).eval()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    rows, seeds = [[1, 5, 6], [1, 5, 6, 7, 8, 9]], [0, 1]
    assert len(sample(model, _Tok(), rows, seeds, max_new_tokens=2, temperature=0).response_ids) == 2  # 6 + 2 = 8
    forwards.clear()
    with pytest.raises(InputError, match="a prompt of 6 tokens \\+ sampling.max_new_tokens 3 = 9 exceeds the model's "
                                         "max_position_embeddings 8"):
        sample(model, _Tok(), rows, seeds, max_new_tokens=3, temperature=0)
    assert forwards == []


def test_eval_gold_past_the_models_positions_exits_2(tmp_path, capsys):
    from rlhf.cli import main

    world = word_world(tmp_path)  # a 256-position policy
    capsys.readouterr()
    assert main(["eval-gold", str(world / "base"), "--prompts", str(world / "prompts.jsonl"),
                 "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sampling: a prompt of ") and "exceeds the model's max_position_embeddings 256" in err
    assert len(err.strip().splitlines()) == 1
