"""A pool of forked ranks that live for the whole test session.

Why: starting a ``torch.distributed`` world with ``spawn`` costs ~10 s on a 2-core machine (every
child re-imports torch); ``fork`` costs well under a second because the children inherit the
already-imported interpreter. So each world size gets one pool of forked ranks, created the first
time a test needs it, with a gloo process group initialised once; test bodies are then
dispatched to every rank and their results (or tracebacks) collected. The ranks are started,
watched and torn down by :class:`flex_surgery.launch.local.ForkedRanks`, the library's one local
launcher (the demo and the benchmarks use it too); this module adds what is the tests' own: the
registry of bodies, the per-body reset, and pools that outlive one test.

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
import os
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from flex_surgery.launch import LaunchError
from flex_surgery.launch.local import ForkedRanks, Reply, receive_message, send_message

DEFAULT_TIMEOUT_S = float(os.environ.get("FLEX_TEST_TIMEOUT", "180"))

_BODIES: dict[tuple[str, str], Callable[..., Any]] = {}


class RankFailure(AssertionError):
    """One or more ranks failed or timed out; the message holds every rank's report."""


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
            destroy_fairscale_model_parallel()
    except ImportError:  # fairscale is optional for the pool itself
        pass


def destroy_fairscale_model_parallel() -> None:
    """fairscale's ``destroy_model_parallel``, and its groups destroyed too.

    ``destroy_model_parallel`` only forgets fairscale's groups; each gloo group keeps three
    threads and its sockets for the life of the process, so a long-lived rank that initialises
    fairscale in every body would pile up hundreds. Every rank ran the same body and calls
    this at the same point, in the same order, so the groups are torn down together."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    getters = ("get_model_parallel_group", "get_data_parallel_group",
               "get_pipeline_parallel_group")
    groups = []
    for getter in getters:
        try:
            group = getattr(fs_init, getter)()
        except (AssertionError, AttributeError):
            continue
        if group is not None and not any(group is g for g in groups):
            groups.append(group)
    fs_init.destroy_model_parallel()
    world = dist.distributed_c10d._world
    default = dist.distributed_c10d._get_default_group()
    for group in groups:
        if group is not default and group in world.pg_map:
            dist.destroy_process_group(group)


def _serve(conn: Connection) -> None:
    """Loop of one forked rank (process group already up): run bodies until told to stop."""
    import torch

    while True:
        try:
            msg = receive_message(conn)
        except EOFError:
            break
        if msg is None:
            break
        key, kwargs = msg
        try:
            # Every body starts from the same RNG state on every rank, whatever ran before it.
            torch.manual_seed(0)
            send_message(conn, ("ok", _resolve(key)(**kwargs)))
        except BaseException:
            send_message(conn, ("err", traceback.format_exc()))
        finally:
            _reset_rank_state()


class RankPool:
    """``world_size`` forked ranks with an initialised gloo process group, started and torn down
    by :class:`flex_surgery.launch.local.ForkedRanks` (the library's one local launcher)."""

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        try:
            self._ranks = ForkedRanks(world_size, _serve, device="cpu", timeout_s=timeout_s,
                                      collective_timeout_s=DEFAULT_TIMEOUT_S, grace_s=10.0)
        except LaunchError as err:
            raise RankFailure(f"starting the pool: {err}") from None

    @staticmethod
    def _format(bad: dict[int, Reply], what: str) -> str:
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
                  timeout_s: float | None) -> dict[int, Reply]:
        """Send a registered body to every rank and collect each rank's ``(kind, value)``."""
        key = (fn.__module__, fn.__qualname__)
        if key not in _BODIES:
            raise ValueError(f"{key} is not registered; decorate it with @distributed")
        self._ranks.send((key, kwargs or {}))
        return self._ranks.collect(timeout_s or self.timeout_s)

    def run_outcomes(
        self, fn: Callable[..., Any], kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[int, Reply]:
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
        return self._ranks.alive

    def close(self, force: bool = False) -> None:
        self._ranks.close(force)


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


def distributed(world_size: int, timeout_s: float | None = None,
                spends_pool: bool = False) -> Callable:
    """Decorate a module-level test body so that pytest runs it on ``world_size`` forked ranks.

    The body keeps its own signature, so ``pytest.mark.parametrize`` and picklable fixtures
    (``tmp_path``) work unchanged; the test returns the per-rank results. ``spends_pool``: the
    ranks are closed after the body, however it ends, and the next test forks new ones -- for
    a body whose failure leaves collectives unmatched (an error inside DDP's backward leaves
    its gradient all-reduce posted on some ranks), which would meet the next test's.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if "<locals>" in fn.__qualname__:
            raise TypeError("@distributed bodies must be module-level functions")
        _BODIES[(fn.__module__, fn.__qualname__)] = fn

        @functools.wraps(fn)
        def test(**kwargs: Any) -> None:
            try:
                get_pool(world_size).run(fn, kwargs, timeout_s)
            finally:
                if spends_pool:
                    pool = _POOLS.pop(world_size, None)
                    if pool is not None:
                        pool.close(force=True)

        test.world_size = world_size  # type: ignore[attr-defined]
        return test

    return decorate


def in_rank() -> bool:
    """True inside a forked rank (the process group is initialised there, never in pytest)."""
    import torch.distributed as dist

    return dist.is_initialized()


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    sys.exit("import this module from tests")
