"""Runtime over a ParallelMesh (placeholder until the distributed layer lands)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.runtime import LocalRuntime, Runtime


def build_runtime(
    module: nn.Module,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    process_group: dist.ProcessGroup | None = None,
    store_on: str = "rank0",
) -> Runtime:
    """The runtime FlexModel uses: local for one process, distributed otherwise."""
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return LocalRuntime()
    raise NotImplementedError("the distributed runtime is not implemented yet")
