#!/usr/bin/env bash
# Llama-3-8B SFT with sequence packing on Megatron-Core: the "Packing Analysis" paper's setup
# (4 nodes x 8 A800, TP 8, PP 4, sequence parallel, distributed optimizer, bf16, Transformer
# Engine, seq 4096, lr 1e-5 cosine, warmup ratio 0.2). Run it on every node:
#
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=6000 GPUS_PER_NODE=8 \
#   DATA_PATH=/data/sft/tulu_llama3 TOKENIZER=/models/Meta-Llama-3-8B \
#   PACK_MODE=greedy DOCUMENT_MASK=1 bash examples/run_llama3_8b_packed.sh
#
# Runs exactly:
#   torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_pack.train "${MODEL_ARGS[@]}" \
#       "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" "${TRAINING_ARGS[@]}" \
#       "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${AUDIT_ARGS[@]}" "$@"
# (extra flags after the script name are passed through; --help lists them all).
#   DRY_RUN=1 bash examples/run_llama3_8b_packed.sh   runs tools/plan_parallel.py with the same
#   settings instead (memory per GPU, step/epoch time per packing mode; DATA_PATH optional).
# Knobs and flag arrays live in examples/lib/packed_sft.sh, shared with the other Llama-3 script.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-llama3-8b}
RECOMPUTE=${RECOMPUTE-}
source examples/lib/packed_sft.sh
