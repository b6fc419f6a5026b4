"""Choosing and starting a ``torch.distributed`` backend from the device, never hard-coded.

NCCL only moves CUDA tensors and gloo is the CPU backend, so the backend follows from where the
model lives. Every place in flex_surgery (and its tests and launch recipes) that starts a process
group goes through :func:`init_distributed`, so the choice is made in one place.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["backend_for_device", "default_device", "init_distributed"]


def default_device() -> torch.device:
    """The device this rank should compute on: its local CUDA device if there is one, else CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for_device(device: torch.device | str | None = None) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` for everything else."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    device: torch.device | str | None = None,
    init_method: str | None = None,
    timeout_s: float = 300.0,
) -> str:
    """Initialise the default process group if it is not already, and return its backend.

    ``rank`` and ``world_size`` default to the ``RANK``/``WORLD_SIZE`` variables that torchrun and
    submitit's ``TorchDistributedEnvironment`` export; ``init_method`` defaults to ``env://``.
    """
    if dist.is_initialized():
        return dist.get_backend()
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend
