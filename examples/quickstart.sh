#!/usr/bin/env bash
# Quickstart: install, then preprocess the built-in sample and train the tiny model for one
# epoch under padding, greedy, random and bfd packing; prints the packing table and a
# results table (sequences, steps, median ms/step, epoch time, real tokens/s, speedup beside
# its ideal, final train loss, held-out loss; which columns are exact and which are timings is
# printed under it).
# A few minutes on 2 CPU cores; outputs under ./outputs/demo.
#
#   bash examples/quickstart.sh [extra demo flags, e.g. --modes padding bfd]
#
# Installs into the active Python (no venv is made; README "Two commands" gives the two lines).
# Runs exactly:  bash scripts/install.sh && $PYTHON -m megatron_pack.demo --output-dir "$OUTPUT_DIR" "$@"
# (PYTHON: the active environment's python; library warnings that say nothing actionable are
# filtered by the demo itself, megatron_pack/quiet.py)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-outputs/demo}
export PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # the active environment's interpreter
echo "quickstart: installing megatron_pack into $PYTHON (the active Python; README: use a venv to keep it apart)"
bash scripts/install.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PYTHON" -m megatron_pack.demo --output-dir "$OUTPUT_DIR" "$@"
