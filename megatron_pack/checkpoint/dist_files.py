"""Every file a dist checkpoint's ``.metadata`` names is there and long enough, before any is read.

``torch.distributed.checkpoint`` finds a ``.distcp`` shard deleted or cut short only while
loading, deep inside its reader threads (a 26-60-line traceback under ``--load``). The index
already says, for every item, which file holds it and at which offset and length: the largest
``offset + length`` per file is the least size it can have (DCP writes each file to exactly that).
Checked on every open, with or without ``--checkpoint-checksums`` (which also catches flipped
bytes, at the cost of reading everything).
"""

from __future__ import annotations

import os

from megatron_pack.checkpoint.iterations import CheckpointError


def required_sizes(metadata) -> dict:
    """``{relative path: least size in bytes}`` of the files the index names."""
    sizes: dict = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if isinstance(rel, str):
            sizes[rel] = max(sizes.get(rel, 0), end)
    return sizes


def check_dist_files(iter_path: str, metadata) -> int:
    """Raise :class:`CheckpointError` naming the first file the index names that is missing,
    outside the directory, or shorter than the items it holds; returns the number of files."""
    sizes = required_sizes(metadata)
    for rel, need in sorted(sizes.items()):
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise CheckpointError(f"{os.path.join(iter_path, '.metadata')}: names {rel!r}, outside the checkpoint")
        full = os.path.join(iter_path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: named by .metadata but missing (incomplete or damaged checkpoint)")
        have = os.path.getsize(full)
        if have < need:
            raise CheckpointError(f"{full}: {have:,} bytes, .metadata places data up to byte {need:,} "
                                  "(truncated: incomplete copy or damaged checkpoint)")
    return len(sizes)
