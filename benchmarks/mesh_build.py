"""Building a ParallelMesh's groups: torch's ``init_device_mesh`` (+ ``_flatten``) against the
hand-written loop of ``dist.new_group`` calls it replaced, and where the hand-written one stays.

On ``--ranks`` forked CPU ranks (gloo), per shape, interleaved round by round (median of
``--reps``; every round's groups are freed before the next):

* ``device_mesh``: ``ParallelMesh.build`` over the world -- ``init_device_mesh`` with a dim per
  axis of more than one rank, the stage group by ``_flatten`` of its ``dp`` and ``tp`` dims;
* ``new_group``: the same groups made by one ``dist.new_group`` per line of the rank grid
  (``mesh._new_groups_along``, what ``build`` did before and still does inside a sub-group).

Then the sub-world case: a ``DeviceMesh`` over ranks ``[0, 1]`` of the world, entered by those
two ranks only (what ``ParallelMesh.build(group=...)`` must support: the other ranks do not call
it). torch creates a DeviceMesh's groups with ``dist.new_group`` without
``use_local_synchronization``, which names groups by a per-process counter that every rank of
the world must advance together; the benchmark then creates and uses one world-wide group, as
the next FlexModel would, and prints what happened on each rank.

Run: ``python benchmarks/mesh_build.py [--ranks 4] [--reps 10]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD_TIMEOUT_S = 20
SUBWORLD_WAIT_S = 30


def _hand_built(sizes: dict[str, int]) -> list:
    from flex_surgery.parallel.mesh import _new_groups_along

    me = dist.get_rank()
    pp, dp, tp = sizes["pp"], sizes["dp"], sizes["tp"]
    grid = torch.arange(dist.get_world_size()).reshape(pp, dp, tp)
    made = [_new_groups_along(grid, dim, me) for dim in (2, 1, 0) if grid.shape[dim] > 1]
    if pp > 1:
        made.append(_new_groups_along(grid.reshape(pp, dp * tp), 1, me))
    return made


def _rank(rank: int, world: int, port: int, reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from flex_surgery.parallel.backend import backend_for_device

    # Its own forked ranks (not fork_ranks): the sub-world probe leaves a group hanging on
    # purpose and ends every rank with os._exit.
    dist.init_process_group(backend_for_device("cpu"), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S))
    from flex_surgery.parallel.group_lifetime import OwnedGroups
    from flex_surgery.parallel.mesh import ParallelMesh

    shapes = [dict(tp=2, dp=world // 2, pp=1), dict(tp=2, dp=1, pp=world // 2),
              dict(tp=1, dp=1, pp=world)]
    for sizes in shapes:
        forms = {"device_mesh": lambda s=sizes: ParallelMesh.build(**s).created_groups(),
                 "new_group": lambda s=sizes: _hand_built(s)}
        times: dict[str, list[float]] = {name: [] for name in forms}
        for rep in range(reps):
            for name in (forms if rep % 2 == 0 else list(reversed(forms))):
                dist.barrier()
                start = time.perf_counter()
                made = forms[name]()
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(float(elapsed))
                OwnedGroups(made).free()
        if rank == 0:
            base = statistics.median(times["new_group"])
            print(f"pp={sizes['pp']} dp={sizes['dp']} tp={sizes['tp']} ({world} ranks, "
                  f"{reps} reps)", flush=True)
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {name:12s} median {med * 1e3:7.2f} ms  ratio to new_group "
                      f"{med / base:.3f}", flush=True)
    dist.barrier()
    if rank < 2:  # a DeviceMesh inside the sub-world [0, 1]; ranks 2.. do not take part
        from torch.distributed.device_mesh import DeviceMesh

        DeviceMesh("cpu", torch.tensor([0, 1]), mesh_dim_names=("tp",))
    # Then every rank creates one group over the world, as the next FlexModel would, and
    # uses it once (in a thread: it may never return).
    outcome: list[str] = []

    def next_group() -> None:
        start = time.perf_counter()
        try:
            after = dist.new_group(list(range(world)))
            dist.all_reduce(torch.ones(1), group=after)
            outcome.append(f"worked ({time.perf_counter() - start:.2f} s)")
        except RuntimeError as err:
            outcome.append(f"failed after {time.perf_counter() - start:.0f} s: "
                           f"{str(err).splitlines()[0][:80]}")

    thread = threading.Thread(target=next_group, daemon=True)
    thread.start()
    thread.join(SUBWORLD_WAIT_S)
    print(f"rank {rank}: after a DeviceMesh over ranks [0, 1] of {world} (entered by those two "
          f"only), the next world-wide group "
          f"{outcome[0] if outcome else f'had not returned after {SUBWORLD_WAIT_S} s'}",
          flush=True)
    os._exit(0)  # the world may be broken; nothing to tear down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args.ranks, port, args.reps),
                       nprocs=args.ranks, start_method="fork")


if __name__ == "__main__":
    main()
