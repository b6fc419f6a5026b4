"""Running the demo's rank function on N ranks, and getting every rank's value back.

Two ways, one result shape (a list of values in rank order, or
:class:`~flex_surgery.launch.LaunchError` naming each failed rank with its traceback):

* ``"fork"``: ranks are forked from this process. The children inherit the imported torch and
  transformers (start-up well under a second instead of ~10 s per fresh interpreter on a small
  CPU machine) and this terminal, so rank 0's progress bar shows live.
* ``"local"`` / ``"torchrun"``: :func:`flex_surgery.launch.launch` starts fresh processes (the
  path a cluster job takes); their output goes to per-rank logs in the job folder.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from flex_surgery.launch import LaunchError, RankOutcome, launch
from flex_surgery.launch.environment import RankEnvironment, free_port, init_from_env


def run_on_ranks(fn: Callable[..., Any], *args: Any, nprocs: int, launcher: str = "fork",
                 timeout_s: float = 900.0) -> list[Any]:
    """``fn(*args)`` on ``nprocs`` ranks with a process group initialised; values by rank."""
    if launcher == "fork":
        return fork_ranks(fn, *args, nprocs=nprocs, timeout_s=timeout_s)
    return launch(fn, *args, nprocs=nprocs, executor=launcher, device="cpu",
                  timeout_min=max(1, int(timeout_s // 60)))


def fork_ranks(fn: Callable[..., Any], *args: Any, nprocs: int,
               timeout_s: float = 900.0) -> list[Any]:
    """Fork ``nprocs`` ranks on this host, run ``fn(*args)`` on each, collect the values.

    A rank that raises is reported with its traceback; once one rank has failed, the others get
    a few seconds to report (they usually fail in their next collective) and are then killed,
    so a failure never leaves the caller waiting on a hung collective.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(nprocs):
        parent, child = ctx.Pipe(duplex=False)
        env = RankEnvironment(rank, nprocs, rank, nprocs, "127.0.0.1", port, "fork")
        proc = ctx.Process(target=_rank_main, args=(fn, args, env, child), daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    outcomes: dict[int, RankOutcome] = {}
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout_s
    try:
        while pending and time.monotonic() < deadline:
            if any(not o.ok for o in outcomes.values()):
                deadline = min(deadline, time.monotonic() + 5.0)
            for conn in wait(list(pending.values()), timeout=1.0):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    outcomes[rank] = conn.recv()
                except EOFError:
                    procs[rank].join(1.0)
                    code = procs[rank].exitcode
                    outcomes[rank] = RankOutcome(rank, ok=False, launcher="fork",
                                                 error=f"rank {rank} died (exit code {code})")
                del pending[rank]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.join(timeout=0.0 if pending else 10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for rank in pending:
        outcomes[rank] = RankOutcome(rank, ok=False, launcher="fork",
                                     error=f"rank {rank} did not finish within {timeout_s:.0f} s")
    ordered = [outcomes[r] for r in range(nprocs)]
    if not all(o.ok for o in ordered):
        raise LaunchError(ordered)
    return [o.value for o in ordered]


def _rank_main(fn: Callable[..., Any], args: tuple, env: RankEnvironment, conn) -> None:
    import torch
    import torch.distributed as dist

    try:
        env.export()
        # One intra-op thread per rank: the ranks share the cores, and a forked child must not
        # use an OpenMP pool its parent may have started.
        torch.set_num_threads(1)
        init_from_env("cpu", master_port=env.master_port)
        outcome = RankOutcome(env.rank, ok=True, value=fn(*args), launcher="fork")
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its rank
        outcome = RankOutcome(env.rank, ok=False, error=traceback.format_exc(), launcher="fork")
    try:
        conn.send(outcome)
    except Exception:  # an unpicklable value: report that instead
        conn.send(RankOutcome(env.rank, ok=False, launcher="fork",
                              error=f"rank {env.rank}: result could not be sent back\n"
                                    f"{traceback.format_exc()}"))
    finally:
        conn.close()
    if dist.is_initialized() and outcome.ok:
        dist.destroy_process_group()
    # Skip the parent's atexit handlers and buffered state inherited through fork.
    os._exit(0)
