"""A training run SIGKILLed after it has saved (an OOM kill, a scheduler's kill after its grace
period) leaves no process behind: not Megatron-Core's forked checkpoint writers, not a spawned
``multiprocessing.Manager`` for the write results, not the resource tracker a spawn starts.

The run is started in a session of its own, so every process it started -- whatever reparented
it to init after the kill -- is found by its session id."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from _launch_train import BASE_ARGS, REPO, make_dataset

pytestmark = pytest.mark.distributed


def _session(sid: int) -> list:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def test_sigkill_after_a_save_leaves_no_process_of_the_run(tmp_path):
    prefix = make_dataset(str(tmp_path / "sft"), n=40)
    log = tmp_path / "run.log"
    args = BASE_ARGS + ["--data-path", prefix, "--global-batch-size", "4", "--valid-fraction", "0",
                        "--train-iters", "1000", "--save", str(tmp_path / "ck"), "--save-interval", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_pack.train", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)
    sid = proc.pid
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("> saved checkpoint") < 2:  # past the first save: its writers are set up
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _session(sid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _session(sid)]
        assert left == [], f"processes of the killed run still alive: {left}"
    finally:
        for p in _session(sid):  # never leave them to the next test (they belong to this run)
            p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
