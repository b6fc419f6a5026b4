#!/usr/bin/env bash
# The batch script slurm_submit.sh hands to sbatch:
# `slurm_job.sh srun|torchrun|single PROGRAM ARGS...`.
# Runs inside the allocation, so SLURM_* describe it; cluster.env is read again (through
# common.sh) so the ranks see the same settings as the submitter.
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the recipes through the
# variable slurm_submit.sh exported.
source "$FLEX_RECIPES_DIR/common.sh"
mode="$1"; shift
echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], mode $mode: $*"
if [[ "$mode" == torchrun ]]; then
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    exec srun --kill-on-bad-exit=1 "$FLEX_PYTHON" -m torch.distributed.run \
        --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$FLEX_TASKS_PER_NODE" \
        --rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID" \
        --rdzv-endpoint="$head_node:$FLEX_RDZV_PORT" "$@"
fi
if [[ "$mode" == single ]]; then
    exec "$FLEX_PYTHON" "$@"
fi
exec srun --kill-on-bad-exit=1 "$FLEX_PYTHON" "$@"
