"""What runs on every rank of a launched job, and what each rank sends back.

:class:`RankTask` is the one callable every launcher runs (a submitit task, a torchrun worker):
it joins the process group from the launcher's variables, calls the user's function, and turns
whatever happened into a :class:`RankOutcome`. It never lets an exception escape, so a failure on
one rank comes back as that rank's traceback instead of a job-level error that hides which rank
failed -- the launcher then decides how to report it (see :class:`LaunchError`).

The user's function travels as cloudpickle bytes and is unpickled *inside* the task, after the
task has put ``python_path`` on ``sys.path``: a function defined in a module that is importable
only from the caller's working tree (a test file, an example script) then still resolves, and if
it does not, that is reported like any other per-rank failure.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LaunchError", "RankOutcome", "RankTask"]


@dataclass
class RankOutcome:
    """What one rank reports: its return value, or the traceback of what it raised.

    ``finished_at`` (wall-clock seconds) orders failures: when one rank raises, its peers usually
    fail moments later inside a collective ("connection closed by peer"); the earliest failure is
    the cause.
    """

    rank: int
    ok: bool
    value: Any = None
    error: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    finished_at: float = field(default_factory=time.time)
    launcher: str = ""


class LaunchError(RuntimeError):
    """One or more ranks failed; holds every rank's :class:`RankOutcome`.

    ``failures`` maps rank to traceback text, ``results`` holds the return values of the ranks
    that succeeded (``None`` for the others), and the message starts with the earliest failure.
    """

    def __init__(self, outcomes: Sequence[RankOutcome]) -> None:
        self.outcomes = list(outcomes)
        self.failures = {o.rank: o.error or "" for o in self.outcomes if not o.ok}
        self.results = [o.value if o.ok else None for o in self.outcomes]
        failed = sorted((o for o in self.outcomes if not o.ok), key=lambda o: o.finished_at)
        parts = [
            f"{len(failed)} of {len(self.outcomes)} rank(s) failed; "
            f"first: rank {failed[0].rank} on {failed[0].hostname}" if failed else "no failures"
        ]
        for o in failed:
            parts.append(f"--- rank {o.rank} ({o.hostname}) ---\n{(o.error or '').rstrip()}")
        super().__init__("\n".join(parts))


def _set_cpu_threads(local_world_size: int) -> None:
    """Split this node's cores between its ranks: N ranks x all cores each thrash a small node."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, local_world_size)))


@dataclass
class RankTask:
    """The callable each rank of a launched job runs; returns a :class:`RankOutcome`.

    ``payload`` is ``cloudpickle.dumps((fn, args, kwargs))``. ``device`` picks the backend
    (``None``: this rank's CUDA device if there is one, else CPU). ``master_port`` pins the
    rendezvous port (the local launcher picks a free one); ``None`` lets the job derive it.
    With ``rank0_only``, the other ranks drop their return value instead of pickling it back
    (large per-rank results cost transfer and memory in the launching process).
    """

    payload: bytes
    device: str | None = None
    master_port: int | None = None
    python_path: Sequence[str] = ()
    timeout_s: float = 300.0
    rank0_only: bool = False

    @classmethod
    def wrap(cls, fn, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             **options: Any) -> RankTask:
        import cloudpickle  # submitit's dependency; imported here so init_from_env needs neither

        return cls(payload=cloudpickle.dumps((fn, tuple(args), dict(kwargs or {}))), **options)

    def __call__(self) -> RankOutcome:
        import cloudpickle
        import torch.distributed as dist

        from flex_surgery.launch.environment import detect_environment, init_from_env

        for entry in reversed(self.python_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        rank, launcher = -1, ""
        try:
            env = detect_environment(self.master_port)
            rank, launcher = env.rank, env.launcher
            if self.device in (None, "cpu"):
                _set_cpu_threads(env.local_world_size)
            init_from_env(self.device, master_port=self.master_port, timeout_s=self.timeout_s)
            fn, args, kwargs = cloudpickle.loads(self.payload)
            value = fn(*args, **kwargs)
            if self.rank0_only and rank != 0:
                value = None
            outcome = RankOutcome(rank=rank, ok=True, value=value, launcher=launcher)
        except BaseException:  # noqa: BLE001 - every failure must reach the caller, with its rank
            outcome = RankOutcome(rank=rank, ok=False, error=traceback.format_exc(),
                                  launcher=launcher)
        if dist.is_initialized():
            dist.destroy_process_group()
        return outcome
