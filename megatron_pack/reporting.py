"""What runs and tools hand to people: aligned Markdown tables and JSON files written whole."""

from __future__ import annotations

import json
import os


def markdown_table(heads: list[str], cells: list[list[str]]) -> str:
    """An aligned Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(heads)]

    def line(xs):
        return "| " + " | ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])


def write_json_atomic(obj, path: str, indent: int = 1) -> str:
    """Write ``obj`` as JSON under a temporary name and rename it into place, so a reader
    never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)
    return path
