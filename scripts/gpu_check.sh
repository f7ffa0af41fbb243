#!/usr/bin/env bash
# One command for a machine with one or more NVIDIA GPUs:
#
#   bash scripts/gpu_check.sh            # report in outputs/gpu_check/gpu_check.{md,json}
#
# 1. installs the GPU extras if missing (Transformer Engine; flash-attn only from a prebuilt
#    wheel: building it takes far longer than this check has), each failure noted in the report;
# 2. runs tests/gpu (pytest, JUnit XML kept beside the report);
# 3. benchmarks/gpu_check.py: THD varlen vs padded attention at ~45% padding, and one-GPU
#    training steps of the tiny and a 1.2B model under padding / greedy / bfd with TE and bf16
#    (real tokens/s, MFU from the planner's FLOP count, peak memory); writes the report;
# 4. benchmarks/bench_train_vs_hf.py at the 1B shape: megatron_pack (TE layers, bf16) bfd /
#    padding / greedy against transformers' Trainer (flash-attn 2 where installed, else SDPA;
#    bf16 autocast) and TRL's padding-free packing, the same conversations and real tokens:
#    tokens/s, MFU and the ratio to the fastest transformers setting, in train_vs_hf.{md,json}.
#
# Without a GPU it writes a "no GPU: skipped" report and exits 0 (CI runs it that way).
# Exit status: 0 when everything that ran passed, 1 when a GPU test or benchmark failed.
# Knobs: OUT_DIR, PYTHON, BUDGET_S (whole check, default 600 s: 10 min on one H100/H200),
#        VS_HF_BUDGET_S (the part of it kept for step 4, default 240), INSTALL_TIMEOUT_S
#        (default 240), SKIP_INSTALL=1, GPU_CHECK_ARGS / VS_HF_ARGS (extra benchmark flags).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT_DIR:-outputs/gpu_check}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-600}
VS_HF_BUDGET_S=${VS_HF_BUDGET_S:-240}
INSTALL_TIMEOUT_S=${INSTALL_TIMEOUT_S:-240}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
CHECK_DEADLINE=$((DEADLINE - VS_HF_BUDGET_S))  # steps 2-3 end here; step 4 has the rest
mkdir -p "$OUT_DIR"
NOTES="$OUT_DIR/install_notes.txt"
: > "$NOTES"
rm -f "$OUT_DIR/gpu_tests.xml"

cuda_ok() { "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 || ! cuda_ok; then
    echo "gpu_check: no usable NVIDIA GPU (nvidia-smi or torch.cuda); writing the 'no GPU: skipped' report"
    exec "$PYTHON" benchmarks/gpu_check.py --out-dir "$OUT_DIR"
fi
nvidia-smi -L

# ---- 1. GPU extras ------------------------------------------------------------------------
have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
install() {  # install NAME SPEC [pip flags...]: bounded in time, logged, failure noted
    local name=$1 spec=$2; shift 2
    echo "gpu_check: installing $spec"
    if ! timeout "$INSTALL_TIMEOUT_S" "$PYTHON" -m pip install --no-build-isolation "$@" "$spec" \
            > "$OUT_DIR/install_$name.log" 2>&1; then
        echo "$name not installed (pip failed or took over ${INSTALL_TIMEOUT_S} s; see install_$name.log)" >> "$NOTES"
    fi
}
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    have transformer_engine.pytorch || install transformer_engine "transformer-engine[pytorch]>=2.0"
    have flash_attn || install flash_attn "flash-attn>=2.6" --only-binary=:all:
else
    echo "install skipped (SKIP_INSTALL=1)" >> "$NOTES"
fi
have transformer_engine.pytorch || echo "Transformer Engine unavailable: TE layers and TE attention skipped" >> "$NOTES"
have flash_attn || echo "flash-attn unavailable: its kernels skipped" >> "$NOTES"

# ---- 2. tests/gpu -------------------------------------------------------------------------
left=$((CHECK_DEADLINE - $(date +%s)))
tests_budget=$(( left > 360 ? 180 : left / 2 ))
echo "gpu_check: pytest tests/gpu (at most ${tests_budget} s)"
timeout "$tests_budget" "$PYTHON" -m pytest -q tests/gpu -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml" \
    > "$OUT_DIR/gpu_tests.log" 2>&1
rc=$?
[ "$rc" = "124" ] && echo "tests/gpu stopped after ${tests_budget} s (time budget)" >> "$NOTES"
tail -n 3 "$OUT_DIR/gpu_tests.log"

# ---- 3. benchmark and report --------------------------------------------------------------
"$PYTHON" benchmarks/gpu_check.py --out-dir "$OUT_DIR" --tests-xml "$OUT_DIR/gpu_tests.xml" \
    --install-notes "$NOTES" --deadline "$CHECK_DEADLINE" ${GPU_CHECK_ARGS:-}
bench=$?

# ---- 4. the same model and data through transformers / TRL ------------------------------------
[ "${SKIP_INSTALL:-0}" = "1" ] || have trl || install trl "trl>=1.0"
have trl || echo "trl unavailable: the TRL packing row of the transformers comparison skipped" >> "$NOTES"
left=$((DEADLINE - $(date +%s)))
if [ "$left" -gt 60 ]; then
    echo "gpu_check: bench_train_vs_hf.py at the 1B shape (at most ${left} s)"
    timeout "$left" "$PYTHON" benchmarks/bench_train_vs_hf.py --device cuda --shape 1b --steps 4 --repeats 1 \
        --conversations 600 --budget-s $((left - 30)) --timeout-s $((left - 20)) \
        --settings mp_bfd hf_grouped trl_packing hf_pad_max mp_padding mp_greedy \
        --json "$OUT_DIR/train_vs_hf.json" --markdown "$OUT_DIR/train_vs_hf.md" ${VS_HF_ARGS:-} \
        > "$OUT_DIR/train_vs_hf.log" 2>&1
    vs_hf=$?
    [ "$vs_hf" = "124" ] && echo "bench_train_vs_hf.py stopped after ${left} s (time budget)" >> "$NOTES"
    tail -n 12 "$OUT_DIR/train_vs_hf.log"
else
    echo "bench_train_vs_hf.py not run: ${left} s left of BUDGET_S" | tee -a "$NOTES"
fi
echo "gpu_check: report $OUT_DIR/gpu_check.md ($(( $(date +%s) - START )) s)"
exit "$bench"
