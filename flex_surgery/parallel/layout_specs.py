"""The vocabulary of layouts: how one tensor is split across the mesh's axes.

A :class:`Layout` lists, per mesh axis, a :class:`ShardSpec` (cut along one dim) or a
:class:`PartialSpec` (every rank holds a summand). These are plain values shared by layout
inference (:mod:`flex_surgery.parallel.layout`) and the collectives that gather and scatter
along them, so they live apart from the inference rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.parallel.frameworks.dtensor import mesh_axis_of
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["GATHER_ORDER", "Layout", "PartialSpec", "ShardSpec", "chunk_sizes",
           "dtensor_layout"]

GATHER_ORDER = ("tp", "dp")


@dataclass(frozen=True)
class ShardSpec:
    """The tensor is cut along ``dim`` over mesh axis ``axis``; ``sizes`` per rank if known.

    ``rows``: for the data-parallel batch dim of a forward tensor, the rows of this replica's
    input (``None``: unknown). A piece with one row where its replica's input has more is no
    piece of the batch (a table broadcast over it, such as rotary or position embeddings): the
    exchange of the pieces' sizes refuses it on every rank. Not part of the layout's identity.
    """

    axis: str
    dim: int
    sizes: tuple[int, ...] | None = None
    rows: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PartialSpec:
    """Every rank of ``axis`` holds a summand; ``op`` is ``"sum"`` or ``"avg"``."""

    axis: str
    op: str = "sum"


@dataclass(frozen=True)
class Layout:
    shards: tuple[ShardSpec, ...] = ()
    partials: tuple[PartialSpec, ...] = ()
    grad_scale: float = 1.0
    backward_scale: float = 1.0

    @property
    def is_replicated(self) -> bool:
        return not self.shards and not self.partials

    def spec_for(self, axis: str) -> ShardSpec | PartialSpec | None:
        for s in (*self.shards, *self.partials):
            if s.axis == axis:
                return s
        return None

    def steps(self) -> list[ShardSpec | PartialSpec]:
        """The per-axis operations in gather order (scatter runs them reversed)."""
        return [s for a in GATHER_ORDER if (s := self.spec_for(a)) is not None]

    def global_shape(self, local_shape: Sequence[int]) -> tuple[int | None, ...]:
        """Unsharded shape; ``None`` where a shard's sizes are only known at run time."""
        shape: list[int | None] = list(local_shape)
        for s in self.shards:
            shape[s.dim] = sum(s.sizes) if s.sizes is not None else None
        return tuple(shape)


def chunk_sizes(full: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``torch.chunk(full, parts)`` padded with empty chunks (DTensor's ``Shard`` rule;
    equal to ``full / parts`` when it divides)."""
    step = -(-full // parts)
    return tuple(max(0, min(step, full - i * step)) for i in range(parts))


def dtensor_layout(t, mesh: ParallelMesh) -> Layout:
    """The layout of a DTensor's local piece, from its placements."""
    shards, partials = [], []
    for i, p in enumerate(t.placements):
        axis = mesh_axis_of(t.device_mesh, i, mesh)
        if p.is_replicate():
            continue
        if axis is None:
            raise LayoutError(f"DTensor mesh dim {i} is not one of the mesh's dp/tp groups")
        if p.is_shard():
            dim = p.dim % t.ndim
            shards.append(ShardSpec(axis, dim, chunk_sizes(t.shape[dim], mesh.size(axis))))
        elif p.is_partial():
            partials.append(PartialSpec(axis, "avg" if p.reduce_op == "avg" else "sum"))
        else:  # e.g. _StridedShard: interleaved blocks, not a piece joined end to end
            raise LayoutError(f"DTensor placement {p} over {axis} is not supported (Shard, "
                              "Partial and Replicate are): redistribute the tensor to Shard "
                              "or Replicate before the hook")
    return Layout(tuple(shards), tuple(partials))
