#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, offline included (nothing is fetched):
#
#   bash scripts/gather_gpu_bundle.sh        # once, where the registries are reachable
#   GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh   # on the GPU machine, the tree + .gpu_bundle carried
#
# Steps, each with a hard time limit inside BUDGET_S (default 420 s = 7 min, the install included):
#  1. install: only from the bundle (.gpu_bundle/, scripts/gather_gpu_bundle.sh), never from the
#     network: each wheel of wheels.txt whose module is missing or too old goes into a fresh
#     --target folder on PYTHONPATH; _packing is copied from the bundle (or built with pybind11)
#     when this Python has none. Transformer Engine, flash-attn, trl are used only where already
#     installed (a cluster's container); what is absent is named in the report as skipped;
#  2. tests/gpu (pytest, JUnit XML; the flex_attention tests, which compile, in a second run);
#  3. benchmarks/gpu_check.py: the bf16 matmul rate, packed (varlen, flex, flash, TE, per-document
#     SDPA) vs padded attention fwd+bwd at ~45% padding, train() steps of the tiny model;
#  4. train --check-isolation only on the 1B shape: packed documents must not see each other
#     (its verdict is a line of the report's notes; a leak makes the exit status 1);
#  5. benchmarks/bench_train_vs_hf.py at the 1B shape (Llama-3.2-1B's): megatron_pack bfd /
#     padding / greedy through train() against transformers' Trainer (SDPA, or flash-attn 2
#     where installed; TRL only where installed) on the same conversations: real tokens/s, MFU,
#     peak memory, the ratio to the fastest transformers setting;
#  6. the report: gpu_check.md (the summary tables), gpu_check.json, gpu_tests{,_flex}.xml,
#     train_vs_hf.{md,json} and logs.tar.gz (every log) in GPU_CHECK_OUT: at most 7 files.
#
# Without a GPU it installs (step 1), writes the "no GPU: skipped" report and exits 0.
# Exit status: 0 when everything that ran passed, 1 when a GPU test or benchmark failed or the audit
# found a leak.
# Knobs: GPU_CHECK_OUT (report folder, default outputs/gpu_check), GPU_BUNDLE (default .gpu_bundle),
#        GPU_CHECK_SITE (install target, default a fresh /tmp folder), PYTHON (default python3),
#        BUDGET_S, GPU_CHECK_ARGS / VS_HF_ARGS (extra flags of steps 3 / 5).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-outputs/gpu_check}
BUNDLE=${GPU_BUNDLE:-$ROOT/.gpu_bundle}
SITE=${GPU_CHECK_SITE:-$(mktemp -d /tmp/megatron_pack_site.XXXXXX)}
BUDGET_S=${BUDGET_S:-420}
RESERVE_S=25  # kept for the report (step 6)
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)  # logs; tarred into logs.tar.gz after every step
NOTES=$WORK/notes.txt
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MEGATRON_PACK_QUIET=1
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" "$SITE"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/gpu_check.md "$OUT_DIR"/gpu_check.json "$OUT_DIR"/gpu_tests*.xml "$OUT_DIR"/train_vs_hf.md \
      "$OUT_DIR"/train_vs_hf.json "$OUT_DIR"/logs.tar.gz
: > "$NOTES"

note() { echo "$*" >> "$NOTES"; echo "gpu_check: $*"; }
snapshot() { tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" . 2>/dev/null || true; }
cap() {  # cap SECONDS: that many, or what is left before the report's reserve if less (>= 1)
    local left=$((DEADLINE - RESERVE_S - $(date +%s)))
    [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
py_ok() { "$PYTHON" -c "$1" >/dev/null 2>&1; }

# ---- 1. install from the bundle only ---------------------------------------------------------
needs() {  # needs MODULE MIN_VERSION: true when MODULE is missing or older ("-": any version will do)
    # found without importing it (megatron.core would import torch: seconds per check)
    ! "$PYTHON" - "$1" "$2" >/dev/null 2>&1 <<'PY'
import importlib.metadata as md, importlib.util, sys
name, least = sys.argv[1], sys.argv[2]
if importlib.util.find_spec(name) is None:
    sys.exit(1)
if least != "-":
    dists = md.packages_distributions().get(name.split(".")[0], [])
    have = max((md.version(d) for d in dists), default="0")
    try:
        from packaging.version import Version
    except ImportError:
        sys.exit(3)
    sys.exit(0 if Version(have) >= Version(least) else 3)
PY
}
install_bundle() {
    if [ ! -f "$BUNDLE/wheels.txt" ]; then
        needs megatron.core - && note "megatron-core missing and no bundle at $BUNDLE:" \
            "run scripts/gather_gpu_bundle.sh where the registries are reachable and carry .gpu_bundle"
        return
    fi
    local whl mod minv
    while read -r whl mod minv; do
        [ -n "$whl" ] || continue
        if ! needs "$mod" "$minv"; then
            note "install: $mod already importable here; bundle's $whl not installed"
            continue
        fi
        if timeout "$(cap 90)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$SITE" "$BUNDLE/wheels/$whl" < /dev/null > "$WORK/install_$mod.log" 2>&1 \
                && ! needs "$mod" "$minv"; then
            note "install: $whl from the bundle into $SITE"
        else
            note "install: $whl FAILED (see install_$mod.log in logs.tar.gz)"
        fi
    done < "$BUNDLE/wheels.txt"
}
install_packing() {  # the compiled packing engine for this Python
    if py_ok "import megatron_pack._packing"; then
        note "install: _packing already built for this Python"
        return
    fi
    local suffix
    suffix=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if [ -f "$BUNDLE/ext/_packing$suffix" ]; then
        cp "$BUNDLE/ext/_packing$suffix" megatron_pack/ && py_ok "import megatron_pack._packing" \
            && { note "install: _packing$suffix from the bundle"; return; }
        rm -f "megatron_pack/_packing$suffix"
    fi
    if timeout "$(cap 120)" ${CXX:-g++} -O3 -shared -std=c++17 -fPIC -fvisibility=hidden \
            $("$PYTHON" -m pybind11 --includes 2>/dev/null) csrc/packing.cpp -o "megatron_pack/_packing$suffix" \
            > "$WORK/install_packing.log" 2>&1 && py_ok "import megatron_pack._packing"; then
        note "install: _packing built here with pybind11 (not in the bundle for $suffix)"
    else
        rm -f "megatron_pack/_packing$suffix"
        note "install: _packing unavailable (no bundle build for $suffix, compile failed): pure-Python planner"
    fi
}
echo "gpu_check: python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), bundle $BUNDLE, site $SITE"
install_bundle
install_packing
py_ok "import transformer_engine.pytorch" || note "skipped: Transformer Engine not installed (cannot travel:" \
    "~180 MB CUDA wheel + a compiled torch extension): TE layers and TE attention"
py_ok "import flash_attn" || note "skipped: flash-attn not installed (source only): its kernels"
py_ok "import trl, datasets" \
    || note "skipped: trl/datasets not installed: the TRL packing row of the transformers comparison"
note "install took $(( $(date +%s) - START )) s"
snapshot

report() {  # step 6, also the whole check without a GPU
    timeout 60 "$PYTHON" benchmarks/gpu_check.py --phase report --out-dir "$OUT_DIR" --install-notes "$NOTES" \
        --measured "$WORK/measured.json" --tests-xml "$OUT_DIR/gpu_tests.xml,$OUT_DIR/gpu_tests_flex.xml" \
        --vs-hf "$OUT_DIR/train_vs_hf.json" > "$WORK/report.log" 2>&1
    local rc=$?
    cat "$WORK/report.log"
    snapshot
    return $rc
}

cuda_ok() { py_ok "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 || ! cuda_ok; then
    echo "gpu_check: no usable NVIDIA GPU (nvidia-smi or torch.cuda); writing the 'no GPU: skipped' report"
    report
    exit 0
fi
nvidia-smi -L
"$PYTHON" -c "import inspect, torch; from megatron_pack.model.fused_varlen import varlen_fn as f
print('torch', torch.__version__, torch.cuda.get_device_name(0)); fn = f()
print('varlen_attn' + str(inspect.signature(fn)) if fn else 'no torch.nn.attention.varlen')" \
    2>&1 | tee "$WORK/torch.txt"

# ---- 2. tests/gpu ----------------------------------------------------------------------------
# in two runs, so that flex_attention's compilations cannot cost the other results: a pytest
# stopped by its time limit writes no JUnit XML
gpu_tests() {  # gpu_tests NAME SECONDS PYTEST_ARGS...
    local name=$1 t; t=$(cap "$2"); shift 2
    echo "gpu_check: pytest tests/gpu $* (at most $t s)"
    timeout "$t" "$PYTHON" -m pytest -q tests/gpu -p no:cacheprovider --junitxml "$OUT_DIR/$name.xml" "$@" \
        > "$WORK/$name.log" 2>&1
    [ $? = 124 ] && note "tests/gpu $* stopped after $t s (time budget)"
    tail -n 3 "$WORK/$name.log"
    snapshot
}
gpu_tests gpu_tests 75 -k "not flex"
gpu_tests gpu_tests_flex 50 -k flex

# ---- 3. matmul rate, attention, tiny train() steps -------------------------------------------
t=$(cap 90)
echo "gpu_check: benchmarks/gpu_check.py --phase measure (at most $t s)"
timeout "$t" "$PYTHON" benchmarks/gpu_check.py --phase measure --measured "$WORK/measured.json" \
    --deadline $(( $(date +%s) + t - 5 )) ${GPU_CHECK_ARGS:-} > "$WORK/measure.log" 2>&1
[ $? = 124 ] && note "gpu_check.py measure stopped after $t s (time budget)"
tail -n 5 "$WORK/measure.log"
snapshot

# ---- 4. isolation audit on the 1B shape -------------------------------------------------------
# train --check-isolation only on Llama-3.2-1B's shape (random init, bf16, the kernels the spec
# picks here): packed documents must not see each other; its report goes to the log archive.
ISO=$WORK/isolation
mkdir -p "$ISO"
cat > "$ISO/llama-1b.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
 "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 128256,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
 "hidden_act": "silu", "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
JSON
t=$(cap 90)
echo "gpu_check: train --check-isolation only at the 1B shape (at most $t s)"
iso_rc=0
if "$PYTHON" -c "import sys; from megatron_pack.demo import prepare_data; print(prepare_data(sys.argv[1]))" \
        "$ISO/data" > "$ISO/data.log" 2>&1; then
    timeout "$t" "$PYTHON" -m megatron_pack.train --data-path "$ISO/data/sample" --model "$ISO/llama-1b.json" \
        --vocab-size 128256 --seq-length 2048 --micro-batch-size 2 --global-batch-size 2 --train-iters 1 \
        --valid-fraction 0 --bf16 --check-isolation only --log-file "$ISO/log.jsonl" > "$ISO/isolation.log" 2>&1
    iso_rc=$?
    case $iso_rc in
        0) note "isolation audit (1B shape): $(grep -m1 '^> isolation:' "$ISO/isolation.log" || echo isolated)";;
        1) note "isolation audit (1B shape): LEAK: $(grep -m1 -i 'isolation' "$ISO/isolation.log" | tail -c 300)";;
        124) note "isolation audit stopped after $t s (time budget)"; iso_rc=0;;
        *) note "isolation audit failed to run (exit $iso_rc): see isolation/isolation.log";;
    esac
else
    note "isolation audit not run: the sample data could not be prepared (isolation/data.log)"
fi
grep -A8 '^> isolation audit' "$ISO/isolation.log" | head -12
rm -rf "$ISO/data"
snapshot

# ---- 5. the same model and data through transformers -----------------------------------------
t=$(cap 400)
if [ "$t" -gt 60 ]; then
    echo "gpu_check: bench_train_vs_hf.py at the 1B shape (at most $t s)"
    timeout "$t" "$PYTHON" benchmarks/bench_train_vs_hf.py --device cuda --shape 1b --steps 4 --repeats 1 \
        --conversations 400 --budget-s $((t - 25)) --timeout-s $((t - 20)) --workdir "$WORK/vs_hf" \
        --settings mp_bfd hf_grouped mp_padding hf_pad_max mp_greedy trl_packing \
        --json "$OUT_DIR/train_vs_hf.json" --markdown "$OUT_DIR/train_vs_hf.md" ${VS_HF_ARGS:-} \
        > "$WORK/train_vs_hf.log" 2>&1
    [ $? = 124 ] && note "bench_train_vs_hf.py stopped after $t s (time budget)"
    rm -rf "$WORK/vs_hf"  # the 1B checkpoints: not for the log archive
    tail -n 12 "$WORK/train_vs_hf.log"
else
    note "bench_train_vs_hf.py not run: $t s left of BUDGET_S"
fi

# ---- 6. report -------------------------------------------------------------------------------
report
rc=$?
[ "$iso_rc" != 0 ] && rc=1
echo "gpu_check: report in $OUT_DIR ($(ls "$OUT_DIR" | wc -l) files, $(( $(date +%s) - START )) s)"
exit $rc
