"""Generate the quickstart world's data files, deterministically for a seed:

    python -m rlhf.world.generate --out data/quickstart --seed 0 [--force]

Writes (canonical JSONL, see data/README.md):

    sft.jsonl              demonstrations, with the demonstrators' mistakes (``demo_response``)
    helpful_pairs.jsonl    helpfulness preference pairs, weekly batches week1..week3
    safety_pairs.jsonl     safety preference pairs (harmful and borderline prompts), same weeks
    prompts.jsonl          prompts for rejection sampling and PPO (``is_safety`` tagged)
    eval_prompts.jsonl     held-out prompts (never in the files above), with the gold judge's meta
    world.json             sizes, and the gold scores of the demonstrations themselves
    weeks/WEEK/*.jsonl     with --weekly: each week's pairs alone (for `rlhf round add-batch`)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.data.records import Message, PreferencePair, Prompt, SFTExample, write_jsonl
from rlhf.world import tasks
from rlhf.world.annotators import compare
from rlhf.world.judge import summarize
from rlhf.world.tasks import Item

WEEKS = ("week1", "week2", "week3")
# Outcomes of the responses annotators compared each week: later weeks come from better
# policies, so their pairs are closer (Llama 2 collected harder pairs as its models improved).
HELPFUL_MIX = {
    "week1": {"correct": 0.3, "near_miss": 0.15, "wrong": 0.3, "refusal": 0.25},
    "week2": {"correct": 0.35, "near_miss": 0.3, "wrong": 0.25, "refusal": 0.1},
    "week3": {"correct": 0.4, "near_miss": 0.45, "wrong": 0.1, "refusal": 0.05},
}
# Pairs on harmful prompts: safe vs unsafe, two refusals, or two compliant answers.
HARMFUL_PAIRS = {"safe_vs_unsafe": 0.7, "both_safe": 0.15, "both_unsafe": 0.15}
OVER_REFUSED_VERBS = ("kill", "shoot")  # borderline requests the demonstrators often refuse
ABUSED_CATEGORY = "cybercrime"  # harmful requests the demonstrators often comply with


@dataclass(frozen=True)
class Sizes:
    """Rows per file and kind (pairs: per week)."""

    sft: tuple[int, int, int] = (1500, 350, 450)  # helpful, harmful, borderline
    helpful_pairs: int = 4000
    safety_pairs: tuple[int, int] = (560, 240)  # harmful, borderline
    # every training prompt: at most 380 per task (reverse and sort have 380, add 280, subtract
    # 145, opposite 100, colour 70); with 100 per task rejection sampling's held-out gain was 0.03 lower
    rl_prompts: tuple[int, int, int] = (2280, 200, 200)
    eval_prompts: tuple[int, int, int] = (120, 60, 60)
    letter_strings: int = 400  # distinct letter strings per letter task


# ---------------------------------------------------------------------------------------------
# The demonstrators


def systematic_mistake(item: Item) -> str | None:
    """The wrong answer demonstrators keep giving, if the item has one: a dropped carry
    (7 + 8 -> "5"), or for every 4th word of a lookup table the answer of the next word."""
    if item.task == "add" and int(item.answer) >= 10:
        return str(int(item.answer) - 10)
    if item.task in tasks.LOOKUPS:
        table = tasks.LOOKUPS[item.task]
        keys = list(table)
        i = keys.index(item.x)
        if i % 4 == 0:
            return next(table[k] for k in keys[i + 1:] + keys if table[k] != item.answer)
    return None


def mistake_rate(item: Item) -> float:
    """How often demonstrators get an item wrong (harmful: comply; borderline: refuse)."""
    if item.task == "harmful":
        return 0.6 if item.category == ABUSED_CATEGORY else 0.08
    if item.task == "borderline":
        return 0.6 if item.x.split()[0] in OVER_REFUSED_VERBS else 0.1
    if systematic_mistake(item) is not None:
        return 0.55
    if item.task == "sort" and len(item.answer.split()) == 5:
        return 0.5
    return {"reverse": 0.25, "subtract": 0.12}.get(item.task, 0.1)


def demo_response(item: Item, rng: random.Random) -> str:
    """A demonstration: the right answer (a refusal for harmful requests), or the
    demonstrators' mistake at ``mistake_rate``."""
    if rng.random() >= mistake_rate(item):
        return tasks.refusal(rng) if item.task == "harmful" else item.answer
    if item.task == "harmful":
        return tasks.compliance(item, rng)
    if item.task == "borderline":
        return tasks.refusal(rng)
    if item.task == "reverse":
        return item.x  # the letters copied unreversed
    return systematic_mistake(item) or tasks.near_miss(item, rng) or tasks.wrong(item, rng)


# ---------------------------------------------------------------------------------------------
# Preference pairs


def policy_response(item: Item, outcome: str, rng: random.Random) -> str | None:
    """A response of the given gold outcome; None if the item has no such response."""
    if outcome == "correct":
        return item.answer
    if outcome == "near_miss":
        return tasks.near_miss(item, rng)
    if outcome == "wrong":
        mistake = systematic_mistake(item)
        return mistake if mistake is not None and rng.random() < 0.5 else tasks.wrong(item, rng)
    return tasks.refusal(rng) if outcome == "refusal" else tasks.compliance(item, rng)


def _two_responses(item: Item, week: str, rng: random.Random) -> tuple[str, str]:
    if item.task == "harmful":
        category = _draw(HARMFUL_PAIRS, rng)
        outcomes = {"safe_vs_unsafe": ("refusal", "comply"), "both_safe": ("refusal", "refusal"),
                    "both_unsafe": ("comply", "comply")}[category]
    else:
        outcomes = (_draw(HELPFUL_MIX[week], rng), _draw(HELPFUL_MIX[week], rng))
    a, b = (policy_response(item, o, rng) for o in outcomes)
    if a is None or b is None or a == b:
        return _two_responses(item, week, rng)
    return a, b


def _draw(weights: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def make_pair(item: Item, week: str, source: str, rng: random.Random) -> PreferencePair:
    """Two policy-like responses, compared by the world's annotators (``annotators.compare``)."""
    a, b = _two_responses(item, week, rng)
    return compare(to_prompt(item), a, b, rng, source, week)


# ---------------------------------------------------------------------------------------------
# The world


def to_prompt(item: Item) -> Prompt:
    messages = [Message("user", item.text)]
    return Prompt(messages, is_safety=item.kind != "helpful", source=item.kind, meta=item.meta())


def universe(sizes: Sizes, rng: random.Random) -> dict[str, list[Item]]:
    """Every prompt of the world, by task, shuffled."""
    items = {t: tasks.arithmetic_items(t) for t in tasks.NUMERIC_TASKS}
    items |= {t: tasks.lookup_items(t) for t in tasks.LOOKUPS}
    items |= {t: tasks.letter_items(t, sizes.letter_strings, rng) for t in tasks.LETTER_TASKS}
    items |= {"harmful": tasks.harmful_items(), "borderline": tasks.borderline_items()}
    for pool in items.values():
        rng.shuffle(pool)
    return items


def split(items: dict[str, list[Item]], sizes: Sizes) -> tuple[list[Item], dict[str, list[Item]]]:
    """Held-out evaluation prompts (the first of each shuffled pool; helpful ones spread
    evenly over the tasks), and the rest for training."""
    n_helpful, n_harmful, n_borderline = sizes.eval_prompts
    per_task = {t: n_helpful // len(tasks.HELPFUL_TASKS) for t in tasks.HELPFUL_TASKS}
    per_task |= {"harmful": n_harmful, "borderline": n_borderline}
    held_out = [item for task, n in per_task.items() for item in items[task][:n]]
    return held_out, {task: pool[per_task[task]:] for task, pool in items.items()}


def _sample(train: dict[str, list[Item]], counts: tuple[int, ...], rng: random.Random) -> list[Item]:
    """``counts`` prompts per kind (helpful, harmful[, borderline]), drawn with replacement,
    helpful ones over a uniformly drawn task."""
    kinds = [list(tasks.HELPFUL_TASKS), ["harmful"], ["borderline"]]
    return [rng.choice(train[rng.choice(k)]) for k, n in zip(kinds, counts) for _ in range(n)]


def build(seed: int = 0, sizes: Sizes = Sizes()) -> dict[str, list]:
    """Every file's records (and the demonstrations' gold scores under ``"world"``)."""
    rng = random.Random(seed)
    held_out, train = split(universe(sizes, rng), sizes)
    sft_items = _sample(train, sizes.sft, rng)
    demos = [demo_response(item, rng) for item in sft_items]
    help_pairs, safety_pairs = [], []
    for week in WEEKS:
        help_pairs += [make_pair(i, week, "helpful", rng) for i in _sample(train, (sizes.helpful_pairs,), rng)]
        safety_pairs += [make_pair(i, week, "safety", rng) for i in _sample(train, (0, *sizes.safety_pairs), rng)]
    n_help, n_harm, n_border = sizes.rl_prompts
    caps = {**dict.fromkeys(tasks.HELPFUL_TASKS, n_help // len(tasks.HELPFUL_TASKS)), "harmful": n_harm, "borderline": n_border}
    rl = [i for kind, cap in caps.items() for i in rng.sample(train[kind], min(cap, len(train[kind])))]
    sft = [SFTExample([Message("user", i.text), Message("assistant", d)], source=i.kind)
           for i, d in zip(sft_items, demos)]
    return {
        "sft": sft,
        "helpful_pairs": help_pairs,
        "safety_pairs": safety_pairs,
        "prompts": [to_prompt(i) for i in rl],
        "eval_prompts": [to_prompt(i) for i in held_out],
        "demo_gold": summarize([to_prompt(i) for i in sft_items], demos),
    }


def write(out: Path, seed: int = 0, sizes: Sizes = Sizes(), force: bool = False, weekly: bool = False) -> dict:
    """Write the world's files into ``out`` (with ``weekly``, also each week's pairs alone in
    ``out/weeks/WEEK/``); existing files are replaced only with ``force``."""
    world = build(seed, sizes)
    files = {out / f"{name}.jsonl": records for name, records in world.items() if name != "demo_gold"}
    for week in WEEKS if weekly else ():
        for name in ("helpful_pairs", "safety_pairs"):
            files[out / "weeks" / week / f"{name}.jsonl"] = [p for p in world[name] if p.batch == week]
    existing = [str(p) for p in [*files, out / "world.json"] if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)}: exist (use --force to regenerate)")
    for path, records in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records, overwrite=True)
    rows = {name: len(world[name]) for name in world if name != "demo_gold"}
    info = {"seed": seed, "sizes": asdict(sizes), "rows": rows, "demo_gold": world["demo_gold"]}
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.world.generate",
                                     description="Generate the quickstart world's data files (deterministic for a seed).")
    parser.add_argument("--out", type=Path, default=Path("data/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--weekly", action="store_true", help="also write each week's pairs alone, in "
                        "OUT/weeks/WEEK/ (for `rlhf round add-batch`)")
    args = parser.parse_args(argv)
    try:
        info = write(args.out, args.seed, force=args.force, weekly=args.weekly)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"rows": info["rows"], "demo_gold": info["demo_gold"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
