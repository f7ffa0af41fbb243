"""Write-then-rename: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import json
import os


def temp_name(path: str) -> str:
    """The temporary name ``path`` is written under before its rename (per process)."""
    return f"{path}.tmp-{os.getpid()}"


def write_json_atomic(obj, path: str, indent: int = 1, default=None) -> str:
    """``obj`` as JSON under a temporary name, renamed into place; returns ``path``."""
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=default)
        f.write("\n")
    os.replace(tmp, path)
    return path
