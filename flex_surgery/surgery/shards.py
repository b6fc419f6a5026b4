"""Local views of parameters: which elements of each original parameter this rank holds.

Every sharding scheme keeps a parameter's elements somewhere in this rank's memory; surgery
needs exactly those elements, as a tensor that *aliases* that memory (so an in-place edit is the
edit, with no gather and no copy), plus the map from those elements back to coordinates of the
full, unsharded parameter (so seeded noise and full-parameter edits agree across layouts).

The answer is framework knowledge, so it comes from the framework registry
(:mod:`flex_surgery.parallel.frameworks`): :func:`local_shards` walks the model once and asks it
for each parameter's :class:`LocalShard`:

- plain parameters (single process, DDP, replicated TP parameters): the parameter itself,
  region = everything;
- DTensor parameters (FSDP2 ``fully_shard``, DTensor TP ``parallelize_module``, HF TP, both on
  a 2-D mesh): the local tensor, region = the block (or index lists) given by the placements;
- fairscale and Megatron-core tensor-parallel layers: the local ``weight``/``bias``, a block
  along the layer's partition dim;
- FSDP1 ``FlatParameter`` (``use_orig_params`` True or False): a 1-D slice of the flat local
  shard, region = a range of the flattened original parameter (``_shard_param_infos``).

The region kinds are :class:`BlockRegion` (a block of the full tensor), :class:`FlatRegion` (a
range of the flattened tensor) and :class:`IndexRegion` (per-dim index lists, for
``_StridedShard`` layouts such as FSDP2 over TP); each can cut the local part out of a
full-shape tensor (``take``) or add its part of a block of whole rows (``add_rows``, what
chunked noise generation produces). ``LocalShard.gather()`` is the full parameter -- for a
parameter no framework owns it first checks that every tensor-parallel rank holds the same
value, and raises :class:`~flex_surgery.parallel.frameworks.UnknownLayoutError` otherwise.
"""

from __future__ import annotations

from torch import nn

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.frameworks.fsdp import fsdp1_param_offsets as fsdp1_param_offsets
from flex_surgery.parallel.frameworks.views import BlockRegion as BlockRegion
from flex_surgery.parallel.frameworks.views import FlatRegion as FlatRegion
from flex_surgery.parallel.frameworks.views import IndexRegion as IndexRegion
from flex_surgery.parallel.frameworks.views import LocalShard

# The view types (LocalShard, the regions) are defined in flex_surgery.parallel.frameworks.views
# and importable from here.
__all__ = ["local_shards", "reshard_for_surgery"]


def reshard_for_surgery(model: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Put every FSDP unit of ``model`` in its sharded state, with no unsharded copy left.

    Why: after a forward, FSDP1 keeps the *root* unit's gathered flat parameter allocated and
    skips the next all-gather, and FSDP2 keeps the root's parameters unsharded; an edit of the
    local shard would then be invisible to the next forward (or an edit of the unsharded copy
    lost at the next reshard). Freeing the unsharded copies makes the next forward gather from
    the shards again -- on entering (so edits take effect) and on leaving (so the restored
    weights do). ``modules`` is ``list(model.modules())`` when the caller has it already.
    """
    frameworks.reshard(model.modules() if modules is None else modules)


def local_shards(model: nn.Module) -> list[LocalShard]:
    """Every original parameter of ``model`` once (tied ones once, with their aliases), in the
    same order on every rank, as this rank's in-place local view.

    Call :func:`reshard_for_surgery` first under FSDP so the views point at the shards.
    """
    return frameworks.parameter_views(model)
