"""Start N ranks of a worker script the way torchrun would (env vars, free port), collect JSON results.

Plain subprocesses rather than ``torchrun`` or ``mp.spawn``: no extra agent process to start on
a 2-core machine, and a failing rank takes the others down instead of leaving them blocked in a
collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")


def write_rank_result(out_dir, rank: int, results) -> None:
    """A worker's ``rank{rank}.json`` for :func:`launch`, written under a temporary name and renamed
    when complete (a rank killed mid-write leaves no half file to read)."""
    tmp = os.path.join(out_dir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nprocs: int, port: int, **extra) -> dict:
    """This process's environment plus what torchrun would set for ``rank`` (CPU only, 1 thread)."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", **extra)


def launch(nprocs: int, args: list[str], out_dir: Path, timeout: float = 240.0,
           worker: Path | None = None) -> list[dict]:
    """Run ``worker args`` (default: the module's ``WORKER``, read at call time so tests can
    monkeypatch it) on ``nprocs`` ranks; returns each rank's ``rank{r}.json``."""
    worker = worker or WORKER
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        env = rank_env(rank, nprocs, port)
        if nprocs == 1:  # a lone process runs without torchrun's variables: the default single-process path
            for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(var)
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(worker), "--out", str(out_dir), *args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        failed = (
            failed if failed is not None else next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        )
        timed_out = any(p.poll() is None for p in procs) and failed is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if failed is not None or timed_out:
        which = failed if failed is not None else 0
        tail = (out_dir / f"rank{which}.log").read_text()[-4000:]
        reason = f"rank {which} exited with {procs[which].returncode}" if failed is not None else f"timeout {timeout}s"
        raise RuntimeError(f"distributed worker failed ({reason}); log tail:\n{tail}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nprocs)]
