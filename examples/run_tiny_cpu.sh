#!/usr/bin/env bash
# Tiny model, 2 CPU ranks (gloo): preprocess the built-in sample, then train with packing.
#
#   bash examples/run_tiny_cpu.sh
#   PACK_MODE=greedy DOCUMENT_MASK=0 TRAIN_ITERS=50 bash examples/run_tiny_cpu.sh
#   CHECK_ISOLATION=only PP=2 bash examples/run_tiny_cpu.sh      # prove isolation on this layout, no training
#
# Runs exactly:
#   torchrun --nproc-per-node 2 -m megatron_pack.train \
#       "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" \
#       "${TRAINING_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${AUDIT_ARGS[@]}"
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
WORKDIR=${WORKDIR:-outputs/tiny_cpu}
PACK_MODE=${PACK_MODE:-bfd}                # padding | greedy | random | bfd | windowed_bfd
DOCUMENT_MASK=${DOCUMENT_MASK:-1}          # 0 = the paper's setting (no cu_seqlens mask)
SEQ_LENGTH=${SEQ_LENGTH:-512}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
TRAIN_ITERS=${TRAIN_ITERS:-20}
LR=${LR:-2e-3}
TP=${TP:-1}
PP=${PP:-1}
CHECK_ISOLATION=${CHECK_ISOLATION:-0}      # 1 = error (exit 1 on a leak) | warn | only (audit, no training)

mkdir -p "$WORKDIR"
DATA_PREFIX="$WORKDIR/data/sample"
if [ ! -f "${DATA_PREFIX}_summary.json" ]; then
    "${PYTHON:-python}" -c "import sys; from megatron_pack.demo import prepare_data; print(prepare_data(sys.argv[1]))" "$WORKDIR/data"
fi

MODEL_ARGS=(--model tiny --tokenizer-model "$WORKDIR/data/tokenizer" --no-bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --distributed-backend gloo)
DATA_ARGS=(--data-path "$DATA_PREFIX" --seq-length "$SEQ_LENGTH" --valid-fraction 0.05)
PACKING_ARGS=(--pack-mode "$PACK_MODE")
[ "$DOCUMENT_MASK" = "0" ] && PACKING_ARGS+=(--no-document-mask)
TRAINING_ARGS=(--micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
               --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 0 --lr-decay-style cosine
               --lr-warmup-fraction 0.1 --clip-grad 1.0 --log-interval 1 --eval-interval 10)
CHECKPOINT_ARGS=(--save "$WORKDIR/checkpoints" --load "$WORKDIR/checkpoints" --save-interval 10)
AUDIT_ARGS=()
case "$CHECK_ISOLATION" in 0) ;; 1) AUDIT_ARGS=(--check-isolation error) ;; *) AUDIT_ARGS=(--check-isolation "$CHECK_ISOLATION") ;; esac

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --nproc-per-node "$NPROC" -m megatron_pack.train \
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${AUDIT_ARGS[@]}"
