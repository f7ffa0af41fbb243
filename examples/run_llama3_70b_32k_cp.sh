#!/usr/bin/env bash
# Long-context SFT: Llama-3-70B at 32k tokens per sequence on the paper's 4 nodes x 8 A800,
# TP 8 x PP 2 x CP 2 (DP 1), sequence parallel, distributed optimizer, full recompute, bf16,
# Transformer Engine THD attention with context parallelism (K/V ring, --cp-comm-type p2p).
# Every document is padded to a multiple of lcm(2*CP, TP*CP) = 16 tokens and each CP rank
# takes 2 of its 4 chunks; the packer packs the padded lengths, so --seq-length is never
# exceeded. Run it on every node:
#
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=6000 GPUS_PER_NODE=8 \
#   DATA_PATH=/data/sft/longalign_llama3 TOKENIZER=/models/Meta-Llama-3-70B \
#   bash examples/run_llama3_70b_32k_cp.sh
#
# Runs exactly:
#   torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_pack.train "${MODEL_ARGS[@]}" \
#       "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" "${TRAINING_ARGS[@]}" \
#       "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${AUDIT_ARGS[@]}" "$@"
#   DRY_RUN=1 bash examples/run_llama3_70b_32k_cp.sh   plans it instead (memory per GPU with the
#   CP options and the smallest CP that fits, K/V exchange time); DATA_PATH optional.
# Knobs and flag arrays live in examples/lib/packed_sft.sh, shared with the other Llama-3 scripts.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-llama3-70b}
RECOMPUTE=${RECOMPUTE-full}
SEQ_LENGTH=${SEQ_LENGTH:-32768}
TP=${TP:-8}
PP=${PP:-2}
CP=${CP:-2}
PACK_MODE=${PACK_MODE:-bfd}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${MODEL}_32k_cp${CP}}
source examples/lib/packed_sft.sh
