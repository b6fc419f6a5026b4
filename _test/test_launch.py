"""flex_surgery.launch on this machine: rank detection from each launcher's variables, one real
2-rank world per executor that returns every rank's value and names the rank that failed, and the
forked launcher's deadline and dead-rank reports."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flex_surgery.launch import (
    ForkedRanks,
    LaunchError,
    detect_environment,
    fork_ranks,
    launch,
    submit,
)
from flex_surgery.launch.cluster_config import load_cluster_config
from flex_surgery.launch.environment import port_for_job
from flex_surgery.launch.local import receive_message, send_message

HERE = str(Path(__file__).resolve().parent)
RECIPES = Path(HERE).parent / "distributed"

_LAUNCH_VARS = (
    "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_LOCALID", "SLURM_NODEID",
    "SLURM_JOB_NUM_NODES", "SLURM_STEP_ID", "SLURM_NNODES", "SLURM_STEP_NUM_NODES",
    "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_world_of_one_started_by_init_from_env_is_described_the_same_afterwards(clean_env):
    """init_from_env() in a plain process exports RANK, WORLD_SIZE, ... for env://; a later
    init_from_env() or detect_environment() took those for a launcher's ("env"). In a
    subprocess: the process group it starts lives until exit."""
    code = ("from flex_surgery.launch import detect_environment, init_from_env\n"
            "first = init_from_env('cpu')\n"
            "print(first.launcher, init_from_env('cpu') == first, detect_environment() == first)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["single", "True", "True"], done.stdout + done.stderr


def test_no_launcher_is_a_world_of_one(clean_env):
    env = detect_environment()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_torchrun_variables(clean_env):
    clean_env.setenv("TORCHELASTIC_RUN_ID", "abc")
    for name, value in dict(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2,
                            MASTER_ADDR="node7", MASTER_PORT=29500).items():
        clean_env.setenv(name, str(value))
    env = detect_environment()
    assert env == type(env)(3, 4, 1, 2, "node7", 29500, "torchrun")


def _slurm_step(env, procid: int, localid: int, job_id: str = "123") -> None:
    for name, value in dict(SLURM_JOB_ID=job_id, SLURM_NTASKS=4, SLURM_JOB_NUM_NODES=2,
                            SLURM_JOB_NODELIST="gpu[03-04]", SLURM_PROCID=procid,
                            SLURM_LOCALID=localid, SLURM_NODEID=procid // 2).items():
        env.setenv(name, str(value))


def test_srun_step_reads_slurm_ids_and_first_node(clean_env):
    _slurm_step(clean_env, procid=3, localid=1)
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    clean_env.setenv("SLURM_STEP_ID", "0")
    env = detect_environment()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.launcher) == ("gpu03", "srun")
    assert env.master_port == port_for_job("123.0")  # every task of the step agrees


def test_batch_script_is_not_a_rank(clean_env):
    """The sbatch script has SLURM_PROCID=0 too; taking it for rank 0 of 4 would hang."""
    _slurm_step(clean_env, procid=0, localid=0)
    assert detect_environment().launcher == "single"


def test_submitit_task_uses_job_port_not_inherited_one(clean_env):
    _slurm_step(clean_env, procid=2, localid=0, job_id="77")
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("MASTER_PORT", "1234")  # copied from the submitter by sbatch
    env = detect_environment()
    assert (env.rank, env.world_size, env.launcher) == (2, 4, "submitit")
    assert env.master_port == port_for_job("77") != 1234
    assert detect_environment(master_port=4321).master_port == 4321


def _set_env(env, **values) -> None:
    for name, value in values.items():
        env.setenv(name, str(value))


def test_srun_step_on_part_of_the_allocation_uses_the_steps_nodes_and_tasks(clean_env):
    """``srun -N1 -n2 -w gpu04 python train.py`` inside a 2-node allocation gpu[03-04]: the
    step's nodes and tasks (SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE), not the job's.
    Before: local_world_size 2 // 2 = 1 (both tasks share gpu04) and the rendezvous on gpu03,
    where no task of the step runs (init waited until its timeout)."""
    _set_env(clean_env, SLURM_JOB_ID=123, SLURM_STEP_ID=0, SLURM_JOB_NUM_NODES=2,
         SLURM_JOB_NODELIST="gpu[03-04]", SLURM_NNODES=1, SLURM_STEP_NUM_NODES=1,
         SLURM_STEP_NODELIST="gpu04", SLURM_NODELIST="gpu04", SLURM_NTASKS=2,
         SLURM_STEP_NUM_TASKS=2, SLURM_TASKS_PER_NODE=2, SLURM_STEP_TASKS_PER_NODE=2,
         SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_NODEID=0)
    env = detect_environment()
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    assert env.local_world_size == 2, f"2 tasks on gpu04, got {env.local_world_size}"
    assert env.master_addr == "gpu04", f"rank 0 runs on gpu04, rendezvous at {env.master_addr}"


def test_srun_step_with_uneven_tasks_per_node_has_the_right_local_world_size(clean_env):
    """``srun -n3`` over 2 nodes puts 2 tasks on the first node and 1 on the second
    (SLURM_STEP_TASKS_PER_NODE="2,1"): node 0 runs 2 (before: 3 // 2 = 1 on every task, so
    each of node 0's ranks took all of its cores). Without the variable, an uneven split is
    an error."""
    _set_env(clean_env, SLURM_JOB_ID=124, SLURM_STEP_ID=0, SLURM_JOB_NUM_NODES=2,
         SLURM_JOB_NODELIST="gpu[03-04]", SLURM_NNODES=2, SLURM_STEP_NUM_NODES=2,
         SLURM_STEP_NODELIST="gpu[03-04]", SLURM_NODELIST="gpu[03-04]", SLURM_NTASKS=3,
         SLURM_STEP_NUM_TASKS=3, SLURM_TASKS_PER_NODE="2,1", SLURM_STEP_TASKS_PER_NODE="2,1",
         SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0)
    env = detect_environment()
    assert env.local_world_size == 2, f"node 0 runs 2 tasks, got {env.local_world_size}"
    clean_env.setenv("SLURM_NODEID", "1")
    assert detect_environment().local_world_size == 1
    clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
    with pytest.raises(RuntimeError, match="do not add up"):
        detect_environment()
    clean_env.delenv("SLURM_STEP_TASKS_PER_NODE")
    clean_env.delenv("SLURM_TASKS_PER_NODE")
    with pytest.raises(RuntimeError, match="3 tasks on 2 nodes"):
        detect_environment()


def test_srun_step_ignores_a_master_port_copied_from_the_submitter(clean_env):
    """As for submitit: the port is drawn from the job and step ids, not a MASTER_PORT that
    sbatch copied from the submitting shell (two steps side by side shared it)."""
    _set_env(clean_env, SLURM_JOB_ID=123, SLURM_STEP_ID=3, SLURM_JOB_NUM_NODES=1,
         SLURM_JOB_NODELIST="gpu03", SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0,
         SLURM_LOCALID=0, SLURM_NODEID=0, MASTER_PORT=29500)  # copied in by sbatch
    env = detect_environment()
    assert env.launcher == "srun"
    assert env.master_port == port_for_job("123.3"), env.master_port


def test_bare_rank_variables_without_local_rank_are_refused_not_guessed(clean_env):
    """``RANK=1 WORLD_SIZE=4`` with no LOCAL_RANK (a custom launcher): which device and how many
    ranks share this host are unknown. It was guessed (local rank 0: every rank on cuda:0);
    now it is an error naming LOCAL_RANK."""
    _set_env(clean_env, RANK=1, WORLD_SIZE=4, MASTER_ADDR="node7", MASTER_PORT=29500)
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        detect_environment()
    clean_env.setenv("LOCAL_RANK", "1")
    assert detect_environment().local_rank == 1


def test_cluster_config_file_with_environment_overrides(tmp_path):
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "cluster.env"
    path.write_text("# comment\nFLEX_PARTITION='gpu'\nFLEX_NODES=2\nFLEX_TASKS_PER_NODE=4\n"
                    "FLEX_GPUS_PER_NODE=4\nFLEX_MEM_GB=\nFLEX_JOB_DIR=jobs\nFLEX_ACCOUNT=lab\n")
    config = load_cluster_config(path, environ={"FLEX_NODES": "3"})
    options = config.launch_options()
    assert (options["nprocs"], options["nodes"], options["partition"]) == (12, 3, "gpu")
    assert (options["gpus_per_node"], options["mem_gb"]) == (4, None)
    assert options["slurm_account"] == "lab"
    assert options["folder"] == str(tmp_path / "jobs")  # relative to the repository


def test_shell_recipes_read_the_same_config():
    """slurm_submit.sh --dry-run prints the sbatch line built from cluster.env + environment."""
    env = {"PATH": "/usr/bin:/bin", "FLEX_NODES": "2", "FLEX_PARTITION": "gpu",
           "FLEX_GPUS_PER_NODE": "8", "FLEX_TASKS_PER_NODE": "8", "FLEX_PYTHON": sys.executable}
    out = subprocess.run([str(RECIPES / "slurm_submit.sh"), "--dry-run", "x.py", "--flag"],
                         env=env, capture_output=True, text=True, check=True).stdout
    expected_time = load_cluster_config(RECIPES / "cluster.env").time_min
    for flag in ("--nodes=2", "--partition=gpu", "--gpus-per-node=8", "--ntasks-per-node=8",
                 f"--time={expected_time}", "slurm_job.sh srun x.py --flag"):
        assert flag in out, (flag, out)


def _rank_report(fail_on: int):
    """Every rank contributes to an all-reduce, then one rank raises after it."""
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    report = (dist.get_rank(), dist.get_world_size(), dist.get_backend(), t.item())
    if dist.get_rank() == fail_on:
        raise ValueError(f"planted failure on rank {fail_on}")
    return report


def check_two_rank_launch(executor: str, folder: Path, monkeypatch) -> None:
    """rank 0's value comes back although rank 1 raised; the error names rank 1 and its cause.

    Launched as if from inside another torchrun job, whose variables the ranks must not take.
    """
    logging.getLogger("submitit").setLevel(logging.ERROR)
    for name, value in dict(TORCHELASTIC_RUN_ID="outer", RANK=5, WORLD_SIZE=8,
                            MASTER_ADDR="elsewhere", MASTER_PORT=1).items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(LaunchError) as caught:
        launch(_rank_report, 1, nprocs=2, executor=executor, device="cpu",
               folder=folder, python_path=[HERE], timeout_min=3)
    err = caught.value
    assert err.results == [(0, 2, "gloo", 3.0), None]
    assert list(err.failures) == [1]
    assert "planted failure on rank 1" in err.failures[1]
    assert "ValueError" in str(err) and "first: rank 1" in str(err)
    launcher = {"local": "submitit", "slurm": "submitit", "torchrun": "torchrun"}[executor]
    assert [o.launcher for o in err.outcomes] == [launcher, launcher]


def test_local_two_ranks_return_values_and_name_the_failed_rank(tmp_path, monkeypatch):
    check_two_rank_launch("local", tmp_path, monkeypatch)


def test_fork_executor_returns_values_and_names_the_failed_rank():
    """executor="fork" (flex_surgery.launch.local): same result path as the job executors."""
    with pytest.raises(LaunchError) as caught:
        launch(_rank_report, 1, nprocs=2, executor="fork", device="cpu", timeout_min=2)
    err = caught.value
    assert err.results == [(0, 2, "gloo", 3.0), None]
    assert list(err.failures) == [1] and "planted failure on rank 1" in err.failures[1]
    assert [o.launcher for o in err.outcomes] == ["fork", "fork"]
    assert launch(_rank_report, -1, nprocs=2, executor="fork", device="cpu",
                  rank0_only=True) == (0, 2, "gloo", 3.0)
    with pytest.raises(TypeError, match="partition"):
        launch(_rank_report, -1, nprocs=2, executor="fork", partition="gpu")
    with pytest.raises(ValueError, match="launch"):
        submit(_rank_report, -1, nprocs=2, executor="fork")


def _hang_on_rank_zero():
    if dist.get_rank() == 0:
        import time

        time.sleep(600)  # outside any collective: only the launcher's deadline ends it
    return dist.get_rank()


def test_fork_ranks_deadline_kills_a_silent_rank_and_leaves_no_process():
    import multiprocessing

    before = set(multiprocessing.active_children())  # the session's rank pools, if any
    start = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        fork_ranks(_hang_on_rank_zero, nprocs=2, device="cpu", timeout_s=5)
    assert time.monotonic() - start < 30
    assert caught.value.results == [None, 1]
    assert "rank 0 (timeout)" in caught.value.failures[0]
    assert set(multiprocessing.active_children()) == before


def test_a_tensor_reply_outlives_the_rank_that_sent_it():
    # Multiprocessing's pickler would pass the tensor as a descriptor fetched from the sender at
    # unpickling time; the rank has exited by then, so the reply would read as a dead rank.
    def answer_and_exit(conn):
        send_message(conn, ("ok", torch.arange(4.0) * (dist.get_rank() + 1)))

    ranks = ForkedRanks(2, answer_and_exit, device="cpu", timeout_s=60)
    try:
        for proc in ranks.procs:
            proc.join(timeout=30)
        assert all(proc.exitcode == 0 for proc in ranks.procs)
        replies = ranks.collect(30)
    finally:
        ranks.close(force=True)
    for rank in (0, 1):
        kind, value = replies[rank]
        assert kind == "ok", value
        assert torch.equal(value, torch.arange(4.0) * (rank + 1))


def test_forked_ranks_report_a_dead_rank_with_its_exit_code():
    def serve(conn):
        import os

        if dist.get_rank() == 1:
            os._exit(7)
        send_message(conn, ("ok", receive_message(conn)))

    ranks = ForkedRanks(2, serve, device="cpu", timeout_s=60)
    try:
        ranks.send("ping")
        replies = ranks.collect(30)
    finally:
        ranks.close(force=True)
    assert replies[0] == ("ok", "ping")
    assert replies[1][0] == "died" and "exit code 7" in replies[1][1]
    assert not ranks.alive


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forked_ranks_that_cannot_start_name_the_cause():
    with pytest.raises(LaunchError, match="process group init failed") as caught:
        ForkedRanks(2, lambda conn: None, device="cuda", timeout_s=60)
    assert sorted(caught.value.failures) == [0, 1]
