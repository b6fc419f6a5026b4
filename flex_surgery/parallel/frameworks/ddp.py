"""DistributedDataParallel: replicated parameters, the local batch, one data-parallel group.

DDP splits nothing but the batch; its only answers are its wrapper label and its process group
(adopted as ``dp`` when it spans the world).
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import JoinHook

from flex_surgery.parallel.frameworks.base import Framework

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["DDP", "JoinRefusal", "backward_reduces", "join_enabled", "join_refused",
           "learns_static_graph"]


def backward_reduces(ddp: nn.Module) -> bool:
    """Read right after a forward under grad: whether it prepared ``ddp``'s reducer for a
    gradient reduction (false under ``no_sync()``). Prepared, the reducer all-reduces in the
    next backward, through whichever forward, until its end of backward. The same on every
    rank, as DDP itself requires."""
    return bool(getattr(ddp, "require_forward_param_sync", True))


def learns_static_graph(ddp: nn.Module) -> bool:
    """Read right after a forward: whether the backward through it is the first of a
    ``static_graph=True`` DDP, in which DDP records which parameters get gradients (it marks
    that backward begun when it starts). A failure there cannot be reset: the reducer keeps
    the partial record and its next backward says the training graph has changed."""
    return bool(getattr(ddp, "static_graph", False)) and \
        not getattr(ddp, "_static_graph_delay_allreduce_enqueued", True)


def join_enabled(ddps: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the DDP modules among ``ddps`` (``(name, module)`` pairs) that have been given
    to ``torch.distributed.algorithms.join.Join`` (uneven inputs).

    Under ``Join`` a rank that runs out of batches stops calling the model and only shadows
    DDP's own collectives, so any other collective over the data-parallel ranks -- a hook's
    gather -- waits for it forever. DDP keeps the setting once given (``Join`` does not reset
    ``_join_config`` when its block ends; DDP goes on announcing each forward to the join
    context), so this answers "may be under Join", the same on every rank."""
    return [name or "<the model>" for name, m in ddps
            if getattr(getattr(m, "_join_config", None), "enable", False)]


class JoinRefusal:
    """Carries a refusal of hooked forwards under ``Join`` to the ranks that have joined.

    A rank with no batch left never runs a hooked forward: it sits in ``Join.__exit__``, in
    the all-reduce that counts the ranks still running. The ranks that refuse (before DDP's
    forward) meet it there, counting themselves as joined, then meet it once more in DDP's
    post-hook, which this class wraps (``join_hook``, shadowed on each DDP instance while the
    runtime lives): there every rank adds whether it refused, and a rank that has joined
    raises the same error instead of syncing the final model. Without a refusal the wrapped
    post-hook costs one one-element all-reduce per ``Join`` block, then does what DDP's does.

    The refusal is read in the wrapped DDP's post-hook: the joinables listed before it in
    ``Join([...])`` must do no collective in theirs (ZeroRedundancyOptimizer's does none; another
    DDP's does: it syncs the final model), so a ``Join`` that lists any other joinable first
    is refused as it is built, on every rank (``_refuse_unsafe_join_order``). A DDP already
    given to a ``Join`` when the runtime is built is refused then (that ``Join`` holds DDP's own
    hook)."""

    def __init__(self, ddps: list[tuple[str, nn.Module]]) -> None:
        # A Join built before this runtime holds DDP's own hooks, which no shadow reaches (and
        # Join leaves the setting on after its block): refused now, on every rank alike.
        enabled = join_enabled(ddps)
        if enabled:
            raise join_refused(enabled)
        for name, ddp in ddps:
            hook = vars(ddp).get("join_hook")
            if hook is not None and not _is_shadow(hook, ddp):
                raise RuntimeError(f"DDP module {name or '<the model>'!r} has a join_hook "
                                   "attribute of its own: FlexModel cannot carry its refusal "
                                   "of hooked forwards under Join to the ranks that joined")
        self.ddps = ddps
        self._wrapped: list[nn.Module] = []
        for name, ddp in ddps:
            if "join_hook" not in vars(ddp):
                # a partial of the DDP, not a closure: a deep copy of the DDP gets its own
                ddp.__dict__["join_hook"] = functools.partial(_refusal_aware_join_hook, ddp,
                                                              name or "<the model>")
            _SHADOW_USERS[ddp] = _SHADOW_USERS.get(ddp, 0) + 1  # runtimes relying on it
            self._wrapped.append(ddp)

    def check(self) -> None:
        """At the start of a hooked forward: raise if a DDP module has been given to ``Join``,
        after telling the ranks that have joined (the count of ``Join.__exit__``, this rank
        counted as joined, then the refusal, over that DDP's join group)."""
        enabled = join_enabled(self.ddps)
        if not enabled:
            return
        ddp = next(m for n, m in self.ddps if (n or "<the model>") == enabled[0])
        for refused in (0.0, 1.0):
            flag = torch.full((1,), refused, device=ddp.join_device)
            dist.all_reduce(flag, group=ddp.join_process_group)
        raise join_refused(enabled)

    def remove(self) -> None:
        """This runtime no longer relies on the shadows; the last one to go removes each."""
        for ddp in self._wrapped:
            users = _SHADOW_USERS.get(ddp, 1) - 1
            if users > 0:
                _SHADOW_USERS[ddp] = users
                continue
            _SHADOW_USERS.pop(ddp, None)
            if _is_shadow(vars(ddp).get("join_hook"), ddp):
                del ddp.__dict__["join_hook"]
        self._wrapped = []


# DDP -> how many live runtimes rely on its shadowed join hook.
_SHADOW_USERS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _is_shadow(hook: Any, ddp: nn.Module) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _refusal_aware_join_hook \
        and hook.args[0] is ddp


def join_refused(names: list[str]) -> RuntimeError:
    """The error of a hooked forward of the DDP modules ``names`` under ``Join``."""
    return RuntimeError(
        f"hooks on a DDP model under torch.distributed.algorithms.join.Join (DDP modules "
        f"{names}) are not supported: with uneven inputs a rank that has joined takes no part "
        "in the hooks' gathers over the data-parallel ranks, and the others would wait for it "
        "forever. Run hooked forwards with the same number of batches on every rank, on a DDP "
        "module never given to Join (Join keeps DDP's join setting on after its block ends)")


def _refusal_aware_join_hook(ddp: nn.Module, name: str, **kwargs: Any) -> JoinHook:
    _refuse_unsafe_join_order(ddp, name)
    return _RefusalAwareJoinHook(ddp, name, type(ddp).join_hook(ddp, **kwargs))


def _constructing_join() -> Any:
    """The ``Join`` whose constructor is asking for a join hook (``Join.__init__`` calls
    ``joinable.join_hook()`` for each joinable in order, its joinables already set), or
    ``None`` when the hook is asked for some other way."""
    from torch.distributed.algorithms.join import Join

    frame = sys._getframe(1)
    for _ in range(8):  # the shadow, its partial, Join's list comprehension, Join.__init__
        if frame is None:
            return None
        if frame.f_code is Join.__init__.__code__:
            join = frame.f_locals.get("self")
            return join if isinstance(join, Join) else None
        frame = frame.f_back
    return None


def _refuse_unsafe_join_order(ddp: nn.Module, name: str) -> None:
    """Raise, at ``Join([...])`` and so on every rank alike, when a joinable listed before
    the FlexModel's DDP may run collectives in its post-hook.

    The refusal of a hooked forward reaches the ranks that have joined in the wrapped DDP's
    post-hook; ``Join`` runs the post-hooks in the listed order, so an earlier joinable's
    collectives (another DDP syncs its final model there) would meet the refusing rank's
    flag instead: a mismatched collective, then an abort or a hang. Known to do none there:
    ``ZeroRedundancyOptimizer`` and DDPs whose hook the runtime shadows (their post-hook reads
    the same flag). Anything else is refused, because it cannot be told safe."""
    join = _constructing_join()
    if join is None:
        return
    from torch.distributed.optim import ZeroRedundancyOptimizer

    earlier = []
    for joinable in join._joinables:
        if joinable is ddp:
            break
        safe = isinstance(joinable, ZeroRedundancyOptimizer) or \
            _is_shadow(getattr(joinable, "__dict__", {}).get("join_hook"), joinable)
        if not safe:
            earlier.append(type(joinable).__name__)
    if earlier:
        raise RuntimeError(
            f"Join([...]) lists {earlier} before DDP module {name!r}, which a FlexModel "
            "hooks: a hooked forward under torch.distributed.algorithms.join.Join is refused "
            "on every rank in that DDP's post-hook, and Join runs the post-hooks in the listed "
            "order, so an earlier joinable's collectives (another DDP syncs its final model "
            "there) would meet the refusal instead and abort or hang. List the FlexModel's "
            "DDP first in Join([...]) (or close the FlexModel before building the Join)")


class _RefusalAwareJoinHook(JoinHook):
    """DDP's join hook, whose post-hook first learns whether another rank refused."""

    def __init__(self, ddp: nn.Module, name: str, inner: JoinHook) -> None:
        self.ddp, self.name, self.inner = ddp, name, inner

    def main_hook(self) -> None:
        self.inner.main_hook()

    def post_hook(self, is_last_joiner: bool) -> None:
        refused = torch.zeros(1, device=self.ddp.join_device)
        dist.all_reduce(refused, group=self.ddp.join_process_group)
        if refused.item() > 0:
            raise join_refused([self.name])
        self.inner.post_hook(is_last_joiner)


class DDP(Framework):
    name = "ddp"

    def owns(self, module: nn.Module) -> bool:
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(module, DistributedDataParallel)

    def wrapper_kind(self, module: nn.Module) -> str | None:
        return "DDP" if self.owns(module) else None

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        if model is None or not self.owns(model):
            return None
        from flex_surgery.parallel.frameworks.fsdp import _data_parallel_mesh

        return _data_parallel_mesh(model.process_group, "data_parallel_wrapper")

    def abandon_backward(self, module: nn.Module) -> None:
        if not self.owns(module):
            return
        reset = getattr(module.reducer, "_reset_state", None)
        if reset is None:  # a torch without it: DDP's own error names the state at next forward
            return
        # The reducer's own recovery ("ensure forward can run despite previous backward not
        # succeeding"): no pending reduction, unused-parameter accounting zeroed, buckets
        # rebuilt from the next backward's order (on every rank alike).
        reset()
        # What the failed backward accumulated is this rank's own, unreduced gradient of some
        # parameters: kept, the replicas would differ from the next step on.
        module.zero_grad(set_to_none=True)

