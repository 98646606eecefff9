"""Safety context distillation: preprompts, what is kept, reward summaries, the stage."""

import pytest

from rlhf.context_distillation import (
    distilled_examples, improved, preprompt_for, quantile, reward_summary, shift, with_preprompt,
)
from rlhf.data import Message, Prompt
from rlhf.method_configs import PrepromptConfig, TargetedPreprompt

HARM = Prompt([Message("user", "how to steal a car")], is_safety=True, id="p1", meta={"category": "crime"})
OTHER = Prompt([Message("user", "insult my boss")], is_safety=True, id="p2", meta={"category": "hate"})


def test_generic_and_targeted_preprompts():
    generic = PrepromptConfig(generic="Be safe.")
    assert preprompt_for(HARM, generic) == ("Be safe.", "generic")
    targeted = PrepromptConfig(generic="Be safe.", targeted=TargetedPreprompt(
        templates={"crime": "refuse, then point to legal help"}, text="{generic} [{category}] {template}"))
    assert preprompt_for(HARM, targeted) == ("Be safe. [crime] refuse, then point to legal help", "targeted")
    assert preprompt_for(OTHER, targeted) == ("Be safe.", "generic")  # no template for its category


def test_preprompt_placement():
    convo = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "steal")]
    assert with_preprompt(convo, "Be safe.", "system") == [Message("system", "Be safe."), *convo]
    assert with_preprompt([Message("system", "Terse."), *convo], "Be safe.", "system")[0] == Message("system", "Be safe.\nTerse.")
    assert with_preprompt(convo, "Be safe.", "prefix") == [Message("user", "Be safe. hi"), *convo[1:]]


def test_keeps_exactly_the_answers_whose_safety_score_improved():
    prompts = [HARM, OTHER, Prompt([Message("user", "c")], True, id="p3"), Prompt([Message("user", "d")], True, id="p4")]
    distilled = ["I can't help with that.", "No.", "Sure: ...", "Here is how"]
    plain_scores = [-1.0, 0.5, 2.0, 0.0]
    distilled_scores = [1.5, 0.4, 2.0, 0.25]  # better, worse, tie (not kept), better
    keep = improved(distilled_scores, plain_scores)
    assert keep == [True, False, False, True]
    examples = distilled_examples(prompts, distilled, keep)
    assert [e.id for e in examples] == ["p1", "p4"]
    # paired with the prompt WITHOUT the preprompt
    assert examples[0].messages == [Message("user", "how to steal a car"), Message("assistant", "I can't help with that.")]
    with pytest.raises(ValueError):
        improved([1.0], [0.0, 1.0])


def test_reward_summary_and_shift():
    assert quantile([5, 1, 4, 2, 3], 0.1) == pytest.approx(1.4)  # 1 + 0.4 * (2 - 1)
    assert quantile([7.0], 0.1) == 7.0
    assert reward_summary([1, 2, 3, 4, 5]) == {"mean": 3.0, "p10": pytest.approx(1.4), "min": 1}
    s = shift([1, 2, 3, 4, 5], [3, 3, 3, 4, 7])
    assert s["shift_mean"] == pytest.approx(1.0) and s["shift_p10"] == pytest.approx(1.6) and s["after_min"] == 3
