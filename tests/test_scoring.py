"""A reward model that shares the policy's tokens (vocabulary, EOS, chat template) scores a
sampled response as the policy generated it: prompt ids + response ids, closed as its template
closes an answer (``RewardModel.score_generated``), not the decoded text re-tokenized, whose ids
differ whenever the text does not round-trip (a special token the decoder drops, a word split
into other pieces). Where the text round-trips, nothing changes. Another reward model re-renders
the text; the manifest of PPO and rejection sampling says which way each one scored."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from reward_model.model import RewardModel, load_reward_model
from rlhf.data import Message, read_jsonl_rows, render_prompt
from rlhf.models import load_tokenizer
from tiny import PROMPT_CORPUS, bpe_tokenizer, llama_config, ppo_config, read_jsonl, rs_config, stage_world, tiny_llama, word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "hello", "bye", "ok", "no"]


def _reward_model(tokenizer, template: str = "llama2") -> RewardModel:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(len(WORDS), max_positions=64, num_labels=1)).eval()
    return RewardModel(model, tokenizer, template)


def test_the_generated_ids_are_scored_as_they_are_and_equal_the_text_where_it_round_trips():
    tokenizer = word_tokenizer(WORDS)
    rm, q = _reward_model(tokenizer), [Message("user", "hi")]
    prompt = render_prompt(q, tokenizer)  # <s> [INST] hi [/INST]
    assert prompt == [1, 3, 5, 4]
    # "hello ok" finished; the same cut at the token limit; with a BOS inside, which decoding drops
    generated, finished = [[6, 8, 2], [6, 8], [6, 1, 8, 2]], [True, False, True]
    texts = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert texts == ["hello ok"] * 3
    assert [rm.encode_generated(prompt, r, f) for r, f in zip(generated, finished)] == [
        [1, 3, 5, 4, 6, 8, 2], [1, 3, 5, 4, 6, 8], [1, 3, 5, 4, 6, 1, 8, 2]]
    assert rm.encode_generated(prompt, generated[0]) == rm.encode(q, "hello ok")  # round trip
    assert rm.encode_generated(prompt, generated[1], False) == rm.encode(q, "hello ok", finished=False)
    assert rm.encode_generated(prompt, generated[2]) != rm.encode(q, texts[2])  # no round trip
    by_ids, by_text = rm.score_generated([prompt] * 3, generated, finished), rm.score([q] * 3, texts, finished=finished)
    torch.testing.assert_close(by_ids[:2], by_text[:2])
    assert by_ids[2] != by_text[2]


def test_a_finished_answer_is_closed_as_the_template_closes_it():
    tokenizer = word_tokenizer(WORDS)
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST] "
                               "{% else %}{{ m.content }} </s> bye {% endif %}{% endfor %}")
    rm, q = _reward_model(tokenizer, "tokenizer"), [Message("user", "hi")]
    prompt = render_prompt(q, tokenizer, "tokenizer")  # [INST] hi [/INST]
    assert rm.encode_generated(prompt, [6, 8, 2]) == rm.encode(q, "hello ok") == [3, 5, 4, 6, 8, 2, 7]
    assert rm.encode_generated(prompt, [6, 8], finished=False) == rm.encode(q, "hello ok", finished=False) == [3, 5, 4, 6, 8]


def test_only_a_reward_model_with_the_policys_tokens_and_template_reads_its_ids():
    tokenizer = word_tokenizer(WORDS)
    rm = _reward_model(tokenizer)
    assert rm.reads_tokens_of(word_tokenizer(WORDS), "llama2")
    assert not rm.reads_tokens_of(tokenizer, "tokenizer")  # the policy's prompts rendered another way
    assert not rm.reads_tokens_of(word_tokenizer([*WORDS, "extra"]), "llama2")  # another vocabulary
    swapped = word_tokenizer(["<unk>", "</s>", "<s>", *WORDS[3:]])  # the same words, BOS and EOS swapped
    assert not rm.reads_tokens_of(swapped, "llama2")


# ---------------------------------------------------------------------------------------------
# The stages: every scored sequence is the policy's prompt + response ids


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``tiny.stage_world`` (reward models sharing the policy's byte-level BPE tokenizer), and
    ``rm_other``: ``rm_s`` with a tokenizer of one more token, so it re-renders text."""
    tokenizer = bpe_tokenizer(PROMPT_CORPUS)
    root = stage_world(tmp_path_factory.mktemp("scoring_world"), tokenizer,
                       tiny_llama(len(tokenizer), max_positions=256), {"rm_h": 1, "rm_s": 2}, prompt_ids=True)
    shutil.copytree(root / "rm_s", root / "rm_other")
    other = load_tokenizer(root / "rm_s" / "model")
    other.add_tokens(["<extra>"])
    other.save_pretrained(root / "rm_other" / "model")
    return root


@pytest.fixture
def scored(monkeypatch) -> dict[str, list]:
    """Reward model -> every sequence it scored, by the path it was loaded from."""
    import reward_model.model as rm_module

    seen: dict[str, list] = {}
    real_load, real_score_ids = rm_module.load_reward_model, RewardModel.score_ids

    def load(path, *args, **kwargs):
        rm = real_load(path, *args, **kwargs)
        rm.source = Path(path).name
        return rm

    def score_ids(self, seqs, *args, **kwargs):
        seen.setdefault(getattr(self, "source", "?"), []).extend(list(s) for s in seqs)
        return real_score_ids(self, seqs, *args, **kwargs)

    monkeypatch.setattr(RewardModel, "score_ids", score_ids)
    for module in ("rlhf.rejection_sampling.stage", "rlhf.ppo.stage"):
        monkeypatch.setattr(f"{module}.load_reward_model", load)
    return seen


def _rs_cfg(world: Path, out: Path):
    return rs_config(world, out, safety_rm_from=str(world / "rm_other"), pool_truncated=True,
                     **{"sampling.max_new_tokens": 6})


def test_rejection_sampling_scores_the_generated_ids_where_the_tokens_are_shared(world, tmp_path, scored):
    import rlhf.rejection_sampling.stage as rs

    out = rs.run(_rs_cfg(world, tmp_path / "rs"))
    assert json.loads((out / "manifest.json").read_text())["reward_scoring"] == {
        "helpfulness": "generated_ids", "safety": "text"}
    tokenizer, rm = load_tokenizer(world / "sft" / "model"), load_reward_model(world / "rm_h")
    prompts = {r["id"]: [Message(**m) for m in r["prompt"]] for r in read_jsonl(world / "prompts.jsonl")}
    rows = [row for path in sorted((out / "samples").glob("*.jsonl")) for row in read_jsonl_rows(path)]
    pairs = [(prompts[row["key"]], ids, text, f)
             for row in rows for ids, text, f in zip(row["response_ids"], row["responses"], row["finished"])]
    generated = [render_prompt(p, tokenizer) + ids for p, ids, _, _ in pairs]  # ids end with EOS where finished
    assert sorted(scored["rm_h"]) == sorted(generated)
    assert sorted(scored["rm_other"]) == sorted(rm.encode(p, text, f) for p, _, text, f in pairs)
    retokenized = [rm.encode(p, text, f) for p, _, text, f in pairs]
    assert sum(a != b for a, b in zip(generated, retokenized)) > 0  # what text scoring would have read


def _ppo_cfg(world: Path, out: Path, **overrides):
    """One iteration, one mini-batch of 4, the paper's lr and beta."""
    return ppo_config(world, out, ppo={"iterations": 1, "prompts_per_iteration": 4},
                      train={"batch_size": 4, "micro_batch_size": 4}, critic={}, **overrides)


def test_ppo_scores_the_generated_ids_where_the_tokens_are_shared(world, tmp_path, scored, monkeypatch):
    import rlhf.ppo.stage as ppo

    real, seen = ppo.collect_rollouts, []

    def spy(accelerator, models, batch, *args):
        seen.append(real(accelerator, models, batch, *args))
        return seen[-1]

    monkeypatch.setattr(ppo, "collect_rollouts", spy)
    out = ppo.run(_ppo_cfg(world, tmp_path / "ppo"))
    (ro,) = seen
    generated = [p + r for p, r in zip(ro.prompt_ids, ro.response_ids)]
    assert scored["rm_h"] == scored["rm_s"] == generated
    assert json.loads((out / "manifest.json").read_text())["reward_scoring"] == {
        "helpfulness": "generated_ids", "safety": "generated_ids"}
