"""fairscale's model-parallel layers (``fairscale.nn.model_parallel``).

Layers and what they do to activations (exact, from the module's attributes):
``ColumnParallelLinear`` output is last-dim sharded unless ``gather_output``, its input
replicated; ``RowParallelLinear`` input is last-dim sharded if ``input_is_parallel``, its output
replicated (all-reduced); ``VocabParallelEmbedding`` and ``ParallelEmbedding`` outputs are
replicated (they reduce or gather before returning).

Parameters: column weight and bias and vocab-parallel weight split on dim 0, row weight on
dim 1 (row bias replicated), ``ParallelEmbedding`` weight on dim 1.

Groups: fairscale's model-parallel state (``initialize_model_parallel``), which orders ranks
``(dp, pp, tp)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from flex_surgery.parallel.frameworks.base import (
    HIDDEN,
    ActivationShard,
    Framework,
    TPLayer,
    loaded,
)
from flex_surgery.parallel.frameworks.views import LocalShard, block_shard

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["FairscaleTP", "fairscale_mesh"]

_LAYERS = "fairscale.nn.model_parallel.layers"


def _layers():
    if not loaded(_LAYERS):
        return None
    from fairscale.nn.model_parallel import layers

    return layers


class FairscaleTP(Framework):
    name = "fairscale"

    def owns(self, module: nn.Module) -> bool:
        fs = _layers()
        return fs is not None and isinstance(module, (
            fs.ColumnParallelLinear, fs.RowParallelLinear, fs.VocabParallelEmbedding,
            fs.ParallelEmbedding))

    def tp_layer(self, module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
        fs = _layers()
        if fs is None:
            return None
        if isinstance(module, fs.ColumnParallelLinear):
            out = None if module.gather_output else ActivationShard(HIDDEN, module.out_features)
            return TPLayer(None, out, exact=True)
        if isinstance(module, fs.RowParallelLinear):
            inp = ActivationShard(HIDDEN, module.in_features) if module.input_is_parallel \
                else None
            return TPLayer(inp, None, exact=True)
        if isinstance(module, (fs.VocabParallelEmbedding, fs.ParallelEmbedding)):
            return TPLayer(None, None, exact=True)
        return None

    def splits_parameters(self, module: nn.Module, mesh: ParallelMesh | None = None) -> bool:
        return self.owns(module)

    def partition_dim(self, module: nn.Module, pname: str,
                      param: torch.Tensor | None = None) -> int | None:
        """The dim a parameter of a fairscale layer is split along (``None``: replicated)."""
        fs = _layers()
        if fs is None:
            return None
        if isinstance(module, (fs.ColumnParallelLinear, fs.VocabParallelEmbedding)):
            return 0
        if isinstance(module, fs.RowParallelLinear):
            return 1 if pname == "weight" else None
        if isinstance(module, fs.ParallelEmbedding):
            return 1
        return None

    def parameter_shard(self, name: str, module: nn.Module, pname: str,
                        param: nn.Parameter) -> LocalShard | None:
        if not self.owns(module):
            return None
        dim = self.partition_dim(module, pname)
        if dim is None:
            return None  # replicated: a plain view
        from fairscale.nn.model_parallel import initialize as fs_init

        return block_shard(name, module, pname, param, dim,
                           fs_init.get_model_parallel_group(), kind=self.name)

    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        if not loaded("fairscale.nn.model_parallel.initialize"):
            return None
        from fairscale.nn.model_parallel import initialize as fs_init

        if not fs_init.model_parallel_is_initialized() or \
                fs_init.get_model_parallel_world_size() == 1:
            return None
        return fs_init.get_model_parallel_group()

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        if not loaded("fairscale.nn.model_parallel.initialize"):
            return None
        from fairscale.nn.model_parallel import initialize as fs_init

        if not fs_init.model_parallel_is_initialized():
            return None
        return fairscale_mesh()


def fairscale_mesh():
    """A :class:`~flex_surgery.parallel.mesh.ParallelMesh` of fairscale's own groups."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.mesh import (
        ParallelMesh,
        _check_sizes,
        _drop_trivial,
        adopted_stage_group,
    )

    if not fs.model_parallel_is_initialized():
        raise RuntimeError("fairscale model parallel is not initialised")
    groups = {"tp": fs.get_model_parallel_group(), "dp": fs.get_data_parallel_group(),
              "pp": fs.get_pipeline_parallel_group()}
    sizes = {a: dist.get_world_size(g) for a, g in groups.items()}
    coords = {a: dist.get_rank(g) for a, g in groups.items()}
    _check_sizes(sizes, dist.get_world_size())
    # fairscale has no stage group; one is made per stage from its (dp, pp, tp) grid.
    stage_group, device_mesh = adopted_stage_group(groups, sizes, ("dp", "pp", "tp"))
    return ParallelMesh(_drop_trivial(groups, sizes), sizes, coords, stage_group,
                        source="fairscale", device_mesh=device_mesh)
