#!/usr/bin/env python
"""Checkpoint conversion benchmark: peak memory and seconds, HF <-> Megatron, on a synthetic model.

    python benchmarks/bench_convert.py                       # 8 layers, hidden 1536, bf16 (~0.6 GB)
    python benchmarks/bench_convert.py --layers 16 --hidden 2048 --ffn 5632 --json out.json

Writes a random Llama-shaped HF directory (sharded safetensors), then runs each conversion in
a fresh process and reports the growth of its peak resident set (``VmHWM`` after the
conversion minus ``VmRSS`` before it, the high-water mark reset after the imports) next to the model, one layer and one
embedding table:

* ``hf-to-megatron`` at TP2 x PP2 (the import format),
* ``megatron-to-hf`` from that import,
* ``megatron-to-hf`` from a torch_dist training checkpoint (saved by Megatron-Core from a
  model loaded with the import; the reader asks for one layer box at a time).

Streaming means the growth tracks one layer plus one output shard, not the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap

import torch

from megatron_pack.convert import mapping as M
from megatron_pack.convert.hf_config import preset_from_hf_config
from megatron_pack.convert.hf_safetensors import ShardedSafetensorsWriter

MEASURE = textwrap.dedent("""
    import json, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch, safetensors.torch, torch.distributed.checkpoint, tqdm
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    # ru_maxrss survives fork+exec (it would report the parent's peak): reset the high-water mark.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    t0 = time.perf_counter()
    kind, src, dst, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if kind == "hf-to-megatron":
        convert_hf_to_megatron(src, dst, progress=False, **extra)
    else:
        convert_megatron_to_hf(src, dst, progress=False, **extra)
    secs = time.perf_counter() - t0
    after = status("VmHWM")
    print(json.dumps({"growth": after - before, "seconds": secs}))
""")

SAVE_DIST = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing
    from megatron_pack.checkpoint.imported import load_imported_weights, preset_from_metadata, read_import_metadata
    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import transformer_config
    from megatron_pack.parallel import initialize_distributed, set_seed
    import os, json, torch

    def main():
        imp, out = sys.argv[1], sys.argv[2]
        initialize_distributed(1, 1)
        set_seed(1)
        preset = preset_from_metadata(read_import_metadata(imp))
        model = build_model(preset, transformer_config(preset, bf16=True, use_cpu_initialization=True))
        load_imported_weights(imp, model)
        it = os.path.join(out, "iter_0000001")
        os.makedirs(it)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, it)
        with open(os.path.join(it, "run_config.json"), "w") as fh:
            json.dump({"model": {"model": "hf", "vocab_size": preset.vocab_size}}, fh)
        open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write("1")

    if __name__ == "__main__":
        main()
""")


def write_hf(path: str, cfg: dict, dtype: torch.dtype, shard_bytes: int) -> int:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    p = preset_from_hf_config(cfg)
    shapes = M.hf_shapes(p)
    w = ShardedSafetensorsWriter(path, shard_bytes)
    g = torch.Generator().manual_seed(0)
    for n, s in shapes["top"].items():
        w.add(n, (torch.randn(*s, generator=g) * 0.02).to(dtype))
    for i in range(p.num_layers):
        for n, s in shapes["layer"].items():
            w.add(M.hf_layer_key(i, n), (torch.randn(*s, generator=g) * 0.02).to(dtype))
    w.close()
    return w.total_size


def measure(kind: str, src: str, dst: str, extra: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, src, dst, json.dumps(extra)], env=env, capture_output=True, text=True
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--no-dist", action="store_true", help="skip the torch_dist checkpoint export")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.layers,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    preset = preset_from_hf_config(cfg)
    el = torch.tensor([], dtype=dtype).element_size()
    layer_bytes = sum(int(torch.Size(s).numel()) for s in M.hf_shapes(preset)["layer"].values()) * el
    table_bytes = args.vocab * args.hidden * el
    root = tempfile.mkdtemp(prefix="bench_convert_")
    rows = []
    try:
        hf = os.path.join(root, "hf")
        model_bytes = write_hf(hf, cfg, dtype, shard_bytes=200 * 10**6)
        imp, back, dist, back2 = (os.path.join(root, n) for n in ("imp", "back", "dist", "back_dist"))
        shard = 100 * 10**6
        runs = [
            (
                "hf-to-megatron TP2 PP2",
                "hf-to-megatron",
                hf,
                imp,
                {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
            ),
            ("megatron-to-hf from import", "megatron-to-hf", imp, back, {"max_shard_size": shard}),
        ]
        for name, kind, src, dst, extra in runs:
            rows.append({"conversion": name, **measure(kind, src, dst, extra)})
        if not args.no_dist:
            imp1 = os.path.join(root, "imp1")
            measure("hf-to-megatron", hf, imp1, {})
            subprocess.run(
                [sys.executable, "-c", SAVE_DIST, imp1, dist],
                check=True,
                capture_output=True,
                env=dict(os.environ, PYTHONWARNINGS="ignore"),
            )
            shutil.rmtree(imp1)
            rows.append({"conversion": "megatron-to-hf from torch_dist", **measure_dist(dist, back2, shard, cfg)})
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = 2**20
    print(
        f"model {model_bytes / mb:.0f} MiB ({args.dtype}, {args.layers} layers, hidden {args.hidden}, ffn "
        f"{args.ffn}, vocab {args.vocab}); one layer {layer_bytes / mb:.0f} MiB, one embedding table "
        f"{table_bytes / mb:.0f} MiB, output shard limit {shard / mb:.0f} MiB"
    )
    print(f"{'conversion':34s} {'peak RSS growth':>16s} {'x model':>8s} {'x layer':>8s} {'seconds':>8s}")
    for r in rows:
        print(
            f"{r['conversion']:34s} {r['growth'] / mb:13.0f} MiB {r['growth'] / model_bytes:8.2f} "
            f"{r['growth'] / layer_bytes:8.2f} {r['seconds']:8.1f}"
        )
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "model_bytes": model_bytes,
                    "layer_bytes": layer_bytes,
                    "table_bytes": table_bytes,
                    "rows": rows,
                    "args": vars(args),
                },
                f,
                indent=1,
            )


def measure_dist(dist: str, out: str, shard: int, cfg: dict) -> dict:
    """The torch_dist checkpoint has no preset name in its run_config: export via a preset built
    from the HF config, registered under the name the run_config gives."""
    code = MEASURE.replace(
        "from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf",
        "from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf\n"
        "from megatron_pack.convert.hf_config import preset_from_hf_config\n"
        "from megatron_pack.model import presets\n"
        f"presets.PRESETS['hf'] = preset_from_hf_config({cfg!r})",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, "-c", code, "megatron-to-hf", dist, out, json.dumps({"max_shard_size": shard})],
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
