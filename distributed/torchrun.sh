#!/usr/bin/env bash
# Run a flex_surgery program on this machine with torchrun, one rank per FLEX_TASKS_PER_NODE.
#
#   distributed/torchrun.sh                         # distributed/check_cluster.py
#   distributed/torchrun.sh examples/foo.py --x 1   # a script
#   distributed/torchrun.sh -m mypackage.train      # a module
#
# Every rank runs the program; it joins the process group with
# flex_surgery.launch.init_from_env(). (The demo starts its own ranks: use demo.sh.)
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -gt 0 ]] || set -- distributed/check_cluster.py
exec "$FLEX_PYTHON" -m torch.distributed.run --standalone --nnodes=1 \
    --nproc-per-node="$FLEX_TASKS_PER_NODE" "$@"
