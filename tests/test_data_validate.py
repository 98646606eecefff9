"""Validation: every problem is reported with file, line and field; the fail/skip policy."""

import json

import pytest

from rlhf.data import DataConfig, DataError, SourceConfig, load_data, load_source, run_validate

GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}


def _line(**changes):
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not ...}).encode()


# (line content, expected "field: message" start); line numbers are the list positions + 1.
TEN_PROBLEMS = [
    (_line(), None),
    (b'{"prompt": "q", "chosen": "a",', "json: invalid JSON"),
    (b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}', "encoding: not valid UTF-8 (byte 0xff"),
    (_line(rejected=...), "rejected: missing"),
    (_line(chosen="  "), "chosen: empty"),
    (_line(chosen=5), "chosen: expected a string, got int 5"),
    (_line(rating="amazing"), "rating: unknown rating label 'amazing'"),
    (_line(rejected="a"), "rejected: identical to chosen"),
    (_line(chosen_safe=False, rejected_safe=True), "chosen_safe: chosen response is unsafe while"),
    (_line(prompt=..., chosen="\n\nHuman: hi\n\nAssistant: x",
           rejected="\n\nHuman: hello\n\nAssistant: y"), "prompt: chosen and rejected transcripts differ"),
    (b"", None),  # blank lines are skipped but counted
    (_line(prompt=[{"role": "bot", "content": "q"}]), "prompt[0].role: expected one of system, user"),
]


def test_ten_problems_all_reported_with_line_and_field(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in TEN_PROBLEMS) + b"\n")
    assert run_validate(str(path), "preference") == 1
    out = capsys.readouterr().out.splitlines()
    expected = [(i, what) for i, (_, what) in enumerate(TEN_PROBLEMS, start=1) if what]
    assert len(expected) == 10 and len(out) == 11
    for (number, what), line in zip(expected, out):
        assert line.startswith(f"{path}:{number}: {what}"), line
    assert out[-1] == "10 problem(s) in 10 of 11 rows"


def test_counts_when_clean(tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    rows = [GOOD, {**GOOD, "rating": "Better", "chosen_safe": True, "rejected_safe": False},
            {**GOOD, "prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                {"role": "user", "content": "z"}], "rating": "unsure", "source": "s2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert run_validate(str(path), "preference") == 0
    out = capsys.readouterr().out
    assert "rows: 3" in out
    assert "user turns per row: 1 (2), 2 (1)" in out
    assert "rating: unrated (1), better (1), negligibly_better (1)" in out
    assert "safety labels: unlabelled (2), safe_vs_unsafe (1)" in out
    assert "source: ok (2), s2 (1)" in out


def test_csv_rows_count_the_header_as_line_1(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,rating\nq,a,b,1\nq,a,a,\nq,,b,9\n")
    src = SourceConfig(path=path, ratings={1: "better"})
    problems = [str(p) for p in load_source(src, "preference").problems]
    assert problems == [
        f"{path}:3: rejected: identical to chosen",
        f"{path}:4: chosen: missing",
        f"{path}:4: rating: unknown rating label '9' (known: 1, significantly_better, better, "
        "slightly_better, negligibly_better, unsure; map other labels with `ratings:` in the "
        "source config)",
    ]


def test_csv_non_utf8_is_reported_by_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,is_safety\nfine,true\nbad \xe9,false\n")
    assert str(pytest.raises(DataError, load_source, SourceConfig(path=path), "prompts").value) == (
        f"{path}:3: encoding: not valid UTF-8 (byte 0xe9 at column 5)")


def test_record_formats_say_record(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": "hi"},
    ]))
    assert [str(p) for p in load_source(SourceConfig(path=path), "sft").problems] == [
        f"{path}:record 2: messages: must end with an assistant turn",
        f"{path}:record 3: messages: expected a list of messages, got str 'hi'",
    ]


def test_prompt_rows_need_is_safety_unless_defaulted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "is_safety": "maybe"}\n')
    assert [str(p) for p in load_source(SourceConfig(path=path), "prompts").problems] == [
        f"{path}:1: is_safety: missing (or set is_safety in the source config)",
        f"{path}:2: is_safety: expected true or false, got str 'maybe'",
    ]


def test_fail_lists_every_source_and_skip_counts(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "rejected": "a"}) + "\n")
    b.write_text("not json\n" + json.dumps(GOOD) + "\n")
    sources = [{"path": str(a)}, {"path": str(b)}]
    with pytest.raises(DataError) as err:
        load_data(DataConfig(sources=sources), "preference", seed=0)
    assert str(err.value).splitlines() == [f"{a}:2: rejected: identical to chosen",
                                           f"{b}:1: json: invalid JSON: Expecting value at column 1",
                                           "set data.on_error=skip to drop these 2 rows; they are "
                                           "counted in the manifest"]
    data = load_data(DataConfig(sources=sources, on_error="skip"), "preference", seed=0)
    assert len(data.records) == 2
    assert data.counts() == {"rows": 2, "parts": {}, "sources": {
        "a": {"rows": 2, "skipped": 1, "used": 1}, "b": {"rows": 2, "skipped": 1, "used": 1}}}


def test_missing_file_fails_even_when_skipping(tmp_path):
    cfg = DataConfig(sources=[{"path": str(tmp_path / "nope.jsonl")}], on_error="skip")
    with pytest.raises(DataError, match="nope.jsonl: path: no such file or directory"):
        load_data(cfg, "sft", seed=0)
