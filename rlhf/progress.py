"""Progress for long loops: a tqdm bar on a terminal, plain lines in logs (CI, files)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rlhf.artifacts import is_main_process


class Progress:
    """``update(n, **postfix)`` advances; on a non-terminal a line is printed every ~10%."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        self.total, self.desc, self.n = total, desc, initial
        self.enabled = is_main_process()
        self.bar = None
        self.next_line = initial + max(1, total // 10)
        self.start = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        elif self.n >= self.next_line or self.n == self.total:
            self.next_line = self.n + max(1, self.total // 10)
            info = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
            elapsed = time.perf_counter() - self.start
            print(f"[rlhf] {self.desc}: {self.n}/{self.total} ({elapsed:.0f}s) {info}".rstrip(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quiet_libraries() -> None:
    """Turn off transformers' own progress bars ("Loading weights", "Writing model shards": one
    per model loaded or saved, dozens in a pipeline) that drown the toolkit's lines; its warnings
    and the toolkit's own bars (``Progress``) stay."""
    from transformers.utils import logging

    logging.disable_progress_bar()
