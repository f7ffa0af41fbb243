"""What runs and tools hand to people: aligned Markdown tables (JSON files go through
:func:`megatron_pack.files.atomic.write_json_atomic`)."""

from __future__ import annotations


def markdown_table(heads: list[str], cells: list[list[str]]) -> str:
    """An aligned Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(heads)]

    def line(xs):
        return "| " + " | ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])

