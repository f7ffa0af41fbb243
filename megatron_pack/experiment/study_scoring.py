"""One model's scores in the study: held-out loss and generation (:mod:`.scoring`), and for the
leakage pair the no-mask leakage on the same held-out rows (:mod:`.leakage`), reduced to the
layer-mean figures the report tabulates."""

from __future__ import annotations

import time

import numpy as np


def leakage_summary(res: dict) -> dict:
    """Layer-mean figures: right after the boundary (d=0, d=1), 128+ tokens in, the sink apart."""
    att = res["attention"]
    counts = np.asarray(att["tokens_per_bucket"], dtype=float)
    leak, sink = np.asarray(att["leak"], dtype=float), np.asarray(att["sink"], dtype=float)
    alone = np.asarray(att["alone_first"], dtype=float)
    far = [i for i, name in enumerate(att["buckets"]) if int(name.split("-")[0].lstrip(">=")) >= 128 and counts[i] > 0]

    def at(arr, idx):
        if not idx:
            return None
        w = counts[idx] / counts[idx].sum()
        return float(np.nanmean(arr[:, idx], axis=0) @ w)

    c = res["contamination"]["as-is"]
    return {"leak_d0": at(leak, [0]), "leak_d1": at(leak, [1]), "leak_d128+": at(leak, far),
            "sink_d0": at(sink, [0]), "sink_d128+": at(sink, far), "alone_first_d128+": at(alone, far),
            "uniform_d0": float(att["uniform"][0]) if counts[0] else None,
            "tokens_d128+": int(counts[far].sum()) if far else 0,
            "leak_overall": float(np.mean(att["leak_overall"])), "sink_overall": float(np.mean(att["sink_overall"])),
            "contamination_mean": c.get("mean"), "contamination_mean_abs": c.get("mean_abs"),
            "contamination_docs": c.get("documents", 0),
            "contamination_se": (float(np.std(c["values"], ddof=1) / np.sqrt(len(c["values"])))
                                 if len(c.get("values", [])) > 1 else None),
            "contamination_values": c.get("values", []),
            "contamination_removed": res["contamination"]["removed"].get("mean"),
            "contamination_doubled": res["contamination"]["doubled"].get("mean"),
            "by_bucket": {"buckets": att["buckets"], "counts": att["tokens_per_bucket"],
                          "leak": np.nanmean(leak, axis=0).tolist()}}


def leakage_scores(model, info: dict, args, arrangements, log) -> tuple:
    """``({arrangement: summary}, rows, separator, layers)`` on the held-out chats' rows
    (:func:`.leakage_report.neighbour_rows`)."""
    from megatron_pack.experiment.leakage import analyze_sequences
    from megatron_pack.experiment.leakage_report import detect_separator, neighbour_rows
    from megatron_pack.files.indexed import SFTIndexedDataset

    data = SFTIndexedDataset(info["heldout"])
    sep, rows = detect_separator(data), neighbour_rows(data, args.seq_length, args.data_seed)
    layers = args.layers or list(range(model.config.num_hidden_layers))
    out = {}
    for arrangement in arrangements:
        seqs = rows[arrangement][:args.leak_sequences]
        res = analyze_sequences(model, seqs, sep, layers)
        out[arrangement] = s = {**leakage_summary(res), "sequences": len(seqs), "documents": sum(map(len, seqs))}
        far = "n/a (no token that far)" if s["leak_d128+"] is None else f"{s['leak_d128+']:.2%}"
        log(f"  leakage ({arrangement}, {len(seqs)} rows): leak d=0 {s['leak_d0']:.2%}, d>=128 {far}, "
            f"sink d=0 {s['sink_d0']:.2%}; "
            f"contamination {s['contamination_mean']:+.4f} nats")
    return out, rows, sep, layers


def mask_check(model, rows: dict, sep, layers: list) -> dict:
    """The measurement's own check: scored with the document mask every figure is 0."""
    from megatron_pack.experiment.leakage import analyze_sequences

    res = analyze_sequences(model, rows["shuffled"][:1], sep, layers[:2], document_mask=True)
    a = res["attention"]
    return {"attention_max": float(max(max(abs(x) for x in row if x == x) for row in a["leak"] + a["sink"])),
            "contamination_max_abs": max(c.get("max_abs", 0.0) for c in res["contamination"].values())}


def score_model(hf_dir: str, info: dict, args, leakage=("file order", "shuffled"), with_mask_check: bool = False,
                log=print) -> dict:
    """Held-out loss (HF, each chat alone), the generation score and, for ``leakage``
    arrangements, the leakage summary of the model at ``hf_dir``."""
    from transformers import AutoTokenizer

    from megatron_pack.experiment.scoring import generation_score, heldout_loss, load_hf

    t0 = time.perf_counter()
    model = load_hf(hf_dir)
    tok = AutoTokenizer.from_pretrained(args.model)
    out = {"heldout_loss_hf": heldout_loss(model, info["heldout"]),
           "generation": generation_score(model, tok, info["qa"])}
    log(f"  held-out loss (HF, each chat alone) {out['heldout_loss_hf']:.4f}; answer-contained "
        f"{out['generation'].get('contained', float('nan')):.1%} of {out['generation']['prompts']}")
    if leakage:
        out["leakage"], rows, sep, layers = leakage_scores(model, info, args, leakage, log)
        if with_mask_check:
            out["mask_check"] = mask_check(model, rows, sep, layers)
            log(f"  with the document mask: {out['mask_check']}")
    out["score_seconds"] = time.perf_counter() - t0
    return out
