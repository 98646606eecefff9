"""Mixtures: exact counts for a seed, and Llama 2's reward-model mixtures as recipes."""

import json

import pytest
import yaml

from rlhf.data import DataConfig, DataError, Message, MixturePart, PreferencePair, load_data, mix
from rlhf.config import RecipeError, validate


def _pairs(source, n):
    return [PreferencePair([Message("user", f"{source} {i}")], "a", "b", source=source)
            for i in range(n)]


POOLS = {"helpful": _pairs("helpful", 100), "safety": _pairs("safety", 60),
         "hh_harmless": _pairs("hh_harmless", 40), "oss": _pairs("oss", 30)}

HELPFULNESS_RM = """
mixture:
  - {name: helpful, sources: [helpful]}
  - {name: rest, sources: [safety, hh_harmless, oss], equal_to: helpful}
"""
SAFETY_RM = """
mixture:
  - {name: safety, sources: [safety, hh_harmless], share: 0.9}
  - {name: helpful, sources: [helpful, oss], share: 0.1}
"""


def _parts(text):
    return [MixturePart(**p) for p in yaml.safe_load(text)["mixture"]]


def _by_source(records):
    counts = {}
    for r in records:
        counts[r.source] = counts.get(r.source, 0) + 1
    return counts


def test_helpfulness_rm_mixture_all_helpful_plus_an_equal_amount_of_the_rest():
    records, parts, counts = mix(POOLS, _parts(HELPFULNESS_RM), seed=0)
    assert parts == {"helpful": 100, "rest": 100}
    assert counts == _by_source(records)
    assert counts["helpful"] == 100 and counts["safety"] + counts["hh_harmless"] + counts["oss"] == 100
    # The 100 "rest" rows are drawn uniformly from the pooled 130, so every source contributes.
    assert min(counts["safety"], counts["hh_harmless"], counts["oss"]) > 0


def test_safety_rm_mixture_90_10():
    records, parts, counts = mix(POOLS, _parts(SAFETY_RM), seed=0)
    # The safety part is the scarce one: all its 100 rows are 90%, so the total is 100 / 0.9
    # = 111.1 and the helpful part takes round(11.1) = 11.
    assert parts == {"safety": 100, "helpful": 11}
    assert counts == _by_source(records)
    assert counts["safety"] == 60 and counts["hh_harmless"] == 40
    assert counts["helpful"] + counts["oss"] == 11


def test_counts_and_draws_are_deterministic_for_a_seed():
    parts = [MixturePart(sources=["helpful"], take=10), MixturePart(sources=["safety"], take=0.5),
             MixturePart(sources=["hh_harmless", "oss"])]
    a, counts, _ = mix(POOLS, parts, seed=3)
    assert counts == {"helpful": 10, "safety": 30, "hh_harmless+oss": 70}
    assert a == mix(POOLS, parts, seed=3)[0]
    assert a != mix(POOLS, parts, seed=4)[0]
    # Changing one part leaves another part's draw alone.
    other = [parts[0].model_copy(update={"take": 20}), *parts[1:]]
    assert [r for r in mix(POOLS, other, seed=3)[0] if r.source == "safety"] == \
        [r for r in a if r.source == "safety"]


def test_part_larger_than_its_pool_is_an_error():
    with pytest.raises(DataError, match="mixture: big: needs 61 rows but its sources .safety. hold 60"):
        mix(POOLS, [MixturePart(name="big", sources=["safety"], take=61)], seed=0)


@pytest.mark.parametrize("mixture, message", [
    ([{"sources": ["nope"]}], "unknown source(s) nope"),
    ([{"sources": ["a"]}], "source(s) b not in any part"),
    ([{"sources": ["a", "b"]}, {"sources": ["a"]}], "source(s) a in more than one part"),
    ([{"sources": ["a"], "equal_to": "b"}, {"sources": ["b"]}], "equal_to must name an earlier part"),
    ([{"sources": ["a"], "share": 0.5}, {"sources": ["b"]}], "every part must"),
    ([{"sources": ["a"], "share": 0.5}, {"sources": ["b"], "share": 0.4}], "sum to 1"),
    ([{"sources": ["a"], "take": 0.5, "share": 0.5}, {"sources": ["b"]}], "at most one of"),
    ([{"sources": ["a"], "take": 1.5}, {"sources": ["b"]}], "fraction must be in (0, 1]"),
])
def test_mixture_config_errors_name_the_key(mixture, message):
    data = {"sources": [{"path": "x/a.jsonl"}, {"path": "y/b.csv"}], "mixture": mixture}
    with pytest.raises(RecipeError) as err:
        validate(DataConfig, data, "recipe.yaml")
    assert message in str(err.value) and str(err.value).startswith("recipe.yaml: ")


def test_load_data_reports_counts_per_source_and_part(tmp_path):
    for name, n in (("helpful", 8), ("safety", 3), ("harmless", 5)):
        rows = [{"prompt": f"{name} {i}", "chosen": "a", "rejected": "b"} for i in range(n)]
        rows[0]["source"] = "annotator_x"  # a row's own source label; counts go by source name
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        sources=[{"path": str(tmp_path / f"{n}.jsonl")} for n in ("helpful", "safety", "harmless")],
        mixture=[{"name": "main", "sources": ["helpful"]},
                 {"name": "rest", "sources": ["safety", "harmless"], "equal_to": "main"}],
    )
    data = load_data(cfg, "preference", seed=0)
    assert data.counts() == {"rows": 16, "parts": {"main": 8, "rest": 8}, "sources": {
        "helpful": {"rows": 8, "skipped": 0, "used": 8},
        "safety": {"rows": 3, "skipped": 0, "used": 3},
        "harmless": {"rows": 5, "skipped": 0, "used": 5}}}
