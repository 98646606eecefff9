"""Chat rendering: exact Llama 2 token ids and loss masks."""

import pytest

import tiny
from rlhf.data import Message, render, render_prompt

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
         "Be", "brief.", "Hi", "there", "Hello", "Add", "2", "and", "3", "5"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word; ids are the positions in WORDS."""
    return tiny.word_tokenizer(WORDS, pad_token=None)


CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hi there"),
    Message("assistant", "Hello"),
    Message("user", "Add 2 and 3"),
    Message("assistant", " 5 "),  # contents are stripped
]


def test_llama2_multi_turn_with_system_prompt(word_tokenizer):
    out = render(CONVERSATION, word_tokenizer)
    # <s> [INST] <<SYS>> Be brief. <</SYS>> Hi there [/INST] Hello </s>
    # <s> [INST] Add 2 and 3 [/INST] 5 </s>
    assert out.ids == [1, 3, 5, 7, 8, 6, 9, 10, 4, 11, 2,
                       1, 3, 12, 13, 14, 15, 4, 16, 2]
    assert out.loss_mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
                             0, 0, 0, 0, 0, 0, 0, 1, 1]
    last = render(CONVERSATION, word_tokenizer, loss_on="last")
    assert last.ids == out.ids
    assert last.loss_mask == [0] * 18 + [1, 1]


def test_prompt_is_prefix_and_ends_after_inst(word_tokenizer):
    ids = render_prompt(CONVERSATION[:4], word_tokenizer)
    assert ids == [1, 3, 5, 7, 8, 6, 9, 10, 4, 11, 2, 1, 3, 12, 13, 14, 15, 4]
    assert render(CONVERSATION, word_tokenizer).ids[: len(ids)] == ids
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt(CONVERSATION, word_tokenizer)


def test_roles_must_alternate(word_tokenizer):
    with pytest.raises(ValueError, match="expected an assistant turn"):
        render([Message("user", "Hi"), Message("user", "there")], word_tokenizer)


def test_tokenizer_chat_template_mask(word_tokenizer):
    word_tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST] "
        "{% elif m.role == 'assistant' %}{{ m.content }} </s> {% endif %}{% endfor %}"
    )
    out = render(CONVERSATION[1:], word_tokenizer, template="tokenizer")
    assert out.ids == [3, 9, 10, 4, 11, 2, 3, 12, 13, 14, 15, 4, 16, 2]
    assert out.loss_mask == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]


def test_real_tokenizer_mask_covers_exactly_the_answers(realdata):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(realdata / "models" / "tinystories-656k")
    out = render(CONVERSATION, tok)
    answer_ids = [i for i, m in zip(out.ids, out.loss_mask) if m]
    expected = (tok(" Hello ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                + tok(" 5 ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert answer_ids == expected
    assert out.ids[0] == tok.bos_token_id and out.ids.count(tok.bos_token_id) == 2
    prompt = render_prompt(CONVERSATION[:4], tok)
    assert out.ids[: len(prompt)] == prompt
