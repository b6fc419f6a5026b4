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

__all__ = ["DDP", "join_enabled"]


def join_enabled(ddps: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the DDP modules among ``ddps`` (``(name, module)`` pairs) that have been given
    to ``torch.distributed.algorithms.join.Join`` (uneven inputs).

    Under ``Join`` a rank that runs out of batches stops calling the model and only shadows
    DDP's own collectives, so any other collective over the data-parallel ranks -- a hook's
    gather -- waits for it forever. DDP keeps the setting once given (``Join`` does not reset
    ``_join_config`` when its block ends; DDP goes on announcing each forward to the join
    context), so this answers "may be under Join", the same on every rank."""
    return [name or "<the model>" for name, m in ddps
            if getattr(getattr(m, "_join_config", None), "enable", False)]


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
