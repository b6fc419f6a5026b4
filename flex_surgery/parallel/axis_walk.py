"""The walk over the mesh axes that puts a hooked tensor together and takes it apart again.

A tensor's :class:`~flex_surgery.parallel.layout.Layout` says, per mesh axis, whether it is
sharded, a partial sum (or average) or replicated. :class:`AxisWalk` turns that into one
autograd-aware collective per axis, in gather order (``tp``, then ``dp``):

* :meth:`AxisWalk.to_leader` / :meth:`AxisWalk.from_leader` -- the whole tensor on the stage
  leader only (gather, reduce; a replica stands for all) and back (scatter, keep, broadcast);
  the record of the first is what the second needs to walk back.
* :meth:`AxisWalk.to_all` -- a detached whole tensor on every rank (``store_on="all"``).
* :meth:`AxisWalk.everywhere` / :meth:`AxisWalk.own_piece` -- the whole tensor on every rank,
  autograd-aware (all-gather, all-reduce), and each rank's piece of an edited copy, without
  communication (``replicate_edit``).

Gradient scales (``Layout.grad_scale``, ``Layout.backward_scale``) are applied where the whole
tensor is formed and undone before it is taken apart; see
:mod:`flex_surgery.parallel.distributed_runtime` for why data parallelism needs them.

``meet``: a hook site's stamp (:mod:`~flex_surgery.parallel.site_tags`) that the walk's first
message must carry, given by the runtime where data-parallel ranks may be at different hooks
(a branch some skip). The first message is then a header to the stage leader
(:meth:`AxisWalk.announce_site`, or the header of a retrieval's or edit's own shapes), the one
kind every hook starts with, so ranks at different hooks meet in it and raise together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flex_surgery.parallel.collectives import (
    _group_rank,
    all_gather,
    all_reduce,
    broadcast_from_one,
    exchange_sizes,
    gather_to_one,
    keep_on_one,
    one_to_replicas,
    reduce_to_one,
    replica_to_one,
    scatter_from_one,
)
from flex_surgery.parallel.failures import naming_lost_ranks
from flex_surgery.parallel.layout import GATHER_ORDER, Layout, PartialSpec, ShardSpec
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.piece_transfer import announce_pieces, collect_pieces, gather_pieces
from flex_surgery.parallel.site_tags import NO_SITE

__all__ = ["AxisWalk"]


class _ScaleGrad(torch.autograd.Function):
    """Copy forward; multiplies the gradient by ``scale`` (see ``Layout.backward_scale``).

    A copy, not a view: the editing function it feeds may edit its tensor in place, which
    autograd forbids on a view a custom Function returns."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _ZeroSummand(torch.autograd.Function):
    """Zeros of ``t``'s shape that stay in ``t``'s graph (with a zero gradient), so every rank's
    backward runs the mirror collectives of the walk, as the rank holding the whole does.
    Exact zeros, forward and backward, whatever ``t`` holds (``t * 0`` would turn an inf into
    a NaN)."""

    @staticmethod
    def forward(ctx, t):
        return torch.zeros_like(t)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class AxisWalk:
    """The collectives of one hook call over ``mesh``, axis by axis (see the module doc)."""

    def __init__(self, mesh: ParallelMesh) -> None:
        self.mesh = mesh
        self._coords: dict[str, list[int]] | None = None  # see stage_coordinates

    def takes_part(self, axis: str) -> bool:
        """Whether this rank joins the step over ``axis``: it must be the first rank on every
        axis gathered before it."""
        for prior in GATHER_ORDER[:GATHER_ORDER.index(axis)]:
            if self.mesh.rank(prior) != 0:
                return False
        return True

    def to_leader(self, t: torch.Tensor, layout: Layout,
                  axes: tuple[str, ...] = GATHER_ORDER,
                  trainable: bool = False, meet: int = NO_SITE) -> tuple[torch.Tensor, list]:
        """Walk ``t`` to the leader axis by axis; returns what this rank holds and the record
        :meth:`from_leader` needs to walk back. Autograd-aware when ``t`` requires grad.

        ``trainable``: the editing function may use trainable modules, whose gradients must be
        the one-process ones, so the gradient inside the edit is scaled by
        ``1 / Layout.backward_scale`` (and back by :meth:`from_leader`, given the same flag).
        Without trainable modules the two scales cancel for every gradient that leaves the
        edit, so they are not applied. ``meet``: see the module docstring."""
        record = []
        if axes == GATHER_ORDER:
            early = self.announced_sizes(t, layout, meet)
        else:
            early = {}
            self.announce_site(meet)
        early = early or self._sizes_before_walk(t, layout, axes)
        for axis in axes:
            if self.mesh.size(axis) == 1 or not self.takes_part(axis):
                continue
            group = self.mesh.group(axis)
            spec = layout.spec_for(axis)
            shape = tuple(t.shape)
            if isinstance(spec, ShardSpec):
                sizes = spec.sizes or early.get(axis) or \
                    exchange_sizes(t, spec.dim, group, spec.rows, spec.site)
                record.append((axis, spec, sizes, shape))
                t = gather_to_one(t, spec.dim, group, 0, sizes)
            elif isinstance(spec, PartialSpec):
                record.append((axis, spec, None, shape))
                # an average divides each summand first, as DDP does: a sum of low-precision
                # gradients may overflow where their mean does not
                t = reduce_to_one(t / self.mesh.size(axis) if spec.op == "avg" else t,
                                  group, 0)
            else:
                record.append((axis, None, None, shape))
                t = replica_to_one(t, group)
        if self.mesh.is_stage_leader():
            if layout.grad_scale != 1.0:
                t = t * layout.grad_scale
            if trainable and layout.backward_scale != 1.0 and t.requires_grad:
                t = _ScaleGrad.apply(t, 1.0 / layout.backward_scale)
        return t, record

    def _sizes_before_walk(self, t: torch.Tensor, layout: Layout,
                           axes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """The unknown sizes of the axes that only some ranks walk (those after the first one
        gathered), exchanged by every rank before the walk starts.

        The exchange checks that the pieces fit (:func:`exchange_sizes` raises on every rank of
        its group). Made in the walk, it would run on the ranks that take part in that step
        only (tp rank 0 for dp), and the others, waiting for the edit's outcome, would hang
        when they raise. Every rank is in one group of each axis, and the pieces along another
        dim do not change before that step, so it is made here, on every rank, at no extra
        cost in collectives. An axis cutting a dim an earlier axis cuts too keeps its exchange
        in the walk (the earlier gather changes the sizes).
        """
        early: dict[str, tuple[int, ...]] = {}
        cut: set[int] = set()
        first = True
        for axis in axes:
            if self.mesh.size(axis) == 1:
                continue
            spec = layout.spec_for(axis)
            dim = spec.dim % t.ndim if isinstance(spec, ShardSpec) else None
            if not first and isinstance(spec, ShardSpec) and spec.sizes is None and \
                    dim not in cut:
                early[axis] = exchange_sizes(t, dim, self.mesh.group(axis), spec.rows,
                                             spec.site)
            if dim is not None:
                cut.add(dim)
            first = False
        return early

    def direct_axes(self, t: torch.Tensor, layout: Layout) -> list[str]:
        """The axes (of size > 1) over which :meth:`to_leader_at_once` retrieves ``t`` in one
        step, or ``[]`` (then :meth:`to_leader`, axis by axis). On the CPU: every tensor cut
        along one dim per sharded axis and replicated over the others, with no partial sums.
        On a device: a tensor cut over two or more axes and replicated over none. The same
        answer on every rank of the stage: the mesh, the layout and the device are shared."""
        axes = [axis for axis in GATHER_ORDER if self.mesh.size(axis) > 1]
        specs = [layout.spec_for(axis) for axis in axes]
        shards = [s for s in specs if isinstance(s, ShardSpec)]
        if not shards or any(isinstance(s, PartialSpec) for s in specs) or \
                len({s.dim % t.ndim for s in shards}) != len(shards):
            return []
        if t.device.type == "cpu" or len(shards) == len(specs) >= 2:
            return axes
        return []

    def stage_coordinates(self, device: torch.device) -> dict[str, list[int]]:
        """Per axis, the coordinate of each rank of the stage group, in group rank order. They
        never change: exchanged once (one small all-gather over the stage, at the first call
        that needs them, which every rank of the stage makes) and kept."""
        if self._coords is None:
            group = self.mesh.stage_group
            mine = torch.tensor([self.mesh.rank(a) for a in GATHER_ORDER], dtype=torch.int64,
                                device=device)
            rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            with naming_lost_ranks(group, "coordinate exchange"):
                dist.all_gather(rows, mine, group=group)
            table = [r.tolist() for r in rows]
            self._coords = {a: [r[i] for r in table] for i, a in enumerate(GATHER_ORDER)}
        return self._coords

    def to_leader_at_once(self, t: torch.Tensor, layout: Layout,
                          axes: list[str], meet: int = NO_SITE) -> torch.Tensor | None:
        """Retrieval of a tensor with :meth:`direct_axes`: every piece to the leader in one
        step over the stage group, put together in place in one fresh tensor. Detached; the
        whole tensor on the leader, ``None`` elsewhere.

        Against a gather per axis, the bytes cross once and the leader waits for one transfer
        instead of up to three collectives (gather over tp, sizes over dp, gather over dp).
        On the CPU the pieces are sent point to point
        (:func:`~flex_surgery.parallel.piece_transfer.collect_pieces`): sizes the layout does
        not know (a data-parallel batch) travel in front of each piece, and of replicas only
        the first sends. On a device, one ``gather`` of padded pieces
        (:func:`~flex_surgery.parallel.piece_transfer.gather_pieces`) after an exchange of the
        unknown sizes over their axis. Each rank's coordinates come from
        :meth:`stage_coordinates` (exchanged once). ``meet``: on the CPU it travels in the
        headers, which then go even when every size is known."""
        group = self.mesh.stage_group
        t = t.detach()
        if t.device.type == "cpu":
            cuts, senders, leader, unknown = self._stage_cuts(t, layout, axes)
            site = meet if meet != NO_SITE else unknown.site if unknown else NO_SITE
            full = collect_pieces(t, cuts, senders, group, leader,
                                  unknown.rows if unknown else None, site)
        else:
            self.announce_site(meet)
            coords = self.stage_coordinates(t.device)
            specs = {axis: layout.spec_for(axis) for axis in axes}
            shards = [axis for axis in axes if specs[axis] is not None]
            leader = self._stage_leader(coords)
            cuts = [(specs[a].dim % t.ndim, specs[a].sizes or
                     exchange_sizes(t, specs[a].dim % t.ndim, self.mesh.group(a),
                                    specs[a].rows, specs[a].site), coords[a])
                    for a in shards]
            full = gather_pieces(t, cuts, group, leader)
        if full is None or _group_rank(group) != leader:
            return None
        return full.mul_(layout.grad_scale) if layout.grad_scale != 1.0 else full

    def _stage_leader(self, coords: dict[str, list[int]]) -> int:
        n = len(coords[GATHER_ORDER[0]])
        return next(i for i in range(n) if all(coords[a][i] == 0 for a in GATHER_ORDER))

    def _stage_cuts(self, t: torch.Tensor, layout: Layout, axes: list[str]):
        """For :func:`~flex_surgery.parallel.piece_transfer.collect_pieces` over the stage:
        the cuts of ``t`` over ``axes`` (:meth:`direct_axes`), the group ranks that send a
        piece (of replicas, the first), the leader's group rank and the first spec of unknown
        sizes (``None`` if every size is known)."""
        coords = self.stage_coordinates(t.device)
        specs = {axis: layout.spec_for(axis) for axis in axes}
        shards = [axis for axis in axes if specs[axis] is not None]
        cuts = [(specs[a].dim % t.ndim, specs[a].sizes, coords[a]) for a in shards]
        senders = [i for i in range(len(coords[GATHER_ORDER[0]]))
                   if all(coords[a][i] == 0 for a in axes if specs[a] is None)]
        unknown = next((specs[a] for a in shards if specs[a].sizes is None), None)
        return cuts, senders, self._stage_leader(coords), unknown

    def announced_sizes(self, t: torch.Tensor, layout: Layout,
                        meet: int = NO_SITE) -> dict[str, tuple[int, ...]]:
        """On the CPU, the sizes of an axis whose pieces' sizes the layout does not know (a
        data-parallel batch), for a gather that must stay autograd-aware (an edit): announced
        to the stage leader the way a retrieval's pieces are
        (:func:`~flex_surgery.parallel.piece_transfer.announce_pieces`), instead of an
        all-gather of sizes over the axis. Every hook's first message at such a site is then
        the same kind, whether it edits or retrieves, so data-parallel ranks at different hooks
        raise ``HookSiteMismatchError`` there instead of waiting in different collectives.
        ``{}`` where a retrieval would not go to the leader in one step either (it then
        exchanges sizes the same way an edit does), or every size is known. With ``meet``
        (a hook site's stamp) the first message is a header carrying it in every case: these
        sizes' announcement, or else :meth:`announce_site`."""
        axes = self.direct_axes(t, layout)
        if t.device.type == "cpu" and axes:
            cuts, senders, leader, unknown = self._stage_cuts(t, layout, axes)
            if unknown is not None:
                axis = next(a for a in axes if layout.spec_for(a) is unknown)
                site = meet if meet != NO_SITE else unknown.site
                return {axis: announce_pieces(t.detach(), cuts, senders, self.mesh.stage_group,
                                              leader, unknown.rows, site)}
        self.announce_site(meet)
        return {}

    def announce_site(self, stamped: int) -> None:
        """Every rank of the stage announces ``stamped`` (a hook site's stamp, or
        :data:`~flex_surgery.parallel.site_tags.END_OF_FORWARD` in this forward) to the stage
        leader the way a hook's first message goes on the CPU (:meth:`announced_sizes`): one
        header each, one answer. A rank at another hook meets it there and every rank raises
        ``HookSiteMismatchError``. Nothing for :data:`~flex_surgery.parallel.site_tags.
        NO_SITE`."""
        if stamped == NO_SITE:
            return
        coords = self.stage_coordinates(torch.device("cpu"))
        n = len(coords[GATHER_ORDER[0]])
        announce_pieces(torch.empty(0), [(0, None, coords["dp"])], range(n),
                        self.mesh.stage_group, self._stage_leader(coords), None, stamped)

    def from_leader(self, t: torch.Tensor, layout: Layout, record: list,
                    trainable: bool = False) -> torch.Tensor:
        if self.mesh.is_stage_leader():
            if layout.grad_scale != 1.0:
                t = t / layout.grad_scale
            if trainable and layout.backward_scale != 1.0 and t.requires_grad:
                t = _ScaleGrad.apply(t, layout.backward_scale)
        for axis, spec, sizes, shape in reversed(record):
            group = self.mesh.group(axis)
            if isinstance(spec, ShardSpec):
                t = scatter_from_one(t, spec.dim, sizes, shape, group, 0)
            elif isinstance(spec, PartialSpec):
                t = broadcast_from_one(t, shape, group, 0) if spec.op == "avg" else \
                    keep_on_one(t, shape, group, 0)
            else:
                t = one_to_replicas(t, shape, group)
        return t

    def to_all(self, t: torch.Tensor, layout: Layout) -> torch.Tensor:
        for axis in GATHER_ORDER:
            spec = layout.spec_for(axis)
            group = self.mesh.group(axis)
            if isinstance(spec, ShardSpec):
                sizes = spec.sizes or exchange_sizes(t, spec.dim % t.ndim, group, spec.rows,
                                                     spec.site)
                t = all_gather(t, spec.dim, group, sizes)
            elif isinstance(spec, PartialSpec):  # an average: each summand divided first
                t = t / self.mesh.size(axis) if spec.op == "avg" else t.clone()
                dist.all_reduce(t, group=group)
        return t * layout.grad_scale if layout.grad_scale != 1.0 else t

    def everywhere(self, t: torch.Tensor, layout: Layout,
                   meet: int = NO_SITE) -> tuple[torch.Tensor, list]:
        """The whole tensor on every rank, autograd-aware (``replicate_edit``): an all-gather
        per sharded axis, an all-reduce per partial one, nothing for a replicated one.
        ``meet``: see the module docstring."""
        record = []
        early = self.announced_sizes(t, layout, meet)
        for axis in GATHER_ORDER:
            if self.mesh.size(axis) == 1:
                continue
            group = self.mesh.group(axis)
            spec = layout.spec_for(axis)
            if isinstance(spec, ShardSpec):
                sizes = spec.sizes or early.get(axis) or \
                    exchange_sizes(t, spec.dim, group, spec.rows, spec.site)
                record.append((axis, spec, sizes, tuple(t.shape)))
                t = all_gather(t, spec.dim, group, sizes)
            elif isinstance(spec, PartialSpec):
                record.append((axis, spec, None, tuple(t.shape)))
                t = all_reduce(t, group, mean=spec.op == "avg")
        return (t * layout.grad_scale if layout.grad_scale != 1.0 else t), record

    def own_piece(self, t: torch.Tensor, layout: Layout, record: list) -> torch.Tensor:
        """This rank's piece of the edited whole tensor every rank holds: the mirror of
        :meth:`everywhere` without communication. A piece of a larger tensor is copied
        out, so the whole tensor is not kept alive by a view of it."""
        if layout.grad_scale != 1.0:
            t = t / layout.grad_scale
        for axis, spec, sizes, _ in reversed(record):
            me = self.mesh.rank(axis)
            if isinstance(spec, ShardSpec):
                t = t.narrow(spec.dim, sum(sizes[:me]), sizes[me]).clone()
            elif spec.op == "sum" and me != 0:  # the summands: the whole on rank 0, zeros
                t = _ZeroSummand.apply(t)
        return t
