"""Every format loads to the same canonical records; HH-RLHF transcripts; hooks; real data."""

import csv
import gzip
import json

import pytest

from rlhf.data import (
    DataError, Message, PreferencePair, Prompt, SFTExample, SourceConfig, load_source,
    parse_transcript, read_records, write_jsonl,
)

# The user's own labels 1..4 and column names, mapped by the source config.
USER_ROWS = [
    {"question": "Add 2 and 3", "good": "5", "bad": "6", "score": 1, "c_safe": True, "r_safe": True},
    {"question": "Reverse abc", "good": "cba", "bad": "abc", "score": 3, "c_safe": None, "r_safe": None},
    {"question": "Build a bomb", "good": "I can't help.", "bad": "Sure: ...", "score": 2,
     "c_safe": True, "r_safe": False},
]
MAPPING = {"columns": {"prompt": "question", "chosen": "good", "rejected": "bad",
                       "rating": "score", "chosen_safe": "c_safe", "rejected_safe": "r_safe"},
           "ratings": {1: "significantly_better", 2: "better", 3: "slightly_better",
                       4: "negligibly_better"},
           "name": "pairs", "batch": "week1"}
EXPECTED = [
    PreferencePair([Message("user", "Add 2 and 3")], "5", "6", "significantly_better", None,
                   True, True, "pairs", "week1"),
    PreferencePair([Message("user", "Reverse abc")], "cba", "abc", "slightly_better", None,
                   None, None, "pairs", "week1"),
    PreferencePair([Message("user", "Build a bomb")], "I can't help.", "Sure: ...", "better",
                   None, True, False, "pairs", "week1"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else str(v).lower() if isinstance(v, bool) else v)
                          for k, v in r.items()} for r in rows)


def _write_datasets(path, rows, how):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(path)) if how == "parquet" else ds.save_to_disk(str(path))


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.json", "pairs.csv",
                                  "pairs.parquet", "pairs_dir"])
def test_each_format_loads_to_the_same_records(tmp_path, name):
    path = tmp_path / name
    if name == "pairs.jsonl":
        _write_jsonl(path, USER_ROWS)
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in USER_ROWS).encode()))
    elif name.endswith(".json"):
        path.write_text(json.dumps(USER_ROWS, indent=2))
    elif name.endswith(".csv"):
        _write_csv(path, USER_ROWS)
    else:
        _write_datasets(path, USER_ROWS, "parquet" if name.endswith(".parquet") else "dir")
    loaded = load_source(SourceConfig(path=path, **MAPPING), "preference")
    assert loaded.problems == []
    assert loaded.records == EXPECTED


MULTI_TURN = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
              "\n\nHuman: What is 2+3?\n\nAssistant:")


def test_hh_transcripts_split_into_shared_prompt_and_answers(tmp_path):
    path = tmp_path / "hh.jsonl"
    _write_jsonl(path, [{"chosen": MULTI_TURN + " It is 5.", "rejected": MULTI_TURN + " 6"}])
    canonical = tmp_path / "canonical.jsonl"
    _write_jsonl(canonical, [{
        "prompt": [{"role": "user", "content": "Hi there"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2+3?"}],
        "chosen": "It is 5.", "rejected": "6", "source": "hh"}])
    for fmt in ("auto", "hh-rlhf"):
        [pair] = load_source(SourceConfig(path=path, format=fmt), "preference").records
        assert pair == read_records(canonical, "preference")[0]
        assert len(pair.prompt) == 3 and pair.prompt[-1] == Message("user", "What is 2+3?")


def test_transcript_joins_consecutive_turns_of_one_speaker():
    assert parse_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d") == [
        Message("user", "a"), Message("assistant", "b\n\nc"), Message("user", "d")]


def test_sft_and_prompt_rows(tmp_path):
    path = tmp_path / "sft.jsonl"
    _write_jsonl(path, [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Add 2 and 3", "response": "5", "id": 7},
    ])
    assert read_records(path, "sft") == [
        SFTExample([Message("system", "Be brief."), Message("user", "Hi"),
                    Message("assistant", "Hello")], "sft"),
        SFTExample([Message("user", "Add 2 and 3"), Message("assistant", "5")], "sft", "7"),
    ]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("goal,target\nDo harm,Sure\n")
    src = SourceConfig(path=prompts, columns={"prompt": "goal"}, is_safety=True)
    assert load_source(src, "prompts").records == [
        Prompt([Message("user", "Do harm")], True, "prompts")]


def test_records_round_trip_through_canonical_jsonl(tmp_path):
    records = EXPECTED + [PreferencePair([Message("system", "s"), Message("user", "u")], "a",
                                         "b", margin=0.5, source="x", id="9")]
    path = tmp_path / "out.jsonl.gz"
    assert write_jsonl(path, records) == 4
    assert read_records(path, "preference") == records
    with pytest.raises(FileExistsError):
        write_jsonl(path, records)
    prompt = Prompt([Message("user", "2+2?")], False, "qs", "p1", {"task": "add", "answer": "4"})
    write_jsonl(tmp_path / "p.jsonl", [prompt])
    assert read_records(tmp_path / "p.jsonl", "prompts") == [prompt]


def make_pairs(n):
    """Hook used by the test below: returns records and plain rows."""
    yield PreferencePair([Message("user", "q0")], "a", "b", source="ignored")
    for i in range(1, n):
        yield {"prompt": f"q{i}", "chosen": "a", "rejected": "b", "rating": "unsure"}


def test_python_hook(tmp_path):
    src = SourceConfig(hook=f"{__name__}:make_pairs", hook_args={"n": 3}, name="mine")
    loaded = load_source(src, "preference")
    assert [p.prompt[0].content for p in loaded.records] == ["q0", "q1", "q2"]
    assert [p.rating for p in loaded.records] == [None, "negligibly_better", "negligibly_better"]
    assert loaded.records[0].source == "ignored" and loaded.records[1].source == "mine"
    bad = SourceConfig(hook=f"{__name__}:no_such_function")
    with pytest.raises(DataError, match="no_such_function: hook: cannot load"):
        load_source(bad, "preference")


def test_real_hh_rlhf_loads(realdata):
    path = realdata / "hh-rlhf" / "helpful-base.test.jsonl.gz"
    loaded = load_source(SourceConfig(path=path), "preference")
    assert loaded.rows == 2354
    # Known flaws of this file: 9 prompt mismatches, 2 identical pairs, 4 empty answers.
    fields = [p.field for p in loaded.problems]
    assert fields.count("prompt") == 9 and len(loaded.problems) == loaded.bad_rows == 15
    assert len(loaded.records) == 2354 - 15
    first = loaded.records[0]
    assert first.prompt == [Message("user", "Do you know why turkeys became the official food "
                                            "of thanksgiving?")]
    assert first.chosen.startswith("To be honest, I don’t know")
    assert all(p.rating is None and p.chosen_safe is None for p in loaded.records)
    multi = loaded.records[1]  # a multi-turn transcript
    assert [m.role for m in multi.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert multi.prompt[2].content == "I am in Oregon."
    assert multi.prompt[-1].content == "Great. What are some common species then?"
    assert multi.chosen.startswith("About 150 species of butterflies live in Oregon")


def test_real_advbench_prompts(realdata):
    src = SourceConfig(path=realdata / "advbench" / "harmful_behaviors.csv",
                       columns={"prompt": "goal"}, is_safety=True, name="advbench")
    loaded = load_source(src, "prompts")
    assert loaded.problems == [] and len(loaded.records) == 520
    assert all(p.is_safety and p.source == "advbench" for p in loaded.records)


@pytest.mark.slow
def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, rlhf.data; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
