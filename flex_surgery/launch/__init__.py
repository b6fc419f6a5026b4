"""Launching flex_surgery programs on many ranks: forked here, torchrun, SLURM through submitit.

- :func:`fork_ranks` / :class:`ForkedRanks`: the one launcher that forks ranks on this machine
  (the demo, the test suite's rank pool and the benchmarks all start their ranks through it).
- :func:`launch` / :func:`submit`: run a function on N ranks and get every rank's result back
  (or a :class:`LaunchError` naming each failed rank with its traceback).
- :func:`init_from_env`: join the process group from inside code that torchrun, ``srun`` or a
  submitit job already started.
- :func:`run_script`: launch a Python file (or module) instead of a function.
- :func:`load_cluster_config`: the ``distributed/cluster.env`` settings as launch options.
"""

from flex_surgery.launch.cluster_config import ClusterConfig, load_cluster_config
from flex_surgery.launch.environment import RankEnvironment, detect_environment, init_from_env
from flex_surgery.launch.launcher import EXECUTORS, LaunchedJob, launch, run_script, submit
from flex_surgery.launch.local import ForkedRanks, fork_ranks
from flex_surgery.launch.rank_task import LaunchError, RankOutcome, RankTask

__all__ = [
    "EXECUTORS",
    "ClusterConfig",
    "ForkedRanks",
    "LaunchError",
    "LaunchedJob",
    "RankEnvironment",
    "RankOutcome",
    "RankTask",
    "detect_environment",
    "fork_ranks",
    "init_from_env",
    "launch",
    "load_cluster_config",
    "run_script",
    "submit",
]
