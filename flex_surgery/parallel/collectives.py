"""Autograd-aware collectives over one process group: each one's backward is its mirror.

In the tone of fairscale's ``model_parallel/mappings.py``: small ``torch.autograd.Function``
classes plus functional wrappers.

============================  ===========================  =================================
function                      forward                      backward
============================  ===========================  =================================
:func:`gather_to_one`         concat shards on ``dst``     scatter the gradient from ``dst``
:func:`scatter_from_one`      split ``src``'s tensor       gather the gradient to ``src``
:func:`all_gather`            concat shards on all         sum gradients, keep own slice
:func:`all_reduce`            sum (or mean) on all         sum (or mean) the gradients
:func:`reduce_to_one`         sum summands on ``dst``      broadcast the gradient from ``dst``
:func:`broadcast_from_one`    copy ``src``'s to all        sum gradients on ``src``
:func:`keep_on_one`           ``src`` keeps, others zero   gradient stays on ``src``
:func:`replica_to_one`        rank 0's replica only        broadcast the gradient
:func:`one_to_replicas`       broadcast to the replicas    keep rank 0's gradient
============================  ===========================  =================================

Ranks that end up without the whole tensor get a zero-size *placeholder* that is still part of
the autograd graph: handing it to the mirror collective keeps every rank's backward running the
same collectives in the same order, even though only one rank did the work in between.

Backends: gloo's ``gather``/``scatter``/``all_gather`` reject uneven sizes, so shards are padded
to the largest one and trimmed after; the sizes are exchanged first unless the caller knows them.
Only ``gather``, ``scatter``, ``all_gather``, ``all_reduce``, ``reduce`` and ``broadcast`` are
used, which gloo and nccl both provide; the device is always the tensor's own.
``group`` ``None`` means the default group; ``dst``/``src`` are ranks *within* the group.

A collective that fails because a peer is gone raises
:class:`~flex_surgery.parallel.failures.LostRankError` naming the lost ranks (see
:mod:`flex_surgery.parallel.failures`; its names are re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# Re-exported: how a failure reaches every rank lives in failures.py; callers import these
# names from here too. Not in __all__, so the API docs describe them once, in failures.py.
from flex_surgery.parallel.failures import (  # noqa: F401
    LostRankError,
    RemoteEditError,
    agree_on_status,
    announce_process,
    broadcast_status,
    lost_ranks,
    names_lost_ranks,
    naming_lost_ranks,
    run_agreeing,
)

# The plain collectives (no autograd) live in piece_transfer.py; exchange_sizes and
# start_gather are part of this module's API.
from flex_surgery.parallel.piece_transfer import (  # noqa: F401
    _all_gather,
    _gather,
    _pad,
    _padded_shape,
    _scatter,
    _sizes,
    exchange_sizes,
    start_gather,
)

__all__ = [
    "all_gather", "all_reduce", "broadcast_from_one", "exchange_sizes", "gather_to_one",
    "keep_on_one", "one_to_replicas", "reduce_to_one", "replica_to_one", "scatter_from_one",
    "start_gather",
]

Group = dist.ProcessGroup | None


@names_lost_ranks
def _broadcast(buf: torch.Tensor, group: Group, src: int) -> None:
    dist.broadcast(buf, group=group, group_src=src)


@names_lost_ranks
def _reduce(buf: torch.Tensor, group: Group, dst: int) -> None:
    dist.reduce(buf, dst=dist.get_global_rank(group, dst) if group is not None else dst,
                group=group)


@names_lost_ranks
def _all_reduce(buf: torch.Tensor, group: Group) -> None:
    dist.all_reduce(buf, group=group)


def _group_rank(group: Group) -> int:
    return dist.get_rank(group)


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# -- autograd functions ---------------------------------------------------------------------
class _GatherToOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dim, group, dst, sizes):
        ctx.dim, ctx.group, ctx.dst, ctx.sizes = dim, group, dst, sizes
        ctx.local_shape = tuple(t.shape)
        full = _gather(t, dim, group, dst, sizes)
        return full if full is not None else _placeholder(t)

    @staticmethod
    def backward(ctx, grad):
        me = _group_rank(ctx.group)
        piece = _scatter(grad if me == ctx.dst else None, ctx.dim, ctx.group, ctx.dst,
                         ctx.sizes, ctx.local_shape, grad)
        return piece, None, None, None, None


def _scatter_piece(full: torch.Tensor, dim: int, group: Group, src: int,
                   sizes: Sequence[int], local_shape: Sequence[int]) -> torch.Tensor:
    piece = _scatter(full if _group_rank(group) == src else None, dim, group, src, sizes,
                     local_shape, full)
    # A piece as large as the largest is the whole receive buffer, already private; a
    # smaller one is a view of the padded buffer: copied so it does not keep the padding.
    return piece if sizes[_group_rank(group)] == max(sizes) else piece.clone()


class _ScatterFromOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, dim, group, src, sizes, local_shape):
        ctx.dim, ctx.group, ctx.src, ctx.sizes = dim, group, src, sizes
        return _scatter_piece(full, dim, group, src, sizes, local_shape)

    @staticmethod
    def backward(ctx, grad):
        full = _gather(grad, ctx.dim, ctx.group, ctx.src, ctx.sizes)
        return (full if full is not None else _placeholder(grad)), None, None, None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dim, group, sizes):
        ctx.dim, ctx.group, ctx.sizes = dim, group, sizes
        return _all_gather(t, dim, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _all_reduce(grad, ctx.group)
        me = _group_rank(ctx.group)
        start = sum(ctx.sizes[:me])
        return grad.narrow(ctx.dim, start, ctx.sizes[me]).clone(), None, None, None


def _summands(t: torch.Tensor, group: Group, mean: bool) -> torch.Tensor:
    """A fresh contiguous buffer to all-reduce: ``t``, divided by the group's size first for
    a mean (as DDP averages: a sum of fp16 values may overflow where their mean does not)."""
    return t.contiguous() / dist.get_world_size(group) if mean else t.contiguous().clone()


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, mean):
        ctx.group, ctx.mean = group, mean
        buf = _summands(t, group, mean)
        _all_reduce(buf, group)
        return buf

    @staticmethod
    def backward(ctx, grad):
        buf = _summands(grad, ctx.group, ctx.mean)
        _all_reduce(buf, ctx.group)
        return buf, None, None


class _ReduceToOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, dst):
        ctx.group, ctx.dst, ctx.shape = group, dst, tuple(t.shape)
        buf = t.contiguous().clone()
        _reduce(buf, group, dst)
        return buf if _group_rank(group) == dst else _placeholder(t)

    @staticmethod
    def backward(ctx, grad):
        buf = grad.contiguous().clone() if _group_rank(ctx.group) == ctx.dst else \
            grad.new_empty(ctx.shape)
        _broadcast(buf, ctx.group, ctx.dst)
        return buf, None, None


class _BroadcastFromOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, group, src, shape):
        ctx.group, ctx.src = group, src
        me = _group_rank(group)
        buf = full.contiguous().clone() if me == src else full.new_empty(shape)
        _broadcast(buf, group, src)
        return buf

    @staticmethod
    def backward(ctx, grad):
        buf = grad.contiguous().clone()
        _reduce(buf, ctx.group, ctx.src)
        return (buf if _group_rank(ctx.group) == ctx.src else _placeholder(grad)), None, None, \
            None


class _KeepOnOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, group, src, shape):
        ctx.keep = _group_rank(group) == src
        return full.clone() if ctx.keep else full.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.keep else _placeholder(grad)), None, None, None


class _ReplicaToOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.keep, ctx.shape = group, _group_rank(group) == 0, tuple(t.shape)
        # A copy, not a view: an editing function may edit the leader's tensor in place, which
        # autograd forbids on a view a custom Function returns.
        return t.clone() if ctx.keep else _placeholder(t)

    @staticmethod
    def backward(ctx, grad):
        buf = grad.contiguous() if ctx.keep else grad.new_empty(ctx.shape)
        _broadcast(buf, ctx.group, 0)
        return buf, None


class _OneToReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, shape):
        ctx.keep = _group_rank(group) == 0
        buf = t.contiguous().clone() if ctx.keep else t.new_empty(shape)
        _broadcast(buf, group, 0)
        return buf

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.keep else _placeholder(grad)), None, None


# -- functional API -------------------------------------------------------------------------
def _tracks_grad(t: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``t``. When it does not, a function below runs
    its collective directly: ``Function.apply`` would build no graph either, but costs a few
    microseconds a call (retrieval runs under ``no_grad``)."""
    return t.requires_grad and torch.is_grad_enabled()


def gather_to_one(t: torch.Tensor, dim: int, group: Group = None, dst: int = 0,
                  sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` on group rank ``dst``.

    Returns the whole tensor on ``dst`` and a zero-size placeholder elsewhere. Backward scatters
    the gradient back. ``sizes`` (every rank's size along ``dim``) is exchanged if not given.
    """
    if dist.get_world_size(group) == 1:
        return t
    dim = dim % t.ndim
    sizes = _sizes(t, dim, group, sizes)
    if not _tracks_grad(t):  # the same collective, without building an autograd node
        full = _gather(t, dim, group, dst, sizes)
        return full if full is not None else _placeholder(t)
    return _GatherToOne.apply(t, dim, group, dst, sizes)


def scatter_from_one(full: torch.Tensor, dim: int, sizes: Sequence[int],
                     local_shape: Sequence[int], group: Group = None,
                     src: int = 0) -> torch.Tensor:
    """Split ``src``'s ``full`` along ``dim`` into pieces of ``sizes``; every rank gets its own.

    Non-``src`` ranks pass their placeholder (or any tensor of the right dtype/device) as
    ``full``; ``local_shape`` is this rank's piece's shape. Backward gathers to ``src``.
    """
    if dist.get_world_size(group) == 1:
        return full
    dim = dim % len(local_shape)
    if not _tracks_grad(full):  # the same collective, without building an autograd node
        return _scatter_piece(full, dim, group, src, tuple(sizes), tuple(local_shape))
    return _ScatterFromOne.apply(full, dim, group, src, tuple(sizes), tuple(local_shape))


def all_gather(t: torch.Tensor, dim: int, group: Group = None,
               sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` on every rank (backward: reduce-scatter)."""
    if dist.get_world_size(group) == 1:
        return t
    dim = dim % t.ndim
    sizes = _sizes(t, dim, group, sizes)
    if not _tracks_grad(t):  # the same collective, without building an autograd node
        return _all_gather(t, dim, group, sizes)
    return _AllGather.apply(t, dim, group, sizes)


def all_reduce(t: torch.Tensor, group: Group = None, mean: bool = False) -> torch.Tensor:
    """Sum (``mean``: average) of every rank's ``t`` on every rank. Every rank's copy feeds its
    own computation, so the gradient is the sum (average) of every rank's gradient."""
    if dist.get_world_size(group) == 1:
        return t
    return _AllReduce.apply(t, group, mean)


def reduce_to_one(t: torch.Tensor, group: Group = None, dst: int = 0) -> torch.Tensor:
    """Sum of every rank's ``t`` on ``dst``, placeholder elsewhere (backward: broadcast)."""
    if dist.get_world_size(group) == 1:
        return t
    return _ReduceToOne.apply(t, group, dst)


def broadcast_from_one(full: torch.Tensor, shape: Sequence[int], group: Group = None,
                       src: int = 0) -> torch.Tensor:
    """``src``'s ``full`` on every rank (backward: sum the gradients onto ``src``)."""
    if dist.get_world_size(group) == 1:
        return full
    return _BroadcastFromOne.apply(full, group, src, tuple(shape))


def keep_on_one(full: torch.Tensor, shape: Sequence[int], group: Group = None,
                src: int = 0) -> torch.Tensor:
    """``full`` on ``src`` and zeros of ``shape`` elsewhere: a split of ``full`` into summands
    (the right inverse of :func:`reduce_to_one`); no communication."""
    if dist.get_world_size(group) == 1:
        return full
    return _KeepOnOne.apply(full, group, src, tuple(shape))


def replica_to_one(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """For a tensor every rank holds an identical copy of (and computes on redundantly): group
    rank 0's copy stands for all, the others get a placeholder. No communication forward;
    backward broadcasts rank 0's gradient, since every replica's gradient is that one."""
    if dist.get_world_size(group) == 1:
        return t
    return _ReplicaToOne.apply(t, group)


def one_to_replicas(t: torch.Tensor, shape: Sequence[int], group: Group = None) -> torch.Tensor:
    """Group rank 0's ``t`` as every rank's replica (the others pass their placeholder and the
    replica's ``shape``). Backward keeps rank 0's gradient: the replicas' gradients are copies
    of it, not summands."""
    if dist.get_world_size(group) == 1:
        return t
    return _OneToReplicas.apply(t, group, tuple(shape))
