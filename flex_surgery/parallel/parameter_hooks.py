"""Parameter-gradient hooks on the tensor a module really uses in forward.

``parameter.register_hook`` is enough in one process, under DDP and under tensor parallelism.
FSDP runs forward with tensors that stand in for the registered parameters: FSDP1 sets fresh
unsharded views as the owner's attributes before each forward; FSDP2 swaps in one unsharded
parameter that lives across steps. :func:`hook_live_parameter` puts a forward-pre hook on the
owner that attaches the gradient hook to whatever stands there, once per tensor -- and, given
the model's root, one on the FSDP unit that substitutes the parameter (after its own
substitution), because a parameter may be used without its owner's forward running
(``F.linear(x, self.proj.weight)``, a tied weight read by another module).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["hook_live_parameter"]


def hook_live_parameter(owner: nn.Module, leaf: str,
                        hook: Callable[[torch.Tensor], Any],
                        root: nn.Module | None = None) -> _Handles:
    """Call ``hook(grad)`` on the gradient of whatever tensor stands at ``owner.<leaf>`` when
    ``owner`` runs forward (and, with ``root``, when the FSDP unit holding the parameter has
    put it in place); the handle's ``remove()`` removes every hook it attached."""
    tag = f"_flex_surgery_hook_{next(_HOOK_IDS)}"  # marks tensors that already have it
    handles = _Handles()
    fired: list[int | None] = [None]  # the backward pass the hook last ran in

    def once_per_backward(grad: torch.Tensor) -> Any:
        # One tensor used several times gets its whole gradient in one call. Two calls in one
        # backward mean two tensors stood for the parameter (FSDP1 makes a fresh view each
        # time its unit runs: a module called twice in one forward): each call would see a
        # part of the gradient, and an edit of a part is not an edit of the whole.
        task = torch._C._current_graph_task_id()
        if task != -1 and fired[0] == task:
            raise RuntimeError(
                f"the gradient of {leaf!r} of {type(owner).__name__} arrives in parts: the "
                "module ran more than once in this forward and its wrapper (FSDP1) gave each "
                "call its own view of the parameter, so a hook would see each part, not the "
                "whole gradient. Hook the module's gradients instead, or use FSDP2")
        fired[0] = task
        return hook(grad)

    @torch.compiler.disable  # run eagerly under torch.compile: it registers a hook on a tensor
    def attach(module: nn.Module, args: Any) -> None:
        live = getattr(module, leaf)
        if isinstance(live, torch.Tensor) and live.requires_grad and \
                not getattr(live, tag, False):
            setattr(live, tag, True)
            handles.add(live.register_hook(once_per_backward), live, tag)

    handles.pre_hooks.append(owner.register_forward_pre_hook(attach))
    entry = _unit_entry(root, owner) if root is not None else None
    if entry is not None and entry is not owner:
        # Runs after the unit has substituted its parameters (FSDP2's pre-forward hook is
        # prepended; FSDP1 sets its views before calling the wrapped module).
        handles.pre_hooks.append(entry.register_forward_pre_hook(
            lambda module, args: attach(owner, args)))
    return handles


def _unit_entry(root: nn.Module, owner: nn.Module) -> nn.Module | None:
    """The module whose forward-pre hooks run right after the FSDP unit that substitutes
    ``owner``'s parameters has put them in place: the nearest FSDP2 unit enclosing ``owner``
    (itself included), or the wrapped module of the nearest FSDP1 unit; ``None`` if none."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for module in _ancestry(root, owner):
        if isinstance(module, FullyShardedDataParallel):
            return module._fsdp_wrapped_module
        if isinstance(module, FSDPModule):
            return module
    return None


def _ancestry(root: nn.Module, owner: nn.Module) -> list[nn.Module]:
    """``owner`` and its ancestors up to ``root``, nearest first (empty if ``owner`` is not in
    ``root``'s tree). Parents come from a map of ``root``'s tree made once and kept, so that
    registering a hook per parameter stays O(depth) each; a map the tree has outgrown (a
    module moved or added since) is made again."""
    parents = _PARENTS.get(root)
    for attempt in range(2):
        if parents is None or attempt:
            parents = {id(child): parent for parent in root.modules()
                       for child in parent.children()}
            _PARENTS[root] = parents
        chain, module = [owner], owner
        while module is not root:
            parent = parents.get(id(module))
            if parent is None or not any(c is module for c in parent.children()):
                break  # not (or no longer) where the map says
            chain.append(parent)
            module = parent
        else:
            return chain
    return []


_PARENTS: weakref.WeakKeyDictionary[nn.Module, dict[int, nn.Module]] = \
    weakref.WeakKeyDictionary()


_HOOK_IDS = itertools.count()


class _Handles:
    """Removes its forward-pre hooks and every tensor hook they attached."""

    def __init__(self) -> None:
        self.pre_hooks: list[Any] = []
        self._tensor_hooks: list[tuple[Any, weakref.ref, str]] = []

    def add(self, handle: Any, tensor: torch.Tensor, tag: str) -> None:
        # forget hooks of tensors that are gone (FSDP1 makes fresh views every forward)
        self._tensor_hooks = [h for h in self._tensor_hooks if h[0].hooks_dict_ref() is not None]
        self._tensor_hooks.append((handle, weakref.ref(tensor), tag))

    def remove(self) -> None:
        for pre_hook in self.pre_hooks:
            pre_hook.remove()
        self.pre_hooks.clear()
        for handle, tensor, tag in self._tensor_hooks:
            handle.remove()
            live = tensor()
            if live is not None and tag in vars(live):  # the long-lived FSDP2 parameter
                delattr(live, tag)
        self._tensor_hooks.clear()
