"""Gradient hooks on parameters that DDP's ``find_unused_parameters`` may leave without a
gradient on some ranks.

With ``DistributedDataParallel(find_unused_parameters=True)`` a parameter on a branch taken on
the data (a mixture-of-experts router, an optional adapter) may be used on some data-parallel
ranks and not on others. Its gradient hook then fires on the ranks that used it only, in the
middle of their backward, while the others never reach it: the hook's gather would wait for
them. DDP itself counts the unused rank's gradient as zero and averages, and one process over
the whole batch gets exactly that average, so the right value to store is the gather of the
used ranks' gradients with zeros for the others.

So after each hooked forward, every rank walks the autograd graph of the outputs for the
hooked parameters it reached, as DDP does, and the ranks agree on the counts (one small
all-reduce). A parameter reached by some ranks and not all is *deferred*: where its gradient
arrives the hook keeps a copy and returns, and at the end of the backward through the model
every rank runs the hook in the same order -- the kept gradient, or zeros where none came.
Parameters reached by every rank keep their hook in the backward, as before.

A deferred hook can only retrieve: an editing function changes the gradient autograd
accumulates, which has been accumulated by then. Editing a deferred parameter's gradient is
refused on every rank, at the end of that backward (the rank that used the parameter has
already accumulated the unedited gradient).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["UnusedParameterHooks", "reached_parameters"]

Group = dist.ProcessGroup | None


@dataclass
class _Hook:
    parameter: weakref.ref[torch.Tensor]
    hook: Callable[[torch.Tensor], Any]
    edits: Callable[[], bool]


def reached_parameters(output: Any) -> set[int]:
    """Ids of the leaf tensors (parameters) whose ``AccumulateGrad`` the autograd graph of
    ``output``'s tensors reaches: those a backward from them would give a gradient. The same
    walk DDP's ``find_unused_parameters`` makes after each forward."""
    stack = [t.grad_fn for t in pytree.tree_leaves(output)
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set[Any] = set()
    found: set[int] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions
                     if next_node is not None)
    return found


class UnusedParameterHooks:
    """The gradient hooks of one runtime on parameters of DDP modules with
    ``find_unused_parameters=True``, and which of them wait for the end of the backward.

    ``group`` is a host group over the ranks that must agree (the stage: its data-parallel
    ranks, and its tensor-parallel ranks, which see the same rows).
    """

    def __init__(self, ddps: list[torch.nn.Module], group: Group) -> None:
        self._params = {id(p) for ddp in ddps
                        if getattr(ddp, "find_unused_parameters", False)
                        for p in ddp.parameters()}
        self.group = group
        # By key: the parameter's name and the hook's number (several hooks may share one
        # parameter); every rank registers the same hooks in the same order.
        self._hooks: dict[str, _Hook] = {}
        self._registered = 0
        self._deferred: set[str] = set()  # agreed after a forward, run at the backward's end
        self._kept: dict[str, torch.Tensor] = {}  # the gradients that came, by key
        # The backward (autograd graph task) they came in: one that raised before its end
        # leaves its gradients behind, and they must not be added to the next one's.
        self._kept_task = -1

    @property
    def deferring(self) -> bool:
        """Whether a backward has hooks to run at its end (the same on every rank)."""
        return bool(self._deferred)

    def covers(self, parameter: torch.Tensor) -> bool:
        return id(parameter) in self._params

    def register(self, name: str, parameter: torch.Tensor, hook: Callable[[torch.Tensor], Any],
                 edits: Callable[[], bool]) -> Any:
        """``parameter.register_hook`` with ``hook`` deferred when the ranks agreed so; the
        handle's ``remove()`` removes both."""
        self._registered += 1
        key = f"{name}#{self._registered:09d}"
        self._hooks[key] = _Hook(weakref.ref(parameter), hook, edits)
        holder = weakref.ref(self)

        def deferring(grad: torch.Tensor) -> Any:
            held = holder()
            if held is None or key not in held._deferred:
                return hook(grad)
            task = torch._C._current_graph_task_id()
            if task != held._kept_task:
                held._kept, held._kept_task = {}, task
            kept = held._kept.get(key)
            # a backward through several forwards gives the gradient once; kept as a sum anyway
            held._kept[key] = grad.detach().clone() if kept is None else kept + grad.detach()
            return None

        return _Handle(parameter.register_hook(deferring), holder, key)

    def agree(self, output: Any) -> None:
        """After a hooked forward, on every rank of :attr:`group`: which hooked parameters
        some ranks reached and others did not. Those wait for the end of the backward."""
        if not self._hooks:
            return
        names = sorted(self._hooks)
        reached = reached_parameters(output)
        counts = torch.tensor([int(id(self._hooks[n].parameter()) in reached) for n in names],
                              dtype=torch.int64)
        dist.all_reduce(counts, group=self.group)
        everyone = dist.get_world_size(self.group)
        self._deferred |= {n for n, c in zip(names, counts.tolist(), strict=True)
                           if 0 < c < everyone}

    def run_deferred(self) -> None:
        """At the end of the backward, on every rank: each deferred hook, in name order, on
        the gradient that came or on zeros. An editing hook among them is refused first, on
        every rank (which hooks edit is the same everywhere)."""
        names, self._deferred = sorted(self._deferred), set()
        kept = self._kept if self._kept_task == torch._C._current_graph_task_id() else {}
        self._kept, self._kept_task = {}, -1
        hooks = [(n, self._hooks[n]) for n in names if n in self._hooks]
        editing = sorted({n.rpartition("#")[0] for n, h in hooks if h.edits()})
        if editing:
            raise RuntimeError(
                f"gradient hooks with an editing function on {editing}: under "
                "DistributedDataParallel(find_unused_parameters=True) some data-parallel ranks "
                "did not use these parameters in this forward, so their gradient is known only "
                "at the end of the backward, after autograd has accumulated it: it can be "
                "retrieved there but not edited. Edit it after the backward (p.grad), or hook "
                "a parameter every rank uses")
        for name, h in hooks:
            parameter = h.parameter()
            if parameter is None:
                continue
            grad = kept.pop(name, None)
            h.hook(torch.zeros_like(parameter) if grad is None else grad)

    def forget(self, key: str) -> None:
        self._hooks.pop(key, None)
        self._deferred.discard(key)
        self._kept.pop(key, None)


class _Handle:
    """The handle of a registered hook: removes the torch hook and the runtime's entry."""

    def __init__(self, inner: Any, owner: weakref.ref[UnusedParameterHooks], key: str) -> None:
        self.inner, self.owner, self.key = inner, owner, key

    def remove(self) -> None:
        self.inner.remove()
        held = self.owner()
        if held is not None:
            held.forget(self.key)
