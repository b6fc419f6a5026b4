"""When the process groups flex_surgery creates are destroyed.

A mesh that :class:`~flex_surgery.parallel.mesh.ParallelMesh` builds (nothing was running to
adopt) and every :class:`~flex_surgery.parallel.pipeline.StageLink` create process groups. Each
group holds sockets and buffers (about 125 KB of host memory on gloo; communicators and their
buffers on the GPU with NCCL), so the object that created them must free them: an evaluation
loop that makes a ``FlexModel`` per step would otherwise add a group per step.

Destroying a group is not a purely local act: NCCL's communicator teardown synchronises with
the peers in some versions (torch shuts groups down in name order for that reason), and a
group torn down on one rank while a peer still runs a collective on it fails that collective.
So groups are destroyed only at points every rank of the group reaches in the same order:

* **explicitly** -- :meth:`OwnedGroups.free`, called by ``FlexModel.close()`` / ``restore()`` /
  leaving its ``with`` block (through ``DistributedRuntime.close``) and by ``StageLink.close``.
  Every rank calls these at the same point of an SPMD program, so the groups go at once, in
  creation order, each after a barrier on itself (no member still works on it; a group whose
  barrier fails because a peer is gone is left to the process's end).
* **after garbage collection** -- an owner dropped without being closed is collected at a time of
  gc's choosing, which differs between ranks (reference cycles), so its finalizer destroys
  nothing: it only *queues* the groups (:meth:`OwnedGroups.drop`). The next collective point
  over the same ranks -- building the next runtime (``FlexModel(...)``) or ``StageLink`` --
  first runs :func:`free_dropped`: the ranks exchange which owners they have queued (one small
  ``all_gather_object``) and destroy, in creation order, the groups of the owners that *every*
  rank has queued. An owner that one rank has not collected yet stays queued until a later
  point. The number of live groups therefore stays bounded in a loop that drops its FlexModels,
  and stays exact in one that closes them.

Some owners are only ever queued, never freed on the spot, because a peer may not reach the same
point: ``StageLink.close`` (a peer stage may fail a moment after this rank read "no failure"
and skip the barrier this rank would wait in), leaving a ``with`` block on an exception (the
exception may be this rank's alone, while its peers run their next forward on the same groups)
and a runtime whose construction failed part-way (the failure may be this rank's alone). The
exchange in :func:`free_dropped` also carries, per queued owner, whether this rank found it
*spent* (a ``StageLink`` whose step failed: an abandoned transfer may still wait on its groups,
and tearing a group down under it can block until its timeout); an owner that any rank found
spent is discarded on every rank without destroying its groups, which go with the process.

The same exchange carries a *refusal*: ``FlexModel`` refuses to wrap a model that another live
FlexModel wraps, which each rank can only tell from its own references (one rank may still hold
the old FlexModel in a results dict or a traceback). Each rank sends what it found, and every
rank raises :class:`RefusedOnEveryRank` if any rank refused, instead of one rank raising while
the others wait in the exchange.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["OwnedGroups", "RefusedOnEveryRank", "free_dropped", "group_timeout",
           "live_group_count"]

Group = dist.ProcessGroup | None

# Owners created over each set of parent ranks, counted in creation order. Creating an owner is
# collective over its parent ranks, so every rank gives the same owner the same number.
_COUNTERS: dict[tuple[int, ...], itertools.count] = {}
_DROPPED: list[OwnedGroups] = []


def _ranks_of(group: Group) -> tuple[int, ...]:
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def group_timeout(group: Group = None) -> datetime.timedelta | None:
    """The timeout collectives of ``group`` (default: the world) wait for, if it can be read.

    ``dist.new_group`` does not inherit the default group's timeout (it falls back to 30
    minutes); groups flex_surgery creates pass this one on, so the timeout a user sets in
    ``init_process_group`` (or on the ``process_group`` given to FlexModel) bounds them too.
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    for device_type in getattr(pg, "_device_types", ()) or (torch.device("cpu"),):
        try:
            return pg._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def live_group_count() -> int:
    """How many process groups (the default one included) this process holds now."""
    return len(dist.distributed_c10d._world.pg_map)


class OwnedGroups:
    """The process groups one object created, destroyed once, at a point every rank shares.

    Args:
        groups: the groups this rank is a member of (non-members hold nothing to free).
        parent: the group whose ranks created them together (``None``: the world).
        spent: tells whether the groups may still carry an abandoned operation (a failed
            ``StageLink`` step); :func:`free_dropped` then leaves them to the process's end.
            It must not hold the owner of these groups (it lives as long as they are queued).
    """

    def __init__(self, groups: Iterable[object], parent: Group = None,
                 spent: Callable[[], bool] | None = None) -> None:
        unique: list[dist.ProcessGroup] = []
        for g in groups:
            if isinstance(g, dist.ProcessGroup) and not any(g is u for u in unique):
                unique.append(g)
        self.groups = unique
        self.parent_ranks = _ranks_of(parent)
        self.index = next(_COUNTERS.setdefault(self.parent_ranks, itertools.count()))
        self.freed = False
        self.spent = spent

    def free(self) -> None:
        """Destroy the groups now, in creation order. Every rank of the parent calls this at
        the same point (see the module docstring); a second call does nothing."""
        if self.freed:
            return
        self.freed = True
        world = dist.distributed_c10d._world
        for g in self.groups:
            if not dist.is_initialized() or g not in world.pg_map:
                continue
            try:
                # Every member has finished its work on the group before any tears it down: a
                # peer still running (or connecting) next to a closing group fails there.
                dist.barrier(group=g)
            except RuntimeError:
                continue  # a peer is gone: leave the broken group to the process's end
            dist.destroy_process_group(g)
        self.groups = []

    def drop(self) -> None:
        """Queue the groups for :func:`free_dropped` (what a finalizer calls: no collective)."""
        if not self.freed and self not in _DROPPED:
            _DROPPED.append(self)


class RefusedOnEveryRank(RuntimeError):
    """A rank refused at :func:`free_dropped`'s exchange; every rank of the group raises it."""


def free_dropped(parent: Group = None, refusal: str | None = None) -> int:
    """Destroy the groups of owners that every rank of ``parent`` has dropped; returns how many
    owners were freed. Collective over ``parent``: every rank calls it at the same point.

    An owner that any rank found spent is discarded everywhere without destroying its groups.
    ``refusal``: this rank's reason to stop here; if any rank gives one, every rank raises
    :class:`RefusedOnEveryRank` (after the agreed freeing), naming the ranks that refused.
    """
    ranks = _ranks_of(parent)
    queued = {o.index: bool(o.spent is not None and o.spent())
              for o in _DROPPED if o.parent_ranks == ranks}
    if len(ranks) == 1:
        everyone = [(queued, refusal)]
    else:
        everyone = [None] * len(ranks)
        dist.all_gather_object(everyone, (queued, refusal), group=parent)
    agreed = set(queued).intersection(*(set(q) for q, _ in everyone))
    spent = {i for i in agreed if any(q[i] for q, _ in everyone)}
    owners = [o for o in _DROPPED if o.parent_ranks == ranks and o.index in agreed]
    freed = 0
    for owner in sorted(owners, key=lambda o: o.index):
        if owner.index in spent:
            owner.freed, owner.groups = True, []  # left to the process's end
        else:
            owner.free()
            freed += 1
        _DROPPED.remove(owner)
    refused = [(ranks[i], why) for i, (_, why) in enumerate(everyone) if why is not None]
    if refused:
        mine = refusal if refusal is not None else refused[0][1]
        others = [r for r, _ in refused if r != dist.get_rank()] if dist.is_initialized() else []
        raise RefusedOnEveryRank(mine if not others else
                                 f"{mine} (refused on rank(s) {[r for r, _ in refused]})")
    return freed
