"""Smoke test for a cluster configuration: every rank joins, all-reduces, and reports.

    distributed/torchrun.sh distributed/check_cluster.py
    distributed/slurm_submit.sh --wait distributed/check_cluster.py
    python distributed/submit.py distributed/check_cluster.py

Each rank prints one line ``rank R/W on HOST via LAUNCHER, backend B, device D: sum S``; the
program fails (non-zero exit on that rank) if the all-reduce does not give 1 + 2 + ... + W.
"""

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flex_surgery.launch import init_from_env  # noqa: E402
from flex_surgery.parallel.backend import default_device  # noqa: E402


def main() -> None:
    env = init_from_env()
    device = default_device()
    t = torch.tensor([float(env.rank + 1)], device=device)
    dist.all_reduce(t)
    expected = env.world_size * (env.world_size + 1) / 2
    print(f"rank {env.rank}/{env.world_size} on {socket.gethostname()} via {env.launcher}, "
          f"backend {dist.get_backend()}, device {device}: sum {t.item():g}", flush=True)
    dist.destroy_process_group()
    if t.item() != expected:
        raise SystemExit(f"rank {env.rank}: all_reduce gave {t.item()}, expected {expected}")


if __name__ == "__main__":
    main()
