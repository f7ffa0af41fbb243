"""One-call GPU check, the report half of ``scripts/gpu_check.sh`` (which installs the extras and
runs ``tests/gpu`` first). Writes ``gpu_check.md`` and ``gpu_check.json`` to ``--out-dir``:

1. the machine: GPUs, torch/CUDA, Transformer Engine / flash-attn / apex, the fusions the spec
   provider turns on;
2. ``tests/gpu``: passed / failed / skipped, from pytest's JUnit XML;
3. packed (THD, varlen) vs padded attention on the same documents at ~45% padding, forward +
   backward, for every kernel present (TE fused attention, flash-attn, PyTorch SDPA), with the
   largest difference on the real tokens;
4. one training step on one GPU, through the real ``train()`` loop, for the tiny model up to a
   1.2B Llama (Llama-3.2-1B's shape), under padding / greedy / bfd, bf16, TE layers when
   importable: real tokens/s, MFU (the planner's model FLOP count per step of the same plan /
   median step time / the GPU's peak bf16) and peak memory.

Everything not run says why (no GPU, kernel not installed, out of time budget). Without CUDA
it writes a "no GPU: skipped" report and exits 0; ``--allow-cpu`` runs sections 3 and 4 on the
CPU at toy sizes (the unit test uses it, so the code runs in CI).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Llama-3.2-1B's shape (tied embeddings, no RoPE scaling): the "1B" of the model-step section,
#: given to train() as a HF config.json.
ONE_B = dict(name="llama3.2-1b", num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
             num_query_groups=8, vocab_size=128256, tie_word_embeddings=True)
GPU_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("A800", "a800"))


class Budget:
    """Seconds left before ``deadline`` (wall clock), so late sections skip instead of overrunning."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


# ------------------------------------------------------------------------------------------
# 1-2: machine and tests
# ------------------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    from megatron_pack.model import spec

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["te"] = spec.te_available()
        env["flash_attn"] = spec.flash_attn_available()
        env["apex_grad_accum"] = spec._importable("fused_weight_gradient_mlp_cuda")
        env["fusions"] = spec.choose_fusions(True)
    return env


def read_junit(path: str | None) -> dict:
    """Counts and failing test names of a pytest ``--junitxml`` file."""
    if not path or not os.path.exists(path):
        return {"ran": False, "why": "no JUnit XML (tests/gpu did not run)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"ran": True, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": []}
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


def _attention_kernels(device, heads: int, kv_heads: int, head_dim: int) -> dict:
    """name -> (thd(q, k, v, cu, max_len), padded(q_sbhd, k_sbhd, v_sbhd)) for what is installed,
    or name -> reason it is skipped."""
    from megatron_pack.model import attention, spec

    scale = head_dim ** -0.5
    out = {"torch": (lambda q, k, v, cu, m: attention.torch_varlen(q, k, v, cu, m, causal=True, scale=scale),
                     lambda q, k, v: attention.torch_dense(q, k, v, causal=True, scale=scale))}
    if device.type != "cuda":
        out["flash"] = "no CUDA"
        out["te"] = "no CUDA"
        return out
    out["flash"] = ((lambda q, k, v, cu, m: attention.flash_varlen(q, k, v, cu, m, causal=True, scale=scale),
                     lambda q, k, v: attention.flash_dense(q, k, v, causal=True, scale=scale))
                    if spec.flash_attn_available() else "flash-attn not installed")
    if not spec.te_available():
        out["te"] = "Transformer Engine not installed"
        return out
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

    out["te"] = (thd, lambda q, k, v: te(q, k, v, None, attn_mask_type=AttnMaskType.causal))
    return out


def attention_bench(device, *, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int,
                    padding: float = 0.45, warmup: int = 3, iters: int = 10) -> dict:
    """THD (only the real tokens, cu_seqlens) vs padded SBHD (every document padded to
    ``max_len``), forward + backward, per kernel."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lens = doc_lengths(batch, max_len, padding)
    total = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(total, h, head_dim, generator=g).to(device, dtype)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[a:a + n], (0, 0, 0, 0, 0, max_len - n))  # noqa: E731
                                 for a, n in zip(cu[:-1].tolist(), lens)], dim=1)  # [s, b, h, d]
    qp, kp, vp = pad(q), pad(k), pad(v)
    real = torch.zeros(max_len, batch, dtype=torch.bool, device=device)
    for b, n in enumerate(lens):
        real[:n, b] = True
    rows = []
    for name, kern in _attention_kernels(device, heads, kv_heads, head_dim).items():
        if isinstance(kern, str):
            rows.append({"kernel": name, "skipped": kern})
            continue
        thd, padded = kern
        try:
            leaves_t = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            leaves_p = [x.detach().clone().requires_grad_() for x in (qp, kp, vp)]

            def run_t():
                out = thd(*leaves_t, cu, max(lens))
                out.float().sum().backward()
                return out

            def run_p():
                out = padded(*leaves_p)
                out.float().sum().backward()
                return out

            with torch.no_grad():
                ot = thd(q, k, v, cu, max(lens)).reshape(total, -1).float()
                op = padded(qp, kp, vp).reshape(max_len, batch, -1).float()
                # the padded output's real tokens, document by document = the THD order
                diff = float((ot - op.transpose(0, 1)[real.transpose(0, 1)]).abs().max())
            t_thd = _time(run_t, warmup, iters, device)
            t_pad = _time(run_p, warmup, iters, device)
            rows.append({"kernel": name, "padded_ms": t_pad, "thd_ms": t_thd, "speedup": t_pad / t_thd,
                         "max_abs_diff": diff})
        except Exception as e:  # a kernel that fails here is a finding, not a crash of the check
            rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
    return {"batch": batch, "max_len": max_len, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "dtype": str(dtype).replace("torch.", ""), "real_tokens": total,
            "padding_fraction": 1.0 - total / (batch * max_len), "rows": rows}


# ------------------------------------------------------------------------------------------
# 4: one-GPU model steps
# ------------------------------------------------------------------------------------------

def make_dataset(prefix: str, n: int, max_len: int, vocab: int, padding: float, seed: int = 0) -> str:
    """``n`` conversations whose lengths pad to ``max_len`` with about ``padding`` waste; the
    first quarter of each is an untrained prompt."""
    import numpy as np

    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    lens = doc_lengths(n, max_len, padding, seed)
    with SFTDatasetWriter(prefix) as w:
        for n_tok in lens:
            toks = rng.integers(1, vocab, n_tok).tolist()
            prompt = max(1, n_tok // 4)
            w.add(toks, [0] * prompt + [1] * (n_tok - prompt), [0, prompt])
    return prefix


def peak_flops(device) -> tuple:
    """(GPU spec name, peak bf16 FLOP/s) from the planner's catalogue, or (None, None)."""
    import torch

    from megatron_pack.planning.catalogue import get_gpu

    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for needle, key in GPU_NAMES:
        if needle in name:
            g = get_gpu(key)
            return g.name, g.peak_flops
    return None, None


def model_arguments(models: list, workdir: str) -> dict:
    """name -> ``--model`` value: a preset name, or for the 1.2B model the path of a HF
    ``config.json`` written here (any supported config is a valid ``--model``)."""
    import json

    from megatron_pack.model.architecture import Architecture
    from megatron_pack.model.hf_architecture import hf_config_from_architecture

    out = {}
    for name in models:
        if name == ONE_B["name"]:
            path = os.path.join(workdir, name, "config.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(hf_config_from_architecture(Architecture(**ONE_B), "bfloat16"), f, indent=1)
            out[name] = path
        else:
            out[name] = name
    return out


def matmul_parameters(model_args: dict) -> dict:
    """The planner's matmul parameter count (the N of 6*N*S) per model. Call it before any
    process group exists: the planner builds each shard under a fake one."""
    from megatron_pack.model import presets
    from megatron_pack.planning.params import count_parameters

    out = {}
    for name, arg in model_args.items():
        preset = presets.get_preset(arg)
        out[name] = count_parameters(preset, vocab_size=preset.vocab_size or 256).matmul_total
    return out


def model_flops_per_step(preset, matmul: int, prefix: str, seq_length: int, mode: str, gbs: int, seed: int) -> float:
    """The planner's model FLOPs of one step of this plan (epoch-0 plan, averaged per step)."""
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.plan import build_plan
    from megatron_pack.planning.catalogue import get_gpu
    from megatron_pack.planning.timing import TimingConfig, estimate, plan_stats

    ds = SFTIndexedDataset(prefix)
    plan = build_plan(ds.lengths, seq_length, mode, seed=seed)
    tcfg = TimingConfig(gpu=get_gpu("h100"), num_gpus=1, pp=1, num_microbatches=gbs, global_batch_size=gbs,
                        seq_length=seq_length)  # the GPU only scales time, not the FLOP count
    return estimate(preset, matmul, plan_stats(plan), tcfg).model_flops_per_step


def model_step_bench(device, workdir: str, *, model_args: dict, matmul: dict, modes: list, seq_length: int, steps: int, gbs: int,
                     budget: Budget, seconds_per_run: float) -> list:
    """``train()`` for ``steps`` steps per (model, mode); ``model_args`` from :func:`model_arguments`,
    ``matmul`` from :func:`matmul_parameters`. Returns one row each."""
    import torch

    from megatron_pack.model import presets, spec
    from megatron_pack.config.spec import (DataArgs, LoggingArgs, ModelArgs, OptimArgs, PackingArgs,
                                               TrainArgs, TrainConfig)
    from megatron_pack.training.loop import train

    use_te = device.type == "cuda" and spec.te_available()
    gpu_name, peak = peak_flops(device)
    rows = []
    for model_name, model_arg in model_args.items():
        preset = presets.get_preset(model_arg)
        vocab = preset.vocab_size or 256
        prefix = make_dataset(os.path.join(workdir, f"data_{model_name}"), n=max(200, 24 * gbs), max_len=seq_length,
                              vocab=min(vocab, 32000), padding=0.45)
        for mode in modes:
            row = {"model": model_name, "mode": mode, "layers": "te" if use_te else "local",
                   "dtype": "bf16" if device.type == "cuda" else "fp32"}
            if not budget.allows(seconds_per_run):
                rows.append({**row, "skipped": f"time budget ({budget.left():.0f} s left)"})
                continue
            cfg = TrainConfig(
                model=ModelArgs(model=model_arg, vocab_size=vocab, bf16=device.type == "cuda",
                                transformer_impl="transformer_engine" if use_te else "local"),
                data=DataArgs(data_path=prefix, seq_length=seq_length, valid_fraction=0.0,
                              packing=PackingArgs(pack_mode=mode)),
                optim=OptimArgs(lr=1e-5),
                train=TrainArgs(micro_batch_size=1, global_batch_size=gbs, train_iters=steps, seed=1234),
                logging=LoggingArgs(log_interval=steps))
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                res = train(cfg)
                step_s = statistics.median(r["seconds"] for r in res["history"][1:] or res["history"])
                flops = model_flops_per_step(preset, matmul[model_name], prefix, seq_length, mode, gbs, 1234)
                row.update({"steps": len(res["history"]), "median_step_s": step_s,
                            "real_tokens_per_s": res["tokens_per_s"], "padding_fraction": res["padding_fraction"],
                            "final_loss": res["final_train_loss"], "model_tflops_per_step": flops / 1e12,
                            "mfu": flops / step_s / peak if peak else None,
                            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                                if device.type == "cuda" else None)})
            except Exception as e:  # report and go on: one failing size must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def _fmt(v, spec=".3g"):
    return "—" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def render(report: dict) -> str:
    from megatron_pack.reporting import markdown_table

    env = report["environment"]
    lines = ["# GPU check", ""]
    if report.get("no_gpu"):
        lines += [f"**no GPU: skipped** — {report['no_gpu']}", "",
                  "Nothing GPU-specific ran: tests/gpu, the attention and the model-step benchmarks were "
                  "skipped. Run `bash scripts/gpu_check.sh` on a machine with an NVIDIA GPU.", ""]
    lines += [f"- GPUs: {', '.join(env.get('gpus') or []) or 'none'}; torch {env['torch']}, CUDA {env['cuda']}",
              f"- Transformer Engine: {_fmt(env.get('te'))}; flash-attn: {_fmt(env.get('flash_attn'))}; "
              f"apex grad-accum kernel: {_fmt(env.get('apex_grad_accum'))}"]
    if env.get("fusions"):
        lines.append("- fusions on: " + (", ".join(k for k, v in env["fusions"].items() if v) or "none"))
    for note in report.get("install_notes", []):
        lines.append(f"- install: {note}")
    t = report.get("tests")
    if t:
        lines += ["", "## tests/gpu", ""]
        if not t.get("ran"):
            lines.append(f"skipped: {t.get('why')}")
        else:
            lines.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")
            lines += [f"- FAILED {n}" for n in t["failed"]] + [f"- skipped {s}" for s in t["skip_reasons"]]
    a = report.get("attention")
    if a:
        lines += ["", f"## Attention: THD (varlen) vs padded, {a['batch']} documents padded to {a['max_len']} "
                      f"({a['padding_fraction']:.0%} padding), {a['heads']}/{a['kv_heads']} heads x {a['head_dim']}, "
                      f"{a['dtype']}, forward + backward", ""]
        rows = [[r["kernel"], _fmt(r.get("padded_ms"), ".2f"), _fmt(r.get("thd_ms"), ".2f"),
                 _fmt(r.get("speedup"), ".2f"), _fmt(r.get("max_abs_diff"), ".2e"),
                 r.get("skipped") or r.get("error") or ""] for r in a["rows"]]
        lines.append(markdown_table(["kernel", "padded ms", "THD ms", "speedup", "max abs diff", "note"], rows))
    m = report.get("model_steps")
    if m is not None:
        lines += ["", f"## Model step on one GPU ({report.get('model_step_setup', '')})", ""]
        rows = [[r["model"], r["mode"], r["layers"], r["dtype"], _fmt(r.get("median_step_s"), ".3f"),
                 _fmt(r.get("real_tokens_per_s"), ".0f"), _fmt(r.get("padding_fraction"), ".2f"),
                 _fmt(r.get("mfu"), ".1%") if r.get("mfu") is not None else "—",
                 _fmt(r.get("peak_memory_gib"), ".1f"), r.get("skipped") or r.get("error") or ""] for r in m]
        lines.append(markdown_table(["model", "mode", "layers", "dtype", "step s", "real tokens/s", "padding",
                                     "MFU", "peak GiB", "note"], rows))
    skipped = report.get("skipped", [])
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in skipped] or ["- nothing"])
    lines += ["", f"Wall time: {report.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> tuple:
    from megatron_pack.files.atomic import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "gpu_check.md")
    js = os.path.join(out_dir, "gpu_check.json")
    write_json_atomic(report, js)
    tmp = md + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(report))
    os.replace(tmp, md)
    return md, js


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
            out.append(f"model step {r['model']}/{r['mode']}: {r['skipped']}")
    return out + report.get("install_notes", [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out-dir", default="outputs/gpu_check")
    ap.add_argument("--tests-xml", default=None, help="pytest --junitxml of tests/gpu")
    ap.add_argument("--install-notes", default=None, help="file with one line per extra that could not be installed")
    ap.add_argument("--deadline", type=float, default=None, help="unix time by which to have finished")
    ap.add_argument("--allow-cpu", action="store_true", help="run the benchmarks on CPU at toy sizes (tests)")
    ap.add_argument("--models", default=None, help="comma list (default: tiny,llama3.2-1b on GPU, tiny on CPU)")
    ap.add_argument("--modes", default="padding,greedy,bfd")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch

    budget = Budget(args.deadline)
    report = {"environment": environment(), "tests": read_junit(args.tests_xml)}
    if args.install_notes and os.path.exists(args.install_notes):
        report["install_notes"] = [ln.strip() for ln in open(args.install_notes) if ln.strip()]
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        report["no_gpu"] = "torch.cuda.is_available() is False"
        report["tests"] = {"ran": False, "why": "no GPU"}
        report["skipped"] = collect_skips(report)
        report["seconds"] = time.time() - t0
        md, js = write(report, args.out_dir)
        print(f"no GPU: skipped (report: {md}, {js})")
        return 0
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    models = args.models.split(",") if args.models else (["tiny", ONE_B["name"]] if cuda else ["tiny"])
    from megatron_pack.parallel import destroy_distributed, initialize_distributed

    work = tempfile.mkdtemp(prefix="gpu_check_")
    model_args = model_arguments(models, work)
    matmul = matmul_parameters(model_args)  # before the process group (the planner fakes its own)
    initialize_distributed()  # one rank; train() below reuses the group
    try:
        if cuda:
            report["attention"] = attention_bench(device, batch=16, max_len=4096, heads=32, kv_heads=8, head_dim=128)
        else:
            report["attention"] = attention_bench(device, batch=4, max_len=64, heads=4, kv_heads=2, head_dim=16,
                                                  warmup=1, iters=2)
        seq, steps, gbs = (4096, args.steps or 8, 8) if cuda else (128, args.steps or 3, 4)
        report["model_step_setup"] = (f"seq {seq}, global batch {gbs} x micro-batch 1, {steps} steps (first not "
                                      f"timed), ~45% padding when padded, MFU = planner model FLOPs / step time / "
                                      f"peak bf16")
        report["model_steps"] = model_step_bench(device, work, model_args=model_args, matmul=matmul,
                                                 modes=args.modes.split(","), seq_length=seq, steps=steps, gbs=gbs,
                                                 budget=budget, seconds_per_run=45.0 if cuda else 0.0)
    finally:
        destroy_distributed()
        shutil.rmtree(work, ignore_errors=True)
    report["skipped"] = collect_skips(report)
    report["seconds"] = time.time() - t0
    md, js = write(report, args.out_dir)
    print(open(md).read())
    failed = report["tests"].get("failures", 0) + report["tests"].get("errors", 0)
    errors = [r for r in report["attention"]["rows"] + report["model_steps"] if "error" in r]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
