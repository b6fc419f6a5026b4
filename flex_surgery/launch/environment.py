"""Who am I in this job? Reading rank, world size and rendezvous from the launcher's variables.

Every launcher describes a rank differently: torchrun exports ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``; a submitit task knows its rank through
:class:`submitit.JobEnvironment`; a plain ``srun`` step has ``SLURM_PROCID``/``SLURM_NTASKS`` and
a compressed node list. :func:`detect_environment` turns each of them into one
:class:`RankEnvironment`, and :func:`init_from_env` exports it as the ``env://`` variables and
starts the process group through :func:`flex_surgery.parallel.backend.init_distributed`, so the
backend always follows from the device.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import random
import socket
from dataclasses import dataclass

import torch

from flex_surgery.parallel.backend import init_distributed

__all__ = ["RankEnvironment", "detect_environment", "free_port", "init_from_env", "port_for_job"]

# The range submitit's TorchDistributedEnvironment draws job ports from.
_MIN_PORT, _MAX_PORT = 20000, 60000


@dataclass(frozen=True)
class RankEnvironment:
    """One rank's place in the job, as the launcher described it.

    ``launcher`` names where it came from: ``"torchrun"``, ``"submitit"``, ``"srun"``, ``"env"``
    (``RANK``/``WORLD_SIZE`` set by something else) or ``"single"`` (no launcher: a world of one).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def export(self) -> None:
        """Write the ``env://`` variables ``torch.distributed`` reads, replacing stale ones.

        Replacing matters: ``sbatch`` copies the submitting shell's environment into the job, so a
        job submitted from inside another distributed run would otherwise inherit its ranks.
        """
        os.environ.update(
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
        )


def free_port() -> int:
    """A TCP port that is free on this host right now (for single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for_job(job_id: str) -> int:
    """The rendezvous port of a job: drawn from its id, so every task computes the same one.

    This is submitit's own rule, applied without reading ``MASTER_PORT``, which ``sbatch`` may
    have copied from the submitter.
    """
    return random.Random(job_id).randint(_MIN_PORT, _MAX_PORT)


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise KeyError(name)
        return default
    return int(value)


def _from_torchrun() -> RankEnvironment:
    world_size = _int_env("WORLD_SIZE")
    return RankEnvironment(
        rank=_int_env("RANK"),
        world_size=world_size,
        local_rank=_int_env("LOCAL_RANK", 0),
        local_world_size=_int_env("LOCAL_WORLD_SIZE", world_size),
        master_addr=os.environ["MASTER_ADDR"],
        master_port=_int_env("MASTER_PORT"),
        launcher="torchrun",
    )


def _from_submitit(master_port: int | None) -> RankEnvironment:
    """A submitit task, described by submitit's own :class:`TorchDistributedEnvironment`.

    Only the port is ours: submitit takes ``MASTER_PORT`` when it is set, and in a job that
    ``sbatch`` started it usually is -- copied from the shell that submitted, often the port of
    another distributed run. The job-id rule every task computes alike is used instead.
    """
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    tde = TorchDistributedEnvironment()
    if master_port is None:
        master_port = port_for_job(submitit.JobEnvironment().job_id)
    return RankEnvironment(tde.rank, tde.world_size, tde.local_rank, tde.local_world_size,
                           tde.master_addr, master_port, "submitit")


def _from_srun_step(master_port: int | None) -> RankEnvironment:
    """A plain ``srun`` step (no submitit): ``TorchDistributedEnvironment()`` refuses those
    ("Could not figure out which environment the job is running in"), so SLURM's ids are read
    through submitit's ``SlurmJobEnvironment`` directly, as submitit's helper would."""
    from submitit.slurm.slurm import SlurmJobEnvironment, _parse_node_list

    job = SlurmJobEnvironment()
    if master_port is None:
        # Steps of one job may run side by side: the step id keeps their ports apart. Not
        # MASTER_PORT, which sbatch may have copied from the submitting shell (as submitit).
        step = os.environ.get("SLURM_STEP_ID", "0")
        master_port = port_for_job(f"{job.job_id}.{step}")
    # The step's nodes and tasks, not the job's: a step may run on part of the allocation
    # (srun -N1 -w node04), and its tasks need not spread evenly (srun -n3 on two nodes).
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST") or \
        os.environ.get("SLURM_JOB_NODELIST")
    hosts = _parse_node_list(nodes) if nodes else [socket.gethostname()]
    per_node = _tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE")
                               or os.environ.get("SLURM_TASKS_PER_NODE"), job.num_tasks, len(hosts))
    node = _int_env("SLURM_NODEID", 0)
    if not 0 <= node < len(per_node):
        raise RuntimeError(f"SLURM_NODEID={node} is not one of the step's {len(per_node)} "
                           f"node(s) ({nodes})")
    return RankEnvironment(job.global_rank, job.num_tasks, job.local_rank, per_node[node],
                           hosts[0], master_port, "srun")


def _tasks_per_node(spec: str | None, tasks: int, nodes: int) -> list[int]:
    """The tasks on each node of a step, from SLURM's ``2(x3),1`` form; without it, an even
    split, or an error when the tasks do not divide evenly (the count per node is unknown)."""
    if spec:
        counts: list[int] = []
        for part in spec.split(","):
            count, _, times = part.partition("(x")
            counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
        if sum(counts) != tasks:
            raise RuntimeError(f"SLURM tasks per node {spec!r} do not add up to the step's "
                               f"{tasks} tasks")
        return counts
    if tasks % max(1, nodes):
        raise RuntimeError(f"{tasks} tasks on {nodes} nodes, and SLURM_STEP_TASKS_PER_NODE is "
                           "not set: how many run on this node is unknown (set LOCAL_WORLD_SIZE "
                           "through torchrun, or run whole tasks per node)")
    return [tasks // max(1, nodes)] * max(1, nodes)


def _in_srun_step() -> bool:
    """Inside ``srun`` (a job step), not in the batch script that would call it.

    The batch script also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``, and treating it as
    rank 0 would wait forever for the other ranks; only a step has ``SLURM_STEP_NUM_TASKS``.
    """
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


def detect_environment(master_port: int | None = None) -> RankEnvironment:
    """Describe this rank from whichever launcher started it; a world of one if none did.

    Precedence: torchrun (``TORCHELASTIC_RUN_ID``) over submitit (``SUBMITIT_EXECUTOR``) over a
    plain ``srun`` step over bare ``RANK``/``WORLD_SIZE``, because each later launcher may run
    the earlier ones inside it (torchrun inside an ``srun`` step, for instance) and the innermost
    one owns the ranks. ``master_port`` overrides the port submitit/srun jobs derive from the
    job id (torchrun and bare ``env://`` always bring their own).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return _from_torchrun()
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return _from_submitit(master_port)
    if _in_srun_step():
        return _from_srun_step(master_port)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if _int_env("WORLD_SIZE") > 1 and "LOCAL_RANK" not in os.environ:
            # Which device this rank takes, and how many ranks share the host, are unknown:
            # every rank would take cuda:0 and all of the host's cores.
            raise RuntimeError(
                "RANK and WORLD_SIZE are set but LOCAL_RANK is not: this rank's device and the "
                "number of ranks on its host are unknown. Set LOCAL_RANK (and "
                "LOCAL_WORLD_SIZE) for every rank, or start the job with torchrun or srun")
        env = _from_torchrun()
        if _started_alone is not None and env == dataclasses.replace(_started_alone,
                                                                     launcher=env.launcher):
            return _started_alone  # the variables init_from_env wrote for a world of one
        return RankEnvironment(**{**env.__dict__, "launcher": "env"})
    return RankEnvironment(
        rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
        master_port=master_port or free_port(), launcher="single",
    )


def init_from_env(
    device: torch.device | str | None = None,
    *,
    master_port: int | None = None,
    timeout_s: float = 300.0,
) -> RankEnvironment:
    """Start ``torch.distributed`` for code already running under torchrun, srun or submitit.

    Idempotent: if the default process group exists, the environment is only described. The
    backend follows from ``device`` (default: this rank's CUDA device, else CPU) through
    :func:`~flex_surgery.parallel.backend.init_distributed`. A group started here is destroyed
    at interpreter exit unless the program did it first: a gloo group still alive while Python
    shuts down can abort the process ("terminate called without an active exception"), which
    ``srun`` then reports as a failed task.

    Example, in a script started by ``torchrun --nproc-per-node 2 script.py`` or
    ``srun -n 2 python script.py``::

        from flex_surgery.launch import init_from_env
        env = init_from_env()
        print(env.rank, env.world_size, env.launcher)
    """
    import torch.distributed as dist

    global _started_alone
    env = detect_environment(master_port)
    if not dist.is_initialized():
        env.export()
        if env.launcher == "single":
            _started_alone = env
        init_distributed(env.rank, env.world_size, device=device, timeout_s=timeout_s)
        atexit.register(_destroy_at_exit)
    return env


# The world of one init_from_env started (it exported RANK, WORLD_SIZE, ... for env://): later
# calls describe it as it was, not as a launcher that set those variables.
_started_alone: RankEnvironment | None = None


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
