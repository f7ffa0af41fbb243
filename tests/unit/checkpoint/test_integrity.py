"""Crash consistency and integrity of checkpoint directories: checksum manifest, one run per
--save, the marker never pointing at nothing, forked writers dying with the trainer."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megatron_pack.checkpoint import dist as D
from megatron_pack.checkpoint.integrity import SaveLock, verify_manifest, write_manifest
from megatron_pack.checkpoint.iterations import MARKER, CheckpointError, iter_dir, recover_iteration

REPO = Path(__file__).resolve().parents[3]


def test_checksum_manifest_catches_a_flipped_byte(tmp_path):
    (tmp_path / "rng").mkdir()
    (tmp_path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "rng" / "rank_00000.pt").write_bytes(b"x" * 100)
    write_manifest(str(tmp_path))
    assert verify_manifest(str(tmp_path)) == 2  # negative control: untouched passes
    data = bytearray((tmp_path / "__0_0.distcp").read_bytes())
    data[5000] ^= 0x01
    (tmp_path / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: SHA-256 .* differs from the manifest"):
        verify_manifest(str(tmp_path))
    (tmp_path / "rng" / "rank_00000.pt").unlink()
    write_manifest(str(tmp_path))
    (tmp_path / "checksums.json").write_text('{"sha256": {"../etc/passwd": "0"}}')
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        verify_manifest(str(tmp_path))
    (tmp_path / "checksums.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="unreadable checksum manifest"):
        verify_manifest(str(tmp_path))


def test_second_run_on_the_same_save_directory_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from megatron_pack.checkpoint.integrity import SaveLock
        lock = SaveLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)
    """)], env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"--save {tmp_path}: in use by another run \(pid {holder.pid} on"):
            SaveLock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    SaveLock(str(tmp_path)).release()  # the kernel dropped the dead holder's lock
    a = SaveLock(str(tmp_path))
    a.release()
    SaveLock(str(tmp_path)).release()  # released locks can be taken again


class _Sched:
    def state_dict(self):
        return {"num_steps": 1}


def _fake_save(monkeypatch, content: str):
    from megatron.core import dist_checkpointing

    monkeypatch.setattr(D, "_sharded_state_dict", lambda *a, **k: {})
    monkeypatch.setattr(D, "rng_state", lambda: {"torch": torch.zeros(1)})
    monkeypatch.setattr(dist_checkpointing, "save", lambda state, d: Path(d, "payload").write_text(content))


def test_resave_crash_never_leaves_marker_pointing_at_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    _fake_save(monkeypatch, "first")
    D.save_checkpoint(root, 4, None, None, _Sched(), {}, checksums=True)
    assert Path(iter_dir(root, 4), "payload").read_text() == "first"
    _fake_save(monkeypatch, "second")
    real = os.replace

    def crash_on_rename_in(src, dst):
        if str(src).endswith(".tmp") and not str(dst).endswith(".tmp"):
            raise KeyboardInterrupt("SIGKILL stand-in")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        D.save_checkpoint(root, 4, None, None, _Sched(), {})
    monkeypatch.setattr(os, "replace", real)
    assert not os.path.isdir(iter_dir(root, 4))  # the crash window: old set aside, new not in
    assert (Path(root) / MARKER).read_text().strip() == "4"
    d = recover_iteration(root, 4)  # what every loader calls
    assert Path(d, "payload").read_text() == "first"
    verify_manifest(d)
    D.save_checkpoint(root, 4, None, None, _Sched(), {})  # and a completed re-save replaces it
    assert Path(iter_dir(root, 4), "payload").read_text() == "second"
    assert not os.path.exists(iter_dir(root, 4) + ".old")


def test_marker_without_directory_is_a_clear_error(tmp_path):
    (tmp_path / MARKER).write_text("7\n")
    with pytest.raises(CheckpointError, match="names iteration 7 but .*iter_0000007 is missing"):
        recover_iteration(str(tmp_path), 7)


_ORPHAN = """
    import multiprocessing as mp, os, signal, sys, time
    {install}
    signal.signal(signal.SIGTERM, lambda *a: None)   # the trainer's handler, inherited by forks
    def child():
        time.sleep(60)
    p = mp.get_context('fork').Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)            # the trainer dies mid-save
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by init soon) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
@pytest.mark.parametrize("installed", [True, False])
def test_forked_writers_die_with_a_sigkilled_trainer(installed):
    install = ("from megatron_pack.checkpoint.integrity import children_die_with_parent; "
               "children_die_with_parent()") if installed else ""
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_ORPHAN.format(install=install))],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    child = int(trainer.stdout.readline())
    assert trainer.wait(timeout=60) == -signal.SIGKILL
    try:
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        if installed:
            assert not _alive(child), "orphaned writer still running"
        else:  # negative control: without the hook the orphan survives and ignores SIGTERM
            assert _alive(child)
            os.kill(child, signal.SIGTERM)
            time.sleep(0.5)
            assert _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_write_results_queue_is_in_process_not_a_spawned_manager():
    """Megatron-Core 0.16 collects a save's write results in a spawned Manager's queue (a server
    process and a resource tracker that outlive a SIGKILLed trainer); after the shim its
    queue is a plain in-process one, and a synchronous save spawns nothing (the end-to-end kill
    is ``tests/distributed/test_killed_run_leaves_nothing.py``)."""
    import multiprocessing as mp
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from megatron_pack.checkpoint.mcore_shim import in_process_write_results

    saved = fa._results_queue
    try:
        fa._results_queue = None
        in_process_write_results()
        q = fa._get_write_results_queue()
        assert type(q) is queue.Queue and not mp.active_children()
        in_process_write_results()  # idempotent: the same queue
        assert fa._get_write_results_queue() is q
    finally:
        fa._results_queue = saved


def test_missing_run_config_is_refused_where_required(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"x")
    assert D.is_dist_checkpoint(str(tmp_path)) and not D.is_dist_checkpoint(str(tmp_path / "rng"))
    assert D.saved_run_config(str(tmp_path)) is None  # negative control: optional readers (export) get None
    with pytest.raises(CheckpointError, match=r"run_config.json: missing .* architecture and packing-plan checks"):
        D.saved_run_config(str(tmp_path), required=True)
    (tmp_path / "run_config.json").write_text('{"plan": {"document_multiple": 4}}')
    assert D.saved_run_config(str(tmp_path), required=True) == {"plan": {"document_multiple": 4}}
