"""The vocabulary of layouts: how one tensor is split across the mesh's axes.

A :class:`Layout` lists, per mesh axis, a :class:`ShardSpec` (cut along one dim) or a
:class:`PartialSpec` (every rank holds a summand). These are plain values shared by layout
inference (:mod:`flex_surgery.parallel.layout`) and the collectives that gather and scatter
along them, so they live apart from the inference rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.parallel.frameworks.dtensor import mesh_axis_of
from flex_surgery.parallel.frameworks.registry import UnknownLayoutError
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["GATHER_ORDER", "Doubt", "Layout", "PartialSpec", "ShardSpec", "chunk_sizes",
           "dtensor_layout", "join_blocks", "unblocked"]

GATHER_ORDER = ("tp", "dp")


@dataclass(frozen=True)
class Doubt:
    """What one rank can say of a sequence split it inherited (a tensor-parallel split of
    sizes that may differ from rank to rank, seen on a module no framework describes):
    ``level`` :data:`SURE`, :data:`UNSURE`, :data:`REFUSES` or :data:`EMPTY`; ``what`` the
    tensor is (``"the output of 'point' (Identity)"``, for the errors of the other ranks) and
    ``why`` (this rank's own error text, empty when it has none).

    Which ranks can tell depends on their local sizes, which differ, so no rank decides
    alone: a small exchange over the stage carries every rank's level
    (:func:`~flex_surgery.parallel.shape_agreement.agree_on_doubt`, or
    :func:`~flex_surgery.parallel.shape_agreement.agree_on_whole_shape` for a hook with
    ``expected_shape``), and every rank raises when
    any rank refuses (its piece is not of the shape the split's layer made) or when two or
    more ranks are unsure and no rank is sure (each holds one token, and a statistic over the
    sequence -- ``sum(1, keepdim=True)``, the first token -- has the piece's shape). A rank
    holding more tokens settles it for all: the same code made every rank's tensor. A rank
    holding none settles nothing (``y[:, :1]`` of an empty piece is empty too), but with one
    unsure rank beside empty ones that rank holds the whole sequence, and its tensor is the
    whole one's, a piece or not."""

    level: int
    what: str
    why: str = ""

    def settle(self, groups: Sequence[dict[int, int]]) -> None:
        """Raise, on every rank that exchanged them, what the levels of ``groups`` (the ranks
        that split one tensor, by global rank) say together; nothing when every split holds."""
        refusing = sorted(rank for group in groups for rank, level in group.items()
                          if level == REFUSES)
        if self.level == REFUSES:
            raise UnknownLayoutError(self.why)
        if refusing:
            raise UnknownLayoutError(
                f"{self.what}: rank(s) {refusing} cannot tell how it is split (their error "
                f"says why); every rank stops at this call")
        unsure = [sorted(group) for group in groups if _undecided(group)]
        if unsure and self.level == UNSURE:
            raise UnknownLayoutError(self.why)
        if unsure:
            raise UnknownLayoutError(
                f"{self.what}: ranks {unsure[0]} each hold one token of the sequence split, "
                f"so whether their tensor is split cannot be told (their error says why); "
                f"every rank stops at this call")


SURE, UNSURE, REFUSES, EMPTY = 0, 1, 2, 3


def _undecided(group: dict[int, int]) -> bool:
    """Whether no rank of ``group`` is sure and two or more are unsure (see :class:`Doubt`)."""
    levels = list(group.values())
    return levels.count(UNSURE) >= 2 and all(level in (UNSURE, EMPTY) for level in levels)


@dataclass(frozen=True)
class ShardSpec:
    """The tensor is cut along ``dim`` over mesh axis ``axis``; ``sizes`` per rank if known.

    ``rows``: for the data-parallel batch dim of a forward tensor, the rows of this replica's
    input (``None``: unknown). A piece with one row where its replica's input has more is no
    piece of the batch (a table broadcast over it, such as rotary or position embeddings): the
    exchange of the pieces' sizes refuses it on every rank. Not part of the layout's identity.

    ``site``: for the data-parallel batch dim, the stamp of the hook site the tensor was seen
    at, in this forward (:mod:`~flex_surgery.parallel.site_tags`; set by the runtime), sent with
    the sizes: ranks whose exchange pairs different sites (a branch some ranks skip) raise
    together. Not part of the identity either.

    ``blocks`` > 1: ``dim`` of the whole tensor is ``blocks`` equal blocks, each split over
    ``axis``, and a rank's piece is its part of block 0, then its part of block 1, ...
    (Megatron's ``partition_stride``: a gated MLP's ``linear_fc1`` holds ``[gate_r, up_r]``).
    The whole is then *not* the pieces joined end to end, so no collective takes such a spec
    (:meth:`Layout.spec_for` refuses it): :func:`unblocked` first views the piece with ``dim``
    split into ``(blocks, part)``, where the split is a plain one of the part dim.

    ``doubt``: for a sequence split inherited under sequence parallelism, what this rank can
    say of it (:class:`Doubt`); set on every rank of the axis alike, with ``sizes`` ``None``,
    and settled among the ranks of the stage before anything is gathered. Not part of the
    identity.
    """

    axis: str
    dim: int
    sizes: tuple[int, ...] | None = None
    rows: int | None = field(default=None, compare=False)
    site: int = field(default=0, compare=False)
    blocks: int = 1
    doubt: Doubt | None = field(default=None, compare=False)


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
                if isinstance(s, ShardSpec) and s.blocks != 1:
                    raise LayoutError(f"{s}: a piece of interleaved blocks cannot be gathered "
                                      f"or scattered as it is; view it with unblocked() first")
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


def unblocked(t: torch.Tensor, layout: Layout,
              ) -> tuple[torch.Tensor, Layout, int | None]:
    """``(view, layout of the view, joined dim)``: for a layout with interleaved blocks
    (``ShardSpec.blocks`` > 1), ``t`` viewed with that dim split into ``(blocks, part)`` and the
    layout that splits the part dim plainly -- gathering the view gives ``(blocks, whole
    part)``, which :func:`join_blocks` flattens into the one-process order. Anything else is
    returned as it is, with ``None``. A view: autograd and in-place edits go through."""
    blocked = [s for s in layout.shards if s.blocks != 1]
    if not blocked:
        return t, layout, None
    spec = blocked[0]
    dim = spec.dim % t.ndim
    others = [s for s in layout.shards if s is not spec]
    if len(blocked) > 1 or any(s.dim % t.ndim >= dim for s in others) or \
            t.shape[dim] % spec.blocks or \
            (spec.sizes is not None and any(n % spec.blocks for n in spec.sizes)):
        raise LayoutError(f"{spec} on a tensor of shape {tuple(t.shape)} (with {others}): "
                          f"interleaved blocks are supported on the last split dim only, in "
                          f"blocks that divide every piece")
    view = t.unflatten(dim, (spec.blocks, t.shape[dim] // spec.blocks))
    part = replace(spec, dim=dim + 1, blocks=1,
                   sizes=None if spec.sizes is None else
                   tuple(n // spec.blocks for n in spec.sizes))
    shards = tuple(part if s is spec else replace(s, dim=s.dim % t.ndim)
                   for s in layout.shards)
    return view, replace(layout, shards=shards), dim


def join_blocks(t: Any, dim: int | None) -> Any:
    """The inverse of :func:`unblocked`'s view on a gathered tensor: ``(blocks, part)`` at
    ``dim`` flattened into one dim (``t`` itself when nothing was blocked, or not a tensor)."""
    if dim is None or not isinstance(t, torch.Tensor):
        return t
    return t.flatten(dim, dim + 1)


def split_blocks(t: Any, dim: int | None, blocks: int) -> Any:
    """:func:`join_blocks` undone: ``dim`` of ``t`` split into ``(blocks, rest)``."""
    if dim is None or not isinstance(t, torch.Tensor):
        return t
    return t.unflatten(dim, (blocks, t.shape[dim] // blocks))


def joining(store: Callable[..., None], dim: int | None) -> Callable[..., None]:
    """``store`` receiving gathered tensors joined back with :func:`join_blocks`."""
    if dim is None:
        return store
    return lambda full, *rest: store(join_blocks(full, dim), *rest)


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
