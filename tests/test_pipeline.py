import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.artifacts import read_manifest, stage_state
from rlhf.pipeline import run_recipe, status_rows
from rlhf.recipe import load_recipe
from tiny import stage_dir

PIPELINE = """
pipeline: demo
output_dir: {out}
stages:
  - name: first
    config: {{stage: echo, message: a, source: {source}}}
  - name: second
    config: {{stage: echo, message: b}}
    inputs: {{upstream: first}}
"""


@pytest.fixture
def pipe(tmp_path, echo_stage):
    source = tmp_path / "data.txt"
    source.write_text("v1")
    path = tmp_path / "pipe.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / "run", source=source))
    return path


def test_manifest_records_the_run(pipe, tmp_path, echo_stage):
    run_recipe(load_recipe(pipe))
    manifest = read_manifest(tmp_path / "run" / "second")
    assert manifest["status"] == "complete" and manifest["stage"] == "echo"
    assert manifest["metrics"] == {"length": len("b+a:v1")}
    assert manifest["inputs"]["upstream"]["fingerprint"] == read_manifest(tmp_path / "run" / "first")["fingerprint"]
    assert manifest["config"]["message"] == "b" and len(manifest["config_hash"]) == 16
    assert {"torch", "transformers", "rlhf-toolkit"} <= set(manifest["versions"])
    assert manifest["started_at"] <= manifest["ended_at"]
    assert (tmp_path / "run" / "second" / "config.yaml").exists()
    lines = (tmp_path / "run" / "second" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 1.0}


def test_complete_stages_are_skipped_and_changed_ones_rerun(pipe, tmp_path, echo_stage):
    run_recipe(load_recipe(pipe))
    assert len(echo_stage.RUNS) == 2
    run_recipe(load_recipe(pipe))
    assert len(echo_stage.RUNS) == 2  # nothing changed: both skipped

    run_recipe(load_recipe(pipe, ["second.message=c"]))
    assert echo_stage.RUNS[2:] == [str(tmp_path / "run" / "second")]  # config changed: only second
    assert (tmp_path / "run" / "second" / "out.txt").read_text() == "c+a:v1"
    assert list((tmp_path / "run").glob("second.superseded-*"))  # the old run is kept aside

    (tmp_path / "data.txt").write_text("v2")  # an input file changed: first, then second
    run_recipe(load_recipe(pipe, ["second.message=c"]))
    assert len(echo_stage.RUNS) == 5


def test_a_moved_run_directory_is_skipped_whole(pipe, tmp_path, echo_stage):
    run_recipe(load_recipe(pipe))
    (tmp_path / "run").rename(tmp_path / "moved")
    run_recipe(load_recipe(pipe, [f"output_dir={tmp_path / 'moved'}"]))
    assert len(echo_stage.RUNS) == 2  # second's input now lies elsewhere, with the same content
    assert not list((tmp_path / "moved").glob("*.superseded-*"))


def test_failed_stage_leaves_no_manifest(pipe, tmp_path, echo_stage):
    with pytest.raises(RuntimeError):
        run_recipe(load_recipe(pipe, ["second.fail_half_way=true"]))
    second = tmp_path / "run" / "second"
    assert (second / "out.txt").exists() and read_manifest(second) is None
    rows = {r["name"]: r["state"] for r in status_rows(tmp_path / "run")}
    assert rows == {"first": "complete", "second": "interrupted"}


def test_stage_refuses_incomplete_or_wrong_input(tmp_path, echo_stage):
    from rlhf.artifacts import InputError
    from rlhf.pipeline import run_stage

    (tmp_path / "up").mkdir()
    cfg = load_recipe(_write(tmp_path, f"stage: echo\nupstream: {tmp_path / 'up'}\n"))
    with pytest.raises(InputError, match="upstream: .*no manifest.json; expected the output directory of a finished echo stage"):
        run_stage(cfg)
    stage_dir(tmp_path / "up", "sft")
    with pytest.raises(InputError, match="is the output of a 'sft' stage; expected echo"):
        run_stage(cfg)


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_killed_stage_is_interrupted_not_complete(tmp_path):
    """kill -9 in the middle of a stage: no complete manifest, status says interrupted."""
    recipe = _write(tmp_path, f"stage: echo\nsleep: 30\noutput_dir: {tmp_path / 'out'}\n")
    code = (
        "import sys; sys.path.insert(0, %r); import echo_stage, rlhf.stages as s;"
        "s.STAGES['echo'] = ('echo_stage:EchoConfig', 'echo_stage:run');"
        "from rlhf.cli import main; main(['run', %r])" % (str(Path(__file__).parent), str(recipe))
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    out = tmp_path / "out"
    deadline = time.time() + 60
    while not (out / "out.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert stage_state(out) == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(out) is None
    assert stage_state(out) == "interrupted"


def test_data_source_paths_are_inputs(tmp_path, echo_stage):
    from rlhf.config import StageConfig
    from rlhf.data import DataConfig

    class WithData(echo_stage.EchoConfig):
        data: DataConfig

    src = tmp_path / "pairs.jsonl"
    src.write_text("{}\n")
    cfg = WithData(data={"sources": [{"path": src}, {"name": "b", "path": src}]})
    assert cfg.input_paths() == {"data.sources.0.path": (src, ()), "data.sources.1.path": (src, ())}
    assert isinstance(cfg, StageConfig)
