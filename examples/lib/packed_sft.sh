# Shared body of examples/run_llama3_{8b,70b}_packed.sh: knobs from the environment,
# flag groups in arrays, one torchrun line. The calling script sets MODEL and RECOMPUTE.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # the active environment's interpreter
DRY_RUN=${DRY_RUN:-0}                       # 1: run tools/plan_parallel.py with these settings instead
if [ "$DRY_RUN" = "1" ]; then DATA_PATH=${DATA_PATH:-}  # the planner costs every mode on a dataset or blend
else DATA_PATH=${DATA_PATH:?set DATA_PATH to the tools/preprocess_sft.py output prefix}; fi
TOKENIZER=${TOKENIZER:-}                    # tokenizer dir/file; default vocab: the preset's 128256
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${MODEL##*/}_${PACK_MODE:-greedy}}  # MODEL: a preset or a HF dir
LOAD_DIR=${LOAD_DIR:-$CHECKPOINT_DIR}       # resume this run; or an hf-to-megatron import to fine-tune from
                                            # (the same command then resumes from CHECKPOINT_DIR once it holds one)
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}

PACK_MODE=${PACK_MODE:-greedy}              # padding | greedy | random | bfd | windowed_bfd
DOCUMENT_MASK=${DOCUMENT_MASK:-1}           # 0 = the paper's setting (attention crosses samples)
SEQ_LENGTH=${SEQ_LENGTH:-4096}
TP=${TP:-8}
PP=${PP:-4}
CP=${CP:-1}                                 # context parallel: each document split over CP ranks (long sequences)
CP_COMM_TYPE=${CP_COMM_TYPE:-p2p}           # TE K/V exchange under CP with THD: p2p | a2a
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-3}
LR=${LR:-1e-5}
MIN_LR=${MIN_LR:-0}
WARMUP_RATIO=${WARMUP_RATIO:-0.2}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}

CHECK_ISOLATION=${CHECK_ISOLATION:-0}       # 1 = error: prove packed documents isolated on this layout before the
                                            # first step, exit 1 on a leak; warn: report, train; only: audit, no training
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}   # seconds torchrun waits on SIGTERM for the workers' save before SIGKILL

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
                  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --shutdown-timeout "$SHUTDOWN_TIMEOUT")
MODEL_ARGS=(--model "$MODEL" --bf16 --transformer-impl transformer_engine)
[ -n "${RECOMPUTE:-}" ] && MODEL_ARGS+=(--recompute-granularity "$RECOMPUTE")
[ -n "$TOKENIZER" ] && MODEL_ARGS+=(--tokenizer-model "$TOKENIZER")
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --context-parallel-size "$CP" --sequence-parallel --use-distributed-optimizer)
[ "$CP" != "1" ] && PARALLEL_ARGS+=(--cp-comm-type "$CP_COMM_TYPE")
DATA_ARGS=(--seq-length "$SEQ_LENGTH" --valid-fraction 0.01)
read -ra DATA_PATHS <<< "$DATA_PATH"      # a blend as in Megatron-LM: DATA_PATH="0.7 /data/a 0.3 /data/b"
[ -n "$DATA_PATH" ] && DATA_ARGS+=(--data-path "${DATA_PATHS[@]}")
PACKING_ARGS=(--pack-mode "$PACK_MODE")
[ "$DOCUMENT_MASK" = "0" ] && PACKING_ARGS+=(--no-document-mask)
TRAINING_ARGS=(--micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
               --train-epochs "$TRAIN_EPOCHS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
               --lr-warmup-fraction "$WARMUP_RATIO" --weight-decay 0.0 --clip-grad 1.0
               --adam-beta1 0.9 --adam-beta2 0.95)
CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --load "$LOAD_DIR" --save-interval "$SAVE_INTERVAL")
LOGGING_ARGS=(--log-interval 1 --tensorboard-dir "$TENSORBOARD_DIR")
AUDIT_ARGS=()                               # not passed to the planner (DRY_RUN)
case "$CHECK_ISOLATION" in 0) ;; 1) AUDIT_ARGS=(--check-isolation error) ;; *) AUDIT_ARGS=(--check-isolation "$CHECK_ISOLATION") ;; esac

# ---- DRY_RUN=1: validate the layout and cost the run (memory per GPU, step and epoch time
# per packing mode) with exactly these settings; exit 0 fits, 1 does not fit, 2 illegal layout.
if [ "$DRY_RUN" = "1" ]; then
    exec "$PYTHON" tools/plan_parallel.py --nnodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
        --gpu "${GPU:-a800-80gb}" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" \
        "${PACKING_ARGS[@]}" "${TRAINING_ARGS[@]}" ${PLAN_JSON:+--json "$PLAN_JSON"} ${MFU:+--mfu "$MFU"} "$@"
fi

# examples/slurm/*.sbatch source this file for the arrays only and launch with srun themselves.
if [ "${PACKED_SFT_ARRAYS_ONLY:-0}" = "1" ]; then return 0; fi

export CUDA_DEVICE_MAX_CONNECTIONS=1        # sequence-parallel comm/compute overlap (Megatron's advice)

torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_pack.train "${MODEL_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${AUDIT_ARGS[@]}" "$@"
