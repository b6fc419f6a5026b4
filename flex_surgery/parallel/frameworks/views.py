"""Shard views: which elements of a full parameter this rank holds, as an in-place view.

Every sharding scheme keeps a parameter's elements somewhere in this rank's memory. A
:class:`LocalShard` is a tensor that *aliases* that memory (an in-place edit is the edit, with no
gather and no copy) plus the map from its elements to coordinates of the full parameter (its
*region*), so seeded noise and full-parameter edits agree across layouts, and a ``gather`` that
returns the whole parameter.

Region kinds: :class:`BlockRegion` (a block of the full tensor: plain, fairscale, Megatron,
DTensor ``Shard``), :class:`FlatRegion` (a range of the flattened tensor: FSDP1 flat shards) and
:class:`IndexRegion` (per-dim index lists: DTensor ``_StridedShard``, e.g. FSDP2 over TP). Each
cuts the local part out of a full-shape tensor (``take``, the *scatter* of a full-shape edit)
and adds its part of a block of whole rows (``add_rows``, what chunked noise generation makes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["BlockRegion", "FlatRegion", "IndexRegion", "LocalShard", "Region",
           "block_shard", "plain_shard", "strided_shard"]


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
    ``kind`` names the framework that answered (``"plain"``, ``"dtensor"``, ``"fairscale"``,
    ``"megatron"``, ``"fsdp1"``); ``partition_dim`` is the dim split over tensor-parallel ranks
    (``None`` when the split is not along one dim, or there is none).
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
    partition_dim: int | None = None
    partition_stride: int = 1
    # A view no framework owns, taken as whole: the tensor-parallel group over which its
    # module must be the same for that to hold (checked by gather and check_whole).
    replicated_over: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def plain_shard(name: str, module: nn.Module, pname: str, param: nn.Parameter,
                gather: Callable[[], torch.Tensor] | None = None) -> LocalShard:
    """A parameter every rank holds whole (one process, DDP, replicated TP parameters).

    ``gather`` may check that claim (see :func:`~flex_surgery.parallel.frameworks.replicated`);
    by default it returns the local tensor.
    """
    local = param.data
    return LocalShard(
        name=name, aliases=(), local=local, full_shape=local.shape,
        region=BlockRegion((0,) * local.dim(), tuple(local.shape)), module=module,
        param_name=pname, gather=gather or (lambda: local), owners=(param,), kind="plain",
    )


def block_shard(name: str, module: nn.Module, pname: str, param: nn.Parameter, dim: int,
                group: dist.ProcessGroup, kind: str) -> LocalShard:
    """A parameter split evenly along ``dim`` over ``group``, rank ``r`` holding block ``r``
    (fairscale's and Megatron's tensor-parallel layers with stride 1)."""
    local = param.data
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
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
        gather=gather, owners=(param,), kind=kind, partition_dim=dim,
    )


def strided_shard(name: str, module: nn.Module, pname: str, param: nn.Parameter, dim: int,
                  stride: int, group: dist.ProcessGroup, kind: str) -> LocalShard:
    """A parameter whose ``dim`` is cut into ``stride`` equal blocks, each split evenly over
    ``group``: rank ``r`` holds part ``r`` of block 0, then part ``r`` of block 1, ...
    (Megatron's ``partition_stride``: a gated MLP's ``linear_fc1`` holds ``[gate_r, up_r]``).
    The region lists the global indices along ``dim``; ``gather`` puts the blocks back."""
    local = param.data
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if local.shape[dim] % stride:
        raise ValueError(f"{name}: dim {dim} of the local shard ({local.shape[dim]}) does not "
                         f"split into partition_stride={stride} blocks")
    part = local.shape[dim] // stride  # one block's part on one rank
    full_shape = list(local.shape)
    full_shape[dim] *= world
    block = full_shape[dim] // stride
    along = torch.cat([torch.arange(j * block + rank * part, j * block + (rank + 1) * part)
                       for j in range(stride)])
    indices = tuple(along if d == dim else torch.arange(n) for d, n in enumerate(local.shape))

    def gather() -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        blocks = [p.chunk(stride, dim) for p in parts]
        return torch.cat([b[j] for j in range(stride) for b in blocks], dim=dim)

    return LocalShard(
        name=name, aliases=(), local=local, full_shape=torch.Size(full_shape),
        region=IndexRegion(indices), module=module, param_name=pname, gather=gather,
        owners=(param,), kind=kind, partition_dim=dim, partition_stride=stride,
    )
