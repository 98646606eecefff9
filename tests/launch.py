"""``rlhf run`` in a subprocess, in one process or under torchrun in several (on a free port):
what the "N processes == 1" tests compare."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(recipe: Path, output_dir: Path, processes: int = 1, timeout: int = 600) -> Path:
    """Run ``recipe`` into ``output_dir``; a failed run fails the test with its stderr's end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", free_port()]
    cmd = [*launcher, "-m", "rlhf", "run", str(recipe), f"output_dir={output_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-12000:]
    return output_dir
