"""Cluster settings for job recipes, in one ``KEY=value`` file that both bash and Python read.

The recipes in ``distributed/`` (shell scripts for ``torchrun``/``sbatch``/``srun`` and the
Python submitter) all take partition, nodes, GPUs, time and log folder from the same file,
``distributed/cluster.env``. The format is the intersection of what ``bash`` and a ten-line
parser agree on: one ``KEY=value`` per line, ``#`` comments on their own lines, no expansion.
A variable already set in the environment overrides the file, in bash and here alike, so
``FLEX_NODES=2 distributed/slurm_submit.sh ...`` needs no edit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ClusterConfig", "load_cluster_config", "read_env_file"]


def read_env_file(path: str | os.PathLike, environ: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    """The file's ``KEY=value`` pairs, each replaced by ``environ[KEY]`` where that is set."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=value, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = environ.get(key, value)
    return values


@dataclass(frozen=True)
class ClusterConfig:
    """The settings of ``distributed/cluster.env`` (see that file for what each one means)."""

    executor: str = "slurm"
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 20
    account: str | None = None
    qos: str | None = None
    job_dir: str = "slurm_jobs"

    @property
    def nprocs(self) -> int:
        return self.nodes * self.tasks_per_node

    def launch_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`flex_surgery.launch.submit` / :func:`launch`."""
        options: dict[str, Any] = dict(
            nprocs=self.nprocs, executor=self.executor, nodes=self.nodes,
            gpus_per_node=self.gpus_per_node, partition=self.partition,
            cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb, timeout_min=self.time_min,
            folder=self.job_dir,
        )
        if self.account:
            options["slurm_account"] = self.account
        if self.qos:
            options["slurm_qos"] = self.qos
        return options


def load_cluster_config(path: str | os.PathLike,
                        environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read a ``cluster.env`` file (``FLEX_*`` keys) into a :class:`ClusterConfig`.

    A relative ``FLEX_JOB_DIR`` is taken relative to the repository that holds the file (its
    parent's parent), so recipes behave the same from any working directory.
    """
    values = read_env_file(path, environ)

    def get(key: str, convert=str, default=None):
        value = values.get(f"FLEX_{key}", "")
        return convert(value) if value != "" else default

    job_dir = Path(get("JOB_DIR", default="slurm_jobs"))
    if not job_dir.is_absolute():
        job_dir = Path(path).resolve().parent.parent / job_dir
    return ClusterConfig(
        executor=get("EXECUTOR", default="slurm"),
        partition=get("PARTITION"),
        nodes=get("NODES", int, 1),
        tasks_per_node=get("TASKS_PER_NODE", int, 1),
        gpus_per_node=get("GPUS_PER_NODE", int, 0),
        cpus_per_task=get("CPUS_PER_TASK", int),
        mem_gb=get("MEM_GB", float),
        time_min=get("TIME_MIN", int, 20),
        account=get("ACCOUNT"),
        qos=get("QOS"),
        job_dir=str(job_dir),
    )
