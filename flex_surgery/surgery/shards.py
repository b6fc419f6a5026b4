"""Local views of parameters: which elements of each original parameter this rank holds.

Every sharding scheme keeps a parameter's elements somewhere in this rank's memory; surgery
needs exactly those elements, as a tensor that *aliases* that memory (so an in-place edit is the
edit, with no gather and no copy), plus the map from those elements back to coordinates of the
full, unsharded parameter (so seeded noise and full-parameter edits agree across layouts).

:func:`local_shards` answers that for every original parameter of a model:

- plain parameters (single process, DDP): the parameter itself, region = everything;
- DTensor parameters (FSDP2 ``fully_shard``, DTensor TP ``parallelize_module``, both on a 2-D
  mesh): the local tensor, region = the block (or index lists) given by the placements;
- fairscale model-parallel layers: the local ``weight``/``bias`` partitioned along the layer's
  partition dimension;
- FSDP1 ``FlatParameter`` (``use_orig_params`` True or False): a 1-D slice of the flat local
  shard, region = a range of the flattened original parameter (``_shard_param_infos``).

The region kinds are :class:`BlockRegion` (a block of the full tensor), :class:`FlatRegion` (a
range of the flattened tensor) and :class:`IndexRegion` (per-dim index lists, for
``_StridedShard`` layouts such as FSDP2 over TP); each can cut the local part out of a
full-shape tensor (``take``) or add its part of a block of whole rows (``add_rows``, what
chunked noise generation produces).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import clean_name

__all__ = [
    "BlockRegion",
    "FlatRegion",
    "IndexRegion",
    "LocalShard",
    "fsdp1_param_offsets",
    "local_shards",
    "reshard_for_surgery",
]

def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class BlockRegion:
    """``local == full[offsets[0]:offsets[0]+shape[0], offsets[1]:..., ...]``."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        if full.dim() == 0:
            return full
        return full[tuple(slice(o, o + s) for o, s in zip(self.offsets, self.shape))]

    def row_range(self, full_shape: torch.Size) -> tuple[int, int]:
        if len(full_shape) == 0:
            return 0, 1
        return self.offsets[0], self.offsets[0] + self.shape[0]

    def add_rows(self, local: torch.Tensor, rows: torch.Tensor, row0: int) -> None:
        """Add to ``local`` its part of ``rows``: whole dim-0 rows ``row0 ..`` of a full-shape
        tensor (the unit of chunked noise generation)."""
        if local.dim() == 0:
            local.add_(rows.reshape(()).to(local.dtype))
            return
        lo = max(row0, self.offsets[0])
        hi = min(row0 + rows.shape[0], self.offsets[0] + self.shape[0])
        if lo >= hi:
            return
        inner = tuple(slice(o, o + s) for o, s in zip(self.offsets[1:], self.shape[1:]))
        part = rows[(slice(lo - row0, hi - row0), *inner)]
        local[lo - self.offsets[0]: hi - self.offsets[0]].add_(part.to(local.dtype))


@dataclass(frozen=True)
class FlatRegion:
    """``local == full.reshape(-1)[start:stop]`` (FSDP1 flat shards)."""

    start: int
    stop: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1)[self.start: self.stop]

    def row_range(self, full_shape: torch.Size) -> tuple[int, int]:
        row = _row_numel(full_shape)
        if self.stop <= self.start:
            return 0, 0
        return self.start // row, math.ceil(self.stop / row)

    def add_rows(self, local: torch.Tensor, rows: torch.Tensor, row0: int) -> None:
        row = _row_numel(rows.shape)
        first = row0 * row
        lo = max(first, self.start)
        hi = min(first + rows.numel(), self.stop)
        if lo < hi:
            part = rows.reshape(-1)[lo - first: hi - first]
            local[lo - self.start: hi - self.start].add_(part.to(local.dtype))


@dataclass(frozen=True)
class IndexRegion:
    """``local == full[ix_(indices[0], indices[1], ...)]``: each dim holds an arbitrary list of
    global indices (DTensor layouts with ``_StridedShard``, e.g. FSDP2 over tensor parallel)."""

    indices: tuple[torch.Tensor, ...]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        if full.dim() == 0:
            return full
        return full[torch.meshgrid(*[i.to(full.device) for i in self.indices], indexing="ij")]

    def row_range(self, full_shape: torch.Size) -> tuple[int, int]:
        if len(full_shape) == 0:
            return 0, 1
        rows = self.indices[0]
        if rows.numel() == 0:
            return 0, 0
        return int(rows.min()), int(rows.max()) + 1

    def add_rows(self, local: torch.Tensor, rows: torch.Tensor, row0: int) -> None:
        if local.dim() == 0:
            local.add_(rows.reshape(()).to(local.dtype))
            return
        dim0 = self.indices[0].to(rows.device)
        hit = ((dim0 >= row0) & (dim0 < row0 + rows.shape[0])).nonzero().flatten()
        if hit.numel() == 0:
            return
        sub = IndexRegion((dim0[hit] - row0, *self.indices[1:])).take(rows)
        local.index_add_(0, hit.to(local.device), sub.to(local.dtype))


Region = BlockRegion | FlatRegion | IndexRegion


def _row_numel(shape: torch.Size | tuple[int, ...]) -> int:
    """Elements per dim-0 row of a parameter of ``shape`` (1 for 0-d and 1-d)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


@dataclass
class LocalShard:
    """This rank's elements of one original parameter, as an in-place view.

    ``local`` aliases the memory the model computes with; ``region`` says which elements of the
    full parameter (shape ``full_shape``) they are; ``gather()`` returns the full parameter
    (a collective over the ranks that share it; call it on every such rank in the same order).
    ``owners`` are the ``nn.Parameter`` objects an optimizer may hold for these elements.
    """

    name: str
    aliases: tuple[str, ...]
    local: torch.Tensor
    full_shape: torch.Size
    region: Region
    module: nn.Module
    param_name: str
    gather: Callable[[], torch.Tensor] = field(repr=False)
    owners: tuple[nn.Parameter, ...] = field(default=(), repr=False)
    kind: str = "plain"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def reshard_for_surgery(model: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Put every FSDP unit of ``model`` in its sharded state, with no unsharded copy left.

    Why: after a forward, FSDP1 keeps the *root* unit's gathered flat parameter allocated and
    skips the next all-gather, and FSDP2 keeps the root's parameters unsharded; an edit of the
    local shard would then be invisible to the next forward (or an edit of the unsharded copy
    lost at the next reshard). Freeing the unsharded copies makes the next forward gather from
    the shards again -- on entering (so edits take effect) and on leaving (so the restored
    weights do). ``modules`` is ``list(model.modules())`` when the caller has it already.
    """
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    for module in model.modules() if modules is None else modules:
        if fsdp1 is not None and isinstance(module, fsdp1):
            handle = getattr(module, "_handle", None)
            if (handle is not None and handle.uses_sharded_strategy
                    and hasattr(handle.flat_param, "_local_shard")):  # lazily initialised
                handle.reshard(True)
                handle.post_reshard()
        elif fsdp2 is not None and isinstance(module, fsdp2):
            module.reshard()


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _dtensor_shard(name: str, module: nn.Module, pname: str, param) -> LocalShard:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    local = param._local_tensor
    strided = False
    for p in param.placements:
        if isinstance(p, _StridedShard):
            strided = True
        elif type(p) not in (Shard, Replicate):
            raise NotImplementedError(
                f"{name}: placement {p} is not supported by surgery (Shard, _StridedShard and "
                "Replicate are); edit a partial-sum tensor after reducing it"
            )
    if strided:
        region = _strided_region(param)
        shape = tuple(len(i) for i in region.indices)
    else:
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        region = BlockRegion(tuple(offset), tuple(shape))
    if tuple(local.shape) != tuple(shape):  # FSDP2 may pad the local storage
        local = local[tuple(slice(0, s) for s in shape)]
    return LocalShard(
        name=name, aliases=(), local=local, full_shape=param.shape, region=region,
        module=module, param_name=pname, gather=lambda: param.detach().full_tensor(),
        owners=(param,), kind="dtensor",
    )


def _strided_region(param) -> IndexRegion:
    """Global indices held locally along each dim, by splitting an ``arange`` per dim with the
    same placements (a local split: ``src_data_rank=None`` communicates nothing)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    indices = []
    for d, size in enumerate(param.shape):
        placements = []
        for p in param.placements:
            if isinstance(p, _StridedShard) and p.dim == d:
                placements.append(_StridedShard(0, split_factor=p.split_factor))
            elif isinstance(p, Shard) and p.dim == d:
                placements.append(Shard(0))
            else:
                placements.append(Replicate())
        ar = torch.arange(size, device=param._local_tensor.device)
        dt = distribute_tensor(ar, param.device_mesh, placements, src_data_rank=None)
        indices.append(dt._local_tensor.clone())
    return IndexRegion(tuple(indices))


def _fairscale_partition(module: nn.Module, pname: str) -> int | None:
    """Partition dim of a fairscale model-parallel layer's parameter, ``None`` if replicated."""
    try:
        from fairscale.nn.model_parallel import layers as fs
    except ImportError:
        return None
    if isinstance(module, (fs.ColumnParallelLinear, fs.VocabParallelEmbedding)):
        return 0
    if isinstance(module, fs.RowParallelLinear):
        return 1 if pname == "weight" else None
    if isinstance(module, fs.ParallelEmbedding):
        return 1
    return None


def _is_fairscale_layer(module: nn.Module) -> bool:
    try:
        from fairscale.nn.model_parallel import layers as fs
    except ImportError:
        return False
    return isinstance(module, (fs.ColumnParallelLinear, fs.RowParallelLinear,
                               fs.VocabParallelEmbedding, fs.ParallelEmbedding))


def _fairscale_shard(name: str, module: nn.Module, pname: str,
                     param: nn.Parameter) -> LocalShard:
    from fairscale.nn.model_parallel import initialize as fs_init

    dim = _fairscale_partition(module, pname)
    local = param.data
    if dim is None:
        return _plain_shard(name, module, pname, param)
    world = fs_init.get_model_parallel_world_size()
    rank = fs_init.get_model_parallel_rank()
    group = fs_init.get_model_parallel_group()
    full_shape = list(local.shape)
    full_shape[dim] *= world
    offsets = [0] * local.dim()
    offsets[dim] = rank * local.shape[dim]

    def gather() -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    return LocalShard(
        name=name, aliases=(), local=local, full_shape=torch.Size(full_shape),
        region=BlockRegion(tuple(offsets), tuple(local.shape)), module=module, param_name=pname,
        gather=gather, owners=(param,), kind="fairscale",
    )


def _plain_shard(name: str, module: nn.Module, pname: str, param: nn.Parameter) -> LocalShard:
    local = param.data
    return LocalShard(
        name=name, aliases=(), local=local, full_shape=local.shape,
        region=BlockRegion((0,) * local.dim(), tuple(local.shape)), module=module,
        param_name=pname, gather=lambda: local, owners=(param,), kind="plain",
    )


def fsdp1_param_offsets(flat_param: nn.Parameter) -> list[int]:
    """Offset of each original parameter of an FSDP1 ``FlatParameter`` in the unsharded (padded)
    flat parameter, i.e. in the concatenation of every rank's local shard."""
    offsets, pos = [], 0
    for numel, is_pad in zip(flat_param._numels_with_padding, flat_param._is_padding_mask):
        if not is_pad:
            offsets.append(pos)
        pos += numel
    return offsets


def _fsdp1_shards(fsdp_module: nn.Module, prefix: str) -> Iterator[LocalShard]:
    """One :class:`LocalShard` per original parameter of an FSDP1 unit's ``FlatParameter``."""
    handle = fsdp_module._handle
    fp = handle.flat_param
    sharded = handle.uses_sharded_strategy
    # Before FSDP's lazy init (first forward) the flat parameter already holds the shard but
    # ``_local_shard`` is not set yet; afterwards it is the same storage.
    local_flat = getattr(fp, "_local_shard", fp.data) if sharded else fp.data
    group = fsdp_module.process_group
    offsets = fsdp1_param_offsets(fp)
    gathered: dict[str, torch.Tensor] = {}

    def gather_flat() -> torch.Tensor:
        if "flat" not in gathered:
            if not sharded:
                gathered["flat"] = local_flat
            else:
                world = dist.get_world_size(group)
                out = torch.empty(local_flat.numel() * world, dtype=local_flat.dtype,
                                  device=local_flat.device)
                dist.all_gather_into_tensor(out, local_flat.contiguous(), group=group)
                gathered["flat"] = out
        return gathered["flat"]

    aliases: dict[tuple[int, str], list[str]] = {}
    for spi in fp._shared_param_infos:
        key = (id(spi.prim_module), spi.prim_param_name)
        aliases.setdefault(key, []).append(
            clean_name(_join(prefix, spi.module_name, spi.param_name)))
    for i, (pinfo, shape, numel) in enumerate(zip(fp._param_infos, fp._shapes, fp._numels)):
        name = clean_name(_join(prefix, fp._fqns[i]))
        if sharded:
            sinfo = fp._shard_param_infos[i]
            if sinfo.in_shard:
                local = local_flat[sinfo.offset_in_shard: sinfo.offset_in_shard
                                   + sinfo.numel_in_shard]
                region = FlatRegion(sinfo.intra_param_start_idx, sinfo.intra_param_end_idx + 1)
            else:
                local = local_flat[:0]
                region = FlatRegion(0, 0)
        else:
            local = local_flat[offsets[i]: offsets[i] + numel]
            region = FlatRegion(0, numel)
        owners = [fp]
        orig = pinfo.module._parameters.get(pinfo.param_name)
        if isinstance(orig, nn.Parameter) and orig is not fp:
            owners.append(orig)

        def gather(i=i, shape=shape, numel=numel) -> torch.Tensor:
            return gather_flat()[offsets[i]: offsets[i] + numel].view(shape)

        yield LocalShard(
            name=name,
            aliases=tuple(aliases.get((id(pinfo.module), pinfo.param_name), ())),
            local=local, full_shape=torch.Size(shape), region=region, module=pinfo.module,
            param_name=pinfo.param_name, gather=gather, owners=tuple(owners), kind="fsdp1",
        )


def local_shards(model: nn.Module) -> list[LocalShard]:
    """Every original parameter of ``model`` once (tied ones once, with their aliases), in the
    same order on every rank, as this rank's in-place local view.

    Call :func:`reshard_for_surgery` first under FSDP so the views point at the shards.
    """
    fsdp1 = _fsdp1_class()
    shards: list[LocalShard] = []
    by_param: dict[int, LocalShard] = {}
    handled: set[tuple[int, str]] = set()  # (module id, param name) owned by an FSDP1 unit
    for mname, module in model.named_modules():
        if fsdp1 is not None and isinstance(module, fsdp1) and module._handle is not None:
            fp = module._handle.flat_param
            for pinfo in fp._param_infos:
                handled.add((id(pinfo.module), pinfo.param_name))
            for spi in fp._shared_param_infos:
                handled.add((id(spi.module), spi.param_name))
            handled.add((id(module), "_flat_param"))
            handled.add((id(module._fsdp_wrapped_module), "_flat_param"))
            for s in _fsdp1_shards(module, _join(mname, "_fsdp_wrapped_module")):
                shards.append(s)
                for owner in s.owners:
                    by_param[id(owner)] = s
    for mname, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None or (id(module), pname) in handled:
                continue
            name = clean_name(_join(mname, pname))
            seen = by_param.get(id(param))
            if seen is not None:
                if name not in seen.names:
                    seen.aliases = (*seen.aliases, name)
                continue
            if _is_dtensor(param):
                s = _dtensor_shard(name, module, pname, param)
            elif _is_fairscale_layer(module):
                s = _fairscale_shard(name, module, pname, param)
            else:
                s = _plain_shard(name, module, pname, param)
            by_param[id(param)] = s
            shards.append(s)
    return shards
