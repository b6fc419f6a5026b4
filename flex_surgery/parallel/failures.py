"""How a failure reaches every rank: a lost peer, or an error on some ranks but not others.

Two ways a distributed hook call can fail, and what every rank sees:

* **A peer is gone** (its process exited: gloo reports "connection closed by peer"; or it did
  not answer within the group's timeout). The collective raises :class:`LostRankError` on the
  ranks that were waiting, naming the ranks whose processes have exited. Every rank records its
  host and process id in the default store when a runtime is built (:func:`announce_process`),
  which is what lets a survivor tell a dead peer from a slow one.
* **Code failed on some ranks** (an editing function on the edit leader, or on any rank when
  every rank runs it). The ranks agree on the outcome in one small collective before anything
  else is communicated (:func:`broadcast_status` from the one rank that ran it,
  :func:`agree_on_status` when all ran it), so every rank raises :class:`RemoteEditError` at the
  same call instead of waiting in a collective that will never come.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from flex_surgery.parallel.group_lifetime import group_timeout
from flex_surgery.parallel.site_tags import HookSiteMismatchError

__all__ = ["LostRankError", "RemoteEditError", "agree_on_status", "announce_process",
           "broadcast_status", "describe_lost_ranks", "host_status_group", "lost_ranks",
           "names_lost_ranks", "naming_lost_ranks", "run_agreeing"]

Group = dist.ProcessGroup | None


class RemoteEditError(RuntimeError):
    """An editing function failed on some rank; raised on every rank of the group."""


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


def names_lost_ranks(fn: Callable) -> Callable:
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


@names_lost_ranks
def _broadcast(buf: torch.Tensor, group: Group, src: int) -> None:
    dist.broadcast(buf, group=group, group_src=src)


@names_lost_ranks
def _all_reduce_max(buf: torch.Tensor, group: Group) -> None:
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)


def _moves_host_tensors(group: Group) -> bool:
    """Whether collectives over ``group`` take CPU tensors (a gloo backend among its own)."""
    return "gloo" in str(dist.get_backend(group))


def host_status_group(group: Group, parent: Group = None) -> tuple[Group, bool]:
    """The group status agreements over ``group`` use, and whether it was made for them (then
    it is the caller's to free; it waits as long as ``parent`` does). Collective over
    ``group``'s members the first time for a set of ranks.

    A status is a host integer: on a gloo group it is agreed as a CPU tensor. On an NCCL-only
    group (CUDA) it would be a device tensor, and reading the verdict (``.item()``) would make
    the host wait for every kernel queued before it -- once per editing hook, so the CPU could
    never run ahead of the GPU. A gloo group over the same ranks agrees on the host alone; the
    device keeps computing.
    """
    if dist.get_world_size(group) == 1 or _moves_host_tensors(group):
        return group, False
    world = dist.distributed_c10d._get_default_group()
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else world))
    # A group made with local synchronisation is named from its ranks: destroyed and made
    # again over the same ranks (the next FlexModel), it would meet the old group's keys in
    # the store and fail to connect, or hang. One per set of ranks is kept and reused instead
    # (as sub-group meshes are, see mesh.py), never freed.
    key = (id(world), ranks)
    if key not in _STATUS_GROUPS:
        _STATUS_GROUPS[key] = dist.new_group(list(ranks), backend="gloo",
                                             use_local_synchronization=True,
                                             timeout=group_timeout(parent))
    return _STATUS_GROUPS[key], False


_STATUS_GROUPS: dict[tuple, Group] = {}


def agree_on_status(error: str | None, group: Group = None,
                    device: torch.device | str = "cpu", what: str = "the same code") -> None:
    """Every rank ran the same code; raise :class:`RemoteEditError` on every rank if it failed
    on any. ``error`` is this rank's message (``None``: success); ``what`` names the code in
    the message of the ranks where it succeeded.

    One all-reduce of a single integer (the failed ranks' bit mask would not fit a large group,
    so the highest failed group rank + 1 is agreed): a deterministic function fails on every
    rank alike, but one that fails on some ranks only (an out-of-memory error, rank-local state)
    must not leave the others waiting in the next collective.
    """
    me = dist.get_rank(group)
    flag = torch.tensor([me + 1 if error is not None else 0], dtype=torch.int64, device=device)
    _all_reduce_max(flag, group)
    failed = int(flag.item())
    if failed == 0:
        return
    if error is not None:
        raise RemoteEditError(error)
    raise RemoteEditError(f"{what} failed on group rank {failed - 1} (at least); its own "
                          "error says why")


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
    me = dist.get_rank(group)
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


def run_agreeing(fn: Callable[[], Any], group: Group, what: str,
                 device: torch.device | str = "cpu", src: int | None = 0) -> tuple[Any, bool]:
    """Run ``fn`` on group rank ``src`` (``None``: on every rank) and agree on the outcome over
    ``group`` before anything else is communicated; if it failed anywhere, every rank raises
    :class:`RemoteEditError` (caused by the original error where it happened).

    Returns ``(result, requires_grad)``: ``fn()``'s result where it ran (``None`` elsewhere) and,
    with one ``src``, whether its tensor result requires grad (sent with the status: it decides
    whether every rank's backward runs the mirror collectives).

    Any ``BaseException`` counts: a ``KeyboardInterrupt`` or ``SystemExit`` is reported to the
    other ranks before it is re-raised unchanged where it happened, so no rank is left waiting
    for a collective that will never come.

    Except :class:`~flex_surgery.parallel.site_tags.HookSiteMismatchError`: the ranks that
    met at another hook raised it together, at that meeting, and those of them outside this
    agreement (at a plain retrieval) will not come to it; it is re-raised at once.
    """
    if dist.get_world_size(group) == 1:  # nobody to tell: no collective
        try:
            result = fn()
        except Exception as exc:
            raise RemoteEditError(f"rank {dist.get_rank()}: {what} failed on rank "
                                  f"{dist.get_rank()}: {type(exc).__name__}: {exc}") from exc
        return result, isinstance(result, torch.Tensor) and result.requires_grad
    result, error, cause = None, None, None
    if src is None or dist.get_rank(group) == src:
        try:
            result = fn()
        except HookSiteMismatchError:
            raise  # raised by every rank of the meeting, most of them outside this agreement
        except BaseException as exc:  # agreed with every rank below, then re-raised
            cause = exc
            error = f"{what} failed on rank {dist.get_rank()}: {type(exc).__name__}: {exc}"
    requires_grad = isinstance(result, torch.Tensor) and result.requires_grad
    try:
        if src is None:
            agree_on_status(error, group, device=device, what=what)
        else:
            requires_grad = broadcast_status(error, group, src, device=device,
                                             flag=requires_grad)
    except RemoteEditError as err:
        if cause is not None and not isinstance(cause, Exception):
            raise cause from None  # KeyboardInterrupt/SystemExit keep their type here
        raise RemoteEditError(f"rank {dist.get_rank()}: {err}") from cause
    return result, requires_grad
