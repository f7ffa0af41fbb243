"""The restricted loader changes no module state while it runs: a load paused half-way leaves
Megatron-Core's module globals as they were, and two loads of two checkpoints in two threads each
read their own checkpoint.

Runs in a subprocess (a gloo process group of one, as Megatron-Core's loader asks for a rank, and
torch's ``FileSystemReader.read_data`` wrapped to pause every load on a barrier mid-read)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

WORKER = r'''
import json, os, sys, threading, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
import megatron.core.dist_checkpointing.strategies.torch as mtorch
from torch.distributed.checkpoint import FileSystemReader
from megatron_pack.checkpoint.safe_metadata import safe_load_strategies

root = sys.argv[1]
dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
META = ('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
        '"common_backend": "torch", "common_backend_version": 1}')
VALUES = {"a": torch.arange(6.0), "b": 100 + torch.arange(6.0)}
for name, value in VALUES.items():  # two torch_dist checkpoints Megatron-Core's loader reads
    d = os.path.join(root, name)
    dcp.save({"w": value}, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
    torch.save({"tag": name}, os.path.join(d, "common.pt"))
    open(os.path.join(d, "metadata.json"), "w").write(META)

NAMES = ("_get_filesystem_reader", "MCoreLoadPlanner")
ORIGINAL = {n: getattr(mtorch, n) for n in NAMES}
def unchanged():
    return {n: getattr(mtorch, n) is ORIGINAL[n] for n in NAMES}

real_read = FileSystemReader.read_data
gate = {}
def paused_read(self, plan, planner):  # every load stops here until the observer has looked
    gate["inside"].wait(timeout=30)
    gate["release"].wait(timeout=30)
    return real_read(self, plan, planner)
FileSystemReader.read_data = paused_read

def run(loads, strategies):
    """Start ``loads`` (checkpoint names) in threads, look at the module globals while every one
    of them is paused inside its read, then let them finish."""
    n = len(loads) + 1
    gate["inside"], gate["release"] = threading.Barrier(n), threading.Barrier(n)
    got, errors = {}, []
    def load(i, name):
        try:
            s, c = strategies(os.path.join(root, name))
            sd = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(6))}
            out = dist_checkpointing.load(sd, os.path.join(root, name), sharded_strategy=s, common_strategy=c,
                                          validate_access_integrity=False)
            got[i] = {"w": out["w"].tolist(), "tag": out["tag"]}
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            for b in gate.values():
                b.abort()
    threads = [threading.Thread(target=load, args=(i, name)) for i, name in enumerate(loads)]
    for t in threads:
        t.start()
    try:
        gate["inside"].wait(timeout=30)
        during = unchanged()
        gate["release"].wait(timeout=30)
    except threading.BrokenBarrierError:
        during = None
    for t in threads:
        t.join(timeout=60)
    return {"during": during, "after": unchanged(), "got": [got.get(i) for i in range(len(loads))],
            "errors": errors}

class Swapping(mtorch.TorchDistLoadShardedStrategy):  # negative control: what the old loader did
    def load(self, sharded_state_dict, checkpoint_dir):
        saved = mtorch._get_filesystem_reader
        mtorch._get_filesystem_reader = lambda d, cache_metadata=False: FileSystemReader(d)
        try:
            return super().load(sharded_state_dict, checkpoint_dir)
        finally:
            mtorch._get_filesystem_reader = saved

def swapping(path):
    return Swapping(), safe_load_strategies(path)[1]

print(json.dumps({"one": run(["a"], safe_load_strategies), "two": run(["a", "b"], safe_load_strategies),
                  "control": run(["a"], swapping)}))
'''


def _run(tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKER), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


A = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
B = [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
SAME = {"_get_filesystem_reader": True, "MCoreLoadPlanner": True}


def test_loads_leave_module_globals_alone_and_threads_read_their_own(tmp_path):
    res = _run(tmp_path)
    one, two, control = res["one"], res["two"], res["control"]
    # one load paused half-way: Megatron-Core's module globals are the ones it imported
    assert one["errors"] == [] and one["during"] == SAME and one["after"] == SAME
    assert one["got"] == [{"w": A, "tag": "a"}]
    # two loads of two checkpoints at once: each reads its own, nothing left behind
    assert two["errors"] == [], two["errors"]
    assert two["during"] == SAME and two["after"] == SAME
    assert two["got"] == [{"w": A, "tag": "a"}, {"w": B, "tag": "b"}]
    # negative control: a loader that swaps a global for the length of its load is seen doing it
    assert control["errors"] == [] and control["got"] == [{"w": A, "tag": "a"}]
    assert control["during"] == {"_get_filesystem_reader": False, "MCoreLoadPlanner": True}
    assert control["after"] == SAME
