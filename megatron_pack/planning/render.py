"""The plan as text people read: layout, parameters, memory, verdict, time per packing mode.
Every table goes through :func:`megatron_pack.reporting.markdown_table`."""

from __future__ import annotations

from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.reporting import markdown_table


def write_json(plan: dict, path: str) -> str:
    return write_json_atomic(plan, path, indent=2)


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s:.1f} s"


def _parameter_table(plan: dict) -> str:
    rows = []
    for s in range(plan["layout"]["pp"]):
        r = [x for x in plan["per_rank_parameters"] if x["pp_rank"] == s]
        counts = sorted({x["parameters"] for x in r})
        rows.append([str(s), str(r[0]["num_layers"]), "yes" if r[0]["has_embedding"] else "",
                     "yes" if r[0]["has_output_layer"] else "", " / ".join(f"{n:,}" for n in counts),
                     f"{r[0]['tp_replicated']:,}"])
    return markdown_table(["stage", "layers", "embedding", "output", "params per GPU (each TP rank)",
                           "TP-replicated"], rows)


def _memory_table(plan: dict) -> str:
    keys = ("weights", "grads", "optimizer", "activations", "logits", "overhead", "total")
    rows = [[str(s["pp_rank"]), str(s["microbatches_in_flight"]), *(f"{s[k]:.1f}" for k in keys)]
            for s in plan["memory_per_stage_gb"]]
    return markdown_table(["stage", "in flight", *keys], rows)


def _alternatives_table(plan: dict) -> str:
    rows = []
    for a in plan["memory_alternatives_gb"]:
        cells = [f"{a[k]:.1f}{'' if a[k] <= plan['gpu_memory_gb'] else ' (OOM)'}"
                 for k in ("none", "selective", "full")]
        rows.append(["on" if a["sequence_parallel"] else "off", "on" if a["use_distributed_optimizer"] else "off",
                     *cells])
    return markdown_table(["sequence parallel", "distributed optimizer", "recompute none", "selective", "full"], rows)


def _cp_table(plan: dict) -> str:
    lay = plan["layout"]
    rows = [[f"{o['cp']}{' *' if o['cp'] == lay['cp'] else ''}",
             str(lay["world_size"] // (lay["tp"] * lay["pp"] * o["cp"])),
             f"{o['peak_gb']:.1f}", "yes" if o["peak_gb"] <= plan["gpu_memory_gb"] else "no"]
            for o in plan["cp_options_gb"]]
    return markdown_table(["CP", "DP", "peak GiB", "fits"], rows)


def _modes_table(plan: dict) -> str:
    epochs = plan["config"]["train_epochs"]
    heads = ["mode", "sequences", "efficiency", "steps/epoch", "attention FLOPs", "PFLOP/step", "step", "epoch",
             "vs padding", "real tok/s/GPU"] + ([f"{epochs:g} epochs"] if epochs is not None else [])
    rows = []
    for r in plan["modes"]:
        vs = f"{r['time_vs_padding']:.2f}x" if r["time_vs_padding"] is not None else "-"
        row = [f"{r['mode']}{' *' if r['selected'] else ''}", f"{r['num_sequences']:,}", f"{r['efficiency']:.1%}",
               f"{r['steps']:,}{' (< 1 batch)' if not r['steps'] else ''}", f"{r['attention_share']:.1%}",
               f"{r['model_flops_per_step'] / 1e15:.2f}",
               f"{r['step_seconds']:.2f} s", _hours(r["epoch_seconds"]), vs,
               f"{r['real_tokens_per_second_per_gpu']:,.0f}"]
        if epochs is not None:
            row.append(_hours(r["train_seconds"]))
        rows.append(row)
    return markdown_table(heads, rows)


def _balance_table(rows: list) -> str:
    cells = [[f"{r['mode']}{' *' if r['selected'] else ''}", str(r["balance"]["sequences_per_rank"]),
              f"{r['balance']['imbalance_contiguous']:.3f}", f"{r['balance']['imbalance_balanced']:.3f}",
              f"{r['balance']['bound']:.3f}", f"{r['step_seconds_contiguous']:.2f} s",
              f"{r['step_seconds_balanced']:.2f} s", f"{r['balance']['gain']:.3f}x"] for r in rows]
    return markdown_table(["mode", "seq/rank", "contiguous", "balanced", "lower bound", "step contiguous",
                           "step balanced", "gain"], cells)


def render(plan: dict) -> str:
    """The plan as text: layout, parameters, memory, verdict, time per packing mode."""
    c, lay, g = plan["config"], plan["layout"], plan["gpu"]
    rc = c["recompute_granularity"] or "none"
    out = [
        f"Plan: {plan['model']} on {c['nnodes']} x {c['gpus_per_node']} {g['name']} ({lay['world_size']} GPUs): "
        f"TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']} x DP {lay['dp']}",
        f"  sequence parallel {'on' if c['sequence_parallel'] else 'off'}, distributed optimizer "
        f"{'on' if c['use_distributed_optimizer'] else 'off'}, recompute {rc}, {'bf16' if c['bf16'] else 'fp32'}; "
        f"global batch {c['global_batch_size']} = micro-batch {c['micro_batch_size']} x {lay['num_microbatches']} "
        f"micro-batches x DP {lay['dp']}, {c['seq_length']} tokens per sequence",
        "",
        f"Parameters: Megatron-Core GPTModel built per rank on the meta device under a fake "
        f"{lay['world_size']}-rank process group ({plan['param_build']['distinct_ranks']} distinct (tp, pp) "
        f"shards, {plan['param_build']['seconds']:.1f} s)",
        f"  {'built model (vocab padded to ' + format(plan['padded_vocab_size'], ',') + ')':<40}"
        f"{plan['total_parameters']:>17,}",
        f"  {'unpadded vocab ' + format(plan['vocab_size'], ',') + ' (compared)':<40}"
        f"{plan['total_parameters_unpadded']:>17,} = {plan['total_parameters_unpadded'] / 1e9:.2f}B",
    ]
    if plan["published_parameters"]:
        out.append(f"  published {plan['published_parameters'] / 1e9:.2f}B: relative error "
                   f"{plan['published_relative_error']:+.4%}")
    out += ["", _parameter_table(plan)]
    out += ["", f"Memory per GPU (GiB; 1F1B keeps min(PP - stage, M) micro-batches in flight; overhead "
                f"{c['overhead_gb']} GiB assumed)", _memory_table(plan)]
    peak = plan["memory_per_gpu_gb"]["total"]
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    out.append(f"peak {peak:.1f} GiB (stage {plan['memory_peak_stage']}) of {plan['gpu_memory_gb']:.0f} GiB: "
               f"{verdict} ({plan['gpu_memory_gb'] - peak:+.1f} GiB headroom)")
    out += ["", "Peak GiB per GPU for other settings:", _alternatives_table(plan)]
    if plan.get("cp_options_gb"):
        out += ["", f"Context parallel (TP {lay['tp']} x PP {lay['pp']} kept; activations / CP):", _cp_table(plan)]
        p = plan["proposed_cp"]
        out.append(f"proposed CP: {p} (the smallest that fits)" if p is not None else
                   "proposed CP: none fits with this TP/PP; raise TP/PP, recompute or nodes")
    t = plan["timing"]
    out += ["", f"Time: {g['name']} {t['gpu_peak_tflops']:.0f} TFLOP/s bf16 peak, MFU {t['mfu']:.2f} assumed, "
                f"pipeline bubble (PP-1)/M = {t['bubble']:.1%}"]
    x = t.get("cp_kv_exchange") or {}
    if x.get("cp", 1) > 1:
        out.append(f"  CP {x['cp']} K/V ring: {x['bytes_per_step'] / 1e9:.1f} GB sent per GPU and step over "
                   f"{x['link']} "
                   f"({x['link_gbps']:.0f} GB/s): {x['seconds_per_step']:.2f} s, "
                   f"{x['exposed_seconds_per_step']:.2f} s not hidden behind attention (added to the step)")
    if plan["modes"]:
        d = plan["data"]
        out.append(f"  dataset {d['data_path']}: {d['num_conversations']:,} conversations, {d['tokens']:,} tokens; "
                   f"attention over {'document segments' if d['document_mask'] else 'whole sequences'}"
                   f"{' (padded to S)' if d['pad_attention'] else ''}")
        out += ["", _modes_table(plan)]
        out.append("(* = --pack-mode; time = model FLOPs / (GPUs x peak x MFU) x (1 + bubble); "
                   "FLOPs include padding positions)")
        for r in (r for r in plan["modes"] if r.get("scope") == "step"):
            rs, mb = r["rows_per_step"], r["micro_batches_per_step"]
            out.append(f"  {r['mode']} (--pack-scope step): the padded run's {r['steps']:,} steps of "
                       f"{c['global_batch_size']} conversations; rows per step min {rs['min']} mean {rs['mean']:.2f} "
                       f"max {rs['max']}, micro-batches per rank min {mb['min']} mean {mb['mean']:.2f} max {mb['max']}")
        bal = [r for r in plan["modes"] if "balance" in r]
        if bal and lay["dp"] > 1:
            out += ["", f"Compute imbalance over DP {lay['dp']} (max/mean rank FLOPs per step, first "
                        f"{max(r['balance']['steps'] for r in bal)} steps; the step waits for the slowest rank):",
                    _balance_table(bal),
                    "(balanced = --balance-batches, the training default when DP > 1 or PP > 1; this run: "
                    + ("balanced" if lay.get("balance_batches") else "contiguous (--no-balance-batches)")
                    + "; lower bound = the best any placement of the same sequences could do)"]
    else:
        out.append(f"  {t['basis']}: {t['model_flops_per_step'] / 1e15:.2f} PFLOP/step, {t['step_seconds']:.2f} s/step"
                   + (f", {c['train_iters']} steps = {_hours(t['train_seconds'])}" if "train_seconds" in t else ""))
    for w in plan["warnings"]:
        out.append(f"warning: {w}")
    if plan["param_build"]["notes"]:
        out += [f"note: {n}" for n in plan["param_build"]["notes"]]
    if plan["unmodelled_flags"]:
        out.append("note: not modelled, ignored: " + " ".join(plan["unmodelled_flags"]))
    return "\n".join(out)
