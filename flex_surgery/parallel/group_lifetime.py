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
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["OwnedGroups", "free_dropped", "group_timeout", "live_group_count"]

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
    """

    def __init__(self, groups: Iterable[object], parent: Group = None) -> None:
        unique: list[dist.ProcessGroup] = []
        for g in groups:
            if isinstance(g, dist.ProcessGroup) and not any(g is u for u in unique):
                unique.append(g)
        self.groups = unique
        self.parent_ranks = _ranks_of(parent)
        self.index = next(_COUNTERS.setdefault(self.parent_ranks, itertools.count()))
        self.freed = False

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


def free_dropped(parent: Group = None) -> int:
    """Destroy the groups of owners that every rank of ``parent`` has dropped; returns how many
    owners were freed. Collective over ``parent``: every rank calls it at the same point."""
    ranks = _ranks_of(parent)
    if len(ranks) == 1:
        owners = [o for o in _DROPPED if o.parent_ranks == ranks]
    else:
        mine = sorted(o.index for o in _DROPPED if o.parent_ranks == ranks)
        everyone: list[list[int] | None] = [None] * len(ranks)
        dist.all_gather_object(everyone, mine, group=parent)
        agreed = set(mine).intersection(*(set(e or ()) for e in everyone))
        owners = [o for o in _DROPPED if o.parent_ranks == ranks and o.index in agreed]
    for owner in sorted(owners, key=lambda o: o.index):
        owner.free()
        _DROPPED.remove(owner)
    return len(owners)
