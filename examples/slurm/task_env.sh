#!/usr/bin/env bash
# One srun task = one training rank: torchrun's environment from SLURM's, then exec the command.
export RANK=${SLURM_PROCID:?not an srun task} WORLD_SIZE=${SLURM_NTASKS:?} LOCAL_RANK=${SLURM_LOCALID:?}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}} NODE_RANK=${SLURM_NODEID:-0}
exec "$@"
