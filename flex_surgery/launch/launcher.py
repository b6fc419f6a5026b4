"""Run a function on N ranks: on this machine, under torchrun, or as a SLURM job via submitit.

One entry point, four executors, one result path:

- ``"fork"``: :func:`~flex_surgery.launch.local.fork_ranks` forks the ranks from this process
  (start-up well under a second: the children inherit the imported torch). :func:`launch` only;
  the function needs no pickling.
- ``"local"``: submitit's ``LocalExecutor`` starts ``nprocs`` fresh processes here (a laptop, a
  single GPU box, a CI runner).
- ``"slurm"``: submitit's SLURM executor writes an ``sbatch`` script that ``srun``-s one task per
  rank (``nodes``, ``tasks_per_node = nprocs // nodes``, ``gpus_per_node``, ``partition``,
  ``timeout_min``, and any other submitit parameter by name).
- ``"torchrun"``: ``python -m torch.distributed.run --standalone`` on this machine.

Every rank runs the same :class:`~flex_surgery.launch.rank_task.RankTask`, which joins the process
group from its launcher's variables and returns a :class:`RankOutcome`; :meth:`LaunchedJob.results`
returns the values in rank order or raises :class:`LaunchError` naming every failed rank with its
traceback. Functions must be picklable (module-level, or anything cloudpickle accepts).
"""

from __future__ import annotations

import os
import pickle
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flex_surgery
from flex_surgery.launch.environment import free_port
from flex_surgery.launch.local import fork_ranks
from flex_surgery.launch.rank_task import LaunchError, RankOutcome, RankTask

__all__ = ["EXECUTORS", "LaunchedJob", "launch", "run_script", "submit"]

EXECUTORS = ("fork", "local", "slurm", "torchrun", "auto")

# The directory that holds the flex_surgery package the caller imported: jobs put it first on
# PYTHONPATH so that they run the caller's code even where the package is not installed.
PACKAGE_ROOT = str(Path(flex_surgery.__file__).resolve().parent.parent)

# What a launcher's ranks carry that a job started from one of them must not inherit.
INHERITED_RANK_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                            "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                            "MASTER_PORT")


def run_script(target: str, *argv: str) -> None:
    """Run a Python file, or a module by name, as ``__main__`` with ``sys.argv`` set: launch a
    program instead of a function.

    ``target`` is a path when it ends in ``.py`` or names a file, else a module
    (``"flex_surgery"`` runs ``flex_surgery/__main__.py``, as ``python -m`` would).
    ``launch(run_script, "examples/demo.py", "--steps", "2", nprocs=2)`` runs the script on two
    ranks with the process group already initialised (the script's own
    :func:`~flex_surgery.launch.init_from_env` call then finds it).
    """
    saved = sys.argv
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py") or os.path.isfile(target):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


class LaunchedJob:
    """A job in flight. :meth:`results` waits and returns every rank's value, in rank order.

    ``folder`` holds the job's files, per-rank logs included (submitit's ``<job>_<rank>_log.out``
    and ``.err``, or torchrun's ``torchrun.log``).
    """

    job_id: str
    folder: Path
    nprocs: int

    def done(self) -> bool:
        raise NotImplementedError

    def outcomes(self) -> list[RankOutcome]:
        """Wait for the job and return one :class:`RankOutcome` per rank (never raises)."""
        raise NotImplementedError

    def results(self) -> list[Any]:
        """Every rank's return value in rank order; :class:`LaunchError` if any rank failed."""
        outcomes = self.outcomes()
        if not all(o.ok for o in outcomes):
            raise LaunchError(outcomes)
        return [o.value for o in outcomes]

    def cancel(self) -> None:
        raise NotImplementedError


def _normalise(outcome: Any, rank: int) -> RankOutcome:
    """A task's return as a RankOutcome carrying its rank (-1 if it died before knowing it)."""
    if not isinstance(outcome, RankOutcome):
        return RankOutcome(rank=rank, ok=False, error=f"task returned {type(outcome).__name__}")
    if outcome.rank < 0:
        outcome.rank = rank
    return outcome


class _SubmititJob(LaunchedJob):
    """A submitit job (local or SLURM) with one task per rank."""

    def __init__(self, job: Any, nprocs: int) -> None:
        self._job, self.nprocs = job, nprocs
        self.job_id = str(job.job_id)
        self.folder = Path(job.paths.folder)  # the job's own folder: pickles and per-rank logs

    def done(self) -> bool:
        return self._job.done()

    def outcomes(self) -> list[RankOutcome]:
        outcomes = []
        for rank in range(self.nprocs):
            task = self._job.task(rank) if self.nprocs > 1 else self._job
            try:
                outcomes.append(_normalise(task.results()[0], rank))
            except Exception as exc:  # the task process died: no outcome was pickled
                outcomes.append(RankOutcome(rank=rank, ok=False,
                                            error=f"{type(exc).__name__}: {exc}"))
        return outcomes

    def cancel(self) -> None:
        self._job.cancel(check=False)


class _TorchrunJob(LaunchedJob):
    """``torchrun --standalone`` on this machine; each worker pickles its outcome to the folder."""

    def __init__(self, task: RankTask, nprocs: int, folder: Path, timeout_min: float) -> None:
        self.nprocs = nprocs
        self.folder = folder = Path(tempfile.mkdtemp(prefix="torchrun_", dir=folder))
        self._deadline = time.monotonic() + 60 * timeout_min
        import cloudpickle

        (folder / "task.pkl").write_bytes(cloudpickle.dumps(task))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        for key in INHERITED_RANK_VARIABLES:
            env.pop(key, None)  # a launch from inside a distributed run must not inherit its ranks
        self._log = open(folder / "torchrun.log", "wb")  # noqa: SIM115 - closed in outcomes()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
             f"--nproc-per-node={nprocs}", "-m", "flex_surgery.launch.torchrun_worker",
             str(folder)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.job_id = str(self._proc.pid)

    def done(self) -> bool:
        return self._proc.poll() is not None

    def outcomes(self) -> list[RankOutcome]:
        try:
            self._proc.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.cancel()
        self._log.close()
        log_tail = (self.folder / "torchrun.log").read_text(errors="replace")[-4000:]
        outcomes = []
        for rank in range(self.nprocs):
            path = self.folder / f"rank_{rank}.pkl"
            if path.exists():
                outcomes.append(_normalise(pickle.loads(path.read_bytes()), rank))
            else:
                outcomes.append(RankOutcome(
                    rank=rank, ok=False,
                    error=f"no outcome (torchrun exit code {self._proc.returncode})\n{log_tail}"))
        return outcomes

    def cancel(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)  # torchrun and its workers: own session
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


def _default_folder(executor: str) -> Path:
    """Where job pickles and logs go; SLURM needs a folder every node can read."""
    base = os.environ.get("FLEX_LAUNCH_DIR")
    if base:
        return Path(base)
    if executor == "slurm":
        return Path.home() / ".cache" / "flex_surgery" / "jobs"
    return Path(tempfile.mkdtemp(prefix="flex_launch_"))


def _resolve_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    if executor == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return executor


def submit(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int,
    executor: str = "local",
    device: str | None = None,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    partition: str | None = None,
    timeout_min: int = 10,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    folder: str | os.PathLike | None = None,
    python_path: Sequence[str] = (),
    kwargs: dict[str, Any] | None = None,
    name: str = "flex_surgery",
    collective_timeout_s: float = 300.0,
    rank0_only: bool = False,
    **executor_parameters: Any,
) -> LaunchedJob:
    """Start ``fn(*args, **kwargs)`` on ``nprocs`` ranks and return the job without waiting.

    ``device`` picks the backend on every rank (``None``: the rank's CUDA device where there is
    one, else CPU -- NCCL or gloo follows). ``python_path`` entries go first on ``sys.path`` in
    every rank before ``fn`` is unpickled (for functions defined outside installed packages).
    ``rank0_only`` drops the return values of ranks other than 0 on the ranks themselves
    (their :class:`RankOutcome` still reports success or the traceback).
    ``collective_timeout_s`` bounds every collective, so a rank stuck waiting for a dead peer
    fails instead of hanging until the job's ``timeout_min``.
    ``executor_parameters`` go to submitit's ``update_parameters`` unchanged (for example
    ``slurm_account="lab"``, ``slurm_constraint="a100"``, ``slurm_qos="high"``).
    """
    executor = _resolve_executor(executor)
    if executor == "fork":
        raise ValueError("executor 'fork' runs while the caller waits: use launch(), not submit()")
    if nprocs < 1 or nprocs % nodes:
        raise ValueError(f"nprocs={nprocs} must be a positive multiple of nodes={nodes}")
    if nodes > 1 and executor != "slurm":
        raise ValueError(f"executor {executor!r} runs on one node; use executor='slurm'")
    folder = Path(folder) if folder is not None else _default_folder(executor)
    folder.mkdir(parents=True, exist_ok=True)
    # On one host the launcher can pick a free rendezvous port; on SLURM the job derives it
    # from its id, which every task knows and the submitter does not yet.
    master_port = free_port() if executor == "local" else None
    task = RankTask.wrap(fn, args, kwargs, device=device, master_port=master_port,
                         python_path=[str(Path(p).resolve()) for p in python_path],
                         timeout_s=collective_timeout_s, rank0_only=rank0_only)
    if executor == "torchrun":
        return _TorchrunJob(task, nprocs, folder, timeout_min)

    import submitit

    if gpus_per_node is None:
        wants_gpu = device is None or str(device).startswith("cuda")
        gpus_per_node = _visible_gpus() if executor == "local" and wants_gpu else 0
    pythonpath = f"export PYTHONPATH={shlex.quote(PACKAGE_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"
    sub = submitit.AutoExecutor(folder=folder / "%j", cluster=executor)
    parameters: dict[str, Any] = dict(
        name=name, nodes=nodes, tasks_per_node=nprocs // nodes, timeout_min=timeout_min,
        gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, mem_gb=mem_gb,
    )
    # A job submitted from inside a distributed run inherits its variables (sbatch exports the
    # environment, the local executor copies it); torchrun's would outrank the job's own ranks.
    stale = "unset " + " ".join(INHERITED_RANK_VARIABLES)
    parameters[f"{executor}_setup"] = [stale, pythonpath]
    if partition is not None:
        parameters["slurm_partition"] = partition
    parameters.update(executor_parameters)
    sub.update_parameters(**parameters)
    job = sub.submit(task)
    return _SubmititJob(job, nprocs)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch(fn: Callable[..., Any], *args: Any, nprocs: int, executor: str = "local",
           rank0_only: bool = False, **options: Any) -> Any:
    """Run ``fn(*args)`` on ``nprocs`` ranks and return every rank's value, in rank order
    (with ``rank0_only``: rank 0's value alone, the others are dropped on their ranks).

    Blocks until the job ends. If any rank raises, :class:`LaunchError` carries each rank's
    traceback (``err.failures``) and the values of the ranks that succeeded (``err.results``).
    Options are those of :func:`submit`; with ``executor="fork"`` only ``device``,
    ``timeout_min``, ``collective_timeout_s`` and ``kwargs`` apply (the others describe a job).

    Example::

        import torch, torch.distributed as dist
        from flex_surgery.launch import launch

        def world_sum(x):
            t = torch.tensor([x * (dist.get_rank() + 1)])
            dist.all_reduce(t)
            return t.item()

        assert launch(world_sum, 1.0, nprocs=2) == [3.0, 3.0]
    """
    if executor == "fork":
        results = _launch_forked(fn, args, nprocs, **options)
    else:
        results = submit(fn, *args, nprocs=nprocs, executor=executor, rank0_only=rank0_only,
                         **options).results()
    return results[0] if rank0_only else results


def _launch_forked(fn: Callable[..., Any], args: tuple, nprocs: int, *, device: str | None = None,
                   timeout_min: float = 10, collective_timeout_s: float = 300.0,
                   kwargs: dict[str, Any] | None = None, **others: Any) -> list[Any]:
    """``executor="fork"``: the options of :func:`submit` that mean something for forked ranks."""
    if others:
        raise TypeError(f"executor 'fork' takes none of {sorted(others)} (job options)")
    return fork_ranks(fn, *args, nprocs=nprocs, device=device, timeout_s=60 * timeout_min,
                      collective_timeout_s=collective_timeout_s, kwargs=kwargs)
