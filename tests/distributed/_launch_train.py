"""Run ``python -m megatron_pack.train`` on N local ranks (torchrun's environment, no agent).

Plain subprocesses, like ``launcher.py`` beside this file, but for the real entry point:
returns every rank's exit code and output, can send SIGTERM once a log line appears,
and caches finished runs so several test files can share one launch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from launcher import free_port, rank_env

from megatron_pack.frontdoor import QUIET_RANK_WAIT_S

REPO = Path(__file__).resolve().parents[2]


def make_dataset(prefix: str, n: int = 160, seed: int = 0) -> str:
    """``n`` learnable conversations (arithmetic token progressions, ids 1..250), 12..220 tokens,
    the first quarter of each an untrained prompt."""
    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    with SFTDatasetWriter(prefix) as w:
        for _ in range(n):
            length = int(rng.integers(12, 221))
            a, b = int(rng.integers(0, 250)), int(rng.integers(1, 4))
            toks = ((a + b * np.arange(length)) % 250 + 1).tolist()
            prompt = max(1, length // 4)
            w.add(toks, [0] * prompt + [1] * (length - prompt), [0, prompt])
    return prefix


BASE_ARGS = ["--model", "tiny", "--vocab-size", "256", "--seq-length", "256", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-fraction", "0.2", "--valid-fraction", "0.1",
             "--log-interval", "1"]


@dataclass
class RunResult:
    returncodes: list
    outputs: list  # text per rank
    log_file: Path | None

    @property
    def records(self) -> list:
        if self.log_file is None or not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    @property
    def steps(self) -> dict:
        return {r["iteration"]: r for r in self.records if "lm loss" in r}

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)


def run_train(nprocs: int, args: list, workdir: Path, *, timeout: float = 150.0, sigterm_after: str | None = None,
              name: str = "run", attempts: int = 3) -> RunResult:
    """Launch ``nprocs`` ranks; with ``sigterm_after``, send SIGTERM to every rank as soon as
    that text appears in the last rank's output. A rendezvous port taken between picking
    and binding it (other jobs on the machine) is retried on a new port."""
    for _ in range(attempts):
        res = _run_once(nprocs, args, workdir, timeout, sigterm_after, name)
        if not any("EADDRINUSE" in t for t in res.outputs):
            return res
    return res


def _run_once(nprocs, args, workdir, timeout, sigterm_after, name) -> RunResult:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / f"{name}.jsonl"
    if log_file.exists():
        log_file.unlink()  # a retried launch starts a fresh log
    port = free_port()
    procs, outs = [], []
    for rank in range(nprocs):
        env = rank_env(rank, nprocs, port, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = open(workdir / f"{name}.rank{rank}.log", "w+")
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_pack.train", *args, "--log-file", str(log_file)],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO)))
    deadline = time.monotonic() + timeout
    signalled = False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            if sigterm_after and not signalled:
                outs[-1].flush()
                if sigterm_after in (workdir / f"{name}.rank{nprocs - 1}.log").read_text():
                    for p in procs:
                        p.send_signal(signal.SIGTERM)
                    signalled = True
            time.sleep(0.02)
        # let the other ranks of a failed one exit on their own: a refusal's quiet ranks wait
        # frontdoor.QUIET_RANK_WAIT_S before they exit with the same status
        settle = time.monotonic() + QUIET_RANK_WAIT_S + 3.0
        while any(p.poll() is None for p in procs) and time.monotonic() < settle:
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = []
    for out in outs:
        out.seek(0)
        texts.append(out.read())
        out.close()
    return RunResult([p.returncode for p in procs], texts, log_file)


def describe_failure(res: RunResult) -> str:
    return f"exit codes {res.returncodes}; output tail:\n" + "\n".join(t[-3000:] for t in res.outputs)


_SHARED: dict = {}


def shared_dataset(tmp_path_factory) -> str:
    """The :func:`make_dataset` prefix, built once per pytest session."""
    if "dataset" not in _SHARED:
        _SHARED["dataset"] = make_dataset(str(tmp_path_factory.mktemp("train_data") / "sft"))
    return _SHARED["dataset"]


FULL_RUNS = {
    # 2 ranks, DP=2, distributed optimizer, 12 steps (8 per epoch), checkpoint at the end.
    "dp2_full": ["--train-iters", "12", "--use-distributed-optimizer"],
}


def shared_run(key: str, tmp_path_factory) -> RunResult:
    """One launch per pytest session for ``key`` (test files reuse a finished run);
    the result's ``args`` are the flags without ``--save``."""
    if key not in _SHARED:
        prefix = shared_dataset(tmp_path_factory)
        tmp = tmp_path_factory.mktemp(key)
        args = BASE_ARGS + ["--data-path", prefix] + FULL_RUNS[key]
        res = run_train(2, args + ["--save", str(tmp / "ckpt")], tmp, name=key)
        res.args, res.save_dir = args, tmp / "ckpt"
        _SHARED[key] = res
    return _SHARED[key]


def stop_and_resume(nprocs: int, args: list, workdir: Path) -> tuple:
    """The resume experiment every resume test runs: ``full`` trains steps 1..6 uninterrupted,
    ``first`` stops after step 3 saving to ``workdir/ck``, ``second`` loads it and runs 4..6.
    Each must exit 0 on every rank; returns ``(full, first, second)``."""
    ck = workdir / "ck"
    runs = (run_train(nprocs, args + ["--exit-interval", "6"], workdir, name="full"),
            run_train(nprocs, args + ["--save", str(ck), "--exit-interval", "3"], workdir, name="first"),
            run_train(nprocs, args + ["--load", str(ck), "--exit-interval", "6"], workdir, name="second"))
    for res in runs:
        assert res.returncodes == [0] * nprocs, describe_failure(res)
    assert sorted(runs[2].steps) == [4, 5, 6]
    return runs
