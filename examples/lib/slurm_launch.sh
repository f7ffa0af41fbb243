# Shared body of examples/slurm/llama3_{8b,70b}.sbatch: the SLURM allocation -> the flag arrays
# of examples/lib/packed_sft.sh (the same knobs and flags as the plain scripts) -> one srun line.
# The calling script sets MODEL and RECOMPUTE and runs from the repository root.
#
# LAUNCHER=srun (default): one task per GPU; each task maps SLURM_PROCID/LOCALID/NTASKS to
#   RANK/LOCAL_RANK/WORLD_SIZE (examples/slurm/task_env.sh) and runs python itself, so SLURM's
#   signals reach the training ranks directly.
# LAUNCHER=torchrun: one task per node running torchrun with a c10d rendezvous on the first node.
#   torchrun's agent gives its workers 30 s after SIGTERM before SIGKILL, which can cut a large
#   checkpoint save short; that is why srun is the default.
# PRINT_ONLY=1: print the exact launch line and exit (no srun).
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?not inside a SLURM allocation (SLURM_NNODES unset): submit with sbatch}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [ -z "${MASTER_ADDR:-}" ]; then               # the allocation's first node (no `| head`: SIGPIPE + pipefail)
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${HOSTS[0]:?scontrol show hostnames gave no node for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
LAUNCHER=${LAUNCHER:-srun}
PRINT_ONLY=${PRINT_ONLY:-0}
export MASTER_ADDR MASTER_PORT

PACKED_SFT_ARRAYS_ONLY=1
source examples/lib/packed_sft.sh
TRAIN_ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PACKING_ARGS[@]}" "${TRAINING_ARGS[@]}"
            "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${AUDIT_ARGS[@]}" "$@")

case "$LAUNCHER" in
    srun)
        LAUNCH=(srun --nodes "$NNODES" --ntasks-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1 --cpu-bind=none
                examples/slurm/task_env.sh python3 -m megatron_pack.train) ;;
    torchrun)
        LAUNCH=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --cpu-bind=none
                torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d
                --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" -m megatron_pack.train) ;;
    *) echo "LAUNCHER must be srun or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} nodes x ${GPUS_PER_NODE} GPUs, master" \
     "${MASTER_ADDR}:${MASTER_PORT}; checkpoints ${CHECKPOINT_DIR} (a requeued job resumes from its latest)"
printf '%q ' "${LAUNCH[@]}" "${TRAIN_ARGS[@]}"; echo
if [ "$PRINT_ONLY" = "1" ]; then exit 0; fi

export CUDA_DEVICE_MAX_CONNECTIONS=1        # sequence-parallel comm/compute overlap (Megatron's advice)

# Near the time limit (#SBATCH --signal=B:USR1@...) the ranks get SIGTERM through srun, save at
# the next step boundary and exit 0; then this job requeues itself and resumes (--load = --save).
# A scheduler preemption sends SIGTERM to the ranks directly and requeues on its own (--requeue).
REQUEUE=0
on_time_limit() {
    echo "job ${SLURM_JOB_ID}: time limit near, checkpointing then requeueing"
    REQUEUE=1
    kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap on_time_limit USR1
"${LAUNCH[@]}" "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
set +e
while true; do
    wait "$SRUN_PID"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi  # a trapped signal woke wait
    break
done
set -e
if [ "$REQUEUE" = "1" ] && [ "$rc" = "0" ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
