"""Registering HookFunctions on a model: the PyTorch hooks FlexModel installs and removes.

:class:`HookRegistration` is the part of :class:`~flex_surgery.hooks.wrapper.FlexModel` that
binds a :class:`~flex_surgery.hooks.hook_function.HookFunction` to a module (or parameter) and
to the runtime, installs its PyTorch hook, and takes it off again. Registering one hook costs a
name lookup (:class:`~flex_surgery.hooks.names.ModelNames`), not a walk of the model, so hooking
every module of a large model costs hooks, not hooks x modules.

Module backward hooks are installed and removed as groups are chosen (see
:meth:`HookRegistration._install_backward_hooks`): their mere presence makes every forward wrap
the module's inputs and outputs in extra autograd nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from flex_surgery.hooks.errors import HookRegistrationError, UnknownNameError
from flex_surgery.hooks.groups import HookGroups
from flex_surgery.hooks.hook_function import HookFunction, SharedState, output_key
from flex_surgery.hooks.names import ModelNames
from flex_surgery.naming import clean_name
from flex_surgery.parallel.runtime import HookSite, LocalRuntime
from flex_surgery.store.base import Store
from flex_surgery.store.hooks import check_reduce

if TYPE_CHECKING:
    from flex_surgery.parallel.pipeline import StageFacts
    from flex_surgery.parallel.runtime import Runtime

__all__ = ["HookRegistration"]

# PyTorch's registration method for each module hook kind, with the options we use.
MODULE_REGISTRATION = {
    "forward": ("register_forward_hook", {}),
    "forward_pre": ("register_forward_pre_hook", {"with_kwargs": True}),
    "full_backward": ("register_full_backward_hook", {}),
    "full_backward_pre": ("register_full_backward_pre_hook", {}),
}

MODULE_BACKWARD_KINDS = ("full_backward", "full_backward_pre")


def detach_hooks(handles: dict[HookFunction, RemovableHandle | None],
                 backward_flag_before: dict[nn.Module, bool | None],
                 params_without_hooks_before: list[torch.Tensor],
                 runtime_unwatch: Callable[[], None] | None,
                 own: list[RemovableHandle] | None = None) -> None:
    """Take every hook of one FlexModel off the model and undo what registering them set.

    :meth:`FlexModel.close` runs it, and so does the FlexModel's ``weakref.finalize`` when the
    FlexModel is dropped without closing (it is given the FlexModel's containers, never the
    FlexModel, which it would keep alive). A finalizer runs on one rank at a time of gc's
    choosing, so this is local work only: no collective, no process group freed.
    """
    for hf, handle in list(handles.items()):
        if handle is not None:
            handle.remove()
        hf._unbind()
    handles.clear()
    for module, before in backward_flag_before.items():
        if not module._backward_hooks:
            module._is_full_backward_hook = before
    for parameter in params_without_hooks_before:
        if not parameter._backward_hooks:
            parameter._backward_hooks = None
    backward_flag_before.clear()
    params_without_hooks_before.clear()
    for handle in own or ():
        handle.remove()  # the FlexModel's own hooks on the wrapped module (hooked_passes)
    if own:
        own.clear()
    if runtime_unwatch is not None:
        runtime_unwatch()  # the runtime's own hooks (layout tracking under TP)


class HookRegistration:
    """FlexModel's ``register_*`` methods and :meth:`remove_hook_function`.

    A mixin: :class:`~flex_surgery.hooks.wrapper.FlexModel` creates the state it reads.
    """

    # Set by FlexModel.__init__.
    runtime: Runtime
    store: Store | None
    keep: str
    key_by_hook_kind: bool
    output_dict: dict[str, Any] | None
    _names: ModelNames
    _remote_names: frozenset[str]
    _stages: StageFacts
    _shared: SharedState
    _groups: HookGroups
    # None: a module backward hook that is disabled, hence not installed.
    _handles: dict[HookFunction, RemovableHandle | None]
    # The registered hooks by output key (keep="last" refuses two hook kinds on one key).
    _handles_by_key: dict[str, list[HookFunction]]
    _backward_flag_before: dict[nn.Module, bool | None]
    _params_without_hooks_before: list[torch.Tensor]
    _check_usable: Callable[[], None]

    def register_forward_hook(self, hook_function: HookFunction) -> None:
        """Run ``hook_function`` on the module's output (``unpack_idx``-th tensor)."""
        self._register(hook_function, "forward")

    def register_forward_pre_hook(self, hook_function: HookFunction) -> None:
        """Run ``hook_function`` on the module's input: tensors of args, then of kwargs."""
        self._register(hook_function, "forward_pre")

    def register_full_backward_hook(self, hook_function: HookFunction) -> None:
        """Run ``hook_function`` on the gradient w.r.t. the module's inputs (``grad_input``)."""
        self._register(hook_function, "full_backward")

    def register_full_backward_pre_hook(self, hook_function: HookFunction) -> None:
        """Run ``hook_function`` on the gradient w.r.t. the module's outputs (``grad_output``)."""
        self._register(hook_function, "full_backward_pre")

    def register_hook(self, hook_function: HookFunction) -> None:
        """Run ``hook_function`` on a parameter's gradient; ``module_name`` is its dotted path."""
        self._register(hook_function, "tensor")

    def _register(self, hf: HookFunction, hook_type: str) -> None:
        self._check_usable()
        if not isinstance(hf, HookFunction):
            raise TypeError(f"expected a HookFunction, got {type(hf).__name__}")
        if hf.is_registered:
            where = "this FlexModel" if hf.owner is self else "another FlexModel"
            raise HookRegistrationError(
                f"{hf!r} is already registered with {where}; create a new HookFunction for "
                "another hook point"
            )
        self._names.check_stage_names()
        check_reduce(hf.reduce, getattr(self.runtime, "store_on", "rank0"),
                     self.store is not None, hf)
        if hf.editing_function is None and self.output_dict is None and \
                self.store is None and isinstance(self.runtime, LocalRuntime):
            # (Distributed, a rank without an output_dict still sends its shard to the storer.)
            raise HookRegistrationError(
                f"{hf!r} has no editing function and this FlexModel has no output_dict: it "
                "would do nothing"
            )
        key = output_key(hf.module_name, hook_type, self.key_by_hook_kind)
        if self.keep == "last":
            self._check_no_key_clash(hf, hook_type, key)
        self._check_one_stage_holds(hf)
        try:
            if hook_type == "tensor":
                handle = self._register_parameter_hook(hf, key)
            else:
                handle = self._register_module_hook(hf, hook_type, key)
        except UnknownNameError:
            hf._unbind()
            if clean_name(hf.module_name) not in self._remote_names:
                raise
            hf._bind_remote(self, hook_type, key)  # the stage that owns the module runs it
            handle = None
        except BaseException:
            hf._unbind()  # a registration that fails part-way leaves nothing bound
            raise
        try:
            self._handles[hf] = handle
            self._groups.add(hf)
            self._handles_by_key.setdefault(key, []).append(hf)
        except BaseException:
            self._handles.pop(hf, None)
            self._groups.discard(hf)
            if handle is not None:
                handle.remove()
            hf._unbind()
            raise

    def _check_one_stage_holds(self, hf: HookFunction) -> None:
        """Under pipelining, a name that several stages hold (``blocks.1`` of stages that each
        number their blocks from 0; the stage's root ``""``) would fire on each, and rank 0
        would collect different modules' values under one key: refused, on every rank (the
        stages' names were exchanged when the FlexModel was built)."""
        name = clean_name(hf.module_name)
        holders = [stage for stage, names in enumerate(self._stages.names_by_stage)
                   if name in names]
        if len(holders) > 1:
            raise HookRegistrationError(
                f"{hf!r}: pipeline stages {holders} each hold a module or parameter named "
                f"{name!r}, so the name means a different one on each; stages should keep the "
                f"names the modules have in the whole model (docs/pipeline.md)")

    def _check_no_key_clash(self, hf: HookFunction, hook_type: str, key: str) -> None:
        clash = next((other for other in self._handles_by_key.get(key, ())
                      if other.hook_type != hook_type), None)
        if clash is not None:
            # One tensor per key: the later hook kind would silently replace what the
            # earlier one stored (a gradient in place of the activation).
            raise HookRegistrationError(
                f"{hf!r} ({hook_type}) would store under {key!r}, where {clash!r} "
                f"({clash.hook_type}) stores, and keep='last' keeps one tensor per key; "
                "pass key_by_hook_kind=True to FlexModel to keep them apart")

    def _register_module_hook(self, hf: HookFunction, hook_type: str,
                              key: str) -> RemovableHandle:
        module = self._names.module(hf.module_name, self._remote_names)
        site = HookSite(hf.module_name, hook_type, HookSite.role_for(hook_type), module=module,
                        expected_shape=hf.expected_shape, unpack_idx=hf.unpack_idx)
        hf._bind(self, hook_type, key, site, self.runtime, self._shared)
        if hook_type == "full_backward" and module not in self._backward_flag_before:
            self._backward_flag_before[module] = module._is_full_backward_hook
        if hook_type in MODULE_BACKWARD_KINDS:
            self.runtime.watch_recomputation(module)
        method, options = MODULE_REGISTRATION[hook_type]
        return getattr(module, method)(hf.torch_hook(), **options)

    def _register_parameter_hook(self, hf: HookFunction, key: str) -> RemovableHandle:
        parameter, owner = self._names.parameter(hf.module_name, self._remote_names)
        if hf.unpack_idx != 0:
            raise HookRegistrationError(
                f"{hf!r}: a parameter gradient is one tensor; unpack_idx must be 0, "
                f"got {hf.unpack_idx}"
            )
        if not parameter.requires_grad:
            raise HookRegistrationError(
                f"parameter {hf.module_name!r} does not require grad, so it gets no gradient "
                "to hook; set requires_grad=True first"
            )
        site = HookSite(hf.module_name, "tensor", HookSite.role_for("tensor"), module=owner,
                        parameter=parameter, expected_shape=hf.expected_shape)
        hf._bind(self, "tensor", key, site, self.runtime, self._shared)
        if parameter._backward_hooks is None and not any(
            p is parameter for p in self._params_without_hooks_before
        ):
            self._params_without_hooks_before.append(parameter)
        # Through the runtime: under FSDP the tensor autograd sees is not the registered one.
        return self.runtime.register_parameter_hook(
            hf.module_name, parameter, owner, hf.torch_hook(),
            edits=lambda: hf._enabled and hf.editing_function is not None)

    def remove_hook_function(self, hook_function: HookFunction) -> None:
        """Unregister one hook function: its PyTorch hook and its group memberships go."""
        self._check_usable()
        if hook_function not in self._handles:
            raise HookRegistrationError(f"{hook_function!r} is not registered with this "
                                        "FlexModel")
        handle = self._handles.pop(hook_function)
        if handle is not None:
            handle.remove()
        self._groups.discard(hook_function)
        same_key = self._handles_by_key.get(hook_function.output_key, [])
        if hook_function in same_key:
            same_key.remove(hook_function)
        hook_function._unbind()

    def _install_backward_hooks(self, modules: dict[int, nn.Module]) -> None:
        """Install exactly the enabled module backward hooks of ``modules`` (by id), in
        registration order.

        A module with any full backward (pre) hook has its inputs and outputs wrapped in
        autograd nodes at every forward, so a disabled one is taken off the module rather than
        only flagged; reinstalling all of them keeps their relative order. One pass over the
        hooks, however many modules change.
        """
        mine: dict[int, list[HookFunction]] = {}
        for hf in self._handles:  # registration order
            if hf.hook_type in MODULE_BACKWARD_KINDS and not hf.is_remote:
                key = id(hf._site.module)
                if key in modules:
                    mine.setdefault(key, []).append(hf)
        for key, hooks in mine.items():
            for hf in hooks:
                if self._handles[hf] is not None:
                    self._handles[hf].remove()
                    self._handles[hf] = None
            for hf in hooks:
                if hf._enabled:
                    method, options = MODULE_REGISTRATION[hf.hook_type]
                    self._handles[hf] = getattr(modules[key], method)(hf.torch_hook(), **options)
