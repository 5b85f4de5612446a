"""Launch a test worker on several CPU processes (gloo on loopback), as ``torchrun`` would, with a hard timeout.

Each rank gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; its output goes to a file (no pipe to fill).
On timeout every rank's process group (session) is killed and the test fails with the ranks' last output lines,
so a hung collective never hangs CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out: Path, *args: str, nproc: int = 2, timeout: float = 60.0, script: Path = WORKER) -> float:
    """Run ``SCRIPT MODE OUT ARGS...`` (``dist_worker.py`` by default, which gets OUT as its first argument) on
    ``nproc`` ranks with logs in ``out``; returns the wall time. Fails the test on a non-zero exit or a timeout
    (after killing every rank)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs, logs = [], []
    start = time.monotonic()
    try:
        for rank in range(nproc):
            log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(script), mode, *([str(out)] if script == WORKER else []), *args], stdout=log, stderr=subprocess.STDOUT,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), start_new_session=True))
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    seconds = time.monotonic() - start
    tails = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n" + (out / f"rank{r}.log").read_text()[-3000:]
                      for r, p in enumerate(procs))
    if timed_out:
        raise AssertionError(f"{mode} workers ran past {timeout:.0f} s and were killed\n{tails}")
    if any(p.returncode for p in procs):
        raise AssertionError(f"{mode} workers failed\n{tails}")
    return seconds
