"""Ghost Attention (GAtt, Llama 2 Sec. 3.3 and App. A.3.5): teach the policy to keep following a
system instruction over many turns.

1. build dialogues [u1, ..., un] from the user turns of prompts, and draw an instruction for
   each from the recipe's constraint lists (random combinations, half the time shortened);
2. append the instruction to EVERY user turn and sample the answers with the latest policy;
3. keep the instruction in the first user turn only, and train (through the SFT stage) with the
   loss on the last assistant turn only: every previous turn, answers included, is context;
4. evaluate on held-out dialogues with the instruction in the first turn only: the share of
   answers at each depth that still follow it, before and after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from rlhf.data import Message, Prompt, SFTExample
from rlhf.gatt_checks import get_checker
from rlhf.method_configs import Constraint, InstructionsConfig

# A sampler answers a batch of conversations (each ending with a user turn).
Sampler = Callable[[list[list[Message]]], list[str]]


@dataclass(frozen=True)
class Instruction:
    text: str
    parts: tuple[tuple[str, str], ...]  # (constraint name, value) of each constraint it combines


@dataclass
class Dialogue:
    """User turns, the instruction, and the answers sampled so far (one per finished turn)."""

    users: list[str]
    instruction: Instruction
    answers: list[str]


# ---------------------------------------------------------------------------------------------
# 1. Dialogues and instructions


def draw_instruction(cfg: InstructionsConfig, rng: random.Random, pool: Sequence[Constraint] | None = None) -> Instruction:
    """One instruction: a single constraint, or (with probability ``cfg.combine``) 2 to
    ``cfg.max_combined`` constraints of different kinds; with probability ``cfg.shorten`` each
    is written in its short form (where it has one)."""
    pool = list(pool or cfg.constraints)
    k = 1
    if len(pool) > 1 and rng.random() < cfg.combine:
        k = rng.randint(2, min(cfg.max_combined, len(pool)))
    short = rng.random() < cfg.shorten
    texts, parts = [], []
    for c in rng.sample(pool, k):
        value = rng.choice(c.values) if c.values else ""
        texts.append((c.short if short and c.short else c.text).format(value=value))
        parts.append((c.name, value))
    return Instruction(" ".join(texts), tuple(parts))


def pour_dialogues(prompts: Sequence[Prompt], turns: int, limit: int | None = None) -> tuple[list[list[str]], int]:
    """User turns of consecutive prompts poured into dialogues of ``turns`` user turns each (a
    prompt's turns may be split over two dialogues); at most ``limit`` dialogues. Returns the
    dialogues and how many prompts they used."""
    dialogues: list[list[str]] = []
    current: list[str] = []
    used = 0
    for prompt in prompts:
        if limit is not None and len(dialogues) >= limit:
            break
        used += 1
        for m in prompt.messages:
            if m.role != "user":
                continue
            current.append(m.content)
            if len(current) == turns:
                dialogues.append(current)
                current = []
                if limit is not None and len(dialogues) >= limit:
                    break
    return dialogues, used


def make_dialogues(users: list[list[str]], cfg: InstructionsConfig, seed: int, checked_only: bool = False) -> list[Dialogue]:
    """A dialogue per list of user turns, each with an instruction drawn for the ``seed``;
    ``checked_only`` draws from the constraints with a checker (for evaluation)."""
    rng = random.Random(f"gatt-instructions/{seed}")
    pool = [c for c in cfg.constraints if c.checker] if checked_only else cfg.constraints
    return [Dialogue(u, draw_instruction(cfg, rng, pool), []) for u in users]


# ---------------------------------------------------------------------------------------------
# 2-3. Conversations with the instruction in every user turn (sampling) or the first (training)


def with_instruction(text: str, instruction: str) -> str:
    return f"{text.strip()} {instruction}"


def conversation(d: Dialogue, turns: int, instruction_in: str) -> list[Message]:
    """The first ``turns`` user turns of ``d`` with their answers so far, ending with a user turn
    if fewer answers exist. ``instruction_in``: "every" user turn or only the "first"."""
    messages = []
    for i, user in enumerate(d.users[:turns]):
        if i == 0 or instruction_in == "every":
            user = with_instruction(user, d.instruction.text)
        messages.append(Message("user", user))
        if i < len(d.answers):
            messages.append(Message("assistant", d.answers[i]))
    return messages


def sample_turns(dialogues: list[Dialogue], turns: int, sampler: Sampler, instruction_in: str) -> None:
    """Answer every dialogue turn by turn, all dialogues batched at each turn."""
    for depth in range(turns):
        todo = [d for d in dialogues if len(d.answers) == depth and depth < len(d.users)]
        if not todo:
            continue
        answers = sampler([conversation(d, depth + 1, instruction_in) for d in todo])
        for d, answer in zip(todo, answers):
            d.answers.append(answer)


def training_examples(d: Dialogue, every_depth: bool) -> list[SFTExample]:
    """The GAtt training conversations of a sampled dialogue: the instruction in the first user
    turn only, ending at each answer (``every_depth``) or only at the last; rendered with
    ``loss_on="last"``, only that answer is trained on."""
    depths = range(1, len(d.answers) + 1) if every_depth else [len(d.answers)]
    return [SFTExample(conversation(d, k, "first"), source="gatt") for k in depths]


# ---------------------------------------------------------------------------------------------
# 4. Following the instruction


def follows(answer: str, instruction: Instruction, constraints: Sequence[Constraint]) -> bool | None:
    """Whether ``answer`` follows every checkable part of ``instruction``; None when no part has
    a checker."""
    checkers = {c.name: c.checker for c in constraints if c.checker}
    verdicts = [get_checker(checkers[name])(answer, value) for name, value in instruction.parts if name in checkers]
    return all(verdicts) if verdicts else None


def follow_rates(dialogues: Sequence[Dialogue], constraints: Sequence[Constraint]) -> dict[int, dict[str, float]]:
    """Per depth (1-based assistant turn): the share of judged answers that follow their
    dialogue's instruction, and how many were judged."""
    table: dict[int, list[bool]] = {}
    for d in dialogues:
        for depth, answer in enumerate(d.answers, start=1):
            verdict = follows(answer, d.instruction, constraints)
            if verdict is not None:
                table.setdefault(depth, []).append(verdict)
    return {depth: {"follow": sum(v) / len(v), "judged": len(v)} for depth, v in sorted(table.items())}
