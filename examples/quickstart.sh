#!/usr/bin/env bash
# Quickstart: install, then preprocess the built-in sample and train the tiny model for one
# epoch under padding, greedy, random and bfd packing; prints the packing table and a
# results table (steps, wall time, real tokens/s, final train loss, held-out loss).
# A few minutes on 2 CPU cores; outputs under ./outputs/demo.
#
#   bash examples/quickstart.sh [extra demo flags, e.g. --modes padding bfd]
#
# Runs exactly:  bash scripts/install.sh && python3 -m megatron_pack.demo --output-dir "$OUTPUT_DIR" "$@"
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-outputs/demo}
bash scripts/install.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore} \
    python3 -m megatron_pack.demo --output-dir "$OUTPUT_DIR" "$@"
