"""The one speedup rule of every comparison table (the demo, tools/compare_modes.py, the study):
how many times less a setting costs than the baseline, a cost being seconds or sequences."""

from __future__ import annotations


def speedup(base_cost, cost, missing=float("nan")):
    """``base_cost / cost``; ``missing`` when ``cost`` is 0 or absent. For a rate (tokens/s)
    pass the setting's rate first and the baseline's second."""
    return base_cost / cost if cost else missing


def add_speedups(rows: list[dict], base: dict, costs: dict[str, str], missing=float("nan")) -> None:
    """``row[out] = speedup(base[key], row[key])`` for every ``out: key`` of ``costs``."""
    for r in rows:
        for out, key in costs.items():
            r[out] = speedup(base[key], r.get(key), missing)
