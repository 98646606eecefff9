"""Ghost Attention (GAtt, Llama 2 Sec. 3.3 and App. A.3.5): teach the policy to keep following a
system instruction over many turns.

1. build dialogues [u1, ..., un] from the user turns of prompts, and draw an instruction for
   each from the recipe's constraint lists (random combinations, half the time shortened);
2. append the instruction to EVERY user turn and sample the answers with the latest policy; a
   dialogue stops at an answer cut at ``sampling.max_new_tokens`` (no EOS): its later turns
   would be sampled, and trained, after an answer the policy never finished;
3. keep the instruction in the first user turn only, and train (through the SFT stage) with the
   loss on the last assistant turn only: every previous turn, answers included, is context. An
   example whose last answer was cut is left out (trained with an EOS it never generated, it
   would teach the policy to stop mid-sentence) and counted (``dropped_truncated``);
4. evaluate on held-out dialogues with the instruction in the first turn only: the share of
   answers at each depth that still follow it, before and after (every turn of every dialogue,
   cut answers included), and the share of answers cut (``truncation_rate/*``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rlhf.artifacts import StageRun, model_dir, write_json_atomic
from rlhf.config import RecipeError
from rlhf.data import Message, Prompt, SFTExample, load_data, read_records, write_jsonl, write_jsonl_rows
from rlhf.gatt.checks import OBEY, get_checker
from rlhf.gatt.config import Constraint, GAttConfig, InstructionsConfig
from rlhf.generation import Sampler, eval_sampler, make_sampler, truncation, truncation_line
from rlhf.models import inference_dtype, load_policy
from rlhf.sharding import in_chunks
from rlhf.training import make_accelerator
from sft.stage import fine_tune_generated


@dataclass(frozen=True)
class Instruction:
    text: str
    parts: tuple[tuple[str, str], ...]  # (constraint name, value) of each constraint it combines


@dataclass
class Dialogue:
    """User turns, the instruction, and the answers sampled so far (one per answered turn),
    each ``finished`` or cut at ``max_new_tokens``."""

    users: list[str]
    instruction: Instruction
    answers: list[str]
    key: str = ""
    finished: list[bool] = field(default_factory=list)  # per answer: it ended with EOS


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


def pour_dialogues(prompts: Iterable[Prompt], turns: int, limit: int | None = None) -> tuple[list[list[str]], int]:
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


def make_dialogues(users: list[list[str]], cfg: InstructionsConfig, seed: int, name: str, checked_only: bool = False) -> list[Dialogue]:
    """A dialogue per list of user turns (keys ``name/i``), each with an instruction drawn for
    the ``seed``; ``checked_only`` draws from the constraints with a checker (for evaluation)."""
    rng = random.Random(f"gatt-instructions/{name}/{seed}")
    pool = [c for c in cfg.constraints if c.checker] if checked_only else cfg.constraints
    return [Dialogue(u, draw_instruction(cfg, rng, pool), [], f"{name}/{i}") for i, u in enumerate(users)]


def instruction_demos(path: str, constraints: list[dict], share: float = 0.5, shorten: float = 0.5,
                      combine: float = 0.0, seed: int = 0) -> list[SFTExample]:
    """Data hook (``hook: rlhf.gatt.stage:instruction_demos``): a ``share`` of the SFT demonstrations at
    ``path`` with an instruction drawn from ``constraints`` appended to their first user turn and
    every answer rewritten to obey it (``rlhf.gatt.checks.OBEY``; constraints need a checker
    that has a rewrite). For a policy that has never seen instructions: GAtt needs one that
    follows an instruction given in the same turn (the Llama 2 RLHF model did)."""
    cfg = InstructionsConfig(constraints=constraints, shorten=shorten, combine=combine)
    unusable = [c.name for c in cfg.constraints if c.checker not in OBEY]
    if unusable:
        raise ValueError(f"constraints {', '.join(unusable)}: no rewrite for their checker; "
                         f"instruction_demos knows {', '.join(OBEY)}")
    rng = random.Random(f"instruction-demos/{seed}")
    checker = {c.name: c.checker for c in cfg.constraints}
    demos = []
    for example in read_records(path, "sft"):
        if rng.random() >= share:
            continue
        inst = draw_instruction(cfg, rng)
        # words added before case changes, so "upper case + end with ok" ends with "OK"
        parts = sorted(inst.parts, key=lambda part: checker[part[0]] in ("upper_case", "lower_case"))
        d = Dialogue([m.content for m in example.messages if m.role == "user"], inst, [])
        for m in example.messages:
            if m.role == "assistant":
                d.answers.append(reduce(lambda a, part: OBEY[checker[part[0]]](a, part[1]), parts, m.content))
        if all(follows(a, inst, cfg.constraints) for a in d.answers):  # e.g. not "upper and lower case"
            system = [m for m in example.messages if m.role == "system"]
            demos.append(SFTExample([*system, *conversation(d, len(d.users), "first")], source="instruction_demos", id=example.id))
    return demos


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


def sample_turns(dialogues: list[Dialogue], turns: int, sampler: Sampler, instruction_in: str,
                 stop_at_truncated: bool = False) -> None:
    """Answer every dialogue turn by turn, all dialogues batched at each turn. With
    ``stop_at_truncated`` a dialogue whose last answer was cut at ``max_new_tokens`` is not
    answered further, so a cut answer is always its dialogue's last."""
    for depth in range(turns):
        todo = [d for d in dialogues if len(d.answers) == depth and depth < len(d.users)
                and (all(d.finished) or not stop_at_truncated)]
        if not todo:
            continue
        out = sampler([conversation(d, depth + 1, instruction_in) for d in todo], [f"{d.key}/{depth}" for d in todo])
        for d, answer, finished in zip(todo, out.texts, out.finished):
            d.answers.append(answer)
            d.finished.append(finished)


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


# ---------------------------------------------------------------------------------------------
# The stage


def shuffled(prompts: Sequence[Prompt], seed: int, name: str, passes: int | None = 1) -> Iterator[Prompt]:
    """The prompts in a new random order on each of ``passes`` passes (None: without end)."""
    for n in range(passes) if passes else itertools.count():
        order = list(prompts)
        random.Random(f"gatt/{name}/{seed}/{n}").shuffle(order)
        yield from order


def dialogue_users(cfg: GAttConfig) -> tuple[list[list[str]], list[list[str]], dict[str, Any]]:
    """User turns of the training and the held-out dialogues, and the data counts. Prompts are
    shuffled for the seed; without ``eval.sources`` the held-out dialogues take the first ones.
    ``data.dialogues`` beyond what one pass over the prompts fills reuses them, reshuffled."""
    data = load_data(cfg.data, "prompts", cfg.seed)
    prompts = list(shuffled(data.records, cfg.seed, "train"))[: cfg.data.max_prompts]
    if cfg.eval.sources:
        held = load_data(cfg.data.model_copy(update={"sources": cfg.eval.sources, "mixture": None}), "prompts", cfg.seed)
        eval_users, _ = pour_dialogues(list(shuffled(held.records, cfg.seed, "eval")), cfg.eval.turns, cfg.eval.dialogues)
    else:
        eval_users, used = pour_dialogues(prompts, cfg.eval.turns, cfg.eval.dialogues)
        prompts = prompts[used:]
    if not eval_users:
        raise RecipeError(f"eval: the held-out prompts fill no dialogue of eval.turns={cfg.eval.turns} user turns")
    if not prompts:
        raise RecipeError("data: no prompt is left for training after the held-out dialogues")
    passes = None if cfg.data.dialogues else 1
    train_users, _ = pour_dialogues(shuffled(prompts, cfg.seed, "dialogues", passes), cfg.data.turns, cfg.data.dialogues)
    if not train_users:
        raise RecipeError(f"data: the prompts left after the held-out dialogues fill no dialogue of "
                          f"data.turns={cfg.data.turns} user turns; give more prompts or fewer turns")
    return train_users, eval_users, {**data.counts(), "dialogues": len(train_users), "eval_dialogues": len(eval_users)}


def answer_dialogues(run: StageRun, accelerator, name: str, dialogues: list[Dialogue], turns: int, sampler: Sampler,
                     instruction_in: str, size: int, stop_at_truncated: bool = False) -> list[Dialogue]:
    """Fresh copies of ``dialogues`` answered turn by turn (``sample_turns``; resumable, sharded
    over processes)."""
    def work(part: list[Dialogue]) -> list[dict]:
        part = [replace(d, answers=[], finished=[]) for d in part]
        sample_turns(part, turns, sampler, instruction_in, stop_at_truncated)
        return [asdict(d) for d in part]

    rows = in_chunks(run.checkpoints / name, dialogues, size, work, accelerator, f"gatt {name}")
    return [Dialogue(**{**r, "instruction": Instruction(r["instruction"]["text"], tuple(map(tuple, r["instruction"]["parts"])))})
            for r in rows]


def gatt_examples(sampled: list[Dialogue], cfg: GAttConfig) -> tuple[list[SFTExample], dict[str, int]]:
    """Training examples of the sampled dialogues. Left out (and counted): examples whose last
    answer was cut at ``max_new_tokens`` (the EOS they would be trained with was never
    generated), examples with an empty answer, and with ``keep: following`` those whose last
    answer the instruction's checker rejects."""
    examples, counts = [], {"dropped_truncated": 0, "dropped_empty_answer": 0, "dropped_not_following": 0}
    for d in sampled:
        for example in training_examples(d, cfg.data.every_depth):
            answers = [m.content for m in example.messages if m.role == "assistant"]
            if not d.finished[len(answers) - 1]:
                counts["dropped_truncated"] += 1
            elif not all(answers):
                counts["dropped_empty_answer"] += 1
            elif cfg.data.keep == "following" and follows(answers[-1], d.instruction, cfg.instructions.constraints) is False:
                counts["dropped_not_following"] += 1
            else:
                examples.append(example)
    if not examples:
        raise RecipeError(
            f"data: no training example is left of {sum(counts.values())} examples: {counts['dropped_truncated']} ended "
            f"with an answer cut at sampling.max_new_tokens={cfg.sampling.max_new_tokens} (no EOS: raise it), "
            f"{counts['dropped_empty_answer']} with an empty answer, {counts['dropped_not_following']} with one its "
            "instruction's checker rejects (data.keep: following: the policy cannot follow these instructions "
            "even when repeated)")
    return examples, counts


def write_eval(out: Path, results: dict[str, list[Dialogue]], constraints: Sequence[Constraint],
               truncated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``eval/gatt.json`` (follow rate by depth, before and after), ``eval/<name>.jsonl`` (the
    answered dialogues with verdicts and which answers finished) and ``eval/report.md`` (with
    the ``truncated`` answers of each set); returns the rates."""
    out.mkdir(parents=True, exist_ok=True)
    rates = {name: follow_rates(ds, constraints) for name, ds in results.items()}
    for name, ds in results.items():
        rows = [{**asdict(d), "follows": [follows(a, d.instruction, constraints) for a in d.answers]} for d in ds]
        write_jsonl_rows(out / f"{name}.jsonl", rows)
    write_json_atomic(out / "gatt.json", rates)
    depths = sorted({k for r in rates.values() for k in r})
    lines = ["# Ghost Attention: instruction followed, by assistant turn", "",
             "before / after: the policy and the fine-tuned policy on held-out dialogues, the "
             "instruction in the first user turn only. sampled: the training dialogues, sampled "
             "with the instruction in every user turn. In brackets: answers judged.", "",
             "| turn | " + " | ".join(rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for k in depths:
        cells = [f"{r[k]['follow']:.1%} ({r[k]['judged']})" if k in r else "-" for r in rates.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", truncation_line(truncated)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return rates


def run(cfg: GAttConfig) -> Path:
    run = StageRun(cfg).start()
    accelerator = make_accelerator(cfg.train, cfg.report_to, run.dir)
    accelerator.wait_for_everyone()  # the stage directory is in place for every process
    # 1. the policy, and dialogues with an instruction drawn for each
    dtype = inference_dtype(cfg.train.mixed_precision, accelerator.device)
    policy, tokenizer = load_policy(cfg.policy_from, accelerator.device, dtype)
    sampler = make_sampler(policy, tokenizer, cfg.sampling, cfg.data.template, cfg.seed)
    evaluator = eval_sampler(policy, tokenizer, cfg)
    train_users, eval_users, counts = dialogue_users(cfg)
    dialogues = make_dialogues(train_users, cfg.instructions, cfg.seed, "train")
    held_out = make_dialogues(eval_users, cfg.instructions, cfg.seed, "eval", checked_only=True)
    size, constraints = cfg.sampling.batch_size, cfg.instructions.constraints
    # 2. the policy on held-out dialogues (instruction in the first turn only), then the
    #    training answers sampled with the instruction in every user turn (a dialogue stops at a cut answer)
    before = answer_dialogues(run, accelerator, "eval_before", held_out, cfg.eval.turns, evaluator, "first", size)
    sampled = answer_dialogues(run, accelerator, "samples", dialogues, cfg.data.turns, sampler, "every", size,
                               stop_at_truncated=True)
    # 3. keep the instruction in the first turn only, train on the last answer of each example
    examples, kept = gatt_examples(sampled, cfg)
    if accelerator.is_main_process:
        (run.dir / "data").mkdir(exist_ok=True)
        write_jsonl(run.dir / "data" / "gatt.jsonl", examples, overwrite=True)
    del policy, sampler, evaluator
    metrics, rows = fine_tune_generated(run, accelerator, model_dir(cfg.policy_from), examples, cfg)
    # 4. the fine-tuned policy on the same held-out dialogues
    tuned, _ = load_policy(run.dir / "model", accelerator.device, dtype)
    evaluator = eval_sampler(tuned, tokenizer, cfg)
    after = answer_dialogues(run, accelerator, "eval_after", held_out, cfg.eval.turns, evaluator, "first", size)
    results = {"sampled": sampled, "before": before, "after": after}
    truncated = {name: truncation([f for d in ds for f in d.finished]) for name, ds in results.items()}
    rates = write_eval(run.dir / "eval", results, constraints, truncated) if accelerator.is_main_process else {}
    headline = {**{f"follow/{name}/turn_{k}": r["follow"] for name in ("before", "after") for k, r in rates.get(name, {}).items()},
                **{f"truncation_rate/{name}": t["rate"] for name, t in truncated.items()}}
    return run.finish({**metrics, **headline}, data={**counts, **kept, **rows})
