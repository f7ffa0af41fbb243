"""What keeps a checkpoint directory trustworthy beyond its format: a checksum manifest, one
writer per ``--save`` directory, and writer processes that die with the run.

* ``checksums.json`` (``--checkpoint-checksums``): SHA-256 of every file of an iteration,
  written last at save and verified before load -- flipped bytes inside a ``.distcp`` are
  otherwise read as weights.
* :class:`SaveLock`: an ``flock`` on ``SAVE/.lock``, so a second run with the same ``--save``
  stops at once with the holder's pid and host instead of a FileNotFoundError mid-save.
* :func:`children_die_with_parent`: Megatron-Core's torch_dist writer forks one process per
  write bucket (``FileSystemWriterAsync.write_preloaded_data_multiproc``); if the trainer is
  SIGKILLed mid-save those children (a copy of the trainer's memory each) are orphaned and,
  having inherited the SIGTERM handler, ignore SIGTERM. Forked children get
  ``PR_SET_PDEATHSIG=SIGKILL`` and the default SIGTERM action.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from megatron_pack.checkpoint.iterations import CheckpointError
from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.files.digest import sha256_file

MANIFEST = "checksums.json"
LOCK_NAME = ".lock"



def _files(directory: str) -> list[str]:
    out = []
    for base, _, names in os.walk(directory):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str) -> str:
    """``directory/checksums.json``: ``{relative path: sha256}`` of every other file."""
    digests = {rel: sha256_file(os.path.join(directory, rel)) for rel in _files(directory)}
    return write_json_atomic({"sha256": digests}, os.path.join(directory, MANIFEST))


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def verify_manifest(directory: str) -> int:
    """Raise :class:`CheckpointError` naming the first missing or changed file; returns the
    number of files verified."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            digests = json.load(f)["sha256"]
        if not isinstance(digests, dict):
            raise TypeError("sha256 is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum manifest ({type(e).__name__}: {e})") from None
    for rel, want in sorted(digests.items()):
        full = os.path.join(directory, rel)
        if os.path.normpath(rel).startswith("..") or os.path.isabs(rel):
            raise CheckpointError(f"{path}: entry {rel!r} points outside the checkpoint")
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: listed in {MANIFEST} but missing")
        got = sha256_file(full)
        if got != want:
            raise CheckpointError(f"{full}: SHA-256 {got[:16]}… differs from the manifest's {str(want)[:16]}… "
                                  "(corrupted or edited after save)")
    return len(digests)


class SaveLock:
    """Exclusive ``flock`` on ``root/.lock`` for the life of a run (released on exit, also on
    SIGKILL, by the kernel)."""

    def __init__(self, root: str):
        import fcntl

        os.makedirs(root, exist_ok=True)
        self.path = os.path.join(root, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise CheckpointError(f"--save {root}: in use by another run ({holder}); two runs writing one "
                                  "checkpoint directory would overwrite each other's iterations. Wait for it, "
                                  "or give this run another --save.") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)  # closing the descriptor drops the flock
            except OSError:
                pass

    __del__ = release


def acquire_save_lock(root: str):
    """Collective: rank 0 takes :class:`SaveLock` and tells every rank whether it could, so all
    of them stop with the same message (none left waiting in a collective). Returns the lock
    on rank 0, None elsewhere."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if group else 0
    lock, err = None, ""
    if rank == 0:
        try:
            lock = SaveLock(root)
        except (CheckpointError, OSError) as e:
            err = str(e)
    if group and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise CheckpointError(err)
    return lock


_INSTALLED = False
_FORKING_PID = [0]


def _before_fork() -> None:
    _FORKING_PID[0] = os.getpid()


def _in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != _FORKING_PID[0]:  # the parent died before prctl: nothing left to write for
            os._exit(1)
    except (OSError, AttributeError):
        pass  # not Linux: best effort


def children_die_with_parent() -> None:
    """Every ``os.fork`` child of this process from now on (Megatron's checkpoint writers)
    dies when the thread that forked it does, and takes SIGTERM's default action. Idempotent."""
    global _INSTALLED
    if not _INSTALLED and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_in_child)
        _INSTALLED = True
