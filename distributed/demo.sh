#!/usr/bin/env bash
# The demo, here or on SLURM: `python -m flex_surgery demo` is a driver that starts its own
# ranks (fork, or flex_surgery.launch's local/torchrun executors), so it runs as ONE process.
#
#   distributed/demo.sh [DEMO OPTIONS]                 # this machine
#   distributed/demo.sh --slurm [--wait] [DEMO OPTIONS] # a one-task SLURM job whose allocation
#                                                      # has the cores of FLEX_TASKS_PER_NODE ranks
#
# DEMO OPTIONS are the demo's own (python -m flex_surgery demo --help), e.g. --nprocs 4.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == --slurm ]]; then
    shift
    submit=("$RECIPES_DIR/slurm_submit.sh" --single)
    [[ "${1:-}" == --wait ]] && { submit+=(--wait); shift; }
    exec "${submit[@]}" -m flex_surgery demo --launcher local "$@"
fi
cd "$REPO_ROOT"
exec "$FLEX_PYTHON" -m flex_surgery demo "$@"
