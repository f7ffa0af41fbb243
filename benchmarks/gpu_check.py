"""The timing and report half of ``scripts/gpu_check.sh`` (which installs from the bundle, runs
``tests/gpu`` and the transformers comparison around it).

``--phase measure`` times, into one JSON file (``--measured``):

1. the machine: GPU, torch/CUDA, megatron-core, the ``varlen_attn`` signature, which packed
   attention kernel the local spec picks, TE / flash-attn / apex, the fusions;
2. the bf16 matmul rate (8192^3 products): the ceiling MFU is shown beside;
3. packed (THD) vs padded attention on the same documents at ~45% padding, forward + backward,
   per kernel present (PyTorch ``varlen_attn``, ``flex_attention`` with a document block mask,
   flash-attn, TE, per-document SDPA), with the largest difference on the real tokens;
4. ``train()`` steps of small models under padding / greedy / bfd: real tokens/s, MFU, peak memory.

``--phase report`` writes ``gpu_check.md`` (summary tables, ready for ``benchmarks/README.md``)
and ``gpu_check.json`` from that file, pytest's JUnit XML, the install notes and
``bench_train_vs_hf.py``'s JSON; without CUDA and measurements it is the "no GPU: skipped"
report. ``--phase all`` (default) does both; ``--allow-cpu`` measures on the CPU at toy sizes
(the unit test). The formulas live in the package: MFU in :mod:`megatron_pack.planning.mfu`,
GPU peaks in :mod:`megatron_pack.planning.catalogue`; this file only times and prints.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET


class Budget:
    """Seconds left before ``deadline`` (wall clock), so late sections skip instead of overrunning."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


# ------------------------------------------------------------------------------------------
# 1-2: machine, matmul rate, tests
# ------------------------------------------------------------------------------------------

def _version(module: str):
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:
        return None
    return getattr(mod, "__version__", "?")


def environment() -> dict:
    import torch

    from megatron_pack.model import fused_varlen, spec

    fn = fused_varlen.varlen_fn()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "megatron_core": _version("megatron.core"), "transformers": _version("transformers"),
           "cuda_available": torch.cuda.is_available(), "gpus": [],
           "varlen_attn": f"varlen_attn{inspect.signature(fn)}" if fn is not None else None}
    if torch.cuda.is_available():
        from megatron_pack.model.presets import get_preset, transformer_config

        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["te"] = spec.te_available()
        env["flash_attn"] = spec.flash_attn_available()
        env["apex_grad_accum"] = spec._importable("fused_weight_gradient_mlp_cuda")
        env["fusions"] = spec.choose_fusions(True)
        env["local_bf16_kernel"] = spec.attention_kernel(transformer_config(get_preset("tiny"), bf16=True))
    return env


def matmul_rate(device, n: int = 8192, iters: int = 20) -> float | None:
    """Measured bf16 matmul FLOP/s (median over ``iters`` products of random n x n matrices)."""
    import torch

    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return 2.0 * n ** 3 / statistics.median(times)


def read_junit(paths: str | None) -> dict:
    """Counts and failing test names of pytest ``--junitxml`` files (comma-separated; missing
    ones are named: a run stopped by its time limit writes none)."""
    found = [p for p in (paths or "").split(",") if p and os.path.exists(p)]
    if not found:
        return {"ran": False, "why": "no JUnit XML (tests/gpu did not run)"}
    suites = []
    for path in found:
        root = ET.parse(path).getroot()
        suites += [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    missing = [os.path.basename(p) for p in paths.split(",") if p and p not in found]
    out = {"ran": True, "missing": missing, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [],
           "skip_reasons": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(name)
            skip = case.find("skipped")
            if skip is not None:
                out["skip_reasons"].append(f"{name}: {skip.get('message', '')}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


# ------------------------------------------------------------------------------------------
# 3: attention
# ------------------------------------------------------------------------------------------

def doc_lengths(batch: int, max_len: int, padding: float, seed: int = 0) -> list:
    """``batch`` document lengths in [1, max_len] whose padding fraction when each is padded to
    ``max_len`` is ``padding`` (to within a token per document)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.1, 1.0, batch)
    target = (1.0 - padding) * max_len * batch
    lens = np.clip(np.round(raw / raw.sum() * target), 1, max_len).astype(int)
    return lens.tolist()


def _time(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of ``fn()`` (forward + backward)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _te_kernels(heads: int, kv_heads: int, head_dim: int):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_pack.model.presets import LlamaPreset, transformer_config

    preset = LlamaPreset("attn", num_layers=1, hidden_size=heads * head_dim, ffn_hidden_size=4 * heads * head_dim,
                         num_attention_heads=heads, num_query_groups=kv_heads, vocab_size=256)
    te = TEDotProductAttention(transformer_config(preset, bf16=True), 1, AttnMaskType.causal, "self")

    def thd(q, k, v, cu, m):
        p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)
        return te(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=p)

    return thd, lambda q, k, v: te(q, k, v, None, attn_mask_type=AttnMaskType.causal)


def _attention_kernels(device, heads: int, kv_heads: int, head_dim: int) -> dict:
    """name -> (thd(q, k, v, cu, max_len), padded(q_sbhd, k_sbhd, v_sbhd)) for what is installed,
    or name -> reason it is skipped. The padded side of the PyTorch kernels is SDPA (causal)."""
    from megatron_pack.model import attention, fused_varlen, spec

    scale = head_dim ** -0.5
    dense = lambda q, k, v: attention.torch_dense(q, k, v, causal=True, scale=scale)  # noqa: E731

    def thd_of(fn):
        return lambda q, k, v, cu, m: fn(q, k, v, cu, m, causal=True, scale=scale)

    torch_kernel = (thd_of(attention.torch_varlen), dense)
    if device.type != "cuda":
        return {"torch": torch_kernel, **{k: "no CUDA" for k in ("varlen", "flex", "flash", "te")}}
    out = {"varlen": ((thd_of(fused_varlen.torch_fa_varlen), dense) if fused_varlen.varlen_fn() is not None
                      else "this torch has no torch.nn.attention.varlen"), "torch": torch_kernel}
    out["flash"] = ((thd_of(attention.flash_varlen),
                     lambda q, k, v: attention.flash_dense(q, k, v, causal=True, scale=scale))
                    if spec.flash_attn_available() else "flash-attn not installed")
    out["te"] = _te_kernels(heads, kv_heads, head_dim) if spec.te_available() else "Transformer Engine not installed"
    out["flex"] = (thd_of(fused_varlen.flex_varlen), dense)  # last: its compilation takes the longest
    return out


def _kernel_row(name, thd, padded, data, warmup, iters, device) -> dict:
    import torch

    q, k, v, qp, kp, vp, cu, lens, real = data
    total, max_len, batch = q.size(0), qp.size(0), qp.size(1)
    leaves_t = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    leaves_p = [x.detach().clone().requires_grad_() for x in (qp, kp, vp)]

    def run_t():
        thd(*leaves_t, cu, max(lens)).float().sum().backward()

    def run_p():
        padded(*leaves_p).float().sum().backward()

    with torch.no_grad():
        ot = thd(q, k, v, cu, max(lens)).reshape(total, -1).float()
        op = padded(qp, kp, vp).reshape(max_len, batch, -1).float()
        # the padded output's real tokens, document by document = the THD order
        diff = float((ot - op.transpose(0, 1)[real.transpose(0, 1)]).abs().max())
    t_thd = _time(run_t, warmup, iters, device)
    t_pad = _time(run_p, warmup, iters, device)
    return {"kernel": name, "padded_ms": t_pad, "thd_ms": t_thd, "speedup": t_pad / t_thd, "max_abs_diff": diff}


def attention_bench(device, *, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int,
                    padding: float = 0.45, warmup: int = 3, iters: int = 10, budget: Budget | None = None,
                    progress=None) -> dict:
    """THD (only the real tokens, cu_seqlens) vs padded SBHD (every document padded to
    ``max_len``), forward + backward, per kernel; ``progress(result so far)`` after each."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lens = doc_lengths(batch, max_len, padding)
    total = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(total, h, head_dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    starts = [0, *itertools.accumulate(lens)][:-1]
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[a:a + n], (0, 0, 0, 0, 0, max_len - n))  # noqa: E731
                                 for a, n in zip(starts, lens)], dim=1)  # [s, b, h, d]
    real = torch.zeros(max_len, batch, dtype=torch.bool, device=device)
    for b, n in enumerate(lens):
        real[:n, b] = True
    data = (q, k, v, pad(q), pad(k), pad(v), cu, lens, real)
    rows = []
    result = {"batch": batch, "max_len": max_len, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "dtype": str(dtype).replace("torch.", ""), "real_tokens": total,
              "padding_fraction": 1.0 - total / (batch * max_len), "rows": rows}
    for name, kern in _attention_kernels(device, heads, kv_heads, head_dim).items():
        if isinstance(kern, str):
            rows.append({"kernel": name, "skipped": kern})
        elif budget is not None and not budget.allows(20):
            rows.append({"kernel": name, "skipped": f"time budget ({budget.left():.0f} s left)"})
        else:
            try:
                rows.append(_kernel_row(name, *kern, data, warmup, iters, device))
            except Exception as e:  # a kernel that fails here is a finding, not a crash of the check
                rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
        if progress is not None:
            progress(result)
    return result


# ------------------------------------------------------------------------------------------
# 4: train() steps
# ------------------------------------------------------------------------------------------

def make_dataset(prefix: str, n: int, max_len: int, vocab: int, padding: float, seed: int = 0) -> list:
    """``n`` conversations whose lengths pad to ``max_len`` with about ``padding`` waste; the
    first quarter of each is an untrained prompt. Returns their lengths."""
    import numpy as np

    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    lens = doc_lengths(n, max_len, padding, seed)
    with SFTDatasetWriter(prefix) as w:
        for n_tok in lens:
            toks = rng.integers(1, vocab, n_tok).tolist()
            prompt = max(1, n_tok // 4)
            w.add(toks, [0] * prompt + [1] * (n_tok - prompt), [0, prompt])
    return lens


def gpu_spec(device):
    """The catalogue entry of this CUDA device, or ``None`` (CPU, unknown GPU)."""
    import torch

    from megatron_pack.planning.catalogue import gpu_from_device_name

    return gpu_from_device_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _train_argv(model: str, prefix: str, vocab: int, mode: str, seq: int, steps: int, gbs: int, cuda: bool) -> list:
    return ["--model", model, "--vocab-size", str(vocab), "--data-path", prefix, "--seq-length", str(seq),
            "--pack-mode", mode, "--micro-batch-size", "1", "--global-batch-size", str(gbs), "--train-iters",
            str(steps), "--lr", "1e-5", "--valid-fraction", "0", "--log-interval", str(steps), "--seed", "1234",
            "--bf16" if cuda else "--no-bf16"]


def model_step_bench(device, workdir: str, *, models: list, modes: list, seq_length: int, steps: int, gbs: int,
                     budget: Budget, seconds_per_run: float, matmul: float | None, progress=None) -> list:
    """``train()`` for ``steps`` steps per (model, mode), through the train CLI's parser;
    ``progress(rows so far)`` after each."""
    import torch

    from megatron_pack.config.cli import parse_args
    from megatron_pack.model import presets, spec
    from megatron_pack.model.cost import CostModel
    from megatron_pack.planning.mfu import flops_per_real_token, mfu
    from megatron_pack.training.loop import train

    cuda = device.type == "cuda"
    gpu = gpu_spec(device)
    rows = []
    for model in models:
        preset = presets.get_preset(model)
        vocab = preset.vocab_size or 256
        prefix = os.path.join(workdir, f"data_{model}")
        lens = make_dataset(prefix, n=max(200, 24 * gbs), max_len=seq_length, vocab=min(vocab, 32000), padding=0.45)
        per_token = flops_per_real_token(CostModel.from_architecture(preset, vocab_size=vocab), lens)
        for mode in modes:
            row = {"model": model, "mode": mode, "layers": "te" if cuda and spec.te_available() else "local",
                   "dtype": "bf16" if cuda else "fp32"}
            if not budget.allows(seconds_per_run):
                rows.append({**row, "skipped": f"time budget ({budget.left():.0f} s left)"})
                continue
            try:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                res = train(parse_args(_train_argv(model, prefix, vocab, mode, seq_length, steps, gbs, cuda)))
                tps = res["tokens_per_s"]
                row.update({"steps": len(res["history"]), "real_tokens_per_s": tps,
                            "median_step_s": statistics.median(r["seconds"] for r in res["history"][1:]
                                                               or res["history"]),
                            "padding_fraction": res["padding_fraction"], "final_loss": res["final_train_loss"],
                            "mfu": mfu(tps, per_token, gpu.peak_flops) if gpu else None,
                            "mfu_vs_matmul": mfu(tps, per_token, matmul) if matmul else None,
                            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None})
            except Exception as e:  # report and go on: one failing size must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            if progress is not None:
                progress(rows)
    return rows


def measure(args) -> dict:
    """Every section, saved to ``args.measured`` as soon as it is done (a time limit that kills
    this process keeps what was measured before it)."""
    import torch

    from megatron_pack.files.atomic import write_json_atomic
    from megatron_pack.parallel import destroy_distributed, initialize_distributed

    budget = Budget(args.deadline)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    out = {"environment": environment()}
    print(f"environment: {json.dumps(out['environment'])}", flush=True)
    out["matmul_flops"] = matmul_rate(device)
    gpu = gpu_spec(device)
    out["peak_flops"], out["gpu_spec"] = (gpu.peak_flops, gpu.name) if gpu else (None, None)
    write_json_atomic(out, args.measured)
    def save(key):
        def progress(value):
            out[key] = value
            write_json_atomic(out, args.measured)
        return progress

    if cuda:
        out["attention"] = attention_bench(device, batch=16, max_len=4096, heads=32, kv_heads=8, head_dim=128,
                                           budget=budget, progress=save("attention"))
    else:
        out["attention"] = attention_bench(device, batch=4, max_len=64, heads=4, kv_heads=2, head_dim=16,
                                           warmup=1, iters=2)
    print(f"attention: {json.dumps(out['attention']['rows'])}", flush=True)
    write_json_atomic(out, args.measured)
    seq, steps, gbs = (2048, args.steps or 6, 8) if cuda else (128, args.steps or 3, 4)
    out["model_step_setup"] = (f"seq {seq}, global batch {gbs} x micro-batch 1, {steps} steps (first not timed), "
                               f"~45% padding when padded")
    work = tempfile.mkdtemp(prefix="gpu_check_")
    initialize_distributed()  # one rank; train() reuses the group
    try:
        out["model_steps"] = model_step_bench(device, work, models=args.models.split(","),
                                              modes=args.modes.split(","), seq_length=seq, steps=steps, gbs=gbs,
                                              budget=budget, seconds_per_run=25.0 if cuda else 0.0,
                                              matmul=out["matmul_flops"], progress=save("model_steps"))
    finally:
        destroy_distributed()
        shutil.rmtree(work, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def _fmt(v, spec=".3g"):
    return "—" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def _pct(v):
    return "—" if v is None else f"{v:.1%}"


def _render_machine(report: dict) -> list:
    env = report["environment"]
    lines = [f"- {env.get('date', '')}: GPUs {', '.join(env.get('gpus') or []) or 'none'}; python {env['python']}, "
             f"torch {env['torch']}, CUDA {env['cuda']}, megatron-core {_fmt(env.get('megatron_core'))}, "
             f"transformers {_fmt(env.get('transformers'))}",
             f"- Transformer Engine: {_fmt(env.get('te'))}; flash-attn: {_fmt(env.get('flash_attn'))}; apex "
             f"grad-accum kernel: {_fmt(env.get('apex_grad_accum'))}; local bf16 packed-attention kernel: "
             f"{_fmt(env.get('local_bf16_kernel'))}",
             f"- `{env.get('varlen_attn') or 'no torch.nn.attention.varlen'}`"]
    if env.get("fusions"):
        lines.append("- fusions on: " + (", ".join(k for k, v in env["fusions"].items() if v) or "none"))
    if report.get("matmul_flops"):
        lines.append(f"- bf16 matmul (8192^3): {report['matmul_flops'] / 1e12:.0f} TFLOP/s measured; catalogue peak "
                     f"({report.get('gpu_spec')}): {_fmt((report.get('peak_flops') or 0) / 1e12, '.0f')} TFLOP/s")
    return lines + [f"- {n}" for n in report.get("install_notes", [])]


def _render_tests(t: dict) -> list:
    lines = ["", "## tests/gpu", ""]
    if not t.get("ran"):
        return lines + [f"skipped: {t.get('why')}"]
    lines.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
                 + (f"; no result from {', '.join(t['missing'])} (stopped by its time limit)" if t.get("missing")
                    else ""))
    return lines + [f"- FAILED {n}" for n in t["failed"]] + [f"- skipped {s}" for s in t["skip_reasons"]]


def _render_attention(a: dict) -> list:
    from megatron_pack.reporting import markdown_table

    lines = ["", f"## Attention: packed (THD) vs padded, {a['batch']} documents padded to {a['max_len']} "
                 f"({a['padding_fraction']:.0%} padding), {a['heads']}/{a['kv_heads']} heads x {a['head_dim']}, "
                 f"{a['dtype']}, forward + backward", ""]
    rows = [[r["kernel"], _fmt(r.get("padded_ms"), ".2f"), _fmt(r.get("thd_ms"), ".2f"),
             _fmt(r.get("speedup"), ".2f"), _fmt(r.get("max_abs_diff"), ".2e"),
             r.get("skipped") or r.get("error") or ""] for r in a["rows"]]
    lines.append(markdown_table(["kernel", "padded ms", "packed ms", "speedup", "max abs diff", "note"], rows))
    timed = {r["kernel"]: r for r in a["rows"] if "thd_ms" in r}
    if "varlen" in timed:
        s = timed["varlen"]["speedup"]
        lines.append(f"\nTarget varlen >= 1.8x padded: {s:.2f}x, {'met' if s >= 1.8 else 'NOT met'}.")
    if "varlen" in timed and "flex" in timed:
        ratio = timed["varlen"]["thd_ms"] / timed["flex"]["thd_ms"]
        verdict = ("flex clearly faster: make it the local bf16 choice" if ratio > 1.1
                   else "varlen stays the local bf16 choice")
        lines.append(f"varlen / flex packed time: {ratio:.2f} ({verdict}).")
    return lines


def _render_steps(report: dict) -> list:
    from megatron_pack.reporting import markdown_table

    m = report["model_steps"]
    lines = ["", f"## train() steps on one GPU ({report.get('model_step_setup', '')})", ""]
    rows = [[r["model"], r["mode"], r["layers"], r["dtype"], _fmt(r.get("median_step_s"), ".3f"),
             _fmt(r.get("real_tokens_per_s"), ".0f"), _fmt(r.get("padding_fraction"), ".2f"), _pct(r.get("mfu")),
             _pct(r.get("mfu_vs_matmul")), _fmt(r.get("peak_memory_gib"), ".1f"),
             r.get("skipped") or r.get("error") or ""] for r in m]
    lines.append(markdown_table(["model", "mode", "layers", "dtype", "step s", "real tokens/s", "padding",
                                 "MFU (peak)", "MFU (matmul)", "peak GiB", "note"], rows))
    return lines


def _render_vs_hf(v: dict, matmul: float | None) -> list:
    from megatron_pack.reporting import markdown_table

    lines = ["", f"## Llama of {v['params'] / 1e9:.2f}B parameters (shape {v.get('shape_name', '1b')}), megatron_pack "
                 f"vs transformers, seq {v['seq_length']}, {v['global_batch_size']} rows per step, {v['steps']} steps",
             ""]
    rows = []
    for r in v["rows"]:
        if "tokens_per_s" not in r:
            rows.append([r["setting"], "", "", "", "", "", "", f"not run: {r.get('skipped')}"])
            continue
        mm = r["mfu"] * v["peak_flops"] / matmul if r.get("mfu") is not None and matmul and v.get("peak_flops") \
            else None
        rows.append([r["setting"], f"{r['tokens_per_s']:,.0f}", _pct(r.get("mfu")), _pct(mm),
                     f"{r['peak_memory_gib']:.1f}", f"{r['padding_fraction']:.1%}",
                     f"{r.get('vs_best_hf', float('nan')):.2f}x", r.get("attention", "")])
    lines.append(markdown_table(["setting", "real tokens/s", "MFU (peak)", "MFU (matmul)", "peak GiB", "padding",
                                 "vs best HF", "note"], rows))
    bfd = next((r for r in v["rows"] if r["setting"] == "mp_bfd" and "vs_best_hf" in r), None)
    if bfd:
        lines.append(f"\nTarget bfd >= 1.5x the fastest transformers setting ({v.get('best_hf')}): "
                     f"{bfd['vs_best_hf']:.2f}x, {'met' if bfd['vs_best_hf'] >= 1.5 else 'NOT met'}.")
    return lines


def render(report: dict) -> str:
    lines = ["# GPU check", ""]
    if report.get("no_gpu"):
        lines += [f"**no GPU: skipped** — {report['no_gpu']}", "",
                  "Nothing GPU-specific ran: tests/gpu, the attention, train() and transformers benchmarks were "
                  "skipped. Run `bash scripts/gpu_check.sh` on a machine with an NVIDIA GPU.", ""]
    lines += _render_machine(report)
    if report.get("tests"):
        lines += _render_tests(report["tests"])
    if report.get("attention"):
        lines += _render_attention(report["attention"])
    if report.get("model_steps") is not None:
        lines += _render_steps(report)
    if report.get("vs_hf"):
        lines += _render_vs_hf({**report["vs_hf"], "peak_flops": report.get("peak_flops")}, report.get("matmul_flops"))
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in report.get("skipped", [])] or ["- nothing"])
    return "\n".join(lines) + "\n"


def collect_skips(report: dict) -> list:
    out = []
    if report.get("no_gpu"):
        out.append(f"everything GPU-specific: no GPU ({report['no_gpu']})")
    t = report.get("tests") or {}
    out += [f"tests/gpu {s}" for s in t.get("skip_reasons", [])]
    if t and not t.get("ran") and not report.get("no_gpu"):
        out.append(f"tests/gpu: {t.get('why')}")
    for r in (report.get("attention") or {}).get("rows", []):
        if "skipped" in r:
            out.append(f"attention kernel {r['kernel']}: {r['skipped']}")
    for r in report.get("model_steps") or []:
        if "skipped" in r:
            out.append(f"train() {r['model']}/{r['mode']}: {r['skipped']}")
    for r in (report.get("vs_hf") or {}).get("rows", []):
        if "skipped" in r:
            out.append(f"transformers comparison {r['setting']}: {r['skipped']}")
    return out + [n for n in report.get("install_notes", []) if n.startswith("skipped:")]


def build_report(args) -> dict:
    import torch

    report = json.load(open(args.measured)) if args.measured and os.path.exists(args.measured) else None
    if report is None:
        report = {"environment": environment()}
        if not torch.cuda.is_available():
            report["no_gpu"] = "torch.cuda.is_available() is False"
    report["tests"] = ({"ran": False, "why": "no GPU"} if report.get("no_gpu") else read_junit(args.tests_xml))
    if args.install_notes and os.path.exists(args.install_notes):
        report["install_notes"] = [ln.strip() for ln in open(args.install_notes) if ln.strip()]
    if args.vs_hf and os.path.exists(args.vs_hf):
        report["vs_hf"] = json.load(open(args.vs_hf))
    report["skipped"] = collect_skips(report)
    return report


def write(report: dict, out_dir: str) -> tuple:
    from megatron_pack.files.atomic import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "gpu_check.md"), os.path.join(out_dir, "gpu_check.json")
    write_json_atomic(report, js)
    with open(md + ".tmp", "w") as f:
        f.write(render(report))
    os.replace(md + ".tmp", md)
    return md, js


def failed(report: dict) -> bool:
    t = report.get("tests") or {}
    rows = (report.get("attention") or {}).get("rows", []) + (report.get("model_steps") or [])
    return bool(t.get("failures", 0) + t.get("errors", 0) or any("error" in r for r in rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phase", choices=("measure", "report", "all"), default="all")
    ap.add_argument("--out-dir", default="outputs/gpu_check", help="report folder (phases report, all)")
    ap.add_argument("--measured", default=None, help="JSON the measure phase writes and the report phase reads")
    ap.add_argument("--tests-xml", default=None, help="pytest --junitxml of tests/gpu")
    ap.add_argument("--install-notes", default=None, help="file with one line per install step or skipped extra")
    ap.add_argument("--vs-hf", default=None, help="bench_train_vs_hf.py --json output")
    ap.add_argument("--deadline", type=float, default=None, help="unix time by which to have finished measuring")
    ap.add_argument("--allow-cpu", action="store_true", help="measure on CPU at toy sizes (tests)")
    ap.add_argument("--models", default="tiny", help="comma list of train() models (the 1B runs in bench_train_vs_hf)")
    ap.add_argument("--modes", default="padding,greedy,bfd")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    import torch

    from megatron_pack.files.atomic import write_json_atomic

    if args.phase in ("measure", "all") and (torch.cuda.is_available() or args.allow_cpu):
        if args.measured is None:
            args.measured = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "measured.json")
        write_json_atomic(measure(args), args.measured)
        print(f"measured: {args.measured}")
    if args.phase == "measure":
        return 0
    report = build_report(args)
    md, js = write(report, args.out_dir)
    print(open(md).read())
    if report.get("no_gpu"):
        print(f"no GPU: skipped (report: {md}, {js})")
        return 0
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
