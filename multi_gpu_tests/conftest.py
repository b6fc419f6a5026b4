"""GPU tests: every rank of a job runs the same pytest session, one GPU per rank.

How to run them (they need CUDA; without it every test here is skipped and says why):

- ``python multi_gpu_tests/run_on_slurm.py``: one SLURM job per test file through submitit,
  with the GPUs of ``distributed/cluster.env``; pass/fail is collected per rank.
- ``torchrun --nproc-per-node=N -m pytest multi_gpu_tests`` on one GPU machine.
- ``pytest multi_gpu_tests`` on a GPU machine: a world of one rank (multi-rank tests skip).

``FLEX_MULTI_GPU_ON_CPU=1`` runs the same tests on CPU ranks with gloo, to develop them on a
machine without GPUs (under torchrun); NCCL-specific checks then skip.

Every rank takes the same skip decisions (they depend on the world size and the device type
only), so the ranks always enter the same collectives. Tests assert after their last collective,
so a failed assertion on one rank cannot leave the others waiting.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
ON_CPU = bool(os.environ.get("FLEX_MULTI_GPU_ON_CPU"))
NO_GPU_REASON = (
    "multi-GPU test: needs CUDA (torch.cuda.is_available() is False here); run it with "
    "`python multi_gpu_tests/run_on_slurm.py` on a GPU cluster, or `torchrun "
    "--nproc-per-node=N -m pytest multi_gpu_tests` on a GPU machine"
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world():
    """The job's process group (started here unless a launcher already did), torn down by
    whoever started it."""
    from flex_surgery.launch import init_from_env

    created = not dist.is_initialized()
    env = init_from_env("cpu" if ON_CPU else None, timeout_s=120)
    if not ON_CPU:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    yield env
    if created and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def device(world) -> torch.device:
    """This rank's device: its GPU, or the CPU under FLEX_MULTI_GPU_ON_CPU."""
    if ON_CPU:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "world_size(n): needs a job of at least n ranks (one GPU each)")
    config.addinivalue_line("markers", "cuda_only: checks something only CUDA/NCCL has")


def pytest_runtest_setup(item):
    """Skip on every rank alike: the decision depends on the world size and device type only."""
    if HERE not in Path(str(item.fspath)).resolve().parents:
        return
    if ON_CPU and item.get_closest_marker("cuda_only"):
        pytest.skip("checks CUDA/NCCL; FLEX_MULTI_GPU_ON_CPU runs on gloo")
    marker = item.get_closest_marker("world_size")
    if marker is not None:
        needed = marker.args[0]
        from flex_surgery.launch import detect_environment

        size = dist.get_world_size() if dist.is_initialized() else detect_environment().world_size
        if size < needed:
            pytest.skip(f"needs a world of >= {needed} ranks (one GPU each); this one has {size}")
