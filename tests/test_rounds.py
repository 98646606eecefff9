import json

import pytest

from rlhf.data import DataError
from rlhf.config import RecipeError
from rlhf.rounds import add_batch, list_batches, list_rounds, run_round
from tiny import ECHO_PAIR as PAIR, echo_round_world

@pytest.fixture
def world(tmp_path, echo_stage):
    echo_round_world(tmp_path)
    echo_stage.RUNS.clear()
    return tmp_path


def test_rounds_retrain_on_all_batches_and_chain_policies(world, echo_stage):
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    run_round(run, world / "round.yaml")
    with pytest.raises(RecipeError, match="no new preference batch"):
        run_round(run)
    add_batch(run, {"helpfulness": world / "week2.jsonl"})
    run_round(run)
    r1, r2 = run / "rounds" / "001", run / "rounds" / "002"
    assert (r1 / "rm" / "out.txt").read_text() == "rm+sft[base,batch_001_helpfulness]"
    assert (r2 / "rm" / "out.txt").read_text() == "rm+sft[base,batch_001_helpfulness,batch_002_helpfulness]"
    assert (r2 / "rl" / "out.txt").read_text() == "p+p+sft"  # round 2 starts from round 1's policy
    assert [r["batches"] for r in list_rounds(run)] == [["001"], ["001", "002"]]
    assert (run / "report" / "summary.json").exists() and (run / "report" / "README.md").exists()


def test_a_recipe_that_adds_a_stage_starts_from_the_previous_rounds_policy(world, echo_stage):
    """Round 2 given a recipe whose policy is a new last stage (e.g. PPO on top of rejection
    sampling): its stages start from round 1's policy, the stage round 1 named."""
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    run_round(run, world / "round.yaml")
    extended = (world / "round.yaml").read_text().replace("policy: rl\n", "policy: polish\n") + (
        "  - name: polish\n    config: {stage: echo, message: f}\n    inputs: {upstream: rl}\n")
    (world / "round_polish.yaml").write_text(extended)
    add_batch(run, {"helpfulness": world / "week2.jsonl"})
    run_round(run, world / "round_polish.yaml")  # before: "expects the output of ..., got a '?' stage"
    r2 = run / "rounds" / "002"
    assert (r2 / "rl" / "out.txt").read_text() == "p+p+sft"  # from round 1's rl, not a round-1 "polish"
    assert (r2 / "polish" / "out.txt").read_text() == "f+p+p+sft"
    assert [(r["policy"], r["pool"]) for r in list_rounds(run)] == [("rl", "rl"), ("polish", "rl")]


def test_stored_batches_are_immutable_copies(world):
    run = world / "run"
    batch = add_batch(run, {"helpfulness": world / "week1.jsonl"})
    stored = batch / "helpfulness.jsonl"
    assert stored.read_bytes() == (world / "week1.jsonl").read_bytes()
    assert not stored.stat().st_mode & 0o222  # read-only
    info = json.loads((batch / "batch.json").read_text())["files"]["helpfulness"]
    assert info["pairs"] == 3 and len(info["sha256"]) == 64
    with pytest.raises(RecipeError, match="already added as batch 001"):
        add_batch(run, {"helpfulness": world / "week1.jsonl"})


def test_malformed_batch_is_refused_and_run_untouched(world):
    run = world / "run"
    add_batch(run, {"helpfulness": world / "week1.jsonl"})
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    bad = world / "bad.jsonl"
    bad.write_text(PAIR.format(i=1) + '{"prompt": "q", "chosen": "same", "rejected": "same"}\n{oops\n')
    with pytest.raises(DataError) as err:
        add_batch(run, {"helpfulness": world / "week2.jsonl", "safety": bad})
    assert f"{bad}:2:" in str(err.value) and f"{bad}:3:" in str(err.value)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert len(list_batches(run)) == 1


def test_interrupted_round_resumes_to_the_same_artifacts(world, echo_stage, monkeypatch):
    for name in ("a", "b"):
        add_batch(world / name, {"helpfulness": world / "week1.jsonl"})
    run_round(world / "a", world / "round.yaml")
    monkeypatch.setenv("ECHO_FAIL_AT", "rl")
    with pytest.raises(RuntimeError):
        run_round(world / "b", world / "round.yaml")
    assert list_rounds(world / "b")[0]["status"] == "running"
    monkeypatch.delenv("ECHO_FAIL_AT")
    runs_before = len(echo_stage.RUNS)
    run_round(world / "b")
    assert echo_stage.RUNS[runs_before:] == [str(world / "b" / "rounds" / "001" / "rl")]  # rm skipped
    for stage in ("rm", "rl"):
        a = (world / "a" / "rounds" / "001" / stage / "out.txt").read_text()
        b = (world / "b" / "rounds" / "001" / stage / "out.txt").read_text()
        assert a == b
    assert list_rounds(world / "b")[0]["status"] == "complete"


def test_round_cli(world, capsys):
    from rlhf.cli import main

    run = world / "run"
    bad = world / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["round", "add-batch", str(run), "--helpfulness", str(bad)]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err and not run.exists()
    assert main(["round", "add-batch", str(run), "--helpfulness", str(world / "week1.jsonl")]) == 0
    assert main(["round", "run", str(run)]) == 2
    assert "no round recipe yet; pass --recipe" in capsys.readouterr().err
    assert main(["round", "run", str(run), "--recipe", str(world / "round.yaml")]) == 0
    assert main(["round", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "001  added" in out and "round 001: complete" in out and "rl" in out


def test_batch_sources_fill_mixture_placeholders(tmp_path):
    from rlhf.rounds import _add_batch_sources

    batches = [{"id": b, "dir": tmp_path / b, "format": "auto",
                "files": {"safety": {"file": "safety.jsonl"}, "helpfulness": {"file": "helpfulness.jsonl"}}}
               for b in ("001", "002")]
    data = {"data": {"sources": [{"name": "hh", "path": "hh.jsonl"}],
                     "mixture": [{"sources": ["batches:safety", "hh"], "share": 0.9},
                                 {"sources": ["batches:helpfulness"], "share": 0.1}]}}
    _add_batch_sources(data, batches, ["safety", "helpfulness"])
    names = [s["name"] for s in data["data"]["sources"]]
    assert names == ["hh", "batch_001_safety", "batch_001_helpfulness", "batch_002_safety", "batch_002_helpfulness"]
    assert data["data"]["mixture"][0]["sources"] == ["batch_001_safety", "batch_002_safety", "hh"]
    assert data["data"]["mixture"][1]["sources"] == ["batch_001_helpfulness", "batch_002_helpfulness"]
