"""A pool of forked ranks that live for the whole test session.

Why: starting a ``torch.distributed`` world with ``spawn`` costs ~10 s on a 2-core machine (every
child re-imports torch); ``fork`` costs well under a second because the children inherit the
already-imported interpreter. So each world size gets one pool of forked ranks, created the first
time a test needs it, with a gloo process group initialised once; test bodies are then
dispatched to every rank and their results (or tracebacks) collected.

A test body is a plain module-level function. It is registered by :func:`distributed` at import
time, before the pool forks, so every rank finds it by ``(module, qualname)`` without pickling
code. Arguments (pytest parameters, ``tmp_path``) are pickled.

A rank that raises makes the test fail with every failing rank's traceback. A rank that does not
answer within the timeout (a hung collective) makes the test fail too; the pool is then killed
and forked again for the next test, so one hang never takes the session down. A rank whose
process dies (``os._exit``, a crash) is reported as ``died`` and the world is replaced the same
way: its peers' process group is broken. Fault-injection tests that *expect* ranks to fail or
die use :meth:`RankPool.run_outcomes`, which returns every rank's outcome instead of raising.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

DEFAULT_TIMEOUT_S = float(os.environ.get("FLEX_TEST_TIMEOUT", "180"))

_BODIES: dict[tuple[str, str], Callable[..., Any]] = {}


class RankFailure(AssertionError):
    """One or more ranks failed or timed out; the message holds every rank's report."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(key: tuple[str, str]) -> Callable[..., Any]:
    if key not in _BODIES:  # module imported after the fork: import it here too
        importlib.import_module(key[0])
    return _BODIES[key]


def _reset_rank_state() -> None:
    """Undo global state a test body may leave behind, so bodies stay independent."""
    import torch

    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    try:
        from fairscale.nn.model_parallel import initialize as fs_init

        if fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
    except ImportError:  # fairscale is optional for the pool itself
        pass


def _rank_main(rank: int, world_size: int, port: int, conn: Connection) -> None:
    """Loop of one forked rank: initialise the process group once, then run bodies on demand."""
    import torch

    from flex_surgery.parallel.backend import init_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        init_distributed(rank, world_size, device="cpu", timeout_s=DEFAULT_TIMEOUT_S)
    except BaseException:
        conn.send(("err", f"rank {rank}: process group init failed\n{traceback.format_exc()}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        key, kwargs = msg
        try:
            # Every body starts from the same RNG state on every rank, whatever ran before it.
            torch.manual_seed(0)
            result = _resolve(key)(**kwargs)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
        finally:
            _reset_rank_state()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class RankPool:
    """``world_size`` forked ranks with an initialised gloo process group."""

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        port = _free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main, args=(rank, self.world_size, port, child), daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        replies = self._collect(self.timeout_s)
        bad = {r: v for r, v in replies.items() if v[0] != "ready"}
        if bad:
            self.close(force=True)
            raise RankFailure(self._format(bad, "starting the pool"))

    def _collect(self, timeout_s: float) -> dict[int, tuple[str, Any]]:
        """Wait for one reply per rank; ranks silent past the deadline are reported as hung."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, tuple[str, Any]] = {}
        pending = dict(enumerate(self._conns))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending.values()), timeout=min(remaining, 1.0)):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    self._procs[rank].join(timeout=1)
                    code = self._procs[rank].exitcode
                    replies[rank] = ("died", f"rank process died (exit code {code})")
                del pending[rank]
            if any(v[0] in ("err", "died") for v in replies.values()) and pending:
                # One rank failed: its peers may be stuck in a collective. Give them a short
                # grace period, not the whole timeout.
                deadline = min(deadline, time.monotonic() + 10.0)
        for rank in pending:
            replies[rank] = ("timeout", f"no answer within {timeout_s:.0f} s (hung collective?)")
        return replies

    @staticmethod
    def _format(bad: dict[int, tuple[str, Any]], what: str) -> str:
        parts = [f"{len(bad)} rank(s) failed while {what}:"]
        for rank in sorted(bad):
            kind, text = bad[rank]
            parts.append(f"--- rank {rank} ({kind}) ---\n{text}")
        return "\n".join(parts)

    def run(
        self, fn: Callable[..., Any], kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Run a registered body on every rank; return the per-rank results in rank order."""
        replies = self._dispatch(fn, kwargs, timeout_s)
        bad = {r: v for r, v in replies.items() if v[0] != "ok"}
        if bad:
            if any(kind != "err" for kind, _ in bad.values()):
                self.close(force=True)  # a hung or dead rank: this world is unusable
            raise RankFailure(self._format(bad, f"running {fn.__qualname__}"))
        return [replies[r][1] for r in range(self.world_size)]

    def _dispatch(self, fn: Callable[..., Any], kwargs: dict[str, Any] | None,
                  timeout_s: float | None) -> dict[int, tuple[str, Any]]:
        """Send a registered body to every rank and collect each rank's ``(kind, value)``."""
        key = (fn.__module__, fn.__qualname__)
        if key not in _BODIES:
            raise ValueError(f"{key} is not registered; decorate it with @distributed")
        for conn in self._conns:
            conn.send((key, kwargs or {}))
        return self._collect(timeout_s or self.timeout_s)

    def run_outcomes(
        self, fn: Callable[..., Any], kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[int, tuple[str, Any]]:
        """Run a registered body on every rank and return every rank's ``(kind, value)``:
        ``("ok", result)``, ``("err", traceback)``, ``("died", why)`` or ``("timeout", why)``.

        For tests that inject faults and check how each rank fails. A world that lost or hung a
        rank is closed here and forked again by the next :func:`get_pool`.
        """
        replies = self._dispatch(fn, kwargs, timeout_s)
        if any(kind in ("died", "timeout") for kind, _ in replies.values()):
            self.close(force=True)
        return replies

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        for conn in self._conns:
            try:
                if not force:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """The session's pool for ``world_size`` ranks, forked again if a hang killed the last one."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        if pool is not None:
            pool.close(force=True)
        _POOLS[world_size] = pool = RankPool(world_size)
    return pool


def close_all_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def distributed(world_size: int, timeout_s: float | None = None) -> Callable:
    """Decorate a module-level test body so that pytest runs it on ``world_size`` forked ranks.

    The body keeps its own signature, so ``pytest.mark.parametrize`` and picklable fixtures
    (``tmp_path``) work unchanged; the test returns the per-rank results.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if "<locals>" in fn.__qualname__:
            raise TypeError("@distributed bodies must be module-level functions")
        _BODIES[(fn.__module__, fn.__qualname__)] = fn

        @functools.wraps(fn)
        def test(**kwargs: Any) -> None:
            get_pool(world_size).run(fn, kwargs, timeout_s)

        test.world_size = world_size  # type: ignore[attr-defined]
        return test

    return decorate


def in_rank() -> bool:
    """True inside a forked rank (the process group is initialised there, never in pytest)."""
    import torch.distributed as dist

    return dist.is_initialized()


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    sys.exit("import this module from tests")
