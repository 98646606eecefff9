"""Ghost Attention: instructions, the GAtt transform, loss masks, follow rates, the stage."""

import random

import pytest

from rlhf.data import Message, Prompt, render
from rlhf.gatt import (
    Dialogue, Instruction, conversation, draw_instruction, follow_rates, follows, make_dialogues,
    pour_dialogues, sample_turns, training_examples,
)
from rlhf.gatt_checks import ends_with, mentions, starts_with, upper_case, words
from rlhf.method_configs import Constraint, InstructionsConfig

WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "HELLO", "add", "two", "FOUR",
         "bye", "BYE", "CAPS!"]
CAPS = Constraint(name="case", text="CAPS!", short="C", checker="upper_case")
LAST = Constraint(name="last", text="End with {value}.", short="Last: {value}", values=["ok", "done"], checker="ends_with")
HOBBY = Constraint(name="hobby", text="You enjoy {value}.", values=["tennis"])


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word; ids are the positions in WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def hand_made() -> Dialogue:
    return Dialogue(["hi", "add two", "bye"], Instruction("CAPS!", (("case", ""),)), ["HELLO", "FOUR", "BYE"])


def test_checkers():
    assert words("Hi, it's me!") == ["hi", "it's", "me"]
    assert upper_case("HELLO, 42!") and not upper_case("Hello") and not upper_case("42")
    assert ends_with("That is all. Done!", "done") and not ends_with("done, that is all", "done")
    assert starts_with("Ok: sure", "ok") and not starts_with("sure ok", "ok")
    assert mentions("I love to play tennis daily", "tennis") and not mentions("tennisball", "tennis")


def test_sampling_puts_the_instruction_in_every_user_turn():
    d = hand_made()
    d.answers = d.answers[:2]
    assert conversation(d, 3, "every") == [
        Message("user", "hi CAPS!"), Message("assistant", "HELLO"),
        Message("user", "add two CAPS!"), Message("assistant", "FOUR"),
        Message("user", "bye CAPS!"),
    ]


def test_training_keeps_it_in_the_first_turn_and_trains_on_the_last_answer(tokenizer):
    full = training_examples(hand_made(), every_depth=False)
    assert len(full) == 1
    assert full[0].messages == [
        Message("user", "hi CAPS!"), Message("assistant", "HELLO"),
        Message("user", "add two"), Message("assistant", "FOUR"),
        Message("user", "bye"), Message("assistant", "BYE"),
    ]
    out = render(full[0].messages, tokenizer, loss_on="last")
    # <s> [INST] hi CAPS! [/INST] HELLO </s> <s> [INST] add two [/INST] FOUR </s> <s> [INST] bye [/INST] BYE </s>
    assert out.ids == [1, 3, 5, 12, 4, 6, 2, 1, 3, 7, 8, 4, 9, 2, 1, 3, 10, 4, 11, 2]
    assert out.loss_mask == [0] * 18 + [1, 1]  # only "BYE </s>": previous answers are context
    depths = training_examples(hand_made(), every_depth=True)
    assert [len(e.messages) for e in depths] == [2, 4, 6] and depths[-1].messages == full[0].messages
    assert depths[1].messages[-1] == Message("assistant", "FOUR")


def test_sample_turns_batches_each_depth_and_sees_the_instruction_everywhere():
    calls = []

    def sampler(convs):
        calls.append(len(convs))
        assert all(m.content.endswith("CAPS!") for c in convs for m in c if m.role == "user")
        return [c[-1].content.split()[0].upper() for c in convs]

    ds = [Dialogue(["hi", "add two", "bye"], Instruction("CAPS!", (("case", ""),)), []) for _ in range(3)]
    sample_turns(ds, 3, sampler, "every")
    assert calls == [3, 3, 3] and ds[0].answers == ["HI", "ADD", "BYE"]


def test_draw_instruction_shortens_and_combines():
    cfg = InstructionsConfig(constraints=[CAPS, LAST, HOBBY], combine=0.5, shorten=0.5)
    rng = random.Random(0)
    drawn = [draw_instruction(cfg, rng) for _ in range(400)]
    combined = [i for i in drawn if len(i.parts) == 2]
    assert 0.4 < len(combined) / 400 < 0.6
    assert all(i.parts[0][0] != i.parts[1][0] for i in combined)  # different kinds
    singles = [i for i in drawn if i.parts == (("last", "ok"),)]
    assert {i.text for i in singles} == {"End with ok.", "Last: ok"}
    assert {i.text for i in drawn if i.parts == (("hobby", "tennis"),)} == {"You enjoy tennis."}  # no short form
    checked = make_dialogues([["a"]] * 50, cfg, seed=1, checked_only=True)
    assert all(name != "hobby" for d in checked for name, _ in d.instruction.parts)
    again = make_dialogues([["a"]] * 50, cfg, seed=1, checked_only=True)
    assert [d.instruction for d in checked] == [d.instruction for d in again]


def test_pour_dialogues():
    prompts = [Prompt([Message("user", f"q{i}")]) for i in range(5)]
    prompts.insert(1, Prompt([Message("user", "a"), Message("assistant", "x"), Message("user", "b")]))
    dialogues, used = pour_dialogues(prompts, turns=3)
    assert dialogues == [["q0", "a", "b"], ["q1", "q2", "q3"]] and used == 6
    assert pour_dialogues(prompts, turns=3, limit=1) == ([["q0", "a", "b"]], 2)


def test_follow_rates_by_depth():
    both = Instruction("CAPS! End with ok.", (("case", ""), ("last", "ok")))
    hobby = Instruction("You enjoy tennis.", (("hobby", "tennis"),))
    assert follows("FINE OK", both, [CAPS, LAST]) and not follows("FINE", both, [CAPS, LAST])
    assert follows("anything", hobby, [CAPS, LAST, HOBBY]) is None
    ds = [
        Dialogue(["u"] * 2, both, ["YES OK", "no ok"]),
        Dialogue(["u"] * 2, Instruction("CAPS!", (("case", ""),)), ["YES", "YES"]),
        Dialogue(["u"] * 2, hobby, ["a", "b"]),  # not judged
    ]
    assert follow_rates(ds, [CAPS, LAST, HOBBY]) == {
        1: {"follow": 1.0, "judged": 2}, 2: {"follow": 0.5, "judged": 2},
    }
