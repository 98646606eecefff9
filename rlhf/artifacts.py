"""Stage directories and their manifests.

A stage directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per logging step), its outputs (``model/`` in Hugging Face format, ``eval/`` ...),
``checkpoints/`` while it runs, and ``manifest.json``, written last by atomic rename. A
directory without a complete manifest is unfinished; a complete one whose config hash and
input fingerprints match the new run's is skipped.

Only the main process (``RANK`` 0 under torchrun / accelerate) writes. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import StageConfig
from rlhf.model_card import CARD, model_card, needs_card
from rlhf.tracking import TENSORBOARD_DIR, WANDB_DIR

MANIFEST = "manifest.json"
LOCK = "running.lock"
# Written by the toolkit while a stage runs; not part of the output fingerprint.
_VOLATILE = {MANIFEST, LOCK, "metrics.jsonl", "config.yaml", "inputs.json", "checkpoints", TENSORBOARD_DIR, WANDB_DIR}
_PACKAGES = ("rlhf-toolkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets")
# Our own passing names: ``.NAME.tmpPID`` (a file before its atomic rename) and ``.trash-NAME-PID``
# (a tree renamed away before it is deleted). A kill can leave them; they never count as content.
_TEMP = re.compile(r"^\..+\.tmp\d+$|^\.trash-")
# Free space below which a failed write is taken for a full disk (torch.save only says
# "unexpected pos" when it runs out of space).
_NEARLY_FULL = 16 * 2**20


class InputError(Exception):
    """A stage input that cannot be used; the message is ready to print (exit 2)."""


class DiskFull(Exception):
    """No space left while writing; the message names the file system and the file (exit 2)."""


class Diverged(Exception):
    """Training stopped on a non-finite loss or weights; the message names the last good
    checkpoint, which is kept (exit 2)."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier across the processes of a distributed run (a no-op in a single process)."""
    dist = sys.modules.get("torch.distributed")  # a distributed run has imported it already
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_temp(name: str) -> bool:
    """A name of ours for a file or tree on its way in or out (see ``_TEMP``)."""
    return bool(_TEMP.match(name))


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: written aside, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path):
            tmp.write_text(text)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def remove_tree(path: Path) -> None:
    """Delete a tree so that a kill half way never leaves a part of it under its own name:
    rename it to a trash name first (``remove_trash`` finishes what a kill interrupted)."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_trash(directory: Path) -> None:
    """Finish the deletions a killed run left half done in ``directory`` and its checkpoints."""
    directory = Path(directory)
    for trash in [*directory.glob(".trash-*"), *directory.glob("checkpoints/.trash-*")]:
        shutil.rmtree(trash, ignore_errors=True)


def file_mode() -> int:
    """The mode a plain ``open`` gives a new file (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def normalize_modes(directory: Path) -> None:
    """Every file under ``directory`` gets ``file_mode()``: safetensors writes through a private
    temporary file (0600), so weights would be the one file other users cannot read."""
    mode = file_mode()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


# ---------------------------------------------------------------------------------------------
# A full disk


def _mount_point(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not path.exists():
        path = path.parent
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    last = exc
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        last, exc = exc, exc.__cause__ or exc.__context__
    if not isinstance(last, (OSError, RuntimeError)):  # what a write can fail with
        return False
    try:
        return shutil.disk_usage(_mount_point(path)).free < _NEARLY_FULL
    except OSError:
        return False


@contextmanager
def writing(path: Path):
    """Writes to ``path`` (a file or a tree) inside the block: a full disk becomes a DiskFull
    that says where and what to do, whichever library was writing."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not _is_disk_full(exc, Path(path)):
            raise
        raise DiskFull(f"no space left on {_mount_point(path)} while writing {path}; free space and "
                       "run the same command again") from exc


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _hash_files(path: Path, skip: set[str]) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(path) if path.is_dir() else Path(file.name)
        if rel.parts and rel.parts[0] in skip or any(is_temp(part) for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0")
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """Content hash of a file or directory. A finished stage directory answers with the
    fingerprint its manifest recorded, so large models are hashed once."""
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest and manifest.get("status") == "complete" and manifest.get("fingerprint"):
        return manifest["fingerprint"]
    return _hash_files(path, skip=set())


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def resolve_input(field: str, path: Path, kinds: tuple[str, ...]) -> Path:
    """Check one input of a stage and return it. Stage inputs must hold a complete manifest
    of an accepted kind; ``"hf"`` in ``kinds`` also admits a plain Hugging Face model dir."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{field}: {path}: does not exist{_hub_hint(field, path, kinds)}")
    if not kinds:
        return path
    manifest = read_manifest(path)
    wanted = " or ".join(k for k in kinds if k != "hf")
    if manifest is None:
        if "hf" in kinds and (path / "config.json").is_file():
            return path
        raise InputError(
            f"{field}: {path}: no manifest.json; expected the output directory of a finished "
            f"{wanted} stage" + (" or a Hugging Face model directory" if "hf" in kinds else "")
        )
    if manifest.get("status") != "complete":
        raise InputError(f"{field}: {path}: stage is not complete (status {manifest.get('status')!r})")
    if manifest.get("stage") not in kinds:
        raise InputError(
            f"{field}: {path}: is the output of a '{manifest.get('stage')}' stage; expected {wanted}"
        )
    return path


def _hub_hint(field: str, path: Path, kinds: tuple[str, ...]) -> str:
    """How to use a Hugging Face hub model id where a local model directory is expected."""
    from rlhf.data.formats import is_hub_id

    if "hf" not in kinds or not is_hub_id(str(path)):
        return ""
    local = f"models/{path.name}"
    return (f" as a local directory; as a Hugging Face hub model id it is not fetched here (hub ids are "
            f"taken where a run starts from a model: base_model's from_pretrained, sft's model_from): "
            f"download it where there is internet, e.g. `hf download {path} --local-dir {local}`, and "
            f"set {field}: {local}")


def hub_model(field: str, name: str) -> dict[str, str]:
    """The manifest record of a Hugging Face hub model id: the id and the commit its
    ``config.json`` resolves to (fetched, or found in the local hub cache offline), which is
    the ``_commit_hash`` transformers loads it at. An InputError saying how to use a local copy
    when it cannot be had."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        config = Path(hf_hub_download(name, "config.json"))
    except Exception as exc:  # offline, no network, unknown or gated repo, no config.json
        first = next(iter(str(exc).splitlines()), "")
        if isinstance(exc, LocalEntryNotFoundError):  # not in the cache, and the hub is off or out of reach
            why = "could not be reached (" + ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
                                              "no connection") + ") and is not in the local hub cache"
        elif isinstance(exc, (RepositoryNotFoundError, EntryNotFoundError)):
            why = f"is no model repository with a config.json that can be read ({type(exc).__name__}: {first})"
        else:
            why = f"could not be fetched ({type(exc).__name__}: {first})"
        local = f"models/{name.rsplit('/', 1)[-1]}"
        raise InputError(f"{field}: {name}: no such local directory, and as a Hugging Face hub model id it {why}; "
                         f"to use a local copy, download it where there is internet, `hf download {name} "
                         f"--local-dir {local}`, and set {field}={local}") from None
    return {"hub": name, "revision": config.parent.name, "fingerprint": config.parent.name}


def model_dir(path: Path) -> Path:
    """The Hugging Face model inside a stage directory, or ``path`` itself if it is one."""
    path = Path(path)
    return path / "model" if (path / MANIFEST).exists() else path


def input_fingerprints(cfg: StageConfig) -> dict[str, dict[str, str]]:
    from rlhf.data.formats import is_hub_id

    inputs = {}
    for key, (path, kinds) in cfg.input_paths().items():
        if key in cfg.HUB_INPUTS and is_hub_id(str(path)):
            inputs[key] = hub_model(key, str(path))
            continue
        resolve_input(key, path, kinds)
        inputs[key] = {"path": str(path), "fingerprint": fingerprint(path)}
    return inputs


# ---------------------------------------------------------------------------------------------
# Locks: one writer per stage directory (and per rounds / batches directory)
#
# ``running.lock`` is locked with flock(2) by its writer and names it (pid, host, since). The
# kernel drops the lock when the writer dies, however it dies, so a dead run's lock is simply
# taken over; the file left behind only marks the directory as interrupted.

_HELD: dict[Path, int] = {}  # lock file -> the descriptor this process locks it with


def hold_lock(directory: Path) -> None:
    """Lock ``directory`` for this process, or raise InputError naming the live holder."""
    path = Path(directory).resolve() / LOCK
    release_lock(directory)  # held still by an earlier run in this process that stopped early
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{directory}: in use by {_holder(path)}; wait for it to finish, or use "
                             "another directory") from None
        if _same_file(fd, path):  # else a finishing holder removed it meanwhile: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode())
    _HELD[path] = fd


def release_lock(directory: Path) -> None:
    """Drop this process's lock of ``directory`` (if it holds it), so it reads as interrupted."""
    path = Path(directory).resolve() / LOCK
    fd = _HELD.pop(path, None)
    if fd is not None:
        if _same_file(fd, path):  # not when the directory was moved aside with the lock in it
            path.unlink()  # before unlocking: nobody may lock a file on its way out
        os.close(fd)


@contextmanager
def locked(directory: Path):
    """``directory`` locked for the block (created if needed)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    hold_lock(directory)
    try:
        yield
    finally:
        release_lock(directory)


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), path.stat()
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock file ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Stage state


def stage_state(stage_dir: Path) -> str:
    """``complete``, ``running``, ``interrupted`` or ``not started``."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("status") == "complete":
        return "complete"
    if (stage_dir / LOCK).exists():
        return "running" if is_locked(stage_dir / LOCK) else "interrupted"
    return "interrupted" if (stage_dir / "config.yaml").exists() else "not started"


def is_ours(directory: Path) -> bool:
    """Whether ``directory`` is empty or a stage directory this toolkit wrote (a manifest, or
    the config.yaml a started run writes first): the only kind a run may set aside."""
    names = [p.name for p in Path(directory).iterdir() if p.name != LOCK and not is_temp(p.name)]
    if not names or (read_manifest(directory) or {}).get("stage"):
        return True
    try:
        with open(Path(directory) / "config.yaml", encoding="utf-8") as fh:
            return fh.readline().startswith("# config_hash: ")
    except (OSError, UnicodeDecodeError):
        return False


def is_up_to_date(cfg: StageConfig) -> bool:
    """True when the output directory holds a complete run of exactly this config and inputs."""
    manifest = read_manifest(cfg.output_dir)
    if not manifest or manifest.get("status") != "complete":
        return False
    if manifest.get("stage") != cfg.stage or manifest.get("config_hash") != cfg.config_hash():
        return False
    try:
        return _contents(manifest.get("inputs", {})) == _contents(input_fingerprints(cfg))
    except InputError:
        return False


def _contents(inputs: dict[str, dict[str, str]]) -> dict[str, str]:
    """Inputs by content only: a moved but unchanged input does not make a stage stale."""
    return {key: value["fingerprint"] for key, value in inputs.items()}


def changed_since(stage_dir: Path, config_hash: str, inputs: dict[str, dict[str, str]]) -> list[str]:
    """What differs between the run started in ``stage_dir`` (its ``config.yaml`` and
    ``inputs.json``) and a run of ``config_hash`` on ``inputs``: ``"config"``, ``"inputs"``, both,
    or nothing (the same run: an interrupted one resumes)."""
    stage_dir = Path(stage_dir)
    try:
        same_config = (stage_dir / "config.yaml").read_text().startswith(f"# config_hash: {config_hash}\n")
    except OSError:
        same_config = False
    try:
        same_inputs = _contents(json.loads((stage_dir / "inputs.json").read_text())) == _contents(inputs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        same_inputs = False
    return [what for what, same in (("config", same_config), ("inputs", same_inputs)) if not same]


class StageRun:
    """The life of one stage directory: ``start`` it, ``log`` metrics, ``finish`` it.

    Starting checks every input, locks the directory (one run writes it at a time), sets aside
    (renames, never deletes) an earlier run of a different config or inputs, and keeps
    checkpoints of the same config for resuming. A directory that is not ours is refused.
    """

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.dir = Path(cfg.output_dir)
        self.inputs = input_fingerprints(cfg)
        self.started_at = now()
        self.main = is_main_process()

    @property
    def name(self) -> str:
        """What the terminal calls this run: its directory's name (a pipeline's stage name)."""
        return self.dir.name

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def start(self) -> "StageRun":
        if self.main:
            check_output_dir(self.dir, self.cfg.stage)
            self.dir.mkdir(parents=True, exist_ok=True)
            hold_lock(self.dir)
            if self._set_aside_stale_run():
                self.dir.mkdir()
                hold_lock(self.dir)
            remove_trash(self.dir)
            config = self.cfg.model_dump(mode="json")
            header = f"# config_hash: {self.cfg.config_hash()}\n"
            write_text_atomic(self.dir / "config.yaml", header + yaml.safe_dump(config, sort_keys=False))
            write_json_atomic(self.dir / "inputs.json", self.inputs)
        return self

    def _set_aside_stale_run(self) -> bool:
        """Move an earlier run of another config or inputs aside; True when it did."""
        if all(p.name == LOCK or is_temp(p.name) for p in self.dir.iterdir()):
            return False
        if not changed_since(self.dir, self.cfg.config_hash(), self.inputs) and read_manifest(self.dir) is None:
            return False  # an interrupted run of this very config: resume from its checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.dir.with_name(f"{self.dir.name}.superseded-{stamp}")
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = self.dir.with_name(f"{self.dir.name}.superseded-{stamp}-{n}")
        os.replace(self.dir, aside)  # still locked: nobody else can be writing either directory
        release_lock(self.dir)  # the lock file went aside with it; it is removed there
        (aside / LOCK).unlink(missing_ok=True)
        print(f"[rlhf] {self.dir}: earlier run of a different config or inputs moved to {aside}")
        return True

    def log(self, step: int, **metrics: Any) -> None:
        if self.main:
            path = self.dir / "metrics.jsonl"
            with writing(path), open(path, "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}, default=float) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: forget what was logged after the checkpoint, it will be logged again, and a
        line a kill or a full disk left half written."""
        path = self.dir / "metrics.jsonl"
        if self.main and path.exists():
            lines = path.read_text(errors="replace").splitlines()
            rows = [_metrics_row(line) for line in lines]
            for number, row in enumerate(rows, start=1):
                if row is None:
                    print(f"[rlhf] {path}:{number}: not a whole metrics line (a write was cut short); dropped")
            keep = [line for line, row in zip(lines, rows) if row is not None and row["step"] <= step]
            write_text_atomic(path, "".join(line + "\n" for line in keep))

    def finish(self, metrics: dict[str, Any], **extra: Any) -> Path:
        """Write the manifest last, then drop the checkpoints (a kill in between leaves a complete
        stage, not one to retrain); both once no process reads them any more."""
        wait_for_everyone()
        if self.main:
            if needs_card(self.dir / "model"):  # its model card, fingerprinted with the model
                write_text_atomic(self.dir / "model" / CARD, model_card(self.cfg, self.inputs, metrics, extra, self.dir))
            manifest = {
                "stage": self.cfg.stage,
                "status": "complete",
                "config_hash": self.cfg.config_hash(),
                "config": self.cfg.model_dump(mode="json"),
                "inputs": self.inputs,
                "metrics": metrics,
                **extra,
                "versions": package_versions(),
                "started_at": self.started_at,
                "ended_at": now(),
                "fingerprint": _hash_files(self.dir, skip=_VOLATILE),
            }
            write_json_atomic(self.dir / MANIFEST, manifest)
            remove_tree(self.checkpoints)
            release_lock(self.dir)
        return self.dir


def _metrics_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def check_output_dir(path: Path, stage: str) -> None:
    """Refuse an output directory a run must not write: a file, the working directory (or one
    above it), or an existing directory that is not ours (a user's own folder is never moved)."""
    field = f"output_dir: {path}"
    if path.exists() and not path.is_dir():
        raise InputError(f"{field}: is a file, not a directory; choose another output_dir")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise InputError(f"{field}: is the current directory (or holds it); a stage needs a directory "
                         f"of its own, e.g. output_dir=runs/{stage}")
    if path.is_dir() and not is_ours(path):
        raise InputError(f"{field}: exists and is not a stage directory (it has no manifest.json or "
                         "config.yaml written by rlhf), so it was left untouched; choose another "
                         f"output_dir, e.g. output_dir={path / stage}")
