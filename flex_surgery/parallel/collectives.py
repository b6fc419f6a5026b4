"""Autograd-aware collectives over one process group: each one's backward is its mirror.

In the tone of fairscale's ``model_parallel/mappings.py``: small ``torch.autograd.Function``
classes plus functional wrappers.

============================  ===========================  =================================
function                      forward                      backward
============================  ===========================  =================================
:func:`gather_to_one`         concat shards on ``dst``     scatter the gradient from ``dst``
:func:`scatter_from_one`      split ``src``'s tensor       gather the gradient to ``src``
:func:`all_gather`            concat shards on all         sum gradients, keep own slice
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

A collective that fails because a peer is gone (its process exited: gloo reports "connection
closed by peer"; or it did not answer within the group's timeout) raises
:class:`LostRankError`, whose message names the ranks whose processes have exited. Every rank
records its host and process id in the default store when a runtime is built
(:func:`announce_process`), which is what lets a survivor tell a dead peer from a slow one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LostRankError", "RemoteEditError", "all_gather", "announce_process", "broadcast_from_one",
    "broadcast_status", "exchange_sizes", "gather_to_one", "keep_on_one", "lost_ranks",
    "naming_lost_ranks", "one_to_replicas", "reduce_to_one", "replica_to_one", "scatter_from_one",
]

Group = dist.ProcessGroup | None


# -- lost ranks -------------------------------------------------------------------------------
class LostRankError(RuntimeError):
    """A collective failed because a rank of its group is gone (its process exited) or did not
    answer within the group's timeout; raised on the ranks that were waiting for it."""


_PROCESS_KEY = "flex_surgery/rank_process/{}"
_announced_in: list[Any] = []  # the default group this process announced itself in


def announce_process() -> None:
    """Record this rank's host and process id in the default store (once per process group),
    so that a survivor of a failed collective can name the ranks whose processes exited."""
    default = dist.distributed_c10d._get_default_group()
    if _announced_in and _announced_in[0] is default:
        return
    store = dist.distributed_c10d._get_default_store()
    store.set(_PROCESS_KEY.format(dist.get_rank()), f"{socket.gethostname()}\n{os.getpid()}")
    _announced_in[:] = [default]


def _process_exited(pid: int) -> bool:
    """Whether process ``pid`` of this host has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def lost_ranks(group: Group = None) -> tuple[list[int], list[int]]:
    """``(exited, unknown)``: global ranks of ``group`` whose processes have exited, and those
    that cannot be checked from here (another host, or never announced)."""
    ranks = dist.get_process_group_ranks(group) if group is not None else \
        list(range(dist.get_world_size()))
    me, host = dist.get_rank(), socket.gethostname()
    exited, unknown = [], []
    try:
        store = dist.distributed_c10d._get_default_store()
        for rank in ranks:
            if rank == me:
                continue
            key = _PROCESS_KEY.format(rank)
            if not store.check([key]):
                unknown.append(rank)
                continue
            their_host, _, pid = store.get(key).decode().partition("\n")
            if their_host != host:
                unknown.append(rank)
            elif _process_exited(int(pid)):
                exited.append(rank)
    except Exception:  # the store lives in rank 0's process (torchrun: the agent's)
        return [r for r in ranks if r == 0 and r != me], [r for r in ranks if r not in (0, me)]
    return exited, unknown


_PEER_FAILURE_SIGNS = ("closed by peer", "reset by peer", "broken pipe", "timed out",
                       "timeout", "connection refused", "socket", "nccl")


def _is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, (getattr(dist, "DistBackendError", ()), getattr(dist, "DistNetworkError",
                                                                        ()))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_FAILURE_SIGNS)


def describe_lost_ranks(group: Group, what: str, exc: BaseException) -> str:
    """The message of a :class:`LostRankError`: which ranks are gone, and the backend's words."""
    ranks = dist.get_process_group_ranks(group) if group is not None else \
        list(range(dist.get_world_size()))
    exited, unknown = lost_ranks(group)
    if exited:
        who = f"lost rank(s) {exited} (process exited)"
    elif unknown:
        who = f"rank(s) {unknown} could not be checked from this host; one of them is lost"
    else:
        who = ("every peer process is still running: one of them stopped answering (it failed "
               "elsewhere or is stuck) within the group's timeout")
    detail = " ".join(str(exc).split())
    return (f"{what} over ranks {ranks} failed on rank {dist.get_rank()}: {who}. "
            f"Backend error: {type(exc).__name__}: {detail}")


@contextlib.contextmanager
def naming_lost_ranks(group: Group, what: str) -> Iterator[None]:
    """Turn a collective that fails for want of a peer into a :class:`LostRankError`."""
    try:
        yield
    except (LostRankError, RemoteEditError):
        raise
    except RuntimeError as exc:
        if not _is_peer_failure(exc):
            raise
        raise LostRankError(describe_lost_ranks(group, what, exc)) from exc


def _names_lost_ranks(fn: Callable) -> Callable:
    """Decorator: ``fn(..., group=...)`` (or a ``group`` positional parameter) reports lost
    ranks (see :func:`naming_lost_ranks`)."""
    import inspect

    position = list(inspect.signature(fn).parameters).index("group")

    what = fn.__name__.strip("_").replace("_", " ")

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LostRankError, RemoteEditError):
            raise
        except RuntimeError as exc:
            if not _is_peer_failure(exc):
                raise
            group = kwargs.get("group", args[position] if len(args) > position else None)
            raise LostRankError(describe_lost_ranks(group, what, exc)) from exc

    return wrapped


@_names_lost_ranks
def _broadcast(buf: torch.Tensor, group: Group, src: int) -> None:
    dist.broadcast(buf, group=group, group_src=src)


@_names_lost_ranks
def _reduce(buf: torch.Tensor, group: Group, dst: int) -> None:
    dist.reduce(buf, dst=dist.get_global_rank(group, dst) if group is not None else dst,
                group=group)


@_names_lost_ranks
def _all_reduce(buf: torch.Tensor, group: Group) -> None:
    dist.all_reduce(buf, group=group)


def _group_rank(group: Group) -> int:
    return dist.get_rank(group)


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@_names_lost_ranks
def exchange_sizes(local: torch.Tensor, dim: int, group: Group) -> tuple[int, ...]:
    """Every rank's size along ``dim`` (a tiny all-gather)."""
    n = dist.get_world_size(group)
    mine = torch.tensor([local.shape[dim]], dtype=torch.int64, device=local.device)
    out = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(out, mine, group=group)
    return tuple(int(t.item()) for t in out)


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _padded_shape(shape: Sequence[int], dim: int, size: int) -> list[int]:
    shape = list(shape)
    shape[dim] = size
    return shape


def _sizes(local: torch.Tensor, dim: int, group: Group,
           sizes: Sequence[int] | None) -> tuple[int, ...]:
    if sizes is not None:
        return tuple(sizes)
    return exchange_sizes(local, dim, group)


# -- plain (non-autograd) collectives -------------------------------------------------------
@_names_lost_ranks
def _gather(t: torch.Tensor, dim: int, group: Group, dst: int,
            sizes: Sequence[int]) -> torch.Tensor | None:
    top = max(sizes)
    padded = _pad(t, dim, top)
    if _group_rank(group) == dst:
        bufs = [torch.empty_like(padded) for _ in sizes]
        dist.gather(padded, bufs, group=group, group_dst=dst)
        return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)
    dist.gather(padded, None, group=group, group_dst=dst)
    return None


@_names_lost_ranks
def _scatter(full: torch.Tensor | None, dim: int, group: Group, src: int,
             sizes: Sequence[int], local_shape: Sequence[int], like: torch.Tensor,
             ) -> torch.Tensor:
    top = max(sizes)
    me = _group_rank(group)
    out = like.new_empty(_padded_shape(local_shape, dim, top))
    if me == src:
        assert full is not None
        pieces = [_pad(p, dim, top) for p in full.split(list(sizes), dim=dim)]
        dist.scatter(out, pieces, group=group, group_src=src)
    else:
        dist.scatter(out, None, group=group, group_src=src)
    return out.narrow(dim, 0, sizes[me])


@_names_lost_ranks
def _all_gather(t: torch.Tensor, dim: int, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    top = max(sizes)
    padded = _pad(t, dim, top)
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)


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


class _ScatterFromOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, dim, group, src, sizes, local_shape):
        ctx.dim, ctx.group, ctx.src, ctx.sizes = dim, group, src, sizes
        return _scatter(full if _group_rank(group) == src else None, dim, group, src, sizes,
                        local_shape, full).clone()

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
        return t.view_as(t) if ctx.keep else _placeholder(t)

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
def gather_to_one(t: torch.Tensor, dim: int, group: Group = None, dst: int = 0,
                  sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` on group rank ``dst``.

    Returns the whole tensor on ``dst`` and a zero-size placeholder elsewhere. Backward scatters
    the gradient back. ``sizes`` (every rank's size along ``dim``) is exchanged if not given.
    """
    if dist.get_world_size(group) == 1:
        return t
    dim = dim % t.ndim
    return _GatherToOne.apply(t, dim, group, dst, _sizes(t, dim, group, sizes))


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
    return _ScatterFromOne.apply(full, dim, group, src, tuple(sizes), tuple(local_shape))


def all_gather(t: torch.Tensor, dim: int, group: Group = None,
               sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` on every rank (backward: reduce-scatter)."""
    if dist.get_world_size(group) == 1:
        return t
    dim = dim % t.ndim
    return _AllGather.apply(t, dim, group, _sizes(t, dim, group, sizes))


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


# -- status ---------------------------------------------------------------------------------
class RemoteEditError(RuntimeError):
    """An editing function failed on the edit leader; raised on every rank of the group."""


def broadcast_status(error: str | None, group: Group = None, src: int = 0,
                     device: torch.device | str = "cpu", flag: bool = False) -> bool:
    """Tell every rank whether ``src`` succeeded; raise :class:`RemoteEditError` everywhere if
    not. ``error`` is the message on ``src`` (``None``: success) and ignored elsewhere.

    ``flag`` carries one more bit from ``src`` to everyone in the same broadcast (the runtime
    sends "the edited tensor requires grad", which decides whether every rank's backward runs
    the mirror collectives); returns ``src``'s flag on success.

    Two small broadcasts at most (a header, then the message bytes), so a failure reaches every
    rank as fast as a success does -- nobody waits for a collective that will never come.
    """
    me = _group_rank(group)
    payload = (error or "").encode() if me == src else b""
    header = torch.tensor([len(payload), int(flag)], dtype=torch.int64, device=device)
    _broadcast(header, group, src)
    n, flag = int(header[0].item()), bool(header[1].item())
    if n == 0:
        return flag
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if me == src
            else torch.empty(n, dtype=torch.uint8, device=device))
    _broadcast(data, group, src)
    raise RemoteEditError(bytes(data.cpu().tolist()).decode(errors="replace"))
