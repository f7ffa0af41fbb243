"""One rank of test_study_rank_zero_wait: a training group with a short timeout, rank 0 busy
(a slowed scoring step) for longer than it, then a collective on that group (what the next
training run does first). ``--wait safe`` waits in :class:`RankZeroWork`; ``--wait old`` goes
straight to the collective, as the study did. (The rendezvous itself gets a minute: on a loaded
machine connecting alone can take longer than the short timeout.)"""

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_pack.experiment.rank_zero import RankZeroWork

p = argparse.ArgumentParser()
p.add_argument("--wait", choices=("safe", "old"), required=True)
p.add_argument("--timeout-s", type=float, required=True)
p.add_argument("--score-s", type=float, required=True)
p.add_argument("--out", required=True)
a = p.parse_args()
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
training = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=a.timeout_s))
rank = dist.get_rank()
work = RankZeroWork(wait_minutes=10) if a.wait == "safe" else None
slow = lambda: time.sleep(a.score_s) or "scored"  # noqa: E731
result = work.run(slow) if work else (slow() if rank == 0 else None)
x = torch.ones(1)
try:
    dist.all_reduce(x, group=training)  # the next training run's first collective, under the short timeout
    status = "ok"
except Exception as e:  # gloo raises on its timeout
    status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
    json.dump({"status": status, "sum": float(x.item()), "result": result}, f)
sys.stdout.flush()
os._exit(0)  # a rank whose peer timed out must not hang in the group's teardown
