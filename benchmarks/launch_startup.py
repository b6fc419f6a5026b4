"""How long does a local world of ranks take to start, per launcher?

Each launcher runs the same trivial body on ``--world`` CPU ranks (join the gloo group, one
all_reduce, return the rank's value) and the wall time of the whole call is taken, alternating
launchers ``--reps`` times so that machine load hits them alike:

* ``fork_ranks``: flex_surgery's own local launcher (children inherit the imported torch);
* ``elastic_launch`` (``torch.distributed.launcher.api``) with ``start_method="spawn"``, its
  default, and with ``"fork"``: torch's in-process agent with c10d rendezvous;
* ``launch(executor="torchrun")`` and ``launch(executor="local")``: flex_surgery's torchrun and
  submitit executors (fresh interpreters).

Prints the medians and the ratio of each to ``fork_ranks``; writes
``results/launch_startup.json``. docs/launch.md quotes it for the choice of launcher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from flex_surgery.launch import RankTask, fork_ranks, launch
from flex_surgery.launch.environment import free_port

RESULTS = Path(__file__).resolve().parents[1] / "results" / "launch_startup.json"


def body() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _run_task(task: RankTask):
    return task()


def _elastic(world: int, start_method: str) -> list[float]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=0, monitor_interval=0.1, start_method=start_method)
    outcomes = elastic_launch(config, _run_task)(RankTask.wrap(body, device="cpu"))
    return [outcomes[r].value for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="launchers to time (default: all)")
    args = parser.parse_args()
    world, expected = args.world, [float(sum(range(1, args.world + 1)))] * args.world
    folder = tempfile.mkdtemp(prefix="flex_launch_bench_")
    launchers = {
        "fork_ranks": lambda: fork_ranks(body, nprocs=world, device="cpu"),
        "elastic_launch_fork": lambda: _elastic(world, "fork"),
        "elastic_launch_spawn": lambda: _elastic(world, "spawn"),
        "launch_torchrun": lambda: launch(body, nprocs=world, executor="torchrun", device="cpu",
                                          folder=folder),
        "launch_submitit_local": lambda: launch(body, nprocs=world, executor="local",
                                                device="cpu", folder=folder),
    }
    if args.only:
        launchers = {k: v for k, v in launchers.items() if k in args.only}
    times: dict[str, list[float]] = {name: [] for name in launchers}
    for _ in range(args.reps):
        for name, run in launchers.items():
            start = time.perf_counter()
            values = run()
            times[name].append(time.perf_counter() - start)
            assert values == expected, (name, values)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med.get("fork_ranks")
    result = {"world": world, "reps": args.reps, "seconds": times, "median_s": med,
              "ratio_to_fork_ranks": {k: v / base for k, v in med.items()} if base else None}
    for name, m in med.items():
        ratio = f"  {m / base:6.1f}x fork_ranks" if base else ""
        print(f"{name:>22}: {m:7.2f} s (median of {args.reps}){ratio}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
