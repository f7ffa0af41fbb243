"""From every rank's largest differences to one verdict per check, with tolerance and place.

Tolerances: when two identical forwards agree bit for bit (the ``repeat`` pass), the kernels
are deterministic and the perturbation and backward checks are exact (a leak of any size
fails). Otherwise, and always for the reference check (a document alone runs through other
kernel shapes), the tolerance comes from the compute dtype (:data:`DTYPE_TOLERANCE`) or four
times the measured repeat noise, whichever is larger.
"""

from __future__ import annotations

#: dtype -> (per-token loss, nats; hidden states and gradients, relative to their largest value)
DTYPE_TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (5e-2, 2e-2), "fp16": (1e-2, 5e-3)}


def merge(per_rank: list) -> tuple:
    """``[(max dict, sum dict, stage, layer numbers)]`` of every rank -> (max, sums, {layer: stage})."""
    best, sums, stage_of = {}, {}, {}
    for mx, sm, stage, layers in per_rank:
        for k, (v, detail) in mx.items():
            if k not in best or v > best[k][0]:
                best[k] = (v, detail)
        for k, v in sm.items():
            sums[k] = sums.get(k, 0.0) + v
        for n in layers:
            stage_of[int(n)] = int(stage)
    return best, sums, dict(sorted(stage_of.items()))


def _get(best: dict, key: str) -> float:
    return best.get(key, (0.0, None))[0]


def _rel(best: dict, name: str, layer: int, kind: str = "layer") -> float:
    """Largest difference of a layer's output (``layer``) or rotated query (``query``), relative
    to the largest value of the original."""
    scale = {"layer": "scale", "query": "qscale"}[kind]
    d, s = _get(best, f"{name}/{kind}/{layer}"), _get(best, f"{name}/{scale}/{layer}")
    return d / s if s > 0 else d


def _first(best: dict, name: str, layers: list, tol: float):
    """First layer whose output or rotated query moved by more than ``tol`` (relative), and which."""
    for n in layers:
        for kind in ("query", "layer"):
            if _rel(best, name, n, kind) > tol:
                return n, kind
    return None, None


def _where(layer, stage_of: dict, what: str) -> str:
    if layer is None:
        return f"{what} after the last layer (final norm, output layer or loss)"
    return f"{what} at pipeline stage {stage_of[layer]}, layer {layer} of {len(stage_of)}"


def _check(name, diff, unit, tol, rule, first_layer, stage_of, detail, leak_word="first appears"):
    failed = diff > tol or first_layer is not None
    out = {"check": name, "max_diff": diff, "unit": unit, "tolerance": tol, "tolerance_rule": rule,
           "passed": not failed, "where": None, "layer": first_layer,
           "stage": stage_of.get(first_layer) if first_layer is not None else None, "detail": detail}
    if failed:
        out["where"] = _where(first_layer, stage_of, leak_word)
    return out


def verdict(best: dict, sums: dict, stage_of: dict, dtype: str, document_mask: bool) -> dict:
    """Per check: largest difference, tolerance and its rule, pass, where; and the overall word."""
    loss_tol, rel_tol = DTYPE_TOLERANCE.get(dtype, DTYPE_TOLERANCE["fp32"])
    layers = list(stage_of)
    floor_loss = _get(best, "repeat/loss")
    floor_rel = max([_rel(best, "repeat", n, k) for n in layers for k in ("layer", "query")] or [0.0])
    exact = floor_loss == 0.0 and floor_rel == 0.0
    if exact:
        p_tol, p_rel, rule = 0.0, 0.0, "exact: identical forwards agree bitwise"
    else:
        p_tol, p_rel = max(loss_tol, 4 * floor_loss), max(rel_tol, 4 * floor_rel)
        rule = f"{dtype} rounding, or 4x the repeat noise {floor_loss:.1e}"
    checks = []
    first, _ = _first(best, "perturbation", layers, p_rel)
    checks.append(_check("perturbation", _get(best, "perturbation/loss"), "nats", p_tol, rule, first, stage_of,
                         best.get("perturbation/loss", (0, None))[1]))
    target = max([_get(best, f"backward/target/{n}") for n in layers] or [0.0])
    b_tol = 0.0 if exact else rel_tol * target
    other = max([_get(best, f"backward/layer/{n}") for n in layers] or [0.0])
    deepest = next((n for n in reversed(layers) if _get(best, f"backward/layer/{n}") > b_tol), None)
    checks.append(_check("backward", other, "grad", b_tol, "exact: zero" if exact else
                         f"{dtype}: {rel_tol:g} x the targeted documents' gradient", deepest, stage_of,
                         f"largest gradient on the targeted documents {target:.3g}", "deepest crossing"))
    first, kind = _first(best, "reference", layers, rel_tol)
    ref = _check("reference", _get(best, "reference/loss"), "nats", loss_tol, f"{dtype} rounding; states, queries "
                 f"{rel_tol:g} relative", first, stage_of,
                 best.get("reference/loss", (0, None))[1])
    if kind == "query":
        ref["detail"] = (f"the rotated queries (after RoPE) of a document differ from the document alone by "
                         f"{_rel(best, 'reference', first, 'query'):.2g} (relative) at layer {first}: its positions "
                         "do not restart at the document start; " + str(ref["detail"]))
    if "positions" in best:
        ref["detail"] = f"{ref['detail']}; the rows' position ids do not restart: {best['positions'][1]}"
    checks.append(ref)
    for c in checks:
        n = sums.get(f"{c['check']}/loss_count", 0.0)
        if n:
            c["mean_diff"] = sums[f"{c['check']}/loss_sum"] / n
    isolated = all(c["passed"] for c in checks)
    return {"deterministic": exact, "repeat_noise": floor_loss, "checks": checks, "isolated": isolated,
            "by_configuration": not document_mask, "leak": document_mask and not isolated}


def reason(report: dict) -> str:
    """One line: the first failed check and where."""
    bad = next((c for c in report["checks"] if not c["passed"]), None)
    if bad is None:
        return "documents are isolated"
    what = ("positions do not restart per document" if "positions do not restart" in str(bad.get("detail"))
            else "packed documents see each other")
    return (f"{what}: the {bad['check']} check differs by {bad['max_diff']:.3g} {bad['unit']} "
            f"(tolerance {bad['tolerance']:.3g}), {bad['where']}")
