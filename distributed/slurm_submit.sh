#!/usr/bin/env bash
# Submit a flex_surgery program as a SLURM batch job with the settings of cluster.env.
#
#   distributed/slurm_submit.sh [--wait] [--torchrun|--single] [--dry-run] [PROGRAM ARGS...]
#
# PROGRAM is a script (examples/foo.py) or `-m module`; default: distributed/check_cluster.py.
# Without a mode flag, srun starts FLEX_NODES x FLEX_TASKS_PER_NODE ranks directly and each finds
# its place with flex_surgery.launch.init_from_env() (SLURM_PROCID & co). With --torchrun, srun
# starts one torchrun per node that rendezvous on the first node (for programs that expect
# torchrun's environment). With --single, one process gets the cores of all ranks of one node:
# for drivers that start their own ranks, like `python -m flex_surgery demo` (see demo.sh).
# --wait blocks until the job ends and returns its exit code; --dry-run prints the sbatch
# command. Logs go to $FLEX_JOB_DIR/<job id>.out.
set -euo pipefail
source "$(dirname "$0")/common.sh"

wait_flag=() mode=srun dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wait) wait_flag=(--wait); shift ;;
        --torchrun) mode=torchrun; shift ;;
        --single) mode=single; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || set -- distributed/check_cluster.py

nodes="$FLEX_NODES"
[[ "$mode" == single ]] && nodes=1
args=(--job-name=flex_surgery --nodes="$nodes" --time="$FLEX_TIME_MIN"
      --output="$FLEX_JOB_DIR/%j.out" --chdir="$REPO_ROOT" --export=ALL)
if [[ "$mode" != srun ]]; then
    args+=(--ntasks-per-node=1 --cpus-per-task=$(( ${FLEX_CPUS_PER_TASK:-1} * FLEX_TASKS_PER_NODE )))
else
    args+=(--ntasks-per-node="$FLEX_TASKS_PER_NODE")
    [[ -n "${FLEX_CPUS_PER_TASK:-}" ]] && args+=(--cpus-per-task="$FLEX_CPUS_PER_TASK")
fi
[[ -n "${FLEX_PARTITION:-}" ]] && args+=(--partition="$FLEX_PARTITION")
[[ -n "${FLEX_ACCOUNT:-}" ]] && args+=(--account="$FLEX_ACCOUNT")
[[ -n "${FLEX_QOS:-}" ]] && args+=(--qos="$FLEX_QOS")
[[ "${FLEX_GPUS_PER_NODE:-0}" -gt 0 ]] && args+=(--gpus-per-node="$FLEX_GPUS_PER_NODE")
[[ -n "${FLEX_MEM_GB:-}" ]] && args+=(--mem="${FLEX_MEM_GB}G")

cmd=(sbatch "${wait_flag[@]}" "${args[@]}" "$RECIPES_DIR/slurm_job.sh" "$mode" "$@")
if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$FLEX_JOB_DIR"
export FLEX_RECIPES_DIR="$RECIPES_DIR"
exec "${cmd[@]}"
