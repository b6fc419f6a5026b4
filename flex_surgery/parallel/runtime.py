"""The seam between hooks and parallelism: how a hook gets the whole tensor and puts it back.

A :class:`~flex_surgery.hooks.hook_function.HookFunction` never calls a collective itself. For
each hook call it asks the model's runtime three questions, and the answers are the only place
where parallelism enters the hook path:

1. :meth:`Runtime.retrieve` -- "store a detached copy of the whole of this tensor": gathered to
   the storing rank only (never an all-gather to everyone), copied off the device there.
2. :meth:`Runtime.gather_for_edit` -- "give me the whole tensor where the editing function runs":
   autograd-aware, full tensor on exactly one rank per hook call (the *edit leader*), ``None``
   on the others.
3. :meth:`Runtime.scatter_from_edit` -- "put the edited whole tensor back in its sharded form":
   the mirror of 2, so gradients flow back through edit and gather.

An editing function declared pure (``HookFunction(replicate_edit=True)``) takes a shorter path:
``gather_for_edit(..., everywhere=True)`` puts the whole tensor on *every* rank (one all-gather
instead of a gather), every rank runs the function on its copy, and ``scatter_from_edit`` keeps
this rank's piece without communicating; the ranks only agree that no one failed.

:class:`LocalRuntime` is the single-process answer (every question is the identity); the
distributed runtime in :mod:`flex_surgery.parallel.distributed_runtime` answers them over a
:class:`~flex_surgery.parallel.mesh.ParallelMesh` with layouts inferred from the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flex_surgery.parallel.site_tags import site_tag

HOOK_TYPES = ("forward", "forward_pre", "full_backward", "full_backward_pre", "tensor")


@dataclass(frozen=True)
class HookSite:
    """Where a hook call happens: which module (or parameter), which hook kind, what shape hint.

    ``role`` says which tensor of the module the hook sees -- ``"output"``, ``"input"``,
    ``"grad_output"``, ``"grad_input"`` or ``"param_grad"`` -- because under tensor parallelism a
    module's input and output are sharded differently (a row-parallel linear takes a sharded
    input and returns a replicated output), and gradients follow the layout of their tensor.
    """

    module_name: str
    hook_type: str
    role: str
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    parameter: nn.Parameter | None = field(default=None, compare=False, repr=False)
    expected_shape: tuple[int, ...] | None = None
    #: Which tensor of the hooked value the hook sees: a layer's outputs may be split
    #: differently (Megatron's ``(output, bias)``).
    unpack_idx: int = 0

    def __post_init__(self) -> None:
        # made now, on every rank alike, so that any rank can name it (see site_tags)
        site_tag(self.module_name, self.role, self.unpack_idx)

    @property
    def tag(self) -> int:
        """This site's :func:`~flex_surgery.parallel.site_tags.site_tag`, which the exchanges
        in front of a data-parallel gather carry."""
        return site_tag(self.module_name, self.role, self.unpack_idx)

    @staticmethod
    def role_for(hook_type: str) -> str:
        return {
            "forward": "output",
            "forward_pre": "input",
            "full_backward": "grad_input",
            "full_backward_pre": "grad_output",
            "tensor": "param_grad",
        }[hook_type]


class EditContext:
    """What :meth:`Runtime.gather_for_edit` hands to :meth:`Runtime.scatter_from_edit`.

    Opaque to the hook: the runtime keeps here whatever it needs to undo its gather (the layout,
    the shard sizes, the autograd placeholder on non-leader ranks).
    """

    def __init__(self, site: HookSite, local: torch.Tensor, **state: Any) -> None:
        self.site = site
        self.local = local
        self.state = state


class Runtime:
    """Interface of a hook runtime; :class:`LocalRuntime` is the one-process implementation."""

    def abandon_backward(self, ranks_apart: bool = False) -> None:
        """Called where flex_surgery raises inside a backward, on every rank that raises: the
        model's data-parallel wrappers (DDP, FSDP1, FSDP2) are put back between two
        iterations and the gradients of that backward dropped, so that the model trains on
        once the exception is caught. ``ranks_apart``: the ranks raised at different points
        (``HookSiteMismatchError``); then FSDP only, whose every collective in a backward is
        announced first, so none was launched by some ranks only. Nothing in one process: no
        wrapper ends iterations there."""
        return None

    def retrieve(self, local: torch.Tensor, site: HookSite,
                 store: Callable[[torch.Tensor], None]) -> None:
        """Call ``store(full_detached_cpu_tensor)`` on the storing rank(s); no-op elsewhere."""
        raise NotImplementedError

    def gather_for_edit(self, local: torch.Tensor, site: HookSite,
                        everywhere: bool = False) -> tuple[torch.Tensor | None, EditContext]:
        """Whole tensor (autograd-connected) on the edit leader, ``None`` on the other ranks;
        with ``everywhere``, on every rank (then :meth:`run_on_leader` runs the function on
        every rank and :meth:`scatter_from_edit` keeps each rank's own piece)."""
        raise NotImplementedError

    def gather_to_leader(self, local: torch.Tensor,
                         site: HookSite) -> tuple[torch.Tensor | None, EditContext]:
        """The whole tensor, detached, on the storing rank (``None`` on the others), moved the
        way :meth:`retrieve` moves it, for work done there before storing (``reduce=``); the
        context serves :meth:`run_on_leader`."""
        raise NotImplementedError

    def retrieve_gathered(self, full: torch.Tensor | None, ctx: EditContext,
                          store: Callable[[torch.Tensor], None], keeps: bool = True) -> None:
        """Like :meth:`retrieve`, for a hook that also edits: store the whole tensor that
        :meth:`gather_for_edit` already gathered instead of gathering it a second time.

        Called before the editing function runs, so the stored value is the one before editing
        even if the function edits in place. ``keeps=False``: this rank's ``store`` keeps
        nothing, so no copy is made where no collective depends on it.
        """
        raise NotImplementedError

    def scatter_from_edit(self, full: torch.Tensor | None, ctx: EditContext) -> torch.Tensor:
        """This rank's piece of the edited whole tensor, in the layout ``ctx.local`` had."""
        raise NotImplementedError

    def run_on_leader(self, ctx: EditContext, fn: Callable[[], Any],
                      what: str = "the editing function") -> Any:
        """Run ``fn`` on the edit leader; if it raises there, raise on every rank.

        Every rank must learn within bounded time that the editing function failed, or the
        non-leaders would wait forever in the next collective. Returns ``fn()``'s result on the
        leader and ``None`` elsewhere. ``what`` names ``fn`` in the error the others raise.
        """
        raise NotImplementedError

    def run_everywhere(self, site: HookSite, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank of the stage; if it raises on any, raise on every rank
        (:class:`~flex_surgery.parallel.failures.RemoteEditError`; ``what`` names ``fn``).

        For work each rank does on its own copy, that may fail on some ranks only (a ``reduce=``
        callable that runs out of memory on one): the others would go on into the next
        collective and wait there forever.
        """
        raise NotImplementedError

    def whole_shape(self, local: torch.Tensor, site: HookSite) -> tuple[int, ...]:
        """The shape of the whole tensor ``local`` is a piece of, the same on every rank.

        Collective (every rank of the stage calls it for the same hook call), and made before
        anything is gathered: a check against ``expected_shape`` on its answer fails on every
        rank at once, at the call whose tensor does not match.
        """
        raise NotImplementedError

    def is_edit_leader(self, site: HookSite) -> bool:
        raise NotImplementedError

    def sync_trainable_modules(self, modules: dict[str, nn.Module]) -> None:
        """Keep trainable modules used in editing functions identical on every rank."""
        raise NotImplementedError

    def end_of_hooked_forward(self) -> None:
        """Called by every rank at the end of each forward with hooks enabled; nothing for one
        process (see :meth:`DistributedRuntime.end_of_hooked_forward
        <flex_surgery.parallel.distributed_runtime.DistributedRuntime.end_of_hooked_forward>`)."""
        return None

    def watch_recomputation(self, module: nn.Module) -> None:
        """Called when a backward hook is registered on ``module``; nothing for one process
        (see :meth:`DistributedRuntime.watch_recomputation
        <flex_surgery.parallel.distributed_runtime.DistributedRuntime.watch_recomputation>`)."""
        return None

    def watch_backward(self, output: Any) -> None:
        """Called by every rank at the end of each forward with backward hooks selected, with
        the wrapped module's output; nothing for one process (see
        :meth:`DistributedRuntime.watch_backward
        <flex_surgery.parallel.distributed_runtime.DistributedRuntime.watch_backward>`)."""
        return None

    def close(self) -> None:
        """Remove whatever the runtime attached to the model (``FlexModel.restore`` calls it);
        nothing for one process."""
        return None

    def abandon(self) -> None:
        """:meth:`close` without any collective, for points a peer may not share (a ``with``
        block left on an exception, a failed construction); nothing for one process."""
        return None

    def register_parameter_hook(self, name: str, parameter: torch.Tensor,
                                owner: nn.Module | None,
                                hook: Callable[[torch.Tensor], Any],
                                edits: Callable[[], bool] = lambda: False) -> Any:
        """Call ``hook(grad)`` whenever ``parameter``'s gradient is computed; return a handle
        with ``remove()``. ``edits()`` says whether the hook would change the gradient now.

        In one process (and under DDP or tensor parallelism) that is ``parameter.register_hook``.
        FSDP runs forward with tensors that stand in for the registered parameters (unsharded
        views / parameters), so a distributed runtime attaches the hook to those instead; under
        DDP with ``find_unused_parameters=True`` it may run the hook at the end of the backward
        (:mod:`~flex_surgery.parallel.unused_parameters`).
        """
        return parameter.register_hook(hook)

    def agree_parameter_use(self, output: Any) -> None:
        """After each forward of the wrapped module, ``output`` being what it returned:
        nothing in one process (see the distributed runtime)."""
        return None

    def full_parameter(self, name: str, parameter: torch.Tensor,
                       owner: nn.Module | None) -> torch.Tensor:
        """The whole of a (possibly sharded) parameter, as a detached CPU copy, on every rank.

        ``name`` is the parameter's dotted path in the wrapped module and ``owner`` the module
        that holds it (its layout says how the parameter is split). Every rank of the model's
        group must call this together; each gets the same whole tensor.
        """
        raise NotImplementedError


# Work that completes after the hook that started it has returned, in the order it was started:
# device-to-host copies on the copy stream, and (``overlap_retrieval``) gathers still travelling
# with the stores that wait for them. Each entry: (completion, whether it stores a value).
_PENDING: list[tuple[Callable[[], None], bool]] = []
_STATE = {"storing": 0, "draining": False}  # pending entries that store; inside a drain
_COPY_STREAMS: dict[torch.device, Any] = {}


def defer(complete: Callable[[], None], stores: bool = False) -> None:
    """Run ``complete()`` at the next :func:`wait_for_host_copies` (the end of this forward, or
    of this backward when called inside one), after every completion deferred before it.
    ``stores``: it stores a value (so later stores must wait for it, :func:`stores_pending`)."""
    if not _PENDING and torch._C._current_graph_task_id() != -1:
        # Inside backward: make sure everything has landed when backward() returns.
        torch.autograd.Variable._execution_engine.queue_callback(wait_for_host_copies)
    _PENDING.append((complete, stores))
    _STATE["storing"] += stores


def stores_pending() -> bool:
    """Whether a value of this pass is still waiting to be stored: a store made now must be
    deferred behind it, so that values stored under one key keep the order of the hook calls
    that produced them (a device copy in flight does not count: its value is stored already)."""
    return _STATE["storing"] > 0 and not _STATE["draining"]


def wait_for_host_copies() -> None:
    """Complete every deferred copy, gather and store (see :func:`defer`), in the order they
    started.

    If one fails (a lost peer), the others are dropped -- they belong to the same failed pass
    -- and the error is raised."""
    _STATE["draining"] = True
    try:
        while _PENDING:
            complete, stores = _PENDING.pop(0)
            _STATE["storing"] -= stores
            complete()
    except BaseException:
        _PENDING.clear()
        _STATE["storing"] = 0
        raise
    finally:
        _STATE["draining"] = False


def _copy_stream(device: torch.device) -> Any:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def store_copy(tensor: torch.Tensor, blocking: bool = False) -> torch.Tensor:
    """A detached CPU copy that later in-place changes to ``tensor`` cannot reach.

    ``tensor.cpu()`` on a CPU tensor returns the tensor itself, so the copy is explicit, and made
    at once: a copy-on-write clone (``torch._lazy_clone``) would save the bytes while nothing
    writes, but memory written through a pointer handed out earlier (DLPack) bypasses it, and in
    torch 2.13 a shared storage that later grows fails every write (docs/performance.md). A CUDA
    tensor is first copied on the device (later in-place changes cannot reach the copy), then
    into pinned memory on a side stream, so neither the hook nor the next block's kernels wait
    for the bytes to cross the bus: the copy stream starts once the compute stream has produced
    the device copy, whose memory is not reused before the transfer is done
    (``record_stream``). The copy is complete once :func:`wait_for_host_copies`
    returns, which FlexModel calls at the end of every forward and (for copies made by backward
    hooks) at the end of every backward -- one synchronisation per pass, not per hook.
    ``blocking=True`` waits for this copy at once.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor.to("cpu", copy=True)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    # A private device copy first, on the compute stream: the side stream reads it while the
    # compute stream goes on, and later in-place changes of ``tensor`` (an editing function, the
    # model's own in-place ops) cannot reach it. Device-to-device copies cost a fraction of the
    # bus transfer they let overlap.
    source = tensor.clone()
    stream = _copy_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)
    source.record_stream(stream)
    if blocking:
        stream.synchronize()
        return host
    event = torch.cuda.Event()
    event.record(stream)
    defer(event.synchronize)
    return host


class LocalRuntime(Runtime):
    """One process, nothing sharded: every question is answered with the tensor itself."""

    def retrieve(self, local: torch.Tensor, site: HookSite,
                 store: Callable[[torch.Tensor], None]) -> None:
        store(store_copy(local))

    def gather_for_edit(self, local: torch.Tensor, site: HookSite,
                        everywhere: bool = False) -> tuple[torch.Tensor | None, EditContext]:
        return local, EditContext(site, local)

    def gather_to_leader(self, local: torch.Tensor,
                         site: HookSite) -> tuple[torch.Tensor | None, EditContext]:
        return local.detach(), EditContext(site, local)

    def retrieve_gathered(self, full: torch.Tensor | None, ctx: EditContext,
                          store: Callable[[torch.Tensor], None], keeps: bool = True) -> None:
        if keeps:
            store(store_copy(full))

    def scatter_from_edit(self, full: torch.Tensor | None, ctx: EditContext) -> torch.Tensor:
        assert full is not None
        return full

    def run_on_leader(self, ctx: EditContext, fn: Callable[[], Any],
                      what: str = "the editing function") -> Any:
        return fn()

    def run_everywhere(self, site: HookSite, what: str, fn: Callable[[], Any]) -> Any:
        return fn()

    def whole_shape(self, local: torch.Tensor, site: HookSite) -> tuple[int, ...]:
        return tuple(local.shape)

    def is_edit_leader(self, site: HookSite) -> bool:
        return True

    def sync_trainable_modules(self, modules: dict[str, nn.Module]) -> None:
        return None

    def full_parameter(self, name: str, parameter: torch.Tensor,
                       owner: nn.Module | None) -> torch.Tensor:
        return store_copy(parameter, blocking=True)
