"""The one table writer of the comparisons: rows of dicts and a list of columns, each a heading
and how to write a row's cell, to a markdown table (:func:`megatron_pack.reporting.markdown_table`)."""

from __future__ import annotations

from megatron_pack.reporting import markdown_table


def column(heading: str, key: str, fmt: str = "{}", missing: str | None = None) -> tuple:
    """A column writing ``fmt.format(row[key])`` (``missing`` when the value is None)."""
    def cell(row):
        v = row[key]
        return missing if v is None and missing is not None else fmt.format(v)

    return heading, cell


def rows_table(rows: list, columns: list) -> str:
    """``columns``: ``(heading, cell)`` pairs, ``cell(row) -> str``."""
    return markdown_table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in rows])
