"""The best-so-far pool of rejection sampling: per prompt, the best response of every round so
far (``pool.jsonl`` in the stage directory), carried from round to round (``pool_from``)."""

from __future__ import annotations

from pathlib import Path

from rlhf.data import DataError, Message, Problem, Prompt, SFTExample, read_jsonl_rows, to_dict
from rlhf.prompt_sampling import Item

POOL = "pool.jsonl"


def scored_by(fingerprints: dict[str, str], threshold: float, penalty: float | None) -> dict:
    """What a pool entry's scores depend on besides its response: the reward models
    (``reward_models``: their fingerprints) and how their scores were combined (``gate``: the
    safety gate's threshold, the missing-EOS penalty). An entry scored otherwise is stale."""
    return {"reward_models": fingerprints, "gate": {"threshold": threshold, "missing_eos_penalty": penalty}}


def pool_entry(item: Item, response: str, finished: bool, scores: dict, round_no: int, model: dict,
               scorer: dict) -> dict:
    """A pool row: the prompt record, the response (``finished``: it ended with EOS) and its
    scores, which round and model produced it, what scored it (``scored_by``)."""
    return {"key": item.key, **to_dict(item.prompt), "response": response, "finished": finished, **scores,
            "round": round_no, "model": model, **scorer}


def entry_finished(entry: dict) -> bool:
    """Whether a pool response ended with EOS; pools of earlier versions did not record it, and
    scored and trained every response as finished."""
    return entry.get("finished", True)


def entry_prompt(entry: dict) -> Prompt:
    return Prompt([Message(m["role"], m["content"]) for m in entry["prompt"]], entry.get("is_safety", False),
                  entry.get("source", ""), entry.get("id"), entry.get("meta") or {})


def read_pool(stage_dir: Path) -> dict[str, dict]:
    """key -> entry of a previous round's pool."""
    path = Path(stage_dir) / POOL
    if not path.is_file():
        raise DataError([Problem(str(path), None, "pool", "missing: pool_from must be a finished rejection_sampling stage")])
    pool = {}
    for entry in read_jsonl_rows(path):
        pool[entry["key"]] = entry
    return pool


def update_pool(pool: dict[str, dict], best: dict[str, dict | None]) -> tuple[dict[str, dict], dict[str, int]]:
    """The pool after a round: a candidate replaces its prompt's entry only if its reward is
    strictly higher (both scored by the same reward models); new prompts are added. A sampled
    prompt without a candidate (None: its samples were all truncated) keeps its entry, if any."""
    updated = dict(pool)
    counts = {"improved": 0, "added": 0, "kept": 0, "not_sampled": len(set(pool) - set(best)), "only_truncated": 0}
    for key, candidate in best.items():
        old = pool.get(key)
        if candidate is None:
            counts["only_truncated"] += 1
            continue
        if old is None:
            counts["added"] += 1
        elif candidate["reward"] > old["reward"]:
            counts["improved"] += 1
        else:
            counts["kept"] += 1
            continue
        updated[key] = candidate
    return updated, counts


def pool_examples(pool: dict[str, dict]) -> list[SFTExample]:
    """Fine-tuning conversations: each prompt followed by its pool response (a truncated one
    trained without an EOS)."""
    return [SFTExample([*entry_prompt(e).messages, Message("assistant", e["response"])], source="rejection_sampling", id=k,
                       finished=entry_finished(e))
            for k, e in pool.items()]
