"""Work over a list cut into chunks, shared out over processes and resumable: a chunk is done
once, by one process, and saved; an interrupted run (with any number of processes) redoes only
the chunks that are missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf.artifacts import write_json_atomic
from rlhf.progress import Progress


def in_chunks(work_dir: Path, items: Sequence[Any], size: int, work: Callable[[list], list[dict]], accelerator, desc: str) -> list[dict]:
    """``work`` over ``items`` cut into chunks of ``size``: chunk i is done by process
    i % processes and saved as ``work_dir/chunk-i.json``, so an interrupted run (with any number
    of processes) redoes only the missing chunks. Returns every chunk's rows, in order."""
    work_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(items), size)
    paths = [work_dir / f"chunk-{i:06d}.json" for i in range(len(starts))]
    mine = [i for i in range(len(starts)) if i % accelerator.num_processes == accelerator.process_index]
    progress = Progress(len(items), desc)
    for i in mine:
        part = list(items[starts[i] : starts[i] + size])
        if not paths[i].exists():
            write_json_atomic(paths[i], work(part))
        progress.update(len(part) * accelerator.num_processes)
    progress.close()
    accelerator.wait_for_everyone()
    return [row for path in paths for row in json.loads(path.read_text())]
