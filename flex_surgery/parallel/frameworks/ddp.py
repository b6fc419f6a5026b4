"""DistributedDataParallel: replicated parameters, the local batch, one data-parallel group.

DDP splits nothing but the batch; its only answers are its wrapper label and its process group
(adopted as ``dp`` when it spans the world).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from flex_surgery.parallel.frameworks.base import Framework

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["DDP"]


class DDP(Framework):
    name = "ddp"

    def owns(self, module: nn.Module) -> bool:
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(module, DistributedDataParallel)

    def wrapper_kind(self, module: nn.Module) -> str | None:
        return "DDP" if self.owns(module) else None

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        if model is None or not self.owns(model):
            return None
        from flex_surgery.parallel.frameworks.fsdp import _data_parallel_mesh

        return _data_parallel_mesh(model.process_group, "data_parallel_wrapper")
