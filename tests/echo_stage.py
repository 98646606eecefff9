"""A minimal stage used by the foundation tests: it copies a message (and its upstream's
output) into ``out.txt``, optionally failing or sleeping half way, and counts its runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar, Literal

from rlhf.artifacts import StageRun
from rlhf.data import DataConfig
from rlhf.config import StageConfig, TrainConfig

RUNS: list[str] = []


class EchoConfig(StageConfig):
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"upstream": ("echo",), "source": ()}

    stage: Literal["echo"] = "echo"
    message: str = "hello"
    upstream: Path | None = None
    source: Path | None = None
    fail_half_way: bool = False
    sleep: float = 0.0
    train: TrainConfig = TrainConfig()
    data: DataConfig | None = None


def run(cfg: EchoConfig) -> Path:
    run = StageRun(cfg).start()
    RUNS.append(str(cfg.output_dir))
    text = cfg.message
    if cfg.source is not None:
        text += ":" + cfg.source.read_text()
    if cfg.upstream is not None:
        text += "+" + (cfg.upstream / "out.txt").read_text()
    if cfg.data is not None:
        text += "[" + ",".join(s.name for s in cfg.data.sources) + "]"
    (run.dir / "out.txt").write_text(text)
    run.log(1, loss=1.0)
    time.sleep(cfg.sleep)
    if cfg.fail_half_way or os.environ.get("ECHO_FAIL_AT") == cfg.output_dir.name:
        raise RuntimeError("stage failed half way")
    return run.finish({"length": len(text)})


def register(monkeypatch) -> None:
    from rlhf import stages

    monkeypatch.setitem(stages.STAGES, "echo", (f"{__name__}:EchoConfig", f"{__name__}:run"))
    RUNS.clear()
