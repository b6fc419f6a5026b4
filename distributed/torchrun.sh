#!/usr/bin/env bash
# Run a flex_surgery program on this machine with torchrun, one rank per FLEX_TASKS_PER_NODE.
#
#   distributed/torchrun.sh                         # the demo: python -m flex_surgery demo
#   distributed/torchrun.sh examples/foo.py --x 1   # a script
#   distributed/torchrun.sh -m flex_surgery demo    # a module
#
# Programs join the process group with flex_surgery.launch.init_from_env().
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -gt 0 ]] || set -- -m flex_surgery demo
exec "$FLEX_PYTHON" -m torch.distributed.run --standalone --nnodes=1 \
    --nproc-per-node="$FLEX_TASKS_PER_NODE" "$@"
