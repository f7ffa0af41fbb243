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


def save_figure_atomic(fig, path: str, dpi: int = 110) -> str:
    """A matplotlib figure as PNG under a temporary name, renamed into place, then closed;
    no timestamp in the PNG metadata, so the same figure gives the same bytes."""
    import matplotlib.pyplot as plt

    tmp = temp_name(path) + ".png"
    try:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
