"""Damaged dist checkpoints and failed saves through the real entry point (one rank, gloo): a
``.distcp`` shard deleted or cut by one byte, ``common.pt`` or an RNG file truncated are refused on
one line naming the file, exit 2, without ``--checkpoint-checksums`` (they were 26-60-line
tracebacks); a save that cannot be written is one line, exit 1 ("ran and failed"), and leaves no
half-written iteration."""

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from _launch_train import BASE_ARGS, REPO, describe_failure, make_dataset, run_train
from launcher import free_port, rank_env

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    prefix = make_dataset(str(tmp / "sft"), n=40)
    args = BASE_ARGS + ["--data-path", prefix, "--global-batch-size", "4", "--valid-fraction", "0"]
    ck = tmp / "ck"
    first = run_train(1, args + ["--train-iters", "2", "--save", str(ck)], tmp, name="first")
    assert first.returncodes == [0], describe_failure(first)
    return tmp, args, ck


def _damaged(tmp, ck, name, damage):
    bad = tmp / f"ck_{name}"
    shutil.copytree(ck, bad)
    return bad, damage(bad / "iter_0000002")


def _truncate(path, by=1):
    os.truncate(path, os.path.getsize(path) - by)
    return path


def _error_lines(res):
    return [line for line in res.output.splitlines() if "error:" in line]


def _delete_last_shard(d):
    shard = sorted(d.glob("*.distcp"))[-1]
    shard.unlink()
    return shard


@pytest.mark.parametrize("name, damage, reason", [
    ("deleted_shard", _delete_last_shard, "named by .metadata but missing (incomplete or damaged checkpoint)"),
    ("common_pt", lambda d: _truncate(d / "common.pt", 100), "unreadable (PytorchStreamReader failed"),
])
def test_damaged_checkpoint_refused_on_one_line_at_load(saved, name, damage, reason):
    tmp, args, ck = saved
    bad, target = _damaged(tmp, ck, name, damage)
    res = run_train(1, args + ["--train-iters", "3", "--load", str(bad)], tmp, name=name)
    assert res.returncodes == [2], describe_failure(res)
    lines = _error_lines(res)
    assert len(lines) == 1 and f"{target}: {reason}" in lines[0], res.output[-3000:]
    assert "Traceback" not in res.output and not res.steps


def test_truncated_shard_and_rng_file_refused_before_any_weight_is_read(saved):
    """The other two damages, checked where ``--load`` checks them (in-process: no model needed),
    with the intact checkpoint as the control."""
    from megatron_pack.checkpoint.dist_files import check_dist_files
    from megatron_pack.checkpoint.iterations import CheckpointError
    from megatron_pack.checkpoint.safe_metadata import read_dist_metadata, safe_torch_load

    tmp, _, ck = saved
    it = ck / "iter_0000002"
    assert check_dist_files(str(it), read_dist_metadata(str(it))) == len(list(it.glob("*.distcp")))
    bad, shard = _damaged(tmp, ck, "short_shard", lambda d: _truncate(sorted(d.glob("*.distcp"))[0]))
    bad_it = bad / "iter_0000002"
    size = os.path.getsize(shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: {size:,} bytes, .metadata places data up to byte "
                                              rf"{size + 1:,} \(truncated"):
        check_dist_files(str(bad_it), read_dist_metadata(str(bad_it)))
    rng = _truncate(bad_it / "rng" / "rank_00000.pt", 100)
    assert isinstance(safe_torch_load(str(it / "rng" / "rank_00000.pt")), dict)
    with pytest.raises(CheckpointError, match=rf"{rng}: unreadable \(.*truncated or damaged\)"):
        safe_torch_load(str(rng))


def _save_with_file_size_limit(args, tmp, save, limit):
    """One rank whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE: writes fail with
    EFBIG, as on a full disk, with SIGXFSZ ignored), so the checkpoint write fails mid-way."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = rank_env(0, 1, free_port(), PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megatron_pack.train", *args, "--train-iters", "1", "--save",
                           str(save)], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=180,
                          preexec_fn=limit_files)


def test_failed_save_is_one_line_and_leaves_no_half_written_iteration(saved):
    tmp, args, _ = saved
    save = tmp / "ck_unwritable"
    res = _save_with_file_size_limit(args, tmp, save, 100_000)  # the .distcp shards are ~800 KB
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 1, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: --save {save}: saving iteration 1 failed: "), errors
    assert "was removed, no checkpoint was written" in errors[0] and "Traceback" not in res.stderr
    assert sorted(p.name for p in save.iterdir()) == [".lock"]  # no iter_0000001.tmp, no marker
