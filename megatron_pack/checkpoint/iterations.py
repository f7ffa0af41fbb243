"""Checkpoint directory layout, Megatron-LM's names so its tooling recognises it::

    SAVE/latest_checkpointed_iteration.txt      "120"
    SAVE/iter_0000120/                          one iteration (dist checkpoint or import)
"""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint (training, import or HF) that cannot be used, with the reason."""


MARKER = "latest_checkpointed_iteration.txt"


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    path = os.path.join(root, MARKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def recover_iteration(root: str, iteration: int) -> str:
    """``iter_N`` for the marker's ``iteration``; a save that died between setting the old
    ``iter_N`` aside (``iter_N.old``) and renaming the new one in is rolled back here."""
    d = iter_dir(root, iteration)
    if not os.path.isdir(d) and os.path.isdir(d + ".old"):
        try:
            os.replace(d + ".old", d)
        except FileNotFoundError:
            pass  # another rank put it back first
    if not os.path.isdir(d):
        raise CheckpointError(f"{os.path.join(root, MARKER)} names iteration {iteration} but {d} is missing")
    return d


def resolve_iteration_dir(path: str) -> str:
    """``path`` may be a checkpoint root (with the marker file) or one ``iter_*`` directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    it = latest_iteration(path)
    if it is not None:
        return recover_iteration(path, it)
    return path
