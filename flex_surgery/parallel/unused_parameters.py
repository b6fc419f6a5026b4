"""Gradient hooks on parameters that DDP's ``find_unused_parameters`` may leave without a
gradient on some ranks.

With ``DistributedDataParallel(find_unused_parameters=True)`` a parameter on a branch taken on
the data (a mixture-of-experts router, an optional adapter) may be used on some data-parallel
ranks and not on others. Its gradient hook then fires on the ranks that used it only, in the
middle of their backward, while the others never reach it: the hook's gather would wait for
them. DDP itself counts the unused rank's gradient as zero and averages, and one process over
the whole batch gets exactly that average, so the right value to store is the gather of the
used ranks' gradients with zeros for the others.

(``static_graph=True`` allows such parameters too and is covered the same way.) So after each
forward of the wrapped module under grad, hooked or not (a gradient hook may be chosen or
registered before its backward), every rank walks the autograd graph of the outputs for the
DDPs' parameters it reached, as DDP does (its tensors found as DDP finds them), and the ranks
agree on the counts (one all-reduce of an integer per parameter). A parameter reached by some
ranks and not all is *deferred* in each backward through that forward, from the moment the
backward reaches the forward's outputs (before any of its parameters gets a gradient): where
its gradient arrives the hook keeps a copy and returns, and at the end of the backward through
the model every rank runs the hook in the same order -- the kept gradient, or zeros where none
came -- if any rank's gradient came (a second all-reduce), as one process runs it only when
the parameter gets a gradient. What a backward defers follows from the forwards its graph
reaches, the same on every rank; a forward never backpropagated through defers nothing later.
One case is caught but not served: losses of several forwards summed into one backward, a
parameter every rank uses in one of them and only some in another -- a rank may then reach the
parameter's gradient before the second forward's outputs, run its hook mid-backward while the
others keep theirs, and all raise ``HookSiteMismatchError``. Parameters reached by every rank
keep their hook in the backward, as before. A reentrant activation checkpoint hides its
region's parameters from the walk (it runs the region again inside the backward): with one in
a rank's graph, every hook that only retrieves is deferred. (A reentrant checkpoint around the
whole hooked call runs its forward under ``no_grad``: no agreement is made, and a branch in it
raises ``HookSiteMismatchError`` as before.)

A deferred hook can only retrieve: an editing function changes the gradient autograd
accumulates, which has been accumulated by then. Editing a deferred parameter's gradient is
refused on every rank, at the end of that backward, after DDP's own end of backward (so the
model stays usable).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["UnusedParameterHooks", "output_tensors", "reached_parameters"]

Group = dist.ProcessGroup | None


@dataclass
class _Hook:
    parameter: weakref.ref[torch.Tensor]
    hook: Callable[[torch.Tensor], Any]
    edits: Callable[[], bool]


class _Deferral:
    """What one forward's agreement found: the parameters some ranks reached and others did
    not, and whether a rank's graph holds a region the walk cannot see. A backward applies it
    when it reaches that forward's outputs (the same on every rank: the graph is the same)."""

    def __init__(self, mixed: frozenset[int], unseen: bool) -> None:
        self.mixed, self.unseen = mixed, unseen


# Autograd nodes whose backward runs a graph the walk cannot see: a reentrant checkpoint runs
# its region again, under grad, inside its backward.
_OPAQUE_NODES = ("CheckpointFunctionBackward",)

#: Forwards whose deferrals are remembered (a backward through an older one defers nothing).
_PASSES_REMEMBERED = 1024


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output, found as DDP finds them: in lists, tuples, dicts
    (and the containers torch's pytree knows, a transformers ``ModelOutput`` among them) and
    in the fields of dataclasses, which pytree takes as leaves."""
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            for field in dataclasses.fields(leaf):
                found.extend(output_tensors(getattr(leaf, field.name)))
    return found


def reached_parameters(output: Any) -> tuple[set[int], bool]:
    """Ids of the leaf tensors (parameters) whose ``AccumulateGrad`` the autograd graph of
    ``output``'s tensors reaches: those a backward from them would give a gradient (the walk
    DDP's ``find_unused_parameters`` makes after each forward); and whether the graph holds a
    node whose backward reaches parameters the walk cannot see (a reentrant checkpoint)."""
    stack = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]
    seen: set[Any] = set()
    found: set[int] = set()
    opaque = False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        opaque = opaque or type(node).__name__ in _OPAQUE_NODES
        stack.extend(next_node for next_node, _ in node.next_functions
                     if next_node is not None)
    return found, opaque


def _may_leave_unused(ddp: torch.nn.Module) -> bool:
    """Whether ``ddp`` allows parameters some ranks leave without a gradient: with
    ``find_unused_parameters=True``, and with ``static_graph=True`` (which finds them once)."""
    return bool(getattr(ddp, "find_unused_parameters", False) or
                getattr(ddp, "static_graph", False))


class UnusedParameterHooks:
    """The gradient hooks of one runtime on parameters of DDP modules with
    ``find_unused_parameters=True`` or ``static_graph=True``, and which of them wait for the
    end of the backward.

    ``group`` is a host group over the ranks that must agree (the stage: its data-parallel
    ranks, and its tensor-parallel ranks, which see the same rows).
    """

    def __init__(self, ddps: list[torch.nn.Module], group: Group) -> None:
        # Every parameter of those DDPs, in their order (the same on every rank): the
        # agreement covers them all, so a hook registered between a forward and its backward
        # is deferred as well.
        self._order = [id(p) for ddp in ddps if _may_leave_unused(ddp)
                       for p in ddp.parameters()]
        self._params = set(self._order)
        self.group = group
        # By key: the parameter's name and the hook's number (several hooks may share one
        # parameter); every rank registers the same hooks in the same order.
        self._hooks: dict[str, _Hook] = {}
        self._registered = 0
        # The deferrals of the latest forwards, by pass (the runtime's count of hooked
        # forwards, the same on every rank); the oldest are forgotten.
        self._by_pass: collections.OrderedDict[int, _Deferral] = collections.OrderedDict()
        self._forwards = 0  # forwards under grad (one agreement each where needed)
        self._task: int | None = None  # the graph task of the backward under way
        # Deferred in the backward under way: the deferrals of the forwards whose outputs it
        # has reached so far.
        self._active: frozenset[str] = frozenset()
        self._kept: dict[str, torch.Tensor] = {}  # the gradients that came, by key
        self._uneven = False  # see uneven_backward

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

        def deferring(grad: torch.Tensor | None) -> Any:
            held = holder()
            if held is None or key not in held._active:
                return hook(grad)
            if grad is None:  # an output the loss does not use: no gradient came here
                return None
            kept = held._kept.get(key)
            # a backward through several forwards gives the gradient once; kept as a sum anyway
            held._kept[key] = grad.detach().clone() if kept is None else kept + grad.detach()
            return None

        return _Handle(parameter.register_hook(deferring), holder, key)

    def agree(self, output: Any) -> int:
        """After a forward under grad, on every rank of :attr:`group` (one all-reduce, for
        DDPs that may leave parameters unused): which of the DDPs' parameters some ranks
        reached and others did not, and whether a rank's graph holds a reentrant checkpoint
        (its region's parameters are reached only inside the backward). Their hooks wait for
        the end of each backward through this forward; with a checkpoint, every hook that
        retrieves does. Made whether or not a parameter has a hook yet: one may be registered
        before the backward. Returns the forward's number, for :meth:`arrive`."""
        self._forwards += 1
        pass_ = self._forwards
        if not self._order:
            return pass_
        reached, opaque = reached_parameters(output)
        counts = torch.tensor([int(i in reached) for i in self._order] + [int(opaque)],
                              dtype=torch.int64)
        dist.all_reduce(counts, group=self.group)
        everyone = dist.get_world_size(self.group)
        *used, unseen = counts.tolist()
        mixed = frozenset(i for i, c in zip(self._order, used, strict=True) if 0 < c < everyone)
        if mixed or unseen:
            self._by_pass[pass_] = _Deferral(mixed, bool(unseen))
            while len(self._by_pass) > _PASSES_REMEMBERED:
                self._by_pass.popitem(last=False)
        return pass_

    def defers(self, pass_: int) -> bool:
        """Whether forward ``pass_`` deferred gradient hooks."""
        return pass_ in self._by_pass

    def reset_backward(self) -> None:
        """Forget the backward under way (one that finished, or raised): the next backward
        starts afresh."""
        self._task = None
        self._active = frozenset()
        self._kept = {}
        self._uneven = False

    def uneven_backward(self) -> bool:
        """Whether the backward under way reached a forward in which the ranks used different
        parameters (or one the walk could not see through): their gradient reductions may
        differ from rank to rank."""
        return self._uneven

    def arrive(self, task: int, pass_: int) -> bool:
        """The backward ``task`` reached the outputs of forward ``pass_`` (before any parameter
        that forward used gets its gradient): that forward's deferred hooks wait for the
        backward's end. True at the backward's first arrival
        (what an earlier backward left behind is dropped): the caller queues
        :meth:`run_deferred` for its end."""
        first = task != self._task
        if first:
            self.reset_backward()
            self._task = task
        deferral = self._by_pass.get(pass_)
        if deferral is not None:
            self._uneven = True
            self._active |= {k for k, h in self._hooks.items()
                             if id(h.parameter()) in deferral.mixed or
                             (deferral.unseen and not h.edits())}
        return first

    def run_deferred(self, abandon: Callable[[], None]) -> None:
        """At the end of the backward, on every rank: each deferred hook, in key order, on
        the gradient that came or on zeros -- if any rank's gradient came (a backward that
        does not reach the parameter runs no hook, as in one process; one all-reduce). They
        run after the callbacks already queued (DDP's end of backward), so a hook that raises
        there (a shape that does not match) leaves DDP's iteration finished, as in one
        process; an editing hook among them is refused on every rank there instead, after
        ``abandon()`` (the runtime's recovery from a backward that raised: DDP reset, every
        gradient dropped, as after any hook that raised in a backward)."""
        keys, self._active = sorted(self._active), frozenset()
        kept, self._kept = self._kept, {}
        hooks = [(k, self._hooks[k]) for k in keys if k in self._hooks]
        if not hooks:
            return
        editing = sorted({k.rpartition("#")[0] for k, h in hooks if h.edits()})

        def refuse() -> None:
            abandon()
            _refuse_edits(editing)

        late = refuse if editing else (lambda: self._run(hooks, kept))
        torch.autograd.Variable._execution_engine.queue_callback(late)

    def _run(self, hooks: list[tuple[str, _Hook]], kept: dict[str, torch.Tensor]) -> None:
        came = torch.tensor([int(k in kept) for k, _ in hooks], dtype=torch.int64)
        dist.all_reduce(came, group=self.group)
        for (key, h), count in zip(hooks, came.tolist(), strict=True):
            parameter = h.parameter()
            if parameter is None or not count:
                continue
            grad = kept.pop(key, None)
            h.hook(torch.zeros_like(parameter) if grad is None else grad)

    def forget(self, key: str) -> None:
        self._hooks.pop(key, None)
        self._kept.pop(key, None)


def _refuse_edits(names: list[str]) -> None:
    raise RuntimeError(
        f"gradient hooks with an editing function on {names}: under "
        "DistributedDataParallel(find_unused_parameters=True) some data-parallel ranks did "
        "not use these parameters in this forward, so their gradient is known only at the "
        "end of the backward, after autograd has accumulated it: it can be retrieved there "
        "but not edited. Edit it after the backward (p.grad), or hook a parameter every rank "
        "uses")


class _Handle:
    """The handle of a registered hook: removes the torch hook and the runtime's entry."""

    def __init__(self, inner: Any, owner: weakref.ref[UnusedParameterHooks], key: str) -> None:
        self.inner, self.owner, self.key = inner, owner, key

    def remove(self) -> None:
        self.inner.remove()
        held = self.owner()
        if held is not None:
            held.forget(self.key)
