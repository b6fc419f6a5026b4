"""Parameter-gradient hooks on the tensor a module really uses in forward.

``parameter.register_hook`` is enough in one process, under DDP and under tensor parallelism.
FSDP runs forward with tensors that stand in for the registered parameters: FSDP1 sets fresh
unsharded views as the owner's attributes before each forward; FSDP2 swaps in one unsharded
parameter that lives across steps. :func:`hook_live_parameter` puts a forward-pre hook on the
owner that attaches the gradient hook to whatever stands there, once per tensor.
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
                        hook: Callable[[torch.Tensor], Any]) -> _Handles:
    """Call ``hook(grad)`` on the gradient of whatever tensor stands at ``owner.<leaf>`` when
    ``owner`` runs forward; the handle's ``remove()`` removes every hook it attached."""
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

    def attach(module: nn.Module, args: Any) -> None:
        live = getattr(module, leaf)
        if isinstance(live, torch.Tensor) and live.requires_grad and \
                not getattr(live, tag, False):
            setattr(live, tag, True)
            handles.add(live.register_hook(once_per_backward), live, tag)

    handles.pre_hook = owner.register_forward_pre_hook(attach)
    return handles


_HOOK_IDS = itertools.count()


class _Handles:
    """Removes a forward-pre hook and every tensor hook it attached."""

    def __init__(self) -> None:
        self.pre_hook: Any = None
        self._tensor_hooks: list[tuple[Any, weakref.ref, str]] = []

    def add(self, handle: Any, tensor: torch.Tensor, tag: str) -> None:
        # forget hooks of tensors that are gone (FSDP1 makes fresh views every forward)
        self._tensor_hooks = [h for h in self._tensor_hooks if h[0].hooks_dict_ref() is not None]
        self._tensor_hooks.append((handle, weakref.ref(tensor), tag))

    def remove(self) -> None:
        if self.pre_hook is not None:
            self.pre_hook.remove()
        for handle, tensor, tag in self._tensor_hooks:
            handle.remove()
            live = tensor()
            if live is not None and tag in vars(live):  # the long-lived FSDP2 parameter
                delattr(live, tag)
        self._tensor_hooks.clear()
