"""Forking N ranks on this machine: the one local launcher of the demo, tests and benchmarks.

Why fork: a forked child inherits the parent's imported torch (and transformers), so a world of
ranks starts in well under a second, where every fresh interpreter (``spawn``, torchrun,
``elastic_launch``) re-imports torch -- seconds per world on a small CPU machine (docs/launch.md
has the measured numbers). Forked ranks also share this terminal, so rank 0's progress shows live.

Two shapes, one machinery:

* :func:`fork_ranks` runs ``fn(*args)`` once on every rank and returns the values in rank order,
  or raises :class:`~flex_surgery.launch.LaunchError` naming each failed rank with its traceback.
* :class:`ForkedRanks` keeps the ranks alive and hands each one a pipe, for callers that send
  work many times to the same world (the test suite's rank pool).

Every rank gets the ``env://`` variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...), one
intra-op thread unless told otherwise, and the default process group started through
:func:`~flex_surgery.parallel.backend.init_distributed`, so the backend follows from ``device``
(``None``: the rank's CUDA device where there is one, else CPU). Fork before the parent touches
CUDA or runs a backward on a GPU: a forked child cannot use a CUDA context or autograd device
threads its parent started.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from flex_surgery.launch.environment import RankEnvironment, free_port
from flex_surgery.launch.rank_task import LaunchError, RankOutcome

__all__ = ["ForkedRanks", "Reply", "fork_ranks", "receive_message", "send_message"]

#: What a rank sends back, as ``(kind, value)``: ``("ok", value)``, ``("err", traceback)``; the
#: parent adds ``("died", why)`` for a rank whose process ended without answering and
#: ``("timeout", why)`` for one that did not answer in time.
Reply = tuple[str, Any]


def send_message(conn: Connection, message: Any) -> None:
    """Send ``message`` down a rank pipe with the plain pickler, tensors by value.

    ``Connection.send`` pickles with multiprocessing's ``ForkingPickler``, for which torch
    registers reductions that pass a tensor's storage as a shared-memory file descriptor fetched
    from the *sender's* process when the receiver unpickles. A rank that answers and then exits
    (every :func:`fork_ranks` rank does) leaves the parent a descriptor it can no longer fetch:
    ``recv`` fails and a rank that returned a tensor looks dead. The plain pickler copies the
    bytes into the message, so a reply outlives its sender.
    """
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive_message(conn: Connection) -> Any:
    """The next message :func:`send_message` put on ``conn`` (``EOFError`` when it is closed)."""
    return pickle.loads(conn.recv_bytes())


def _rank_process(rank: int, nprocs: int, port: int, device: Any, threads: int | None,
                  collective_timeout_s: float, rank_main: Callable[[Connection], None],
                  conn: Connection, inherited: list[Connection]) -> None:
    """One forked rank: join the process group, say ``ready``, hand the pipe to ``rank_main``."""
    import torch
    import torch.distributed as dist

    from flex_surgery.parallel.backend import init_distributed

    for other in inherited:  # the parent's ends of earlier ranks' pipes: not ours to hold open
        other.close()
    RankEnvironment(rank, nprocs, rank, nprocs, "127.0.0.1", port, "fork").export()
    if threads is not None:
        # The ranks share the cores, and a forked child must not use an OpenMP pool its parent
        # may have started.
        torch.set_num_threads(threads)
    try:
        init_distributed(rank, nprocs, device=device, timeout_s=collective_timeout_s)
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank
        failure = f"rank {rank}: process group init failed\n{traceback.format_exc()}"
        send_message(conn, ("err", failure))
        return
    send_message(conn, ("ready", None))
    try:
        rank_main(conn)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


class ForkedRanks:
    """``nprocs`` ranks forked from this process, each with the default process group started and
    a duplex pipe to this process; each rank runs ``rank_main(conn)`` and exits when it returns.
    Both ends speak :func:`send_message` / :func:`receive_message` (tensors travel by value).

    The constructor waits until every rank has joined the process group (or raises
    :class:`LaunchError`). :meth:`collect` waits for one message per rank with a deadline; once a
    rank has failed, its peers get ``grace_s`` more seconds (they usually fail in their next
    collective) instead of the whole timeout. :meth:`close` ends the ranks (``force``: at once).
    """

    def __init__(self, nprocs: int, rank_main: Callable[[Connection], None], *,
                 device: Any = None, threads: int | None = 1, timeout_s: float = 300.0,
                 collective_timeout_s: float = 300.0, grace_s: float = 10.0) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be positive, not {nprocs}")
        self.nprocs, self.grace_s = nprocs, grace_s
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        ctx = mp.get_context("fork")
        port = free_port()
        for rank in range(nprocs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_process, daemon=True,
                args=(rank, nprocs, port, device, threads, collective_timeout_s, rank_main, child,
                      list(self.conns)))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        replies = self.collect(timeout_s)
        if any(kind != "ready" for kind, _ in replies.values()):
            self.close(force=True)
            raise LaunchError(to_outcomes(replies, " while starting"))

    def send(self, message: Any) -> None:
        """Send the same message to every rank; a rank that is gone is left for :meth:`collect`
        to report as ``died``."""
        for conn in self.conns:
            try:
                send_message(conn, message)
            except OSError:  # BrokenPipeError, ConnectionResetError: the rank's process ended
                pass

    def collect(self, timeout_s: float) -> dict[int, Reply]:
        """One :data:`Reply` per rank; ranks silent past the deadline are reported as hung."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Reply] = {}
        pending = dict(enumerate(self.conns))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending.values()), timeout=min(remaining, 1.0)):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    replies[rank] = receive_message(conn)
                except (EOFError, OSError):  # OSError: it died with our message unread
                    self.procs[rank].join(timeout=1)
                    code = self.procs[rank].exitcode
                    replies[rank] = ("died", f"rank process died (exit code {code})")
                del pending[rank]
            if pending and any(kind in ("err", "died") for kind, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + self.grace_s)
        for rank in pending:
            replies[rank] = ("timeout", f"no answer within {timeout_s:.0f} s (hung collective?)")
        return replies

    @property
    def alive(self) -> bool:
        """Every rank's process is still running."""
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        """End the ranks: ``None`` down every pipe (a serving rank's signal to return), a few
        seconds to exit, then SIGKILL; ``force`` kills without waiting (hung or dead worlds)."""
        for conn in self.conns:
            try:
                if not force:
                    send_message(conn, None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=0 if force else 5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def to_outcomes(replies: dict[int, Reply], what: str = "") -> list[RankOutcome]:
    """Replies as :class:`RankOutcome` in rank order (the shape :class:`LaunchError` reports)."""
    outcomes = []
    for rank in sorted(replies):
        kind, value = replies[rank]
        if kind in ("ok", "ready"):  # "ready": this rank started; a peer did not
            outcomes.append(RankOutcome(rank, ok=True, value=value, launcher="fork"))
        else:  # a traceback speaks for itself; a death or a silence needs saying
            error = value if kind == "err" else f"rank {rank} ({kind}{what}): {value}"
            outcomes.append(RankOutcome(rank, ok=False, error=error, launcher="fork"))
    return outcomes


def _run_once(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Callable:
    def rank_main(conn: Connection) -> None:
        try:
            reply: Reply = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - every failure goes back with its rank
            reply = ("err", traceback.format_exc())
        try:
            send_message(conn, reply)
        except Exception:  # an unpicklable value: report that instead
            failure = f"the result could not be sent back\n{traceback.format_exc()}"
            send_message(conn, ("err", failure))
    return rank_main


def fork_ranks(fn: Callable[..., Any], *args: Any, nprocs: int, device: Any = None,
               threads: int | None = 1, timeout_s: float = 900.0,
               collective_timeout_s: float = 300.0, kwargs: dict[str, Any] | None = None,
               ) -> list[Any]:
    """Fork ``nprocs`` ranks on this host, run ``fn(*args, **kwargs)`` on each, return the values
    in rank order.

    ``fn`` needs no pickling (the children inherit it); its return values are pickled back.
    ``device`` picks the backend (``None``: CUDA where there is one, else CPU), ``threads`` the
    intra-op threads per rank (``None``: leave torch's default). A rank that raises is reported
    with its traceback in :class:`LaunchError`; once one rank has failed the others get 5 s to
    report and are then killed, so a failure never leaves the caller waiting on a hung
    collective; nothing outlives the call.

    Example::

        from flex_surgery.launch import fork_ranks

        def rank_sum(x):
            t = torch.tensor([x * (dist.get_rank() + 1)]); dist.all_reduce(t); return t.item()

        assert fork_ranks(rank_sum, 1.0, nprocs=2, device="cpu") == [3.0, 3.0]
    """
    start = time.monotonic()
    ranks = ForkedRanks(nprocs, _run_once(fn, args, kwargs or {}), device=device,
                        threads=threads, timeout_s=timeout_s,
                        collective_timeout_s=collective_timeout_s, grace_s=5.0)
    replies: dict[int, Reply] = {}
    try:
        replies = ranks.collect(max(0.0, timeout_s - (time.monotonic() - start)))
    finally:
        # Ranks that answered are only tearing down their process group: let them finish (and
        # flush their output); a failed or silent world is killed.
        ranks.close(force=len(replies) < nprocs or any(k != "ok" for k, _ in replies.values()))
    outcomes = to_outcomes(replies)
    if not all(o.ok for o in outcomes):
        raise LaunchError(outcomes)
    return [o.value for o in outcomes]
