"""The isolation audit's one-screen report (printed by the logging rank) and its JSON file."""

from __future__ import annotations

import os


def _num(x: float) -> str:
    return "0" if x == 0 else f"{x:.2g}"


def _count(n: int, word: str, plural: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else plural}"


def _diff(c: dict) -> str:
    text = f"{_num(c['max_diff'])} {c['unit']}"
    if "mean_diff" in c and c["max_diff"]:
        text += f" (mean {_num(c['mean_diff'])})"
    return text


def _result(c: dict, by_configuration: bool) -> str:
    if c["passed"]:
        return "pass"
    if by_configuration:
        return "sees other documents (by configuration)"
    return "LEAK " + (c["where"] or "")


def format_report(report: dict) -> list:
    """Lines of the report, each ready for ``log.print``."""
    lay, rows = report["layout"], report["rows"]
    lines = [f"> isolation audit (--check-isolation {report['mode']}): TP {lay['tp']} PP {lay['pp']} CP {lay['cp']} "
             f"DP {lay['dp']}, sequence parallel {'on' if lay['sequence_parallel'] else 'off'}, {lay['dtype']}, "
             f"document mask {'on' if lay['document_mask'] else 'off'}"
             + (f"; {lay['backends']}" if lay["backends"] else ""),
             f">   rows: {_count(rows['micro_batches'], 'micro-batch', 'es')} of {_count(rows['rows'], 'row')} x "
             f"{rows['row_length']} tokens per DP rank, {rows['origin']}; {rows['documents']} documents "
             f"({rows['min_docs']}-{rows['max_docs']} per row), {rows['straddling']} split over CP / SP ranks"
             + (f"; layers per stage {'/'.join(map(str, lay['layers_per_stage']))}" if lay['pp'] > 1 else "")]
    head = ("check", "largest difference", "tolerance", "result")
    table = [head] + [(c["check"], _diff(c), f"{_num(c['tolerance'])}, {c['tolerance_rule']}",
                       _result(c, report["by_configuration"])) for c in report["checks"]]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        lines.append(">   " + "  ".join(x.ljust(w) for x, w in zip(r[:3], widths)) + "  " + r[3])
    if rows.get("reference_documents", rows["documents"]) < rows["documents"]:
        lines.append(f">   reference: the first {rows['reference_documents']} documents of each DP rank")
    for c in report["checks"]:
        if not c["passed"] and c.get("detail"):
            lines.append(f">   {c['check']}: {c['detail']}")
    cost = f"{report['passes']} passes, {report['seconds']:.1f} s"
    if report["by_configuration"]:
        word = ("documents see each other by configuration (--no-document-mask, the paper's setting): "
                "the differences above are the size of the effect, not a failure")
    elif report["isolated"]:
        word = "packed documents are isolated on this layout"
    else:
        word = "LEAK: " + report["reason"]
    lines.append(f"> isolation: {word} ({cost})")
    return lines


def report_path(save: str | None, log_file: str | None, tensorboard_dir: str | None = None) -> str | None:
    """``isolation_audit.json`` in --save, else beside --log-file, else in --tensorboard-dir; None without them."""
    if save:
        return os.path.join(save, "isolation_audit.json")
    if log_file:
        return os.path.join(os.path.dirname(os.path.abspath(log_file)), "isolation_audit.json")
    if tensorboard_dir:
        return os.path.join(tensorboard_dir, "isolation_audit.json")
    return None
