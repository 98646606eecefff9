"""Reliability (issue 18): user data is never moved or overwritten, a killed or full-disk run can
always be finished by running the same command again, a checkpoint never runs a pickle, and bad
input ends in one clean message, never a traceback."""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.artifacts import InputError, StageRun, read_manifest, stage_state
from rlhf.config import RecipeError, StageConfig, TrainConfig
from rlhf.recipe import load_recipe
from tiny import Crash, toy_collate, toy_regression, weights, word_world

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _echo(tmp_path: Path, out: Path | str, message: str = "a") -> StageConfig:
    return load_recipe(_recipe(tmp_path, f"stage: echo\nmessage: {message}\noutput_dir: {out}\n"))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. Data never lost, moved or overwritten


def test_an_existing_folder_that_is_not_a_stage_dir_is_refused_untouched(tmp_path, echo_stage):
    from rlhf.pipeline import run_stage

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(InputError, match=r"output_dir: .*thesis: exists and is not a stage directory"):
        run_stage(_echo(tmp_path, mine))
    assert _tree(mine) == {"chapter1.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "thesis"]  # nothing set aside


def test_our_own_stage_dirs_are_still_superseded(tmp_path, echo_stage):
    from rlhf.pipeline import run_stage

    run_stage(_echo(tmp_path, tmp_path / "out", "a"))
    run_stage(_echo(tmp_path, tmp_path / "out", "b"))
    assert (tmp_path / "out" / "out.txt").read_text() == "b"
    (aside,) = tmp_path.glob("out.superseded-*")
    assert (aside / "out.txt").read_text() == "a" and not (aside / "running.lock").exists()


def test_output_dir_that_is_a_file_or_the_working_directory_is_a_clean_error(tmp_path, echo_stage, monkeypatch):
    from rlhf.pipeline import run_stage

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"output_dir: .*notes.txt: is a file"):
        run_stage(_echo(tmp_path, tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    for here in (".", tmp_path):
        with pytest.raises(InputError, match="is the current directory"):
            run_stage(_echo(tmp_path, here))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "r.yaml"]


_HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
import echo_stage, rlhf.stages as s
s.STAGES['echo'] = ('echo_stage:EchoConfig', 'echo_stage:run')
from rlhf.cli import main
main(['run', {recipe!r}])
"""


@pytest.mark.slow
def test_a_live_stage_dir_is_locked_and_a_dead_holders_lock_is_taken_over(tmp_path, echo_stage):
    from rlhf.pipeline import run_stage

    out = tmp_path / "out"
    recipe = _recipe(tmp_path, f"stage: echo\nsleep: 60\noutput_dir: {out}\n", "slow.yaml")
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(tests=str(TESTS), recipe=str(recipe))])
    try:
        deadline = time.time() + 60
        while not (out / "out.txt").exists() and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(InputError, match=rf"in use by process {proc.pid} on {os.uname().nodename}"):
            run_stage(_echo(tmp_path, out, "changed"))  # a changed config must not move the live run aside
        assert not list(tmp_path.glob("out.superseded-*")) and stage_state(out) == "running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert stage_state(out) == "interrupted"
    run_stage(_echo(tmp_path, out, "changed"))  # the dead holder's lock is taken over
    assert read_manifest(out)["status"] == "complete" and (out / "out.txt").read_text() == "changed"


_HOLD_LOCK = """
import sys, time
from rlhf.artifacts import hold_lock
hold_lock({dir!r})
print('held', flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_round_commands_lock_their_directories(tmp_path):
    from rlhf.rounds import add_batch, run_round

    run = tmp_path / "run"
    (tmp_path / "week.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    for held, command in ((run / "batches", lambda: add_batch(run, {"helpfulness": tmp_path / "week.jsonl"})),
                          (run / "rounds", lambda: run_round(run))):
        held.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(dir=str(held))], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(InputError, match=rf"{held.name}: in use by process {proc.pid}"):
                command()
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_full_disk_is_a_clean_error_naming_the_file(tmp_path, echo_stage, capsys):
    from rlhf.artifacts import DiskFull
    from rlhf.cli import main

    run = StageRun(StageConfig(stage="toy", output_dir=tmp_path / "out")).start()
    (run.dir / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(DiskFull, match=r"no space left on /\S* while writing .*metrics.jsonl; free space and run the same command again"):
        run.log(1, loss=1.0)
    recipe = _recipe(tmp_path, f"stage: echo\noutput_dir: {tmp_path / 'echo'}\n")
    main(["run", str(recipe)])  # an interrupted run of this config, resumed below
    (tmp_path / "echo" / "manifest.json").unlink()
    (tmp_path / "echo" / "metrics.jsonl").unlink()
    (tmp_path / "echo" / "metrics.jsonl").symlink_to("/dev/full")
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on /") and "Traceback" not in err, err


@pytest.mark.slow
def test_an_sft_stage_on_a_full_disk_stops_cleanly_and_a_rerun_with_space_finishes(sft_world, tmp_path, capsys):
    from rlhf.cli import main

    disk = tmp_path / "disk"
    disk.mkdir()
    # 512 KiB: the step-2 checkpoint (~300 KB) fits, the step-4 one beside it does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs a small file system of its own (mount -t tmpfs, as root)")
    try:
        killed = _sft_recipe(sft_world, tmp_path, disk / "sft")
        assert main(["run", str(killed)]) == 2
        err = capsys.readouterr().err
        assert f"\nerror: no space left on {disk} while writing {disk}/sft/checkpoints/" in "\n" + err, err
        assert "Traceback" not in err and read_manifest(disk / "sft") is None
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert main(["run", str(killed)]) == 0
        assert main(["run", str(_sft_recipe(sft_world, tmp_path, tmp_path / "whole"))]) == 0
        _assert_same_weights(tmp_path / "whole" / "model", disk / "sft" / "model")
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_killed_add_batch_leftovers_are_cleaned_up(tmp_path):
    from rlhf.rounds import add_batch

    run = tmp_path / "run"
    (tmp_path / "week.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    for pid in (99999999, 99999998):  # what SIGKILLed add-batch runs leave
        (run / "batches" / f".incoming-{pid}").mkdir(parents=True)
        (run / "batches" / f".incoming-{pid}" / "helpfulness.jsonl").write_text("half")
    add_batch(run, {"helpfulness": tmp_path / "week.jsonl"})
    assert sorted(p.name for p in (run / "batches").iterdir()) == ["001"]


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.epochs=1e400", "train.epochs"), ("train.weight_decay=.nan", "train.weight_decay"),
])
def test_non_finite_recipe_numbers_are_errors(tmp_path, override, key):
    recipe = _recipe(tmp_path, "stage: sft\nmodel_from: base\ndata: {sources: [{path: sft.jsonl}]}\n")
    with pytest.raises(RecipeError, match=rf"{key}: expected a finite number"):
        load_recipe(recipe, [override])


def _train(tmp_path: Path, name: str, loss_hook=None, **train):
    """The toy of test_training: a small MLP, 24 items, 6 steps of 8 in 2 micro-batches each,
    a checkpoint every 2 steps; ``loss_hook(step, model, loss)`` may crash or poison it."""
    from rlhf.training import make_accelerator, train_loop

    model, items = toy_regression()
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        x, y = batch
        loss = ((model(x) - y) ** 2).sum()
        return (loss_hook(calls["n"], model, loss) if loss_hook else loss), {}

    cfg = TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=4, epochs=2, save_every=2, **train)
    run = StageRun(StageConfig(stage="toy", output_dir=tmp_path / name)).start()
    metrics = train_loop(run, model, items, toy_collate, loss_fn, cfg, seed=0, accelerator=make_accelerator(cfg))
    return model, metrics, run


def _crash_at(call: int):
    def hook(n, model, loss):
        if n == call:
            raise Crash
        return loss
    return hook


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_non_finite_loss_stops_keeping_the_last_good_checkpoint(tmp_path):
    from rlhf.artifacts import Diverged

    nan_in_step_4 = lambda n, model, loss: loss * float("nan") if n == 7 else loss  # noqa: E731
    with pytest.raises(Diverged, match=r"non-finite .* at step 4; the last good checkpoint is .*step-00000002"):
        _train(tmp_path, "nan", nan_in_step_4, keep_checkpoints=3)
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert read_manifest(tmp_path / "nan") is None


def test_non_finite_weights_stop_before_the_stage_saves_them(tmp_path):
    from rlhf.artifacts import Diverged

    def poison_last_step(n, model, loss):
        if n == 12:  # the last micro-batch: the loss is finite, the weights after the step are not
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        return loss

    with pytest.raises(Diverged, match=r"non-finite weights after step 6"):
        _train(tmp_path, "inf", poison_last_step, grad_clip=None)


# ---------------------------------------------------------------------------------------------
# 2. Runs that a re-run can always finish


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    run = StageRun(StageConfig(stage="toy", output_dir=tmp_path / "out")).start()
    run.log(1, loss=1.0)
    run.log(2, loss=0.5)
    with open(run.dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # killed (or out of space) mid-append
    run.truncate_metrics(2)
    assert [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("damage", ["missing weights", "truncated weights", "garbage state", "no trainer state"])
def test_a_broken_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    reference, _, _ = _train(tmp_path, "whole")
    with pytest.raises(Crash):
        _train(tmp_path, "b", _crash_at(2 * 5 + 1), keep_checkpoints=2)  # dies in step 6
    newest = tmp_path / "b" / "checkpoints" / "step-00000004"
    weights_file = newest / "model.safetensors"
    if damage == "missing weights":
        weights_file.unlink()
    elif damage == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif damage == "garbage state":
        (newest / "optimizer.bin").write_bytes(b"\0garbage")
    else:
        (newest / "trainer_state.json").write_text('{"st')
    resumed, _, run = _train(tmp_path, "b")
    _assert_same(reference, resumed)
    out = capsys.readouterr().out
    if damage != "no trainer state":  # an unfinished checkpoint is simply not one
        assert f"skipping checkpoint {newest}" in out
    assert "resumed from" in out and "step-00000002" in out


def test_a_broken_only_checkpoint_starts_over(tmp_path):
    reference, _, _ = _train(tmp_path, "whole")
    with pytest.raises(Crash):
        _train(tmp_path, "b", _crash_at(2 * 5 + 1))
    (tmp_path / "b" / "checkpoints" / "step-00000004" / "model.safetensors").unlink()
    resumed, _, _ = _train(tmp_path, "b")
    _assert_same(reference, resumed)


def test_the_manifest_is_written_before_the_checkpoints_are_dropped(tmp_path, monkeypatch):
    from rlhf import artifacts
    from rlhf.artifacts import is_up_to_date

    real_rmtree = artifacts.shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt("killed in the final clean-up")

    cfg = StageConfig(stage="toy", output_dir=tmp_path / "out")
    run = StageRun(cfg).start()
    (run.checkpoints / "step-00000002").mkdir(parents=True)
    monkeypatch.setattr(artifacts.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run.finish({"loss": 1.0})
    monkeypatch.setattr(artifacts.shutil, "rmtree", real_rmtree)
    assert read_manifest(run.dir)["status"] == "complete" and is_up_to_date(cfg)  # a re-run skips it


def test_our_temp_files_do_not_change_a_fingerprint(tmp_path):
    from rlhf import artifacts

    run = StageRun(StageConfig(stage="toy", output_dir=tmp_path / "out")).start()
    (run.dir / "model").mkdir()
    (run.dir / "model" / "weights.bin").write_bytes(b"w")
    planted = [run.dir / ".manifest.json.tmp4242", run.dir / "model" / ".summary.json.tmp4242",
               run.dir / ".trash-checkpoints-4242" / "optimizer.bin"]  # what kills mid-write leave
    for path in planted:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{")
    run.finish({})
    for path in planted:
        path.unlink()
    assert read_manifest(run.dir)["fingerprint"] == artifacts._hash_files(run.dir, artifacts._VOLATILE)


def _round_world(tmp_path: Path) -> Path:
    from rlhf.pipeline import run_stage

    run_stage(_echo(tmp_path, tmp_path / "sft", "sft"))
    (tmp_path / "round.yaml").write_text(
        f"initial_policy: {tmp_path / 'sft'}\npolicy: rl\nstages:\n"
        "  - {name: rl, config: {stage: echo, message: p}, inputs: {upstream: policy}}\n")
    (tmp_path / "week.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    return tmp_path / "run"


def test_a_round_killed_before_its_round_json_is_run_again(tmp_path, echo_stage):
    from rlhf.rounds import add_batch, round_status, run_round

    run = _round_world(tmp_path)
    add_batch(run, {"helpfulness": tmp_path / "week.jsonl"})
    (run / "rounds" / "001").mkdir(parents=True)  # killed between mkdir and round.json
    assert "round 001" not in round_status(run)
    run_round(run, tmp_path / "round.yaml")
    info = json.loads((run / "rounds" / "001" / "round.json").read_text())
    assert info["status"] == "complete" and info["batches"] == ["001"]


def test_a_damaged_batch_json_is_explained(tmp_path, echo_stage):
    from rlhf.rounds import add_batch, round_status

    run = _round_world(tmp_path)
    add_batch(run, {"helpfulness": tmp_path / "week.jsonl"})
    (run / "batches" / "001" / "batch.json").write_text('{"added_at": ')
    with pytest.raises(InputError, match=r"batches/001/batch.json: damaged \(invalid JSON"):
        round_status(run)


# ---------------------------------------------------------------------------------------------
# 3. No code runs from files


def _pwn(marker: Path, state: dict) -> dict:
    marker.write_text("pwned")
    return state  # and the state it replaced, so loading it goes on unnoticed


class _Payload:
    def __init__(self, marker: Path, state: dict):
        self.marker, self.state = marker, state

    def __reduce__(self):
        return (_pwn, (self.marker, self.state))


def test_a_pickle_planted_in_a_checkpoint_is_never_run(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, "b", _crash_at(2 * 3 + 1))  # dies in step 4: step-2 on disk
    newest = tmp_path / "b" / "checkpoints" / "step-00000002"
    marker = tmp_path / "marker"
    planted = newest / "custom_checkpoint_0.pkl"  # where accelerate looks for registered objects
    state = torch.load(planted, weights_only=False) if planted.exists() else {}
    torch.save(_Payload(marker, state), planted)
    resumed, _, _ = _train(tmp_path, "b")
    assert not marker.exists()


def test_checkpoint_state_is_plain_json(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, "b", _crash_at(2 * 3 + 1))
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000002"
    assert not (ckpt / "custom_checkpoint_0.pkl").exists()
    (state,) = json.loads((ckpt / "state.json").read_text())
    assert state["last_epoch"] == 2


def test_hook_and_checker_modules_are_checked_when_the_recipe_is(tmp_path, monkeypatch):
    from rlhf.data import DataError, SourceConfig, load_source
    from rlhf.gatt.config import Constraint

    with pytest.raises(ValueError, match="hook 'nomod:fn': no module named 'nomod'"):
        SourceConfig(hook="nomod:fn")
    with pytest.raises(ValueError, match="checker: 'nomod:fn': no module named 'nomod'"):
        Constraint(name="c", text="Say hi.", checker="nomod:fn")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raising.py").write_text("raise ValueError('broken at import')\ndef rows(): return []\n")
    with pytest.raises(DataError, match="raising:rows: hook: cannot load: ValueError: broken at import"):
        load_source(SourceConfig(hook="raising:rows"), "sft")  # in the current directory: found


@pytest.fixture(scope="module")
def sft_world(tmp_path_factory) -> Path:
    return word_world(tmp_path_factory.mktemp("sft_world"))


def _sft(world: Path, out: Path, **train):
    from sft.config import SFTConfig

    return SFTConfig(output_dir=out, model_from=world / "base",
                     data={"sources": [{"path": world / "sft.jsonl"}], "max_length": 32, "packing": False},
                     train={"lr": 1e-2, "batch_size": 2, "micro_batch_size": 2, "epochs": 3, "save_every": 2,
                            "warmup_ratio": 0.0, **train})


def test_every_file_a_stage_writes_has_the_same_mode(sft_world, tmp_path, monkeypatch):
    from rlhf import training
    from sft.stage import run

    wanted = 0o666 & ~_umask()
    seen = {}
    real_save = training.save_checkpoint

    def save_and_look(accelerator, checkpoints, step, keep):
        real_save(accelerator, checkpoints, step, keep)
        seen.update({str(p): p.stat().st_mode & 0o777 for p in checkpoints.rglob("*") if p.is_file()})

    monkeypatch.setattr(training, "save_checkpoint", save_and_look)
    out = run(_sft(sft_world, tmp_path / "sft", max_steps=3))
    seen.update({str(p): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()})
    assert any(name.endswith("model.safetensors") for name in seen)
    assert {name: oct(mode) for name, mode in seen.items() if mode != wanted} == {}


def _sft_recipe(world: Path, tmp_path: Path, out: Path) -> Path:
    import yaml

    return _recipe(tmp_path, yaml.safe_dump(_sft(world, out).model_dump(mode="json")), f"{out.name}.yaml")


def _assert_same_weights(a: Path, b: Path) -> None:
    a, b = weights(a), weights(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# The kill test: SIGKILL an SFT stage inside its checkpoint write and inside the final clean-up


_KILLED_SFT = """
import os, shutil, signal, sys
from pathlib import Path
import accelerate.checkpointing as ck
point, recipe = sys.argv[1], sys.argv[2]
real_save, real_rmtree, saves = ck.save, shutil.rmtree, []

def save(obj, path, *args, **kwargs):
    if str(path).endswith("optimizer.bin"):
        saves.append(path)
        if point == "checkpoint" and len(saves) == 2:  # the step-4 checkpoint: weights written, optimizer not
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

def rmtree(path, *args, **kwargs):
    if point == "cleanup" and "checkpoints" in Path(path).name:
        for weights in Path(path).rglob("model.safetensors"):  # half way through deleting them
            weights.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)

ck.save, shutil.rmtree = save, rmtree
from rlhf.cli import main
sys.exit(main(["run", recipe]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint", "cleanup"])
def test_a_killed_sft_stage_resumes_to_the_uninterrupted_weights(sft_world, tmp_path, point):
    from rlhf.cli import main

    assert main(["run", str(_sft_recipe(sft_world, tmp_path, tmp_path / "whole"))]) == 0
    killed = _sft_recipe(sft_world, tmp_path, tmp_path / "killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KILLED_SFT, point, str(killed)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert main(["run", str(killed)]) == 0
    _assert_same_weights(tmp_path / "whole" / "model", tmp_path / "killed" / "model")
    assert read_manifest(tmp_path / "killed")["status"] == "complete"
    assert not (tmp_path / "killed" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# 4. Bad input: one clean message naming the file, a non-zero exit, no traceback, inputs unchanged
#
# Each case writes its bad input under ``root`` and returns (the command line, the file the
# message must name, the inputs to hash). ``world`` is the tiny SFT world (a model in base/).

PAIRS = "".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(20))


def _gz(root: Path, name: str, text: str, keep: float = 1.0) -> Path:
    path = root / name
    data = gzip.compress(text.encode())
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _validate(path: Path, kind: str = "preference", *extra: str):
    return ["data", "validate", str(path), "--kind", kind, *extra], path, [path]


def _write(root: Path, name: str, text: str | bytes) -> Path:
    path = root / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _bad_model(root: Path, world: Path, damage) -> tuple:
    """``rlhf run`` of an SFT recipe whose model_from is a copy of the world's model, damaged:
    the message names that directory."""
    model = root / "model"
    shutil.copytree(world / "base", model)
    damage(model)
    recipe = _write(root, "sft.yaml", f"stage: sft\nmodel_from: {model}\noutput_dir: {root / 'out'}\n"
                    f"data: {{sources: [{{path: {world / 'sft.jsonl'}}}]}}\n")
    return ["run", str(recipe)], model, [model, recipe]


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _stage_without_model(root: Path, world: Path) -> tuple:
    stage = root / "sft_stage"
    stage.mkdir()
    (stage / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))  # model/ deleted since
    recipe = _write(root, "sft.yaml", f"stage: sft\nmodel_from: {stage}\noutput_dir: {root / 'out'}\n"
                    f"data: {{sources: [{{path: {world / 'sft.jsonl'}}}]}}\n")
    return ["run", str(recipe)], stage / "model", [stage, recipe]


def _symlink_loop(root: Path, world: Path) -> tuple:
    model = root / "model"
    shutil.copytree(world / "base", model)
    (model / "again").symlink_to(model, target_is_directory=True)
    recipe = _write(root, "base.yaml", f"stage: base_model\nfrom_pretrained: {model}\noutput_dir: {root / 'out'}\n")
    return ["run", str(recipe)], model / "again", [recipe]


def _recipe_case(text: str, *overrides: str):
    def case(root: Path, world: Path) -> tuple:
        recipe = _write(root, "r.yaml", text.format(root=root, world=world))
        return ["run", str(recipe), *overrides], recipe, [recipe]
    return case


SFT_RECIPE = ("stage: sft\nmodel_from: {world}/base\noutput_dir: {root}/out\n"
              "data: {{sources: [{{path: {world}/sft.jsonl}}]}}\n")

BAD_INPUTS = {
    # tracebacks today
    "truncated .jsonl.gz": lambda root, world: _validate(_gz(root, "p.jsonl.gz", PAIRS, 0.6)),
    "truncated .json.gz": lambda root, world: _validate(_gz(root, "p.json.gz", json.dumps(PAIRS.splitlines()), 0.6)),
    "truncated .csv.gz": lambda root, world: _validate(_gz(root, "p.csv.gz", "prompt,chosen,rejected\n" + "q,a,b\n" * 50, 0.6)),
    ".gz that is not gzip": lambda root, world: _validate(_write(root, "p.jsonl.gz", PAIRS)),
    "100k-deep JSON line": lambda root, world: _validate(_write(root, "p.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")),
    "prompts meta a string": lambda root, world: _validate(
        _write(root, "p.jsonl", '{"prompt": "hi", "is_safety": false, "meta": "x"}\n'), "prompts"),
    "prompts meta a number": lambda root, world: _validate(
        _write(root, "p.jsonl", '{"prompt": "hi", "is_safety": false, "meta": 3}\n'), "prompts"),
    "a directory as --format jsonl": lambda root, world: _validate(root / "d", "preference", "--format", "jsonl"),
    "lone surrogate in text": lambda root, world: _validate(
        _write(root, "p.jsonl", '{"prompt": "q \\ud800", "chosen": "a", "rejected": "b"}\n')),
    "truncated model.safetensors": lambda root, world: _bad_model(root, world, lambda m: _truncate(m / "model.safetensors")),
    "garbage config.json": lambda root, world: _bad_model(root, world, lambda m: _write(m, "config.json", "{garbage")),
    "missing tokenizer files": lambda root, world: _bad_model(
        root, world, lambda m: [p.unlink() for p in m.glob("tokenizer*")]),
    "a finished stage whose model/ is gone": _stage_without_model,
    "a model directory with a symlink loop": _symlink_loop,
    "epochs: 1e400": _recipe_case(SFT_RECIPE + "train: {{epochs: 1e400}}\n"),
    "lr: .inf": _recipe_case(SFT_RECIPE, "train.lr=.inf"),
    "eval-rm of a missing model": lambda root, world: (
        ["eval-rm", str(root / "no_rm"), str(_write(root, "p.jsonl", PAIRS))], root / "no_rm", [root / "p.jsonl"]),
    # accepted silently today
    "a NaN margin": lambda root, world: _validate(
        _write(root, "p.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n')),
    "an empty data file": lambda root, world: _validate(_write(root, "p.jsonl", "")),
    "a duplicate train: key": _recipe_case(SFT_RECIPE + "train: {{lr: 1.0e-3}}\ntrain: {{epochs: 1}}\n"),
    "a pipeline with no stages": _recipe_case("pipeline: p\noutput_dir: {root}/out\nstages: []\n"),
    "report of a missing directory": lambda root, world: (["report", str(root / "nothing")], root / "nothing", []),
    "round status of a missing run": lambda root, world: (["round", "status", str(root / "norun")], root / "norun", []),
    "an empty weekly batch": lambda root, world: (
        ["round", "add-batch", str(root / "run"), "--helpfulness", str(_write(root, "week.jsonl", ""))],
        root / "week.jsonl", [root / "week.jsonl"]),
}


def _digest(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clean_message(case, sft_world, tmp_path, capsys):
    from rlhf.cli import main

    (tmp_path / "d").mkdir()
    argv, named, inputs = BAD_INPUTS[case](tmp_path, sft_world)
    before = _digest(inputs)
    code = main(argv)  # a traceback would raise out of here
    out = capsys.readouterr()
    lines = [line.removeprefix("error: ") for line in (out.out + out.err).splitlines()]
    assert code != 0, out
    assert any(line.startswith(f"{named}:") or line.startswith(f"{named} (") for line in lines), out
    assert _digest(inputs) == before
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_a_utf8_bom_is_accepted_in_every_text_format(tmp_path):
    from rlhf.data import read_records

    bom = "\ufeff"
    files = {"p.jsonl": bom + PAIRS, "p.json": bom + "[" + ",".join(PAIRS.splitlines()) + "]",
             "p.csv": bom + "prompt,chosen,rejected\n" + "q,a,b\n" * 3}
    for name, text in files.items():
        records = read_records(_write(tmp_path, name, text), "preference")
        assert records and records[0].prompt[0].content.startswith("q"), name
