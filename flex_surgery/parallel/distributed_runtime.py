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

import bisect
import collections
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.utils import _apply_to_tensors
from torch.utils import _pytree as pytree

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.axis_walk import AxisWalk
from flex_surgery.parallel.collectives import (
    announce_process,
    exchange_sizes,
    run_agreeing,
    start_gather,
)
from flex_surgery.parallel.failures import host_status_group
from flex_surgery.parallel.frameworks.ddp import (
    JoinRefusal,
    backward_reduces,
    learns_static_graph,
)
from flex_surgery.parallel.group_lifetime import OwnedGroups, RefusedOnEveryRank, free_dropped
from flex_surgery.parallel.layout import (
    GATHER_ORDER,
    Layout,
    LayoutInference,
    PartialSpec,
    ShardSpec,
    dtensor_layout,
    is_dtensor,
)
from flex_surgery.parallel.layout_specs import join_blocks, joining, split_blocks, unblocked
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.parameter_hooks import hook_live_parameter
from flex_surgery.parallel.runtime import (
    EditContext,
    HookSite,
    LocalRuntime,
    Runtime,
    defer,
    store_copy,
)
from flex_surgery.parallel.shape_agreement import agree_on_doubt, agree_on_whole_shape
from flex_surgery.parallel.site_tags import (
    BACKWARD_UNSHARD,
    END_OF_BACKWARD,
    END_OF_FORWARD,
    GRADIENT_REDUCTION,
    NO_SITE,
    HookSiteMismatchError,
    stamp,
)
from flex_surgery.parallel.trainable_sync import TrainableSync
from flex_surgery.parallel.unused_parameters import UnusedParameterHooks, output_tensors
from flex_surgery.store.hooks import Rows

__all__ = ["DistributedRuntime", "build_runtime"]

STORE_ON = ("rank0", "all", "replica_leaders")

#: Passes whose backward hooks can still be told apart (a backward through more forwards
#: than this at once stamps the older ones alike: they meet as one pass).
_PASSES_REMEMBERED = 1024
_UNNUMBERED = 2**63  # autograd numbers nodes no forward made (AccumulateGrad) 2**64 - 1


def _release_model(layouts: LayoutInference, join_refusal: JoinRefusal | None) -> None:
    """Take this runtime's hooks off the model: the layout tracker's, the DDP join hooks'."""
    layouts.unwatch()
    if join_refusal is not None:
        join_refusal.remove()


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
        overlap_retrieval: a retrieval whose tensor is sharded over one axis starts its gather
            and returns; the model computes on while the bytes travel, and the stored value
            appears at the end of the forward (or backward) pass, when
            :func:`~flex_surgery.parallel.runtime.wait_for_host_copies` completes it. Costs a
            copy of the local piece (the model may change it in place before it is sent).
    """

    def __init__(self, module: nn.Module, mesh: ParallelMesh, store_on: str = "rank0",
                 batch_dim: int | None = None,
                 mesh_parent: dist.ProcessGroup | None = None, owns_mesh: bool = False,
                 overlap_retrieval: bool = False) -> None:
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
            self.walk = AxisWalk(mesh)
            self.store_on = store_on
            self.overlap_retrieval = overlap_retrieval
            # The layout whole_shape just agreed, for the same call's gather; the tensor by weak
            # reference, so a call that fails in between does not keep an activation alive.
            self._agreed: tuple[weakref.ref[torch.Tensor], HookSite, Layout] | None = None
            # The call whose ranks have met at its site already (see _meeting).
            # With the pass: a mark a refused call left behind cannot match a later forward's.
            self._met: tuple[weakref.ref[torch.Tensor], HookSite, int] | None = None
            # Data-parallel ranks may reach different hooks (a branch some skip); on a stage
            # group that moves CPU tensors through gloo ("gloo", "cpu:gloo",
            # "cpu:gloo,cuda:nccl") every hook call's first message is then a header to the
            # stage leader, and so is the end of every hooked forward. From the mesh and the
            # backend: the same on every rank.
            self.meets_at_sites = mesh.dp_size > 1 and \
                "gloo" in str(dist.get_backend(mesh.stage_group))
            # Calls of the wrapped module with hooks enabled (FlexModel counts them with a hook
            # on the module, flex(...) or not; every rank runs the same ones): stamped into the
            # exchanges in front of a data-parallel gather, so a hook
            # that meets its own gather of another forward raises (site_tags).
            self.passes = 0
            # Where each pass began in this thread's autograd sequence numbers, for the pass a
            # backward hook call belongs to (_pass_of_call): (first sequence number, pass).
            self._pass_starts: collections.deque[tuple[int, int]] = collections.deque(
                maxlen=_PASSES_REMEMBERED)
            self._pass_thread = threading.get_ident()  # the thread that numbers them
            # The same for the nodes a reentrant checkpoint's recomputation makes on another
            # thread than the forwards' (the autograd engine's device threads): by thread.
            # (a thread-local: a new thread may get a finished one's ident, not its numbers)
            self._recompute_starts = threading.local()
            # (graph task, pass) of the latest reentrant recomputation that the backward
            # through the wrapped module's outputs ran: checkpoints nested in its region
            # belong to its forward.
            self._outer_recompute: tuple[int, int] | None = None
            self._announcing = -1  # the graph task whose end of backward is queued
            # Pre-hooks before the gradient collectives FSDP1 runs inside the backward.
            # By id of the FlatParameter: (a weak reference to it, its AccumulateGrad node,
            # the pre-hook's handle).
            self._reductions: dict[int, tuple[weakref.ref[torch.Tensor], Any, Any]] = {}
            self._fsdp1_units: list[nn.Module] | None = None
            # Forward hooks on FSDP2 units announcing their all-gathers in the backward.
            self._unshards = self._watch_unshards() if self.meets_at_sites else []
            # Pre-hooks on the modules with backward hooks that see a forward recomputed
            # inside the backward (reentrant activation checkpointing), for the pass its nodes
            # belong to (_pass_of_call); by module.
            self._recomputing: weakref.WeakKeyDictionary[nn.Module, Any] = \
                weakref.WeakKeyDictionary()
            if batch_dim is None:
                batch_dim = frameworks.batch_dim(module)
            self.layouts = LayoutInference(mesh, batch_dim)
            # DDP modules, whose join setting each hooked forward checks (start_pass)
            ddps = [(n, m) for n, m in module.named_modules()
                    if frameworks.wrapper_kind(m) == "DDP"]
            self._join_refusal = JoinRefusal(ddps) if ddps and mesh.dp_size > 1 else None
            self._ddp_unfinished: str | None = None  # see abandon_backward
            # DDPs split over data-parallel ranks, and what their next end of backward
            # finishes (see agree_parameter_use): a gradient reduction, a static graph's record
            self._ddps = [m for _, m in ddps] if mesh.dp_size > 1 else []
            self._ddp_reducing = self._ddp_learning = False
            self._finalizer = weakref.finalize(self, _release_model, self.layouts,
                                               self._join_refusal)
            self.layouts.watch(module)
            self.trainable = TrainableSync(mesh)
            # Editing hooks agree on their outcome on the host (no device sync per edit).
            self.status_group, made = host_status_group(mesh.stage_group, mesh_parent)
            if made:
                self._owned.groups.append(self.status_group)
            # Gradient hooks on parameters DDP may leave unused on some ranks
            self._unused = UnusedParameterHooks([m for _, m in ddps], self.status_group) \
                if ddps and mesh.dp_size > 1 else None
            announce_process()  # lets a survivor of a failed collective name the lost rank
        except BaseException:
            self.abandon()  # the failure may be this rank's alone: no collective
            raise

    def abandon(self) -> None:
        """:meth:`close` without a collective: remove the layout tracker's hooks and queue the
        mesh's groups for :func:`~flex_surgery.parallel.group_lifetime.free_dropped`. For the
        points a peer may not share: a failed construction, a ``with`` block left on an
        exception. A second call (or :meth:`close` after it) does nothing."""
        self._unwatch_reductions()
        if self._finalizer is not None:
            self._finalizer()  # _release_model, once
        self._mesh_finalizer()  # OwnedGroups.drop, once

    def abandon_backward(self, ranks_apart: bool = False) -> None:
        # No collective: each rank that raised resets its own wrappers (see Runtime), from what
        # every rank shares. DDP is kept as it is (and refused from now on) where it reduces in
        # this backward -- a forward under grad outside no_sync() since its last end of
        # backward, which a deferred gradient hook raising after it has passed -- and either
        # one rank may have launched a bucket all-reduce another never will (they are not
        # announced: ranks at different hooks, or a backward through a forward whose ranks used
        # different parameters), or it is a static-graph DDP's first backward, which records
        # the graph once.
        unused = self._unused
        reduces = self._ddp_reducing
        apart = reduces and (ranks_apart or (unused is not None and unused.uneven_backward()))
        learning = reduces and self._ddp_learning
        frameworks.abandon_backward(self.module.modules(), ddp=not (apart or learning))
        if not (apart or learning):  # reset: DDP expects nothing more
            self._ddp_reducing = self._ddp_learning = False
        if unused is not None:
            unused.reset_backward()  # nothing of the failed backward is left for the next
        if apart:
            self._ddp_unfinished = (
                "a backward through this DDP model raised inside flex_surgery while the "
                "data-parallel ranks " + ("were at different hooks" if ranks_apart else
                                           "had used different parameters") +
                ", so some ranks may have started gradient all-reduces that the others never "
                "will: DDP cannot finish that iteration or run another, and a collective on "
                "its process group could meet the stray all-reduce. Save what you need and "
                "restart the job (or build new process groups and a new DDP)")
        elif learning:
            self._ddp_unfinished = (
                "the first backward through this DistributedDataParallel(static_graph=True) "
                "raised inside flex_surgery: DDP records the training graph in that backward "
                "and cannot record it again (its next backward would say 'Your training graph "
                "has changed'). Save what you need and restart the job (or build a new DDP); "
                "a failure in a later backward is recovered from")

    def announce_in_backward(self, site: int) -> None:
        """``walk.announce_site(site)`` inside a backward; where the ranks turn out to be at
        different points, the backward is abandoned (:meth:`abandon_backward`) first."""
        try:
            self.walk.announce_site(site)
        except HookSiteMismatchError:
            self.abandon_backward(ranks_apart=True)
            raise

    def close(self) -> None:
        """Remove the layout tracker's hooks from the model and destroy the process groups
        this runtime's mesh created. Every rank calls it at the same point (``FlexModel.close``,
        ``restore`` or the end of its ``with`` block); a second call does nothing."""
        if not self._mesh_finalizer.alive:
            return  # abandoned: the groups are queued
        self._finalizer.detach()
        self._mesh_finalizer.detach()
        _release_model(self.layouts, self._join_refusal)
        self._unwatch_reductions()
        self._owned.free()

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.mesh.stage

    # -- layouts -----------------------------------------------------------------------------
    def layout_of(self, local: torch.Tensor, site: HookSite, settle: bool = True) -> Layout:
        """The layout of the tensor a hook at ``site`` sees (see :mod:`.layout`), its
        data-parallel split stamped with the site (see :mod:`.site_tags`). A sequence split
        inferred with a :class:`~flex_surgery.parallel.layout_specs.Doubt` is settled here on
        every rank of the stage (:func:`~flex_surgery.parallel.shape_agreement.agree_on_doubt`:
        every rank has one), unless not ``settle``: then the caller settles it
        (:meth:`whole_shape`, in its agreement)."""
        agreed, self._agreed = self._agreed, None
        if agreed is not None and agreed[0]() is local and agreed[1] is site:
            return agreed[2]  # just inferred (and agreed) by whole_shape for this very call
        if site.role == "param_grad" and is_dtensor(local):
            layout = dtensor_layout(local, self.mesh)
            if self.mesh.dp_size > 1 and layout.spec_for("dp") is None:
                layout = Layout(layout.shards, layout.partials + (PartialSpec("dp", "avg"),))
            return layout
        layout = self.layouts.layout(local, site.module, site.role, site.parameter,
                                     site.expected_shape, site.unpack_idx)
        doubted = _doubted(layout)
        if doubted is not None and settle:
            # Settled over the whole stage (a replica's refusal stops the others too), after
            # the data-parallel ranks met at this call: the gather that follows skips its
            # meeting (as after whole_shape).
            self.walk.announce_site(self._meeting(local, site))
            agree_on_doubt(self.mesh, _local_of(local), doubted.doubt, site,
                           stamp(site.tag, self._pass_of_call()))
            self._met = (weakref.ref(local), site, self._pass_of_call())
            layout = _with_spec(layout, doubted, replace(doubted, doubt=None))
        dp = next((s for s in layout.shards if s.axis == "dp"), None)
        if dp is None:  # not split over dp (a partial sum of it is no gather of pieces)
            return layout
        return _with_spec(layout, dp, replace(dp, site=stamp(site.tag, self._pass_of_call())))

    def whole_shape(self, local: torch.Tensor, site: HookSite) -> tuple[int, ...]:
        """The shape of the whole tensor, agreed by every rank of the stage before anything is
        gathered (see :func:`~flex_surgery.parallel.shape_agreement.agree_on_whole_shape`)."""
        failure: Exception | None = None
        layout = walked = None
        plain, joined = _local_of(local), None
        # The agreement below is an all-gather over the stage: data-parallel ranks at another
        # hook must meet this one first, where every hook's first message goes.
        self.walk.announce_site(self._meeting(local, site))
        try:
            layout = self.layout_of(local, site, settle=False)
            plain, walked, joined = unblocked(plain, layout)
        except Exception as exc:  # every rank learns of it there, then this rank re-raises it
            failure = exc
        doubted = _doubted(layout) if failure is None else None
        shape = agree_on_whole_shape(self.mesh, plain, walked, failure, site,
                                     stamp(site.tag, self._pass_of_call()),
                                     doubted.doubt if doubted is not None else None)
        if doubted is not None:  # settled in the agreement; the gather exchanges the sizes
            layout = _with_spec(layout, doubted, replace(doubted, doubt=None))
        # Met: the same call's gather (which follows unless the shape is refused) skips its
        # meeting. A refused shape raises above and leaves no mark behind.
        self._met = (weakref.ref(local), site, self._pass_of_call())
        self._agreed = (weakref.ref(local), site, layout)  # the call's gather asks for it next
        if joined is not None:  # (blocks, whole part) -> one dim
            shape = (*shape[:joined], shape[joined] * shape[joined + 1], *shape[joined + 2:])
        return shape

    def start_pass(self) -> None:
        """A hooked forward of the wrapped module begins (every rank runs the same ones).

        Refused, before the module runs, on a DDP model given to ``Join`` when it is split
        over data-parallel ranks: ranks that joined take no part in the hooks' gathers (see
        :func:`~flex_surgery.parallel.frameworks.ddp.join_enabled`; the same on every rank)."""
        if self._join_refusal is not None:
            self._join_refusal.check()
        if self._ddp_unfinished is not None:  # the same on every rank: each raised there
            raise RuntimeError(self._ddp_unfinished)
        self.passes += 1
        if self.meets_at_sites:
            self._pass_starts.append((torch._C._autograd._get_sequence_nr(), self.passes))
            self._pass_thread = threading.get_ident()  # (sequence numbers are per thread)

    def _pass_of_call(self) -> int:
        """The pass a hook call belongs to, stamped into its first message. In forward, the
        current one. In backward, the forward that created the autograd node running now:
        a backward through several forwards at once (losses of accumulated forwards summed)
        runs their backward hooks interleaved, and a branch hook of forward 1 on one rank
        must not meet the same hook of forward 2 on another (their rows would be joined as
        one tensor). Each rank maps its own sequence numbers (thread-local, increasing) to
        the passes every rank shares."""
        if torch._C._current_graph_task_id() == -1 or not self._pass_starts:
            return self.passes
        node = torch._C._current_autograd_node()
        starts = self._numbering()
        if node is None or node._sequence_nr() >= _UNNUMBERED or not starts:
            # no forward made it (a leaf's AccumulateGrad): the last pass, on every rank
            return self.passes
        return self._pass_of_sequence_nr(node._sequence_nr(), starts)

    def _numbering(self) -> collections.deque[tuple[int, int]]:
        """The passes' starts in the numbering of the autograd nodes that the current graph
        task runs. Sequence numbers are per thread: the forwards' nodes are numbered on the
        thread that ran them, and so are the nodes that a reentrant checkpoint's
        recomputation makes inside the backward -- on the thread running the backward, which
        for CUDA tensors is the autograd engine's device thread. The backward that reached the
        wrapped module's outputs (:meth:`watch_backward`) runs forward-made nodes; a nested
        one (the recomputed region's own backward) runs nodes its recomputation made."""
        outer = self._outer_recompute
        if threading.get_ident() == self._pass_thread or outer is None or \
                outer[0] != self._announcing or \
                torch._C._current_graph_task_id() == self._announcing:
            return self._pass_starts  # forward-made nodes (no recomputation under way)
        return self._thread_recompute_starts()

    def _thread_recompute_starts(self) -> collections.deque[tuple[int, int]]:
        """This thread's passes' starts of the nodes its recomputations made."""
        starts = getattr(self._recompute_starts, "starts", None)
        if starts is None:
            starts = self._recompute_starts.starts = collections.deque(
                maxlen=_PASSES_REMEMBERED)
        return starts

    def _pass_of_sequence_nr(self, seq: int, starts: collections.deque[tuple[int, int]]
                             ) -> int:
        """The pass whose forward made the autograd node numbered ``seq`` in the numbering
        whose passes' starts are ``starts`` (see :meth:`_pass_of_call`; a forward recomputed
        in backward: :meth:`watch_recomputation`)."""
        first = bisect.bisect_right(starts, (seq, math.inf)) - 1
        # before the passes remembered: no pass of them (each rank forgets the same ones)
        return starts[first][1] if first >= 0 else starts[0][1] - 1

    def end_of_hooked_forward(self) -> None:
        """Under data parallelism on the CPU, every rank of the stage announces to the stage
        leader that its hooked forward has returned (one small header each, one answer: a
        point-to-point round trip per forward). A hook on a module some ranks skip (a branch
        taken on the data) that was the last hook to fire on the others would leave those
        waiting in its gather while these go on into the model's own collectives (DDP's
        gradient all-reduce) or their next step, until the process group's timeout; met by
        this announcement, every rank raises ``HookSiteMismatchError`` instead. Decided from
        the mesh and the stage group's backend (:attr:`meets_at_sites`), the same on every
        rank."""
        if self.meets_at_sites:
            self.walk.announce_site(stamp(END_OF_FORWARD, self.passes))

    def watch_backward(self, output: Any) -> None:
        """Under data parallelism on the CPU (:attr:`meets_at_sites`), make the backward
        through this forward end with the same announcement as the forward
        (:data:`~flex_surgery.parallel.site_tags.END_OF_BACKWARD`): a backward hook on a
        module some ranks skip, when no later backward hook fires on them, would leave the
        others waiting in its gather while these go on. A hook on each tensor of ``output``
        that requires grad queues an autograd callback (once per backward) when its gradient
        arrives (the start of the backward through the model); the callback runs when that
        backward has finished, after every backward hook of it. A backward that raises runs no
        callback, so a rank that raised at a hook announces nothing more. Called by the
        FlexModel when backward hooks are selected, and after a forward that deferred gradient
        hooks (:meth:`agree_parameter_use`; the same on every rank), so every rank that runs
        the backward announces its end. A loss computed from none of the outputs (from a
        tensor kept aside in forward) announces nothing."""
        if not self.meets_at_sites or not torch.is_grad_enabled():
            return
        runtime = weakref.ref(self)

        def arrived(grad: torch.Tensor) -> None:
            held = runtime()
            task = torch._C._current_graph_task_id()
            if held is not None and held._announcing != task:  # once per backward
                held._announcing = task
                held._outer_recompute = None  # (a backward that raised left its own)
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: _announce_end_of_backward(runtime))

        # Every output an autograd node made: a loss may use any of them, and which of them
        # require grad may differ between ranks (a head on a branch). Not a leaf (a parameter
        # the model returns): its hook would stay for every later backward.
        for t in output_tensors(output):
            if t.grad_fn is not None:
                t.register_hook(arrived)
        self._watch_reductions()

    def agree_parameter_use(self, output: Any) -> None:
        """Under DDP split over data-parallel ranks, after every forward of the wrapped module
        under grad, hooks chosen or not (one may be registered or chosen before the backward);
        every rank runs the same forwards. With ``find_unused_parameters=True`` (or
        ``static_graph=True``): which parameters some ranks used in this forward and others
        did not (one all-reduce over the stage); their gradient hooks run at the end of the
        backward (:mod:`~flex_surgery.parallel.unused_parameters`). For every DDP: what DDP
        prepares for its next end of backward (a gradient reduction unless under
        ``no_sync()``, a static graph's first record), for :meth:`abandon_backward`; and a
        backward through this forward is followed from the moment it reaches the outputs
        (:meth:`_follow_backward`)."""
        if self._unused is not None and torch.is_grad_enabled():
            # A forward under grad (not under no_sync) prepares DDP's reducer, which then
            # reduces in the next backward through any forward, until its end of backward
            # (_after_ddp_end_of_backward): pending till then, whatever forwards follow (under
            # no_grad or no_sync they leave the reducer as it is). The same on every rank.
            self._ddp_reducing |= any(backward_reduces(d) for d in self._ddps)
            self._ddp_learning |= any(learns_static_graph(d) for d in self._ddps)
            pass_ = self._unused.agree(output)
            self._follow_backward(output, pass_)
            if self._unused.defers(pass_):  # the deferred hooks run at its end: announced
                self.watch_backward(output)

    def _follow_backward(self, output: Any, pass_: int) -> None:
        """Tell :attr:`_unused` when a backward reaches forward ``pass_``'s outputs (a hook on
        each made by an autograd node: a leaf's hook would stay for every later backward; once
        per backward, a callback at its end runs the deferred gradient hooks). Queued after
        :meth:`watch_backward`'s callback where both are on the same outputs (its hooks are
        registered first), so the end is announced first."""
        runtime = weakref.ref(self)

        def arrived(grad: torch.Tensor) -> None:
            held = runtime()
            if held is not None and held._unused is not None and \
                    held._unused.arrive(torch._C._current_graph_task_id(), pass_):
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: _end_of_backward(runtime))

        for t in output_tensors(output):
            if t.grad_fn is not None:
                t.register_hook(arrived)

    def _watch_reductions(self) -> None:
        """FSDP1 reduce-scatters a unit's gradient inside the backward, as soon as it is
        accumulated, not after it: a rank that skipped the branch of the others' last backward
        hook would be in that collective while they wait at the hook. Just before each
        reduction, in a backward whose end is announced (the same on every rank), every rank
        announces it (:data:`~flex_surgery.parallel.site_tags.GRADIENT_REDUCTION`): one
        round trip per FSDP1 unit and backward, and a rank at another hook raises with them.
        (FSDP2 reduces a unit's gradient in the backward of a node on the unit's inputs,
        announced from a pre-hook on it (``_watch_unshards``), and the root's in a callback at
        the end of the backward, which the end-of-backward announcement precedes: see
        ``hooked_passes``.)"""
        if self._fsdp1_units is None:  # the model's FSDP1 units, found once
            self._fsdp1_units = [m for m in self.module.modules() if frameworks.FSDP1().owns(m)]
        runtime = weakref.ref(self)
        for flat_param, node in frameworks.fsdp1_gradient_accumulators(self._fsdp1_units):
            # FSDP1 hooks the node again in each forward (it drops its hook after the
            # backward, and the node may be a new one): watched where it is not yet
            known = self._reductions.get(id(flat_param))
            if known is not None and known[0]() is flat_param and known[1] is node:
                continue
            if known is not None:
                known[2].remove()
            self._reductions[id(flat_param)] = (weakref.ref(flat_param), node,
                                                node.register_prehook(
                                                    lambda grads: _announce_reduction(runtime)))

    def _watch_unshards(self) -> list:
        """FSDP all-gathers a unit resharded after forward inside the backward, from a hook
        on the unit's outputs (its pre-backward: the unit's unshard, or the prefetch of the
        one before it): a rank that skipped the branch of the others' last backward hook would
        be in that all-gather while they wait at the hook. So, in a backward whose end is
        announced, every rank announces
        (:data:`~flex_surgery.parallel.site_tags.BACKWARD_UNSHARD`) just before FSDP's hook
        runs: one round trip per unit and backward. FSDP2 hooks the outputs from its own
        forward hook: a forward hook put in front of it hooks them first. FSDP1 hooks them
        inside its forward, before any forward hook of the unit runs (and a tensor's hooks run
        in the order they were added), so a forward hook hands on views of the outputs instead,
        hooked: a view's gradient comes before its base's. A forward recomputed in the backward
        (activation checkpointing) unshards the unit before it runs: a forward pre-hook put in
        front of FSDP's announces that too. Returns the hooks' handles."""
        runtime = weakref.ref(self)

        def announce(*grads: Any) -> None:
            held = runtime()
            if held is not None and held._announcing == torch._C._current_graph_task_id():
                held.announce_in_backward(stamp(BACKWARD_UNSHARD, held._pass_of_call()))

        def recomputing(unit: nn.Module, args: Any) -> None:
            # A forward run again inside the backward (activation checkpointing around the
            # unit) unshards the unit before it runs: announced first, as in the backward.
            if torch._C._current_graph_task_id() != -1:
                announce()

        def fsdp2_returned(unit: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            watched = [t for t in pytree.tree_leaves(output)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if watched:  # FSDP2 runs its pre-backward once per unit: so does this
                torch.autograd.graph.register_multi_grad_hook(watched, announce, mode="any")

        def fsdp1_returned(unit: nn.Module, args: Any, output: Any) -> Any:
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return None
            seen = [None]  # the graph task announced in: once per call and backward, as FSDP1

            def first_gradient(grad: torch.Tensor) -> None:
                task = torch._C._current_graph_task_id()
                if seen[0] != task:
                    seen[0] = task
                    announce()

            def viewed(t: torch.Tensor) -> torch.Tensor:
                # A plain view (in-place ops on it stay allowed, as on the output itself): its
                # gradient, and so this hook, comes before the output's and FSDP1's hook on it.
                view = t.view_as(t)
                view.register_hook(first_gradient)
                return view

            return _apply_to_tensors(lambda t: viewed(t) if t.requires_grad else t, output)

        def fsdp2_reduces(unit: nn.Module, args: Any, kwargs: Any) -> None:
            # FSDP2 reduce-scatters a unit's gradients in the backward of the node its own
            # pre-forward hook put on the unit's inputs (RegisterPostBackwardFunction), once the
            # unit's backward is done; the root's, and a unit's whose inputs need no gradient,
            # at the end of the backward, which its announcement precedes. A pre-hook on that
            # node announces the reduction (GRADIENT_REDUCTION), as a pre-hook on an FSDP1
            # unit's AccumulateGrad does, so a rank whose branch hook the others skipped
            # raises with them there instead of meeting their reduce-scatter.
            if not torch.is_grad_enabled():
                return
            nodes = {t.grad_fn for t in pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None and
                     type(t.grad_fn).__name__ == "RegisterPostBackwardFunctionBackward"}
            for node in nodes:
                node.register_prehook(lambda grads: _announce_reduction(runtime))

        fsdp1, fsdp2 = frameworks.FSDP1(), frameworks.FSDP2()
        units = [unit for unit in self.module.modules() if fsdp1.owns(unit) or fsdp2.owns(unit)]
        # (after FSDP2's own pre-forward hook, which is prepended: the inputs it returns)
        return [unit.register_forward_hook(
                    fsdp1_returned if fsdp1.owns(unit) else fsdp2_returned, prepend=True)
                for unit in units] + \
            [unit.register_forward_pre_hook(recomputing, prepend=True) for unit in units] + \
            [unit.register_forward_pre_hook(fsdp2_reduces, with_kwargs=True)
             for unit in units if fsdp2.owns(unit)]

    def watch_recomputation(self, module: nn.Module) -> None:
        """A reentrant checkpoint (``torch.utils.checkpoint(..., use_reentrant=True)``) runs
        its region's forward again inside the backward, and the backward hooks of ``module``
        in the region fire on the nodes made then -- after every pass began, so by their
        sequence numbers alone they would all belong to the last forward, and accumulated
        forwards whose branch hook fires on different ranks would meet as one call. A forward
        pre-hook on ``module`` (which has a backward hook) notes, as its forward runs again,
        which pass the node running it (the checkpoint's, made in that forward) belongs to, as
        a new entry of the passes' starts: the nodes its backward hooks fire on, made next,
        map to it. The entry goes to the starts of the thread that runs the recomputation (the
        autograd engine's device thread for CUDA tensors), whose numbering those nodes have
        (:meth:`_numbering`). A checkpoint nested in the region was made by the outer
        recomputation, after which the backward through the outputs has moved on to no other
        forward: its recomputation belongs to the outer one's forward. Assumes the backward
        reaches the wrapped module's outputs (:meth:`watch_backward`), as every loss of them
        does. Outside a backward it returns at once; on the modules with backward hooks
        only (a pre-hook takes a module call off torch's fast path: about 1 us). Under
        :attr:`meets_at_sites` only, where the stamps are compared."""
        if not self.meets_at_sites or module in self._recomputing:
            return
        runtime = weakref.ref(self)

        def entered(module: nn.Module, args: Any) -> None:
            if torch._C._current_graph_task_id() == -1:
                return
            held = runtime()
            node = torch._C._current_autograd_node()
            # a reentrant checkpoint's recomputation (a non-reentrant one makes no nodes that
            # hooks fire on)
            if held is None or node is None or not held._pass_starts or \
                    type(node).__name__ != "CheckpointFunctionBackward":
                return
            task = torch._C._current_graph_task_id()
            outer = held._outer_recompute
            if task != held._announcing and outer is not None and outer[0] == held._announcing:
                # a checkpoint nested in the region whose recomputation the backward through
                # the outputs runs now: its node was made there, its forward is that one's
                seen = outer[1]
            else:
                of_node = held._numbering()  # the numbering of the checkpoint's node
                if not of_node:
                    return
                seen = held._pass_of_sequence_nr(node._sequence_nr(), of_node)
                if task == held._announcing:
                    held._outer_recompute = (task, seen)
            # the nodes made next are numbered on this thread
            made = held._pass_starts if threading.get_ident() == held._pass_thread else \
                held._thread_recompute_starts()
            if not made or made[-1][1] != seen:  # (the same pass goes on: nothing new)
                made.append((torch._C._autograd._get_sequence_nr(), seen))

        self._recomputing[module] = module.register_forward_pre_hook(entered)

    def _unwatch_reductions(self) -> None:
        for _, _, handle in self._reductions.values():
            handle.remove()
        self._reductions.clear()
        for handle in (*getattr(self, "_unshards", ()),
                       *getattr(self, "_recomputing", {}).values()):
            handle.remove()
        self._unshards = []
        self._recomputing = weakref.WeakKeyDictionary()

    def _meeting(self, local: torch.Tensor, site: HookSite) -> int:
        """The stamp that this hook call's first message carries, so that data-parallel ranks
        at another hook meet it (:attr:`meets_at_sites`); ``NO_SITE`` when no meeting is
        needed: no data parallelism, or the ranks met at this call already (its shape
        agreement, or an edit's gather before the retrieval of its result)."""
        met, self._met = self._met, None
        if not self.meets_at_sites or \
                (met is not None and met[0]() is local and met[1] is site
                 and met[2] == self._pass_of_call()):
            return NO_SITE
        return stamp(site.tag, self._pass_of_call())

    def is_edit_leader(self, site: HookSite) -> bool:
        return self.mesh.is_stage_leader()

    # -- the Runtime seam -----------------------------------------------------------------------
    def retrieve(self, local: torch.Tensor, site: HookSite,
                 store: Callable[[torch.Tensor], None]) -> None:
        plain, layout, joined = unblocked(_local_of(local).detach(),
                                          self.layout_of(local, site))
        store = joining(store, joined)
        meet = self._meeting(local, site)
        with torch.no_grad():
            if self.store_on == "all":
                self.walk.announce_site(meet)
                store(store_copy(self.walk.to_all(plain, layout)))
                return
            if self.store_on == "replica_leaders" and self.mesh.dp_size > 1 and \
                    isinstance(layout.spec_for("dp"), ShardSpec):
                self.walk.announce_site(meet)
                self._retrieve_replica_rows(plain, layout, store)
                return
            if self.overlap_retrieval and self._start_retrieval(plain, layout, store, meet):
                return
            full, record = self._to_leader_detached(plain, layout, meet)
        if self.mesh.is_stage_leader():
            # A tensor gathered (or reduced) on the CPU is already a private copy; copy only
            # what may still alias the model's own activation, or lives on a device.
            fresh = full.device.type == "cpu" and (record is None or any(
                spec is not None for _, spec, _, _ in record))
            store(full if fresh else store_copy(full))

    def _to_leader_detached(self, plain: torch.Tensor, layout: Layout,
                            meet: int) -> tuple[torch.Tensor | None, list | None]:
        """The whole of a detached tensor on the stage leader (what this rank holds elsewhere)
        and the walk's record (``None`` after one transfer over the stage): the one transfer
        that both a retrieval and a ``reduce=`` (:meth:`gather_to_leader`) make, so hooks of
        either kind at different sites meet in the same exchange and raise together."""
        axes = self.walk.direct_axes(plain, layout)  # one transfer over the stage
        if axes:
            return self.walk.to_leader_at_once(plain, layout, axes, meet), None
        return self.walk.to_leader(plain, layout, meet=meet)

    def gather_to_leader(self, local: torch.Tensor,
                         site: HookSite) -> tuple[torch.Tensor | None, EditContext]:
        plain, layout, joined = unblocked(_local_of(local).detach(),
                                          self.layout_of(local, site))
        meet = self._meeting(local, site)
        with torch.no_grad():
            full, _ = self._to_leader_detached(plain, layout, meet)
        ctx = EditContext(site, local, layout=layout)
        return (join_blocks(full, joined) if self.mesh.is_stage_leader() else None), ctx

    def _start_retrieval(self, plain: torch.Tensor, layout: Layout,
                         store: Callable[[torch.Tensor], None], meet: int) -> bool:
        """``overlap_retrieval``: start the gather of a tensor sharded over the only axis of
        size > 1 and store it when it has arrived (:func:`~flex_surgery.parallel.runtime.defer`).
        Returns ``False`` (nothing started) for any other layout, and in backward, the same on
        every rank: the mesh, the layout and the pass are shared."""
        if torch._C._current_graph_task_id() != -1:
            # In backward: retrieve now. A backward that raises runs no end-of-backward
            # callback, so a deferred value could only land in the next pass.
            return False
        axes = [axis for axis in GATHER_ORDER if self.mesh.size(axis) > 1]
        spec = layout.spec_for(axes[0]) if len(axes) == 1 else None
        if not isinstance(spec, ShardSpec):
            return False
        self.walk.announce_site(meet)
        group = self.mesh.group(axes[0])
        sizes = spec.sizes or exchange_sizes(plain, spec.dim, group, spec.rows, spec.site)
        finish = start_gather(plain, spec.dim % plain.ndim, group, 0, sizes)
        scale = layout.grad_scale

        def complete() -> None:
            full = finish()
            if full is not None:
                full = full * scale if scale != 1.0 else full
                store(full if full.device.type == "cpu" else store_copy(full))

        defer(complete, stores=True)
        return True

    def _retrieve_replica_rows(self, plain: torch.Tensor, layout: Layout,
                               store: Callable[..., None]) -> None:
        """``store_on="replica_leaders"``: no activation crosses replicas. The tensor is gathered
        over tp only; each replica's leader stores its rows with their place in the global
        batch (the replicas' sizes are exchanged: one small all-gather over dp)."""
        spec = layout.spec_for("dp")
        sizes = spec.sizes or exchange_sizes(plain, spec.dim, self.mesh.group("dp"),
                                             spec.rows, spec.site)
        full, record = self.walk.to_leader(plain, layout, axes=("tp",))
        if self.mesh.rank("tp") != 0:
            return
        if layout.grad_scale != 1.0 and not self.mesh.is_stage_leader():  # _gather scaled it
            full = full * layout.grad_scale
        start = sum(sizes[:self.mesh.rank("dp")])
        rows = Rows(spec.dim, start, start + sizes[self.mesh.rank("dp")], sum(sizes))
        fresh = full.device.type == "cpu" and any(spec is not None for _, spec, _, _ in record)
        store(full if fresh else store_copy(full), rows)

    def retrieve_gathered(self, full: torch.Tensor | None, ctx: EditContext,
                          store: Callable[[torch.Tensor], None], keeps: bool = True) -> None:
        # Only the branches that gather again (self.retrieve) are collectives: every rank takes
        # them; a copy this rank would not keep is skipped.
        everywhere = ctx.state.get("everywhere")
        layout = ctx.state["layout"]
        if self.store_on == "replica_leaders" and self.mesh.dp_size > 1 and \
                isinstance(layout.spec_for("dp"), ShardSpec):
            # Each replica's leader stores its own rows, as a retrieval-only hook does: taken
            # from the whole tensor every rank holds, or gathered over tp on the leader path.
            if not everywhere:
                self._retrieve_again(ctx, store)
            elif keeps:
                self._store_own_rows(full, layout, ctx.state["record"], store)
        elif self.store_on == "all" and not everywhere:  # the leader's gather is not enough
            self._retrieve_again(ctx, store)
        elif keeps and (self.store_on == "all" or self.mesh.is_stage_leader()):
            store(store_copy(full))  # "all" here: every rank gathered the whole tensor

    def _retrieve_again(self, ctx: EditContext, store: Callable[..., None]) -> None:
        """Retrieve the tensor an edit has just gathered: its ranks met at its site already
        (the edit's gather), so the retrieval's first message carries no site (_meeting). The
        mark lives for this one call only: left behind, a later call on the same tensor (a
        pre-hook that sees the caller's input again) would skip its own meeting."""
        self._met = (weakref.ref(ctx.local), ctx.site, self._pass_of_call())
        try:
            self.retrieve(ctx.local, ctx.site, store)
        finally:
            self._met = None

    def _store_own_rows(self, full: torch.Tensor, layout: Layout, record: list,
                        store: Callable[..., None]) -> None:
        """``store_on="replica_leaders"`` with the whole tensor on every rank: this replica's
        leader (tp rank 0) stores its rows, with their place in the global batch."""
        if self.mesh.rank("tp") != 0:
            return
        spec = layout.spec_for("dp")
        sizes = next(sizes for axis, _, sizes, _ in record if axis == "dp")
        me = self.mesh.rank("dp")
        start = sum(sizes[:me])
        rows = Rows(spec.dim, start, start + sizes[me], sum(sizes))
        store(store_copy(full.narrow(spec.dim, start, sizes[me])), rows)

    def gather_for_edit(self, local: torch.Tensor, site: HookSite,
                        everywhere: bool = False) -> tuple[torch.Tensor | None, EditContext]:
        blocked = self.layout_of(local, site)
        plain, layout, joined = unblocked(_local_of(local), blocked)
        # what the editing function sees is joined back into the one-process order; the
        # edited tensor is split again before it is scattered (see scatter_from_edit)
        blocks = (joined, plain.shape[joined] if joined is not None else 1)
        meet = self._meeting(local, site)
        if everywhere and not self.trainable.modules:
            # Trainable modules are kept identical by the leader broadcasting their gradients
            # (sync_trainable_modules), which needs the leader path; registering them is a
            # collective every rank makes, so every rank takes the same path here.
            full, record = self.walk.everywhere(plain, layout, meet)
            return join_blocks(full, joined), EditContext(site, local, layout=layout,
                                                          record=record, everywhere=True,
                                                          blocks=blocks)
        trainable = bool(self.trainable.modules)
        held, record = self.walk.to_leader(plain, layout, trainable=trainable, meet=meet)
        ctx = EditContext(site, local, layout=layout, record=record, held=held,
                          trainable=trainable, blocks=blocks)
        return (join_blocks(held, joined) if self.mesh.is_stage_leader() else None), ctx

    def scatter_from_edit(self, full: torch.Tensor | None, ctx: EditContext) -> torch.Tensor:
        piece = self._scatter(full, ctx)
        if ctx.site.role == "output" and torch._C._current_graph_task_id() == -1:
            # What the module now returns is the edited piece, split like the tensor the layout
            # tracker saw it make (its exit ran before this hook): a later hook on it reads that.
            self.layouts.keep_like(piece, ctx.local)
        return piece

    def _scatter(self, full: torch.Tensor | None, ctx: EditContext) -> torch.Tensor:
        joined, blocks = ctx.state.get("blocks", (None, 1))
        if ctx.state.get("everywhere"):
            piece = self.walk.own_piece(split_blocks(full, joined, blocks), ctx.state["layout"],
                                        ctx.state["record"])
            return _like(join_blocks(piece, joined), ctx.local)
        if self.mesh.is_stage_leader():
            start = full
            held = ctx.state.get("held")
            if isinstance(full, torch.Tensor) and full.requires_grad and \
                    isinstance(held, torch.Tensor) and held.requires_grad:
                # The other ranks' backward runs the gather's backward (a scatter) whenever
                # the scatter's does; so must the leader's, even if the edited tensor does not
                # depend on the gathered one (a replacement from a trainable module).
                start = _ThroughGather.apply(full, held)
            start = split_blocks(start, joined, blocks)
        else:
            # Whether the backward of the scatter runs (a collective) must not depend on this
            # rank's placeholder: the leader's edited tensor decides, broadcast with the status
            # by run_on_leader. A frozen model with a trainable module in the editing function
            # has an edited tensor that requires grad and placeholders that do not.
            start = ctx.state["held"]
            wanted = ctx.state.get("requires_grad")
            if wanted is not None and start.requires_grad != wanted:
                start = start.detach().requires_grad_(wanted)
        piece = join_blocks(self.walk.from_leader(start, ctx.state["layout"],
                                                  ctx.state["record"],
                                                  trainable=ctx.state["trainable"]), joined)
        if self.trainable.modules and piece.requires_grad:
            piece = self.trainable.sync_point(piece)
        return _like(piece, ctx.local)

    def run_on_leader(self, ctx: EditContext, fn: Callable[[], Any],
                      what: str = "the editing function") -> Any:
        everywhere = bool(ctx.state.get("everywhere"))
        site = ctx.site
        what = (f"{what} of hook {site.module_name!r} ({site.hook_type}"
                f"{', replicate_edit' if everywhere else ''})")
        result, requires_grad = run_agreeing(fn, self.status_group, what, "cpu",
                                             src=None if everywhere else 0)
        ctx.state["requires_grad"] = requires_grad
        return result

    def run_everywhere(self, site: HookSite, what: str, fn: Callable[[], Any]) -> Any:
        what = f"{what} of hook {site.module_name!r} ({site.hook_type})"
        return run_agreeing(fn, self.status_group, what, "cpu", src=None)[0]

    # -- trainable modules ------------------------------------------------------------------------
    def sync_trainable_modules(self, modules: dict[str, nn.Module]) -> None:
        """See :class:`~flex_surgery.parallel.trainable_sync.TrainableSync`."""
        self.trainable.sync(modules)

    # -- parameters -------------------------------------------------------------------------------
    def register_parameter_hook(self, name: str, parameter: torch.Tensor,
                                owner: nn.Module | None,
                                hook: Callable[[torch.Tensor], Any],
                                edits: Callable[[], bool] = lambda: False) -> Any:
        """Under DDP with ``find_unused_parameters=True`` the hook may wait for the end of
        the backward (:class:`~flex_surgery.parallel.unused_parameters.UnusedParameterHooks`).

        Under FSDP1/FSDP2 the hook goes on the tensor the owner really uses in forward.

        FSDP1 sets fresh unsharded views as the owner's attributes before each forward; FSDP2
        swaps in one unsharded parameter that lives across steps. A forward-pre hook on the
        owner attaches ``hook`` to whatever stands there, once per tensor. That tensor's
        gradient is the whole parameter's gradient of the local batch; its layout is a dp
        average, and the (edited) value returned is what FSDP then reduce-scatters.
        """
        if owner is None or not frameworks.substitutes_parameters(self.module):
            if self._unused is not None and self._unused.covers(parameter):
                return self._unused.register(name, parameter, hook, edits)
            return parameter.register_hook(hook)
        return hook_live_parameter(owner, name.rpartition(".")[2], hook, root=self.module)

    def full_parameter(self, name: str, parameter: torch.Tensor,
                       owner: nn.Module | None) -> torch.Tensor:
        """Asks the framework registry how the parameter is split (see
        :func:`flex_surgery.parallel.frameworks.full_parameter`); a parameter no framework
        owns that differs across the tp ranks raises ``UnknownLayoutError``."""
        with torch.no_grad():
            full = frameworks.full_parameter(self.module, name, parameter, owner,
                                             frameworks.tensor_parallel_group(self.mesh))
        return store_copy(full, blocking=True)


class _ThroughGather(torch.autograd.Function):
    """``edited`` unchanged, with the gathered tensor as an input whose gradient is ``None``: the
    autograd engine still runs the gather's backward (with a zero gradient when nothing else
    reaches it), so the leader joins the scatter the other ranks wait in. Free otherwise: a
    ``None`` adds nothing to the gradient the editing function gives."""

    @staticmethod
    def forward(ctx, edited: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        return edited.view_as(edited)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _announce_end_of_backward(runtime: weakref.ref) -> None:
    held = runtime()
    if held is not None:
        held._outer_recompute = None  # a later backward's recomputations are its own
        if held.meets_at_sites:  # a rank left at a hook the others skipped raises
            held.announce_in_backward(stamp(END_OF_BACKWARD, held.passes))


def _end_of_backward(runtime: weakref.ref) -> None:
    held = runtime()
    if held is not None and held._unused is not None:
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: _after_ddp_end_of_backward(runtime))
        # gradient hooks of parameters some ranks skipped, after that
        held._unused.run_deferred(lambda: _abandon_backward(runtime))


def _after_ddp_end_of_backward(runtime: weakref.ref) -> None:
    """After the callbacks queued inside the backward -- DDP's end of backward (its
    gradients reduced; a static graph's record made) among them -- and before the deferred
    gradient hooks: DDP expects nothing more, and the backward is over."""
    held = runtime()
    if held is not None:
        held._ddp_reducing = held._ddp_learning = False
        if held._unused is not None:
            held._unused.reset_backward()


def _abandon_backward(runtime: weakref.ref) -> None:
    held = runtime()
    if held is not None:
        held.abandon_backward()


def _announce_reduction(runtime: weakref.ref) -> None:
    held = runtime()
    if held is not None and held._announcing == torch._C._current_graph_task_id():
        held.announce_in_backward(stamp(GRADIENT_REDUCTION, held._pass_of_call()))


def _doubted(layout: Layout) -> ShardSpec | None:
    """The split of ``layout`` inferred with a :class:`~flex_surgery.parallel.layout_specs.
    Doubt` (to settle among the ranks of its axis), or ``None``."""
    return next((s for s in layout.shards if s.doubt is not None), None)


def _with_spec(layout: Layout, old: ShardSpec, new: ShardSpec) -> Layout:
    """``layout`` with its split ``old`` replaced by ``new``."""
    return replace(layout, shards=tuple(new if s is old else s for s in layout.shards))


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
    overlap_retrieval: bool = False,
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
                              mesh_parent=process_group, owns_mesh=True,
                              overlap_retrieval=overlap_retrieval)
