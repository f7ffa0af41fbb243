"""Write-then-rename: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import errno
import json
import os


def os_error_line(exc: OSError, path: str) -> str:
    """One line for a failed read or write: the file (the error's own, else ``path``) and the
    reason, with a hint for the usual causes (a full disk, a read-only or unwritable directory)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to write there",
            errno.EFBIG: "the file size limit was reached"}.get(exc.errno)
    return f"{where}: {reason}" + (f" ({hint}; nothing was left half-written)" if hint else "")


def temp_name(path: str) -> str:
    """The temporary name ``path`` is written under before its rename (per process)."""
    return f"{path}.tmp-{os.getpid()}"


def write_json_atomic(obj, path: str, indent: int = 1, default=None) -> str:
    """``obj`` as JSON under a temporary name, renamed into place; returns ``path``."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a full disk mid-write: no temporary file left behind
            os.remove(tmp)
        raise
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
