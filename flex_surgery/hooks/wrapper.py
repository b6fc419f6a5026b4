"""FlexModel: hooks that read and edit whole activations of a (possibly sharded) model.

:class:`FlexModel` wraps any ``nn.Module`` without changing it: it registers PyTorch hooks that
run :class:`~flex_surgery.hooks.hook_function.HookFunction`\\ s, and :meth:`FlexModel.restore`
removes every one of them, and every attribute PyTorch set while registering them. All
parallelism lives behind the model's :class:`~flex_surgery.parallel.runtime.Runtime` (from
:func:`~flex_surgery.parallel.distributed_runtime.build_runtime`); this module never calls a
collective, so the same code runs in one process and under DP/TP/PP/FSDP.

PyTorch hooks are installed at registration and stay until :meth:`FlexModel.close` (also
:meth:`FlexModel.restore`, leaving a ``with`` block, or dropping the FlexModel) or
:meth:`FlexModel.remove_hook_function`; choosing groups per call flips a flag on each
HookFunction, which keeps the order of several hooks on one module fixed (registration order
matters when they edit). Module backward hooks are the exception: a disabled one is taken off
its module, because their mere presence makes every forward wrap the module's inputs and
outputs in extra autograd nodes; they are put back in registration order.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from flex_surgery.hooks.errors import HookRegistrationError, UnknownNameError, did_you_mean
from flex_surgery.hooks.groups import ALL, HookGroups, HookSelection, name_matcher
from flex_surgery.hooks.hook_function import (
    KEEP_MODES,
    EditingFunction,
    HookFunction,
    SharedState,
    check_expected_shape,
    output_key,
)
from flex_surgery.naming import clean_name
from flex_surgery.parallel.distributed_runtime import build_runtime
from flex_surgery.parallel.group_lifetime import RefusedOnEveryRank
from flex_surgery.parallel.pipeline import StageLink, collect_stage_outputs, names_on_other_stages
from flex_surgery.parallel.runtime import (
    HOOK_TYPES,
    HookSite,
    LocalRuntime,
    wait_for_host_copies,
)
from flex_surgery.store.base import Store
from flex_surgery.store.hooks import bind_store, check_reduce

# PyTorch's registration method for each module hook kind, with the options we use.
_MODULE_REGISTRATION = {
    "forward": ("register_forward_hook", {}),
    "forward_pre": ("register_forward_pre_hook", {"with_kwargs": True}),
    "full_backward": ("register_full_backward_hook", {}),
    "full_backward_pre": ("register_full_backward_pre_hook", {}),
}

_MODULE_BACKWARD_KINDS = ("full_backward", "full_backward_pre")

# Names FlexModel 0.1.0 used for hook kinds, accepted by create_hook_group.
_HOOK_TYPE_ALIASES = {"backward": "full_backward", "backward_pre": "full_backward_pre",
                      "pre_forward": "forward_pre", "pre_backward": "full_backward_pre",
                      "tensor_backward": "tensor", "parameter": "tensor"}

# The FlexModel each module is wrapped by (weakly), so that a second one is refused: two
# FlexModels on one model would each gather and edit the same activations, in an order neither
# controls.
_WRAPPED_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_CREATE_HOOK_GROUP_OPTIONS = ("expected_shape", "editing_function", "unpack_idx", "hook_type")


def _check_not_wrapped(module: nn.Module) -> str | None:
    """Refuse to wrap a FlexModel (the same on every rank: it raises at once); return why this
    rank refuses to wrap a module another live FlexModel wraps, or ``None``.

    Whether the old FlexModel is still alive is this rank's own state (one rank may still hold
    it in a results dict, a traceback, IPython's ``_``), so that answer is not raised here: the
    ranks exchange it in :func:`~flex_surgery.parallel.group_lifetime.free_dropped`, which
    building the runtime runs, and every rank raises if any refused. Nothing is modified yet."""
    if isinstance(module, FlexModel):
        raise HookRegistrationError(
            "the module is a FlexModel; wrap the model itself (flex.module), or register more "
            "hooks on this FlexModel and choose them per call with groups")
    for attempt in range(2):
        ref = _WRAPPED_BY.get(module)
        current = ref() if ref is not None else None
        if current is None or current._restored:
            return None
        if attempt == 0:
            gc.collect()  # a FlexModel that was dropped but not yet collected does not count
    return (f"this {type(module).__name__} is already wrapped by a FlexModel; close() or "
            "restore() that one first, or register more hooks on it and choose them per call "
            "with groups")


def _detach_hooks(handles: dict[HookFunction, RemovableHandle | None],
                  backward_flag_before: dict[nn.Module, bool | None],
                  params_without_hooks_before: list[torch.Tensor],
                  runtime_unwatch: Callable[[], None] | None) -> None:
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
    if runtime_unwatch is not None:
        runtime_unwatch()  # the runtime's own hooks (layout tracking under TP)


class FlexModel(nn.Module):
    """Wrap ``module`` to retrieve and edit its activations and gradients with hooks.

    Args:
        module: the model; left invariant (``restore()`` gives it back with nothing attached).
        output_dict: where hooks store what they see, as FlexModel 0.1.0 does:
            ``output_dict[name]`` is a list that grows by one detached CPU tensor per hook
            call, the whole (unsharded) value before editing, filled on the storing rank only.
            ``name`` is the name the hook was registered with, for every hook kind
            (:attr:`HookFunction.output_key`). ``None``: this rank keeps nothing (distributed,
            it still takes part in the gathers, so passing a dict on rank 0 only is fine).
        tensor_parallel_size, pipeline_parallel_size, data_parallel_size, process_group: how
            the model is distributed; all 1/``None`` in one process.
        store_on: ``"rank0"`` stores retrieved tensors on global rank 0 only (on each pipeline
            stage's leader until :meth:`sync_pipeline_outputs`); ``"all"`` on every rank.
        batch_dim: the activation dimension that data parallelism splits; ``None`` (default):
            the one the model's framework uses (1 for Megatron-core's ``[s, b, h]``, else 0).
        keep: ``"all"`` (FlexModel's behaviour): a list per key, one tensor per hook call;
            ``"last"``: the tensor of the latest call, replacing the previous one (not with
            pipelining, whose stages' calls are collected as lists).
        key_by_hook_kind: ``False`` (FlexModel's behaviour): every hook kind stores under the
            registered name, so several kinds on one module share one list, in call order.
            ``True``: non-forward kinds get their own keys ``name:input``,
            ``name:grad_input``, ``name:grad_output`` and ``name:grad``.
        store: a :class:`~flex_surgery.store.Store` (e.g. a
            :class:`~flex_surgery.store.DiskStore`) that receives what the hooks retrieve,
            instead of ``output_dict`` (pass ``None`` for it). Every rank passes one; only the
            storing ranks write to it. See ``docs/store.md``.
        memory_budget: bytes (or a size such as ``"64GiB"``, or ``"auto"``: the smallest
            available host memory of the ranks) that a storing rank may hold per forward.
            Before the first hooked forward the planner (:mod:`flex_surgery.plan`) computes
            what the registered forward hooks will store, from the model's config, the mesh
            and the token ids, and refuses a plan over the budget on every rank with a
            :class:`~flex_surgery.plan.PlanError`. ``None`` (default): no check, no cost.

    Dropping the FlexModel (``model = flex.module``, ``del flex``) removes its hooks from the
    model, as FlexModel 0.1.0's finalizer does; :meth:`close` (or leaving ``with FlexModel(...)
    as flex:``) does it at once and also frees what the runtime created.
    """

    def __init__(
        self,
        module: nn.Module,
        output_dict: dict[str, Any] | None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
        *,
        store_on: str = "rank0",
        batch_dim: int | None = None,
        keep: str = "all",
        key_by_hook_kind: bool = False,
        store: Store | None = None,
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"FlexModel wraps an nn.Module, got {type(module).__name__}")
        if output_dict is not None and not isinstance(output_dict, dict):
            raise TypeError(f"output_dict must be a dict or None, got {type(output_dict).__name__}")
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
        refusal = _check_not_wrapped(module)
        self.module = module
        self.keep = keep
        self.key_by_hook_kind = bool(key_by_hook_kind)
        self._memory_budget = memory_budget
        self._budget_group = process_group  # the ranks that agree on the budget check
        self.save_ctx = SimpleNamespace()
        self.trainable_modules = nn.ModuleDict()
        self.tp_size = tensor_parallel_size
        self.pp_size = pipeline_parallel_size
        self.dp_size = data_parallel_size
        try:
            self.runtime = build_runtime(module, tensor_parallel_size, pipeline_parallel_size,
                                         data_parallel_size, process_group, store_on=store_on,
                                         batch_dim=batch_dim, refusal=refusal)
        except RefusedOnEveryRank as exc:
            raise HookRegistrationError(str(exc)) from None
        try:
            self._finish_init(module, output_dict, store, store_on, keep)
        except BaseException:
            # The failure may be this rank's alone: hand the runtime's groups to the next
            # agreed point instead of freeing them here (no collective).
            self.runtime.abandon()
            raise

    def _finish_init(self, module: nn.Module, output_dict: dict[str, Any] | None,
                     store: Store | None, store_on: str, keep: str) -> None:
        self._shared = SharedState(None, self.save_ctx, self.trainable_modules, keep,
                                   batch_dim=getattr(getattr(self.runtime, "layouts", None),
                                                     "batch_dim", 0))
        self.store = store
        self._shared.binding = bind_store(store, module, self.runtime, output_dict, store_on)
        # Under pipelining: names of the other stages, so every rank can register every hook.
        mesh = getattr(self.runtime, "mesh", None)
        self._remote_names = names_on_other_stages(
            set(self._module_table()) | set(self._parameter_table()), mesh)
        if keep == "last" and mesh is not None and mesh.pp_size > 1:
            raise ValueError("keep='last' is not available with pipeline parallelism: every "
                             "stage's calls are collected on rank 0 as lists; use keep='all'")
        self.output_dict = output_dict
        self._groups = HookGroups()
        # None: a module backward hook that is disabled, hence not installed (see _select).
        self._handles: dict[HookFunction, RemovableHandle | None] = {}
        # What registering hooks changed besides the hook dicts, to put back in restore():
        # modules whose `_is_full_backward_hook` flag we set, parameters whose
        # `_backward_hooks` dict PyTorch created for us.
        self._backward_flag_before: dict[nn.Module, bool | None] = {}
        self._params_without_hooks_before: list[torch.Tensor] = []
        self._selection_key: tuple | None = None
        self._restored = False
        _WRAPPED_BY[module] = weakref.ref(self)
        layouts = getattr(self.runtime, "layouts", None)
        self._finalizer = weakref.finalize(
            self, _detach_hooks, self._handles, self._backward_flag_before,
            self._params_without_hooks_before, getattr(layouts, "unwatch", None))

    @property
    def output_dict(self) -> dict[str, Any] | None:
        """Where hooks store what they see (may be replaced, e.g. by a fresh dict per step)."""
        return self._output_dict

    @output_dict.setter
    def output_dict(self, value: dict[str, Any] | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"output_dict must be a dict or None, got {type(value).__name__}")
        self._output_dict = value
        # Under pipelining a stage leader stores its stage's tensors until
        # sync_pipeline_outputs moves them to rank 0: it needs somewhere to keep them even if
        # the user gave this rank no dict (a dict on rank 0 only is a natural SPMD pattern).
        staging = value is None and self._remote_names
        self._shared.output_dict = {} if staging else value

    @property
    def output_ptr(self) -> dict[str, Any] | None:
        """FlexModel 0.1.0's name for :attr:`output_dict`."""
        return self.output_dict

    @output_ptr.setter
    def output_ptr(self, value: dict[str, Any] | None) -> None:
        self.output_dict = value

    # -- forward ------------------------------------------------------------------------------

    def forward(self, *args: Any, groups: str | Sequence[str] = ALL, complement: bool = False,
                **kwargs: Any) -> Any:
        """Run the wrapped module with exactly the hooks of ``groups`` (or all others).

        The selection holds for this forward and for the backward of its outputs, until the
        next call chooses again. ``groups`` and ``complement`` are taken by FlexModel; every
        other argument goes to the wrapped module.
        """
        self._check_usable()
        self._select(groups, complement)
        if self._memory_budget is not None:
            self._check_memory_budget(args, kwargs)
        output = self.module(*args, **kwargs)
        wait_for_host_copies()  # stored activations are complete when forward returns
        return output

    def _check_memory_budget(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse the first hooked forward if its plan exceeds ``memory_budget`` (then never
        again: the check is made once)."""
        from flex_surgery.plan.budget import check_memory_budget

        names = sorted({hf.module_name for hf in self._handles
                        if hf.hook_type == "forward" and hf._enabled})
        if not names:
            return
        mesh = getattr(self.runtime, "mesh", None)
        check_memory_budget(self.module, names, mesh, args, kwargs, self._memory_budget,
                            self._budget_group)
        self._memory_budget = None

    def _select(self, groups: str | Sequence[str], complement: bool) -> None:
        names = (groups,) if isinstance(groups, str) else tuple(groups)
        key = (names, bool(complement), self._groups.version)
        if key == self._selection_key:
            return
        active = self._groups.select(names, complement)
        reinstall: dict[int, nn.Module] = {}
        for hf in self._groups.hook_functions():
            enabled = hf in active
            if hf._enabled != enabled:
                hf._enabled = enabled
                if hf.hook_type in _MODULE_BACKWARD_KINDS and not hf.is_remote:
                    reinstall[id(hf._site.module)] = hf._site.module
        for module in reinstall.values():
            self._install_backward_hooks(module)
        self._selection_key = key

    def _install_backward_hooks(self, module: nn.Module) -> None:
        """Install exactly the enabled module backward hooks of ``module``, in registration order.

        A module with any full backward (pre) hook has its inputs and outputs wrapped in
        autograd nodes at every forward, so a disabled one is taken off the module rather than
        only flagged; reinstalling all of them keeps their relative order.
        """
        mine = [hf for hf in self._handles
                if hf.hook_type in _MODULE_BACKWARD_KINDS and not hf.is_remote
                and hf._site.module is module]
        for hf in mine:
            if self._handles[hf] is not None:
                self._handles[hf].remove()
                self._handles[hf] = None
        for hf in mine:
            if hf._enabled:
                method, options = _MODULE_REGISTRATION[hf.hook_type]
                self._handles[hf] = getattr(module, method)(hf.torch_hook(), **options)

    def select_hook_groups(self, groups: str | Sequence[str] = ALL,
                           complement: bool = False) -> None:
        """Choose the hooks of ``groups`` for calls of the wrapped module that do not go
        through :meth:`forward` (a pipelining schedule calls its stage module directly)."""
        self._check_usable()
        self._select(groups, complement)

    def sync_pipeline_outputs(self, link: StageLink | None = None) -> None:
        """Move what the hooks of every pipeline stage stored to global rank 0's
        ``output_dict`` (see :func:`~flex_surgery.parallel.pipeline.collect_stage_outputs`).

        Every rank calls it after the pipeline step; a no-op without pipelining. With a
        :class:`~flex_surgery.parallel.pipeline.StageLink` a failed stage makes it raise
        instead of wait.
        """
        self._check_usable()
        runtime = self.runtime
        collect_stage_outputs(self._shared.output_dict, getattr(runtime, "mesh", None),
                              getattr(runtime, "store_on", "rank0"), link)
        if self._output_dict is None and self._shared.output_dict is not None:
            self._shared.output_dict.clear()  # staging only: this rank keeps nothing

    # -- registration ---------------------------------------------------------------------------

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

    def _register(self, hf: HookFunction, hook_type: str, table: dict | None = None) -> None:
        self._check_usable()
        if not isinstance(hf, HookFunction):
            raise TypeError(f"expected a HookFunction, got {type(hf).__name__}")
        if hf.is_registered:
            where = "this FlexModel" if hf.owner is self else "another FlexModel"
            raise HookRegistrationError(
                f"{hf!r} is already registered with {where}; create a new HookFunction for "
                "another hook point"
            )
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
            clash = next((other for other in self._handles
                          if other.output_key == key and other.hook_type != hook_type), None)
            if clash is not None:
                # One tensor per key: the later hook kind would silently replace what the
                # earlier one stored (a gradient in place of the activation).
                raise HookRegistrationError(
                    f"{hf!r} ({hook_type}) would store under {key!r}, where {clash!r} "
                    f"({clash.hook_type}) stores, and keep='last' keeps one tensor per key; "
                    "pass key_by_hook_kind=True to FlexModel to keep them apart")
        try:
            if hook_type == "tensor":
                handle = self._register_parameter_hook(hf, key, table)
            else:
                handle = self._register_module_hook(hf, hook_type, key, table)
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
        except BaseException:
            self._handles.pop(hf, None)
            if handle is not None:
                handle.remove()
            hf._unbind()
            raise

    def _register_module_hook(self, hf: HookFunction, hook_type: str, key: str,
                              table: dict | None) -> RemovableHandle:
        module = self._resolve_module(hf.module_name, table)
        site = HookSite(hf.module_name, hook_type, HookSite.role_for(hook_type), module=module,
                        expected_shape=hf.expected_shape, unpack_idx=hf.unpack_idx)
        hf._bind(self, hook_type, key, site, self.runtime, self._shared)
        if hook_type == "full_backward" and module not in self._backward_flag_before:
            self._backward_flag_before[module] = module._is_full_backward_hook
        method, options = _MODULE_REGISTRATION[hook_type]
        return getattr(module, method)(hf.torch_hook(), **options)

    def _register_parameter_hook(self, hf: HookFunction, key: str,
                                 table: dict | None) -> RemovableHandle:
        parameter, owner = self._resolve_parameter(hf.module_name, table)
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
        return self.runtime.register_parameter_hook(hf.module_name, parameter, owner,
                                                    hf.torch_hook())

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
        hook_function._unbind()

    # -- groups ---------------------------------------------------------------------------------

    def create_hook_group(
        self,
        group_name: str,
        group_constructor: str | Any,
        expected_shape: Sequence[int | None] | None = None,
        editing_function: EditingFunction | None = None,
        unpack_idx: int = 0,
        hook_type: str = "forward",
        **kwargs: Any,
    ) -> list[HookFunction]:
        """Create and register one HookFunction per module matching ``group_constructor``.

        ``group_constructor`` is a name pattern (substring, glob, ``re:`` regex or compiled
        pattern; see :mod:`flex_surgery.hooks.groups`) matched against module names, or
        against parameter names when ``hook_type="tensor"``. All created hooks share
        ``expected_shape``, ``editing_function`` and ``unpack_idx``, and are added to
        ``group_name`` (and ``"all"``). Returns them in model order.
        """
        if kwargs:
            unknown = next(iter(kwargs))
            raise TypeError(
                f"create_hook_group() got an unexpected keyword argument {unknown!r}"
                f"{did_you_mean(unknown, _CREATE_HOOK_GROUP_OPTIONS)} "
                f"(options: {', '.join(_CREATE_HOOK_GROUP_OPTIONS)})"
            )
        self._check_usable()
        hook_type = _HOOK_TYPE_ALIASES.get(hook_type, hook_type)
        if hook_type not in HOOK_TYPES:
            raise ValueError(f"unknown hook_type {hook_type!r}; choose from {HOOK_TYPES}"
                             f"{did_you_mean(str(hook_type), HOOK_TYPES)}")
        matches = name_matcher(group_constructor)
        table = self._parameter_table() if hook_type == "tensor" else self._module_table()
        candidates = list(table)
        names = [n for n in candidates if n and matches(n)]
        if not names and any(matches(n) for n in self._remote_names):
            self._groups.create(group_name)  # the group exists on every stage
            return []  # every match lives on another pipeline stage
        if not names:
            kind = "parameter" if hook_type == "tensor" else "module"
            raise UnknownNameError(
                f"group constructor {group_constructor!r} matches no {kind} name of the wrapped "
                f"{type(self.module).__name__}"
                f"{did_you_mean(str(group_constructor), candidates)}"
            )
        created = [HookFunction(n, expected_shape, editing_function, unpack_idx) for n in names]
        registered: list[HookFunction] = []
        try:
            for hf in created:
                self._register(hf, hook_type, table)
                registered.append(hf)
        except Exception:
            for hf in registered:  # all or nothing
                self.remove_hook_function(hf)
            raise
        self._groups.update(created, group_name)
        return created

    def update_hook_groups(self, hook_functions: HookSelection, group_name: str) -> None:
        """Add hook functions (one, a list, or a name pattern) to ``group_name``."""
        self._groups.update(hook_functions, group_name)

    def remove_hook_groups(self, hook_functions: HookSelection, group_name: str) -> None:
        """Remove hook functions (one, a list, or a name pattern) from ``group_name``.

        A pattern selects the matching hook functions that are in the group. Group ``"all"``
        cannot be removed.
        """
        self._groups.remove(hook_functions, group_name)

    def get_hook_function_groups(
        self, hook_function: HookFunction | None = None
    ) -> set[str] | dict[HookFunction, set[str]]:
        """The groups of ``hook_function``; without an argument, of every hook function."""
        if hook_function is not None:
            return self._groups.groups_of(hook_function)
        return {hf: self._groups.groups_of(hf) for hf in self._groups.hook_functions()}

    def get_group_hook_functions(self, group_name: str) -> list[HookFunction]:
        """The hook functions in ``group_name``, in registration order."""
        return self._groups.members(group_name)

    @property
    def hook_groups(self) -> set[str]:
        """Names of every existing group, ``"all"`` included."""
        return self._groups.names()

    @property
    def hook_functions(self) -> list[HookFunction]:
        """Every registered hook function, in registration order."""
        return self._groups.hook_functions()

    # -- shared state for editing functions -------------------------------------------------------

    def register_trainable_module(self, name: str, module: nn.Module) -> None:
        """Make ``module`` available to every editing function as ``modules[name]``.

        Its parameters are parameters of this FlexModel (not of the wrapped module), so an
        optimizer over ``flex.trainable_modules.parameters()`` trains it through the edits.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"a trainable module is an nn.Module, got {type(module).__name__}")
        if name in self.trainable_modules and self.trainable_modules[name] is not module:
            raise HookRegistrationError(f"a different trainable module is already registered "
                                        f"as {name!r}")
        self.trainable_modules[name] = module
        self.runtime.sync_trainable_modules(dict(self.trainable_modules.items()))

    def get_module_parameter(self, parameter_name: str,
                             expected_shape: Sequence[int | None] | None = None) -> torch.Tensor:
        """The whole parameter ``parameter_name`` as a detached CPU copy (on every rank)."""
        self._check_usable()
        parameter, owner = self._resolve_parameter(parameter_name)
        full = self.runtime.full_parameter(parameter_name, parameter, owner)
        expected = None if expected_shape is None else tuple(expected_shape)
        check_expected_shape(full.shape, expected, f"parameter {parameter_name!r}")
        return full

    # -- names ------------------------------------------------------------------------------------

    @property
    def wrapped_module_names(self) -> list[str]:
        return self._module_names()

    @property
    def trainable_modules_names(self) -> list[str]:
        return list(self.trainable_modules.keys())

    @property
    def all_modules_names(self) -> list[str]:
        """Names of the wrapped module's submodules, then of the trainable modules."""
        return self.wrapped_module_names + self.trainable_modules_names

    def _module_names(self) -> list[str]:
        return [n for n, _ in self.module.named_modules(remove_duplicate=False)]

    def _module_table(self) -> dict[str, nn.Module]:
        """Modules by their wrapper-free name (see :func:`clean_name`).

        FSDP1, activation checkpointing and ``torch.compile`` insert wrapper modules into
        paths; hooks are addressed by the names of the model as written, and land on the
        innermost module of that name (``named_modules`` lists a wrapper before what it wraps,
        so the later entry wins).
        """
        return {clean_name(n): m for n, m in self.module.named_modules(remove_duplicate=False)}

    def _parameter_table(self) -> dict[str, tuple[nn.Parameter, nn.Module]]:
        """``(parameter, owning module)`` by wrapper-free dotted parameter name."""
        table = {}
        for module_name, module in self.module.named_modules(remove_duplicate=False):
            for leaf, parameter in module._parameters.items():
                if parameter is not None:
                    name = f"{module_name}.{leaf}" if module_name else leaf
                    table[clean_name(name)] = (parameter, module)
        return table

    def _resolve_module(self, name: str,
                        table: dict[str, nn.Module] | None = None) -> nn.Module:
        return self._lookup(name, "module", self._module_table() if table is None else table,
                            self._parameter_table,
                            "it is a parameter: use register_hook for its gradient")

    def _resolve_parameter(
        self, name: str, table: dict[str, tuple[nn.Parameter, nn.Module]] | None = None
    ) -> tuple[nn.Parameter, nn.Module]:
        return self._lookup(name, "parameter",
                            self._parameter_table() if table is None else table,
                            self._module_table,
                            "it is a module: use register_forward_hook and friends")

    def _lookup(self, name: str, kind: str, table: dict[str, Any],
                other_table: Callable[[], dict[str, Any]], other_hint: str) -> Any:
        """``table[clean_name(name)]``, or an UnknownNameError that says what the name is
        instead (a module given to a parameter hook, or the reverse) or the closest names."""
        found = table.get(clean_name(name))
        if found is not None:
            return found
        hint = f"; {other_hint}" if clean_name(name) in other_table() else ""
        raise UnknownNameError(
            f"no {kind} named {name!r} in the wrapped {type(self.module).__name__}"
            f"{hint or did_you_mean(name, table)}"
        )

    # -- close / restore ----------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook now and free what the runtime created (its process groups).

        Every rank calls it (the runtime may free groups). Afterwards this FlexModel cannot be
        used; its hook functions can be registered again with a new one. Idempotent.
        Leaving ``with FlexModel(...) as flex:`` calls it; dropping the FlexModel without it
        still removes the hooks (a finalizer); the process groups its runtime built are then
        freed when every rank has dropped it, at the next FlexModel built on every rank
        (:mod:`flex_surgery.parallel.group_lifetime`).
        """
        if self._restored:
            return
        self._restored = True
        self._groups = HookGroups()
        self._finalizer()  # _detach_hooks, once
        self.runtime.close()

    def restore(self) -> nn.Module:
        """:meth:`close`, then give back the wrapped module exactly as it was wrapped."""
        self.close()
        return self.module

    def __enter__(self) -> FlexModel:
        self._check_usable()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The exception may be this rank's alone (rank-0-only saving, an OOM) while the other
        # ranks run their next forward on the runtime's groups: remove the hooks here, queue
        # the groups for the next point every rank agrees on (no collective).
        if not self._restored:
            self._restored = True
            self._groups = HookGroups()
            self._finalizer()  # _detach_hooks, once
            self.runtime.abandon()

    def _check_usable(self) -> None:
        if self._restored:
            raise RuntimeError("this FlexModel was closed or restored (close(), restore() or the "
                               "end of its with block); wrap the module again to use hooks")

    def hook_map(self, title: str | None = None):
        """The module tree with hookable points, registered hooks, groups and sharding.

        Returns a :class:`~flex_surgery.viz.HookMap`: ``print()`` it for a terminal tree, or
        ``.save_html(path)`` for a standalone page. See :func:`flex_surgery.viz.hook_map`.
        """
        from flex_surgery.viz import hook_map

        return hook_map(self, title=title)

    def extra_repr(self) -> str:
        return f"hook_functions={len(self._handles)}, groups={sorted(self._groups.names())}"

