"""DistributedRuntime: the hook seam over a ParallelMesh -- one process's view, on many ranks.

For each hook call the tensor's :class:`~flex_surgery.parallel.layout.Layout` says, per mesh
axis, whether it is sharded, a partial sum or replicated. The runtime walks the axes in gather
order (``tp``, then ``dp``), one collective per axis, towards the *edit leader*: the first rank
(dp == tp == 0) of this pipeline stage, which is global rank 0 without pipelining.

* **retrieve** gathers a detached copy to the leader only (``dist.gather``: the other ranks send
  and go on), or to every rank with ``store_on="all"``; replicated axes cost nothing.
* **gather_for_edit / scatter_from_edit** do the same with autograd-aware collectives
  (:mod:`~flex_surgery.parallel.collectives`), so the editing function runs once, on the leader,
  on exactly the tensor one process would see, and gradients flow back through
  gather -> edit -> scatter. Non-leaders carry a zero-size placeholder through the edit so that
  their backward runs the same mirror collectives in the same order.
* On a replicated axis the leader's copy stands for all (the others compute the same thing), the
  edit is broadcast back, and in backward the leader's gradient is broadcast to the replicas.
* **run_on_leader** runs the editing function on the leader and broadcasts success or the error
  over the stage before anything is scattered, so a failure raises on every rank at once.

Gradient scale under data parallelism (DDP, FSDP1, FSDP2 average parameter gradients over dp):
with each rank's loss averaged over its local batch, the gradient a hook sees on an activation
is ``dp`` times the gradient of the global-batch mean loss that one process would compute. The
runtime therefore multiplies gathered activation gradients by ``1/dp`` and an edited gradient by
``dp`` before scattering it back. Parameter gradients seen by hooks are each rank's local
gradient; their gathered value is the dp *average* (what DDP's all-reduce produces), and an
edited parameter gradient is handed back unchanged to every dp rank (whose average it is).
The gradient flowing backward *through* an edit of an activation is scaled the same way
(``Layout.backward_scale``), so editing functions and trainable modules used in them get the
one-process gradient.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.collectives import (
    RemoteEditError,
    all_gather,
    announce_process,
    broadcast_from_one,
    broadcast_status,
    exchange_sizes,
    gather_to_one,
    keep_on_one,
    naming_lost_ranks,
    one_to_replicas,
    reduce_to_one,
    replica_to_one,
    scatter_from_one,
)
from flex_surgery.parallel.group_lifetime import OwnedGroups, RefusedOnEveryRank, free_dropped
from flex_surgery.parallel.layout import (
    ACTIVATION_ROLES,
    GATHER_ORDER,
    Layout,
    LayoutError,
    LayoutInference,
    PartialSpec,
    ShardSpec,
    dtensor_layout,
    is_dtensor,
)
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.runtime import EditContext, HookSite, LocalRuntime, Runtime, store_copy
from flex_surgery.store.hooks import Rows

__all__ = ["DistributedRuntime", "build_runtime"]

STORE_ON = ("rank0", "all", "replica_leaders")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (see ``Layout.backward_scale``)."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _SyncTrainablePoint(torch.autograd.Function):
    """Identity whose backward schedules the trainable-module sync at the end of backward."""

    @staticmethod
    def forward(ctx, t, runtime):
        ctx.runtime = runtime
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.runtime._queue_trainable_sync()
        return grad, None


class DistributedRuntime(Runtime):
    """Hooks see whole tensors; sharding comes from ``mesh`` and layouts from ``module``.

    Args:
        module: the model (a DDP/FSDP wrapper, a TP model or both); its TP layers are watched
            so that modules without parameters inherit the right layout.
        mesh: the groups (usually :meth:`ParallelMesh.adopt`).
        store_on: ``"rank0"`` -- retrieved tensors are stored on the stage leader only;
            ``"all"`` -- on every rank; ``"replica_leaders"`` -- a tensor split over dp is
            gathered over tp only and each replica's leader (tp rank 0) stores its batch rows.
        batch_dim: the activation dim that data parallelism splits; ``None``: the one the
            model's framework uses (1 for Megatron's ``[s, b, h]``, else 0).
        mesh_parent: the group whose ranks built ``mesh`` (default: the world).
        owns_mesh: ``mesh`` was made for this runtime (:func:`build_runtime`): the groups it
            created are freed with the runtime (:meth:`close`). A mesh passed in by the caller
            stays the caller's.
    """

    def __init__(self, module: nn.Module, mesh: ParallelMesh, store_on: str = "rank0",
                 batch_dim: int | None = None,
                 mesh_parent: dist.ProcessGroup | None = None, owns_mesh: bool = False) -> None:
        # The groups the mesh created are this runtime's to free: at close(), or, once the mesh
        # is dropped without closing (it may outlive the runtime: a StageLink built on it),
        # queued for the next runtime that all ranks build (flex_surgery.parallel.group_lifetime).
        # Owned first, so that a failure below (an unknown layout, a lost rank) leaves nothing
        # unowned: abandon() queues them.
        self._owned = OwnedGroups(mesh.created_groups() if owns_mesh else (), mesh_parent)
        self._mesh_finalizer = weakref.finalize(mesh, self._owned.drop)
        self._finalizer: weakref.finalize | None = None
        try:
            if store_on not in STORE_ON:
                raise ValueError(f"store_on must be one of {STORE_ON}, got {store_on!r}")
            self.module = module
            self.mesh = mesh
            self.store_on = store_on
            if batch_dim is None:
                batch_dim = frameworks.batch_dim(module)
            self.layouts = LayoutInference(mesh, batch_dim)
            self._finalizer = weakref.finalize(self, self.layouts.unwatch)
            self.layouts.watch(module)
            self._trainable: dict[str, nn.Module] = {}
            self._sync_queued = False
            announce_process()  # lets a survivor of a failed collective name the lost rank
        except BaseException:
            self.abandon()  # the failure may be this rank's alone: no collective
            raise

    def abandon(self) -> None:
        """:meth:`close` without a collective: remove the layout tracker's hooks and queue the
        mesh's groups for :func:`~flex_surgery.parallel.group_lifetime.free_dropped`. For the
        points a peer may not share: a failed construction, a ``with`` block left on an
        exception. A second call (or :meth:`close` after it) does nothing."""
        if self._finalizer is not None:
            self._finalizer()  # layouts.unwatch, once
        self._mesh_finalizer()  # OwnedGroups.drop, once

    def close(self) -> None:
        """Remove the layout tracker's hooks from the model and destroy the process groups
        this runtime's mesh created. Every rank calls it at the same point (``FlexModel.close``,
        ``restore`` or the end of its ``with`` block); a second call does nothing."""
        if not self._mesh_finalizer.alive:
            return  # abandoned: the groups are queued
        self._finalizer.detach()
        self._mesh_finalizer.detach()
        self.layouts.unwatch()
        self._owned.free()

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.mesh.stage

    # -- layouts -----------------------------------------------------------------------------
    def layout_of(self, local: torch.Tensor, site: HookSite) -> Layout:
        """The layout of the tensor a hook at ``site`` sees (see :mod:`.layout`)."""
        if site.role == "param_grad" and is_dtensor(local):
            layout = dtensor_layout(local, self.mesh)
            if self.mesh.dp_size > 1 and layout.spec_for("dp") is None:
                layout = Layout(layout.shards, layout.partials + (PartialSpec("dp", "avg"),))
            return layout
        return self.layouts.layout(local, site.module, site.role, site.parameter,
                                   site.expected_shape, site.unpack_idx)

    def whole_shape(self, local: torch.Tensor, site: HookSite) -> tuple[int, ...]:
        """The shape of the whole tensor, agreed by every rank of the stage before anything is
        gathered: one small all-gather over the stage group.

        Each rank infers the layout of its own piece from what it sees; the ranks exchange what
        they found and their local shapes. A rank that cannot tell, ranks that disagree (uneven
        data-parallel batches where one rank's batch happens to equal ``expected_shape`` and the
        other's does not), or pieces that cannot be put together raise :class:`LayoutError` on
        every rank, at this call, instead of walking into different collectives. The whole shape
        is computed on every rank from the exchanged shapes, so a check against
        ``expected_shape`` fails on every rank at the call whose tensor does not match.
        """
        plain = _local_of(local)
        failure: Exception | None = None
        layout = None
        try:
            layout = self.layout_of(local, site)
        except Exception as exc:  # every rank learns of it below, then this rank re-raises it
            failure = exc
        row = self._describe(plain, layout, failure is not None)
        group = self.mesh.stage_group
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        with naming_lost_ranks(group, "layout agreement"):
            dist.all_gather(rows, row, group=group)
        table = [r.tolist() for r in rows]
        ranks = dist.get_process_group_ranks(group) if group is not None else \
            list(range(dist.get_world_size()))
        where = f"{site.module_name!r} ({site.role} of a {site.hook_type} hook)"
        failed = [ranks[i] for i, r in enumerate(table) if r[0]]
        if failure is not None:
            raise failure
        if failed:
            raise LayoutError(f"{where}: rank(s) {failed} could not tell how the tensor is split "
                              "(their error says why); every rank stops at this call")
        signatures = {tuple(r[3:8]) for r in table}
        if len(signatures) > 1:
            seen = "; ".join(f"rank {ranks[i]}: {_signature_text(r)}"
                             for i, r in enumerate(table))
            raise LayoutError(f"{where}: the ranks disagree on how the tensor is split ({seen}); "
                              "give expected_shape with None for the dims that vary (e.g. the "
                              "batch dim of uneven data-parallel batches)")
        shape = _whole_shape(table, ranks, where)
        self._check_same_over_dp(plain, layout, site, where)
        return shape

    def _check_same_over_dp(self, plain: torch.Tensor, layout: Layout, site: HookSite,
                            where: str) -> None:
        """An activation the hint leaves whole over ``dp`` (its batch dim is the local size)
        must *be* the same on every data-parallel rank: a batch on another dim than
        ``batch_dim`` (which the hint would then cut over ``tp``) or a per-rank value (a loss)
        is an error, not rank 0's piece. One small all-gather over ``dp``; every rank of the
        stage agreed on ``layout`` above, so all take this path."""
        if self.mesh.dp_size == 1 or site.role not in ACTIVATION_ROLES or \
                layout.spec_for("dp") is not None:
            return
        if frameworks.differs_across([plain.detach()], self.mesh.group("dp"))[0]:
            raise LayoutError(
                f"{where}: expected_shape {site.expected_shape} leaves the tensor whole on every "
                f"data-parallel rank (the dim data parallelism splits has the local size), but "
                f"the data-parallel ranks hold different values: its batch is on another "
                f"dim (pass FlexModel's batch_dim, or give that dim as None), or it is a "
                f"per-rank value that cannot be stored as one tensor")

    def _describe(self, plain: torch.Tensor, layout: Layout | None,
                  failed: bool) -> torch.Tensor:
        """One rank's row of :meth:`whole_shape`'s exchange: ``[failed, tp coordinate, dp
        coordinate, ndim, tp kind, tp dim, dp kind, dp dim, shape...]``."""
        row = torch.full((_ROW,), -1, dtype=torch.int64)
        row[0] = int(failed or plain.ndim > _ROW - _HEAD)
        row[1], row[2] = self.mesh.rank("tp"), self.mesh.rank("dp")
        if layout is not None and not row[0]:
            row[3] = plain.ndim
            for i, axis in enumerate(GATHER_ORDER):
                spec = layout.spec_for(axis)
                kind = 0 if spec is None else 1 if isinstance(spec, ShardSpec) else \
                    3 if spec.op == "avg" else 2
                row[4 + 2 * i] = kind
                row[5 + 2 * i] = spec.dim if isinstance(spec, ShardSpec) else -1
            row[_HEAD:_HEAD + plain.ndim] = torch.tensor(plain.shape, dtype=torch.int64)
        return row.to(plain.device)

    def is_edit_leader(self, site: HookSite) -> bool:
        return self.mesh.is_stage_leader()

    def _takes_part(self, axis: str) -> bool:
        """Whether this rank joins the step over ``axis``: it must be the first rank on every
        axis gathered before it."""
        for prior in GATHER_ORDER[:GATHER_ORDER.index(axis)]:
            if self.mesh.rank(prior) != 0:
                return False
        return True

    # -- the walk over the axes -----------------------------------------------------------------
    def _gather(self, t: torch.Tensor, layout: Layout,
                axes: tuple[str, ...] = GATHER_ORDER) -> tuple[torch.Tensor, list]:
        """Walk ``t`` to the leader axis by axis; returns what this rank holds and the record
        :meth:`_scatter` needs to walk back. Autograd-aware when ``t`` requires grad."""
        record = []
        for axis in axes:
            if self.mesh.size(axis) == 1 or not self._takes_part(axis):
                continue
            group = self.mesh.group(axis)
            spec = layout.spec_for(axis)
            shape = tuple(t.shape)
            if isinstance(spec, ShardSpec):
                sizes = spec.sizes or exchange_sizes(t, spec.dim, group)
                record.append((axis, spec, sizes, shape))
                t = gather_to_one(t, spec.dim, group, 0, sizes)
            elif isinstance(spec, PartialSpec):
                record.append((axis, spec, None, shape))
                t = reduce_to_one(t, group, 0)
                if spec.op == "avg" and dist.get_rank(group) == 0:
                    t = t / self.mesh.size(axis)
            else:
                record.append((axis, None, None, shape))
                t = replica_to_one(t, group)
        if self.mesh.is_stage_leader():
            if layout.grad_scale != 1.0:
                t = t * layout.grad_scale
            if layout.backward_scale != 1.0 and t.requires_grad:
                t = _ScaleGrad.apply(t, 1.0 / layout.backward_scale)
        return t, record

    def _scatter(self, t: torch.Tensor, layout: Layout, record: list) -> torch.Tensor:
        if self.mesh.is_stage_leader():
            if layout.grad_scale != 1.0:
                t = t / layout.grad_scale
            if layout.backward_scale != 1.0 and t.requires_grad:
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

    def _gather_to_all(self, t: torch.Tensor, layout: Layout) -> torch.Tensor:
        for axis in GATHER_ORDER:
            spec = layout.spec_for(axis)
            group = self.mesh.group(axis)
            if isinstance(spec, ShardSpec):
                t = all_gather(t, spec.dim, group, spec.sizes)
            elif isinstance(spec, PartialSpec):
                t = t.clone()
                dist.all_reduce(t, group=group)
                if spec.op == "avg":
                    t = t / self.mesh.size(axis)
        return t * layout.grad_scale if layout.grad_scale != 1.0 else t

    # -- the Runtime seam -----------------------------------------------------------------------
    def retrieve(self, local: torch.Tensor, site: HookSite,
                 store: Callable[[torch.Tensor], None]) -> None:
        layout = self.layout_of(local, site)
        plain = _local_of(local).detach()
        with torch.no_grad():
            if self.store_on == "all":
                store(store_copy(self._gather_to_all(plain, layout)))
                return
            if self.store_on == "replica_leaders" and self.mesh.dp_size > 1 and \
                    isinstance(layout.spec_for("dp"), ShardSpec):
                self._retrieve_replica_rows(plain, layout, store)
                return
            full, record = self._gather(plain, layout)
        if self.mesh.is_stage_leader():
            # A tensor gathered (or reduced) on the CPU is already a private copy; copy only
            # what may still alias the model's own activation, or lives on a device.
            fresh = full.device.type == "cpu" and any(spec is not None for _, spec, _, _ in record)
            store(full if fresh else store_copy(full))

    def _retrieve_replica_rows(self, plain: torch.Tensor, layout: Layout,
                               store: Callable[..., None]) -> None:
        """``store_on="replica_leaders"``: no activation crosses replicas. The tensor is gathered
        over tp only; each replica's leader stores its rows with their place in the global
        batch (the replicas' sizes are exchanged: one small all-gather over dp)."""
        spec = layout.spec_for("dp")
        sizes = spec.sizes or exchange_sizes(plain, spec.dim, self.mesh.group("dp"))
        full, record = self._gather(plain, layout, axes=("tp",))
        if self.mesh.rank("tp") != 0:
            return
        if layout.grad_scale != 1.0 and not self.mesh.is_stage_leader():  # _gather scaled it
            full = full * layout.grad_scale
        start = sum(sizes[:self.mesh.rank("dp")])
        rows = Rows(spec.dim, start, start + sizes[self.mesh.rank("dp")], sum(sizes))
        fresh = full.device.type == "cpu" and any(spec is not None for _, spec, _, _ in record)
        store(full if fresh else store_copy(full), rows)

    def retrieve_gathered(self, full: torch.Tensor | None, ctx: EditContext,
                          store: Callable[[torch.Tensor], None]) -> None:
        if self.store_on == "all":  # every rank stores: the leader's gather is not enough
            self.retrieve(ctx.local, ctx.site, store)
        elif self.mesh.is_stage_leader():
            store(store_copy(full))  # always a copy: the editing function may edit in place

    def gather_for_edit(self, local: torch.Tensor,
                        site: HookSite) -> tuple[torch.Tensor | None, EditContext]:
        layout = self.layout_of(local, site)
        held, record = self._gather(_local_of(local), layout)
        ctx = EditContext(site, local, layout=layout, record=record, held=held)
        return (held if self.mesh.is_stage_leader() else None), ctx

    def scatter_from_edit(self, full: torch.Tensor | None, ctx: EditContext) -> torch.Tensor:
        if self.mesh.is_stage_leader():
            start = full
        else:
            # Whether the backward of the scatter runs (a collective) must not depend on this
            # rank's placeholder: the leader's edited tensor decides, broadcast with the status
            # by run_on_leader. A frozen model with a trainable module in the editing function
            # has an edited tensor that requires grad and placeholders that do not.
            start = ctx.state["held"]
            wanted = ctx.state.get("requires_grad")
            if wanted is not None and start.requires_grad != wanted:
                start = start.detach().requires_grad_(wanted)
        piece = self._scatter(start, ctx.state["layout"], ctx.state["record"])
        if self._trainable and piece.requires_grad:
            piece = _SyncTrainablePoint.apply(piece, self)
        return _like(piece, ctx.local)

    def run_on_leader(self, ctx: EditContext, fn: Callable[[], Any]) -> Any:
        result, requires_grad = self._run_reporting(ctx.site, "the editing function", fn,
                                                    ctx.local.device)
        ctx.state["requires_grad"] = requires_grad
        return result

    def _run_reporting(self, site: HookSite, what: str, fn: Callable[[], Any],
                       device: torch.device) -> tuple[Any, bool]:
        """Run ``fn`` on the leader and broadcast success or its error over the stage, with
        whether its (tensor) result requires grad; on failure every rank raises.

        Any ``BaseException`` counts: a ``KeyboardInterrupt`` or ``SystemExit`` on the leader
        is reported to the other ranks (as :class:`RemoteEditError`) before the leader re-raises
        it unchanged, so no rank is left waiting for a collective the leader will never join.
        An ``Exception`` becomes :class:`RemoteEditError` on every rank, caused by the original.
        """
        result, error, cause = None, None, None
        if self.mesh.is_stage_leader():
            try:
                result = fn()
            except BaseException as exc:  # reported to every rank below, then re-raised
                cause = exc
                error = (f"{what} of hook {site.module_name!r} ({site.hook_type}) failed on "
                         f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}")
        requires_grad = isinstance(result, torch.Tensor) and result.requires_grad
        try:
            requires_grad = broadcast_status(error, self.mesh.stage_group, 0, device=device,
                                             flag=requires_grad)
        except RemoteEditError as err:
            if cause is not None and not isinstance(cause, Exception):
                raise cause from None  # KeyboardInterrupt/SystemExit keep their type here
            raise RemoteEditError(f"rank {dist.get_rank()}: {err}") from cause
        return result, requires_grad

    # -- trainable modules ------------------------------------------------------------------------
    def sync_trainable_modules(self, modules: dict[str, nn.Module]) -> None:
        """Broadcast the modules' parameters from the leader now, and their gradients at the
        end of every backward that went through an edit (only the leader computes them)."""
        self._trainable = dict(modules)
        with torch.no_grad():
            with naming_lost_ranks(self.mesh.stage_group, "trainable module sync"):
                for p in self._trainable_parameters():
                    dist.broadcast(p.data, group=self.mesh.stage_group, group_src=0)

    def _trainable_parameters(self) -> list[torch.Tensor]:
        return [p for _, m in sorted(self._trainable.items()) for p in m.parameters()]

    def _queue_trainable_sync(self) -> None:
        if self._sync_queued:
            return
        self._sync_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._sync_trainable_grads)

    def _sync_trainable_grads(self) -> None:
        self._sync_queued = False
        leader = self.mesh.is_stage_leader()
        for p in self._trainable_parameters():
            if leader:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                buf = p.grad
            else:
                buf = torch.empty_like(p)
            with naming_lost_ranks(self.mesh.stage_group, "trainable gradient sync"):
                dist.broadcast(buf, group=self.mesh.stage_group, group_src=0)
            if not leader:
                p.grad = buf

    # -- parameters -------------------------------------------------------------------------------
    def register_parameter_hook(self, name: str, parameter: torch.Tensor,
                                owner: nn.Module | None,
                                hook: Callable[[torch.Tensor], Any]) -> Any:
        """Under FSDP1/FSDP2 the hook goes on the tensor the owner really uses in forward.

        FSDP1 sets fresh unsharded views as the owner's attributes before each forward; FSDP2
        swaps in one unsharded parameter that lives across steps. A forward-pre hook on the
        owner attaches ``hook`` to whatever stands there, once per tensor. That tensor's
        gradient is the whole parameter's gradient of the local batch; its layout is a dp
        average, and the (edited) value returned is what FSDP then reduce-scatters.
        """
        if owner is None or not frameworks.substitutes_parameters(self.module):
            return parameter.register_hook(hook)
        leaf = name.rpartition(".")[2]
        tag = f"_flex_surgery_hook_{next(_HOOK_IDS)}"  # marks tensors that already have it
        handles = _Handles()

        def attach(module: nn.Module, args: Any) -> None:
            live = getattr(module, leaf)
            if isinstance(live, torch.Tensor) and live.requires_grad and \
                    not getattr(live, tag, False):
                setattr(live, tag, True)
                handles.add(live.register_hook(hook))

        handles.pre_hook = owner.register_forward_pre_hook(attach)
        return handles

    def full_parameter(self, name: str, parameter: torch.Tensor,
                       owner: nn.Module | None) -> torch.Tensor:
        """Asks the framework registry how the parameter is split (see
        :func:`flex_surgery.parallel.frameworks.full_parameter`); a parameter no framework
        owns that differs across the tp ranks raises ``UnknownLayoutError``."""
        with torch.no_grad():
            full = frameworks.full_parameter(self.module, name, parameter, owner,
                                             frameworks.tensor_parallel_group(self.mesh))
        return store_copy(full, blocking=True)


_HEAD, _ROW = 8, 24  # whole_shape's exchange: 8 header entries, then up to 16 dims

_KINDS = {0: "replicated", 1: "sharded", 2: "partial sum", 3: "partial average"}


def _signature_text(row: list[int]) -> str:
    parts = []
    for i, axis in enumerate(GATHER_ORDER):
        kind, dim = row[4 + 2 * i], row[5 + 2 * i]
        parts.append(f"{axis} {_KINDS.get(kind, '?')}" + (f" on dim {dim}" if kind == 1 else ""))
    return ", ".join(parts) + f", local shape {tuple(row[_HEAD:_HEAD + row[3]])}"


def _whole_shape(table: list[list[int]], ranks: list[int], where: str) -> tuple[int, ...]:
    """The whole shape from every rank's row (see ``DistributedRuntime.whole_shape``): a dim
    sharded over an axis is the sum of the pieces along that axis (the ranks that are first on
    the other axis); every other dim must be the same on every rank."""
    ndim = table[0][3]
    shape = [table[0][_HEAD + d] for d in range(ndim)]
    sharded = {}
    for i in range(len(GATHER_ORDER)):
        if table[0][4 + 2 * i] == 1:
            sharded[table[0][5 + 2 * i]] = i
    for d in range(ndim):
        if d in sharded:
            i = sharded[d]
            other = 2 if i == 0 else 1  # the row column of the other axis' coordinate
            shape[d] = sum(r[_HEAD + d] for r in table if r[other] == 0)
            continue
        sizes = {r[_HEAD + d] for r in table}
        if len(sizes) > 1:
            seen = ", ".join(f"rank {ranks[k]}: {r[_HEAD + d]}" for k, r in enumerate(table))
            raise LayoutError(f"{where}: dim {d} is not split, yet its size differs between "
                              f"ranks ({seen}); the pieces cannot form one tensor")
    return tuple(shape)


_HOOK_IDS = itertools.count()


class _Handles:
    """Removes a forward-pre hook and every tensor hook it attached."""

    def __init__(self) -> None:
        self.pre_hook: Any = None
        self._tensor_hooks: list[Any] = []

    def add(self, handle: Any) -> None:
        # forget hooks of tensors that are gone (FSDP1 makes fresh views every forward)
        self._tensor_hooks = [h for h in self._tensor_hooks if h.hooks_dict_ref() is not None]
        self._tensor_hooks.append(handle)

    def remove(self) -> None:
        if self.pre_hook is not None:
            self.pre_hook.remove()
        for handle in self._tensor_hooks:
            handle.remove()
        self._tensor_hooks.clear()


def _local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _like(piece: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``piece`` in the form of ``original``: a DTensor again if the hook saw a DTensor."""
    if not is_dtensor(original):
        return piece
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(piece, original.device_mesh, original.placements,
                              run_check=False, shape=original.shape, stride=original.stride())


def build_runtime(
    module: nn.Module,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    process_group: dist.ProcessGroup | None = None,
    store_on: str = "rank0",
    batch_dim: int | None = None,
    refusal: str | None = None,
) -> Runtime:
    """The runtime FlexModel uses: local for one process, distributed otherwise.

    The mesh is adopted from what runs ``module`` (HF TP, DTensor/FSDP2, Megatron-core,
    fairscale, DDP/FSDP1 groups) and built from the sizes otherwise; sizes of 1 mean "whatever
    is running" (dp takes the ranks tp x pp leave over). ``batch_dim`` is the activation dim
    data parallelism splits (``None``: the model's framework decides -- 1 for Megatron's
    ``[seq, batch, hidden]``, else 0). Collective: every rank must call it. ``refusal``: this
    rank's reason not to build one (from its own state); if any rank gives one, every rank
    raises :class:`~flex_surgery.parallel.group_lifetime.RefusedOnEveryRank` before anything
    is built.
    """
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        if refusal is not None:
            raise RefusedOnEveryRank(refusal)
        return LocalRuntime()
    # A collective point over these ranks: free the groups of runtimes that every rank has
    # dropped without closing, and agree on refusals (see flex_surgery.parallel.group_lifetime).
    free_dropped(process_group, refusal=refusal)
    mesh = ParallelMesh.adopt(
        module,
        tp=tensor_parallel_size if tensor_parallel_size != 1 else None,
        pp=pipeline_parallel_size if pipeline_parallel_size != 1 else None,
        dp=data_parallel_size if data_parallel_size != 1 else None,
        group=process_group,
    )
    return DistributedRuntime(module, mesh, store_on=store_on, batch_dim=batch_dim,
                              mesh_parent=process_group, owns_mesh=True)
