"""FlexModel: hooks that read and edit whole activations of a (possibly sharded) model.

:class:`FlexModel` wraps any ``nn.Module`` without changing it: it registers PyTorch hooks that
run :class:`~flex_surgery.hooks.hook_function.HookFunction`\\ s, and :meth:`FlexModel.restore`
removes every one of them, and every attribute PyTorch set while registering them. All
parallelism lives behind the model's :class:`~flex_surgery.parallel.runtime.Runtime` (from
:func:`~flex_surgery.parallel.distributed_runtime.build_runtime`); this module never calls a
collective, so the same code runs in one process and under DP/TP/PP/FSDP.

PyTorch hooks are installed at registration and stay until :meth:`FlexModel.close` (also
:meth:`FlexModel.restore`, leaving a ``with`` block, or dropping the FlexModel) or
:meth:`FlexModel.remove_hook_function`. FlexModel is assembled from one file per concern:

* this module -- the FlexModel's life: wrapping, ``forward``, shared state, closing;
* :mod:`flex_surgery.hooks.registration` -- the ``register_*`` methods;
* :mod:`flex_surgery.hooks.group_api` -- hook groups, chosen per call;
* :mod:`flex_surgery.hooks.names` -- names to modules and parameters, looked up in O(1).

The hook map of a FlexModel is drawn by :func:`flex_surgery.viz.hook_map` (``viz`` reads
``hooks``; ``hooks`` does not know ``viz``).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from flex_surgery.hooks.errors import HookRegistrationError
from flex_surgery.hooks.group_api import HookGroupAPI
from flex_surgery.hooks.groups import ALL, HookGroups
from flex_surgery.hooks.hook_function import (
    KEEP_MODES,
    HookFunction,
    SharedState,
    check_expected_shape,
)
from flex_surgery.hooks.names import ModelNames
from flex_surgery.hooks.registration import HookRegistration, detach_hooks
from flex_surgery.naming import StageBlockNames
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.distributed_runtime import build_runtime
from flex_surgery.parallel.group_lifetime import RefusedOnEveryRank
from flex_surgery.parallel.pipeline import (
    StageLink,
    blocking_line,
    collect_stage_outputs,
    exchange_stage_facts,
)
from flex_surgery.parallel.runtime import wait_for_host_copies
from flex_surgery.store.base import Store
from flex_surgery.store.hooks import agree_on_store, bind_store, store_call

__all__ = ["FlexModel"]

# The FlexModel each module is wrapped by (weakly), so that a second one is refused: two
# FlexModels on one model would each gather and edit the same activations, in an order neither
# controls.
_WRAPPED_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def hooked_passes(module: nn.Module, flex_ref: weakref.ref) -> list:
    """Hooks on the wrapped module itself that mark each call of it while hooks are selected:
    a new pass as it starts (``DistributedRuntime.passes``, in every hook site's stamp, see
    :mod:`~flex_surgery.parallel.site_tags`) and its end as it returns
    (``Runtime.end_of_hooked_forward``; with backward hooks selected, ``Runtime.watch_backward``
    for the end of the backward through it). On the module, not in :meth:`FlexModel.forward`, so
    that calls which bypass ``flex(...)`` after :meth:`FlexModel.select_hook_groups` -- a
    pipeline schedule calling the stage module per micro-batch, ``generate`` -- count too.
    A forward recomputed in backward (activation checkpointing) is no new pass. They hold the
    FlexModel weakly (a hook would otherwise keep it alive); returns their handles. For a
    distributed runtime only."""

    def starts(mod: nn.Module, args: Any) -> None:
        flex = flex_ref()
        if flex is not None and flex._hooks_selected and \
                torch._C._current_graph_task_id() == -1:
            flex.runtime.start_pass()  # every rank runs the same hooked forwards

    def ends(mod: nn.Module, args: Any, output: Any) -> None:
        flex = flex_ref()
        if flex is not None and flex._hooks_selected and \
                torch._C._current_graph_task_id() == -1:
            # a rank left waiting at a hook the others skipped raises with them
            flex.runtime.end_of_hooked_forward()
            if flex._backward_hooks_selected:  # ... and in the backward through this forward
                flex.runtime.watch_backward(output)

    def ends_after_others(mod: nn.Module, args: Any, output: Any) -> None:
        flex = flex_ref()
        if flex is None or torch._C._current_graph_task_id() != -1:
            return
        # which gradient hooks wait for the backward's end (DDP's unused parameters): after
        # every forward, hooked or not, as a hook may be chosen or registered before the
        # backward, and its losses summed with a hooked forward's
        flex.runtime.agree_parameter_use(output)
        if flex._hooks_selected and flex._backward_hooks_selected:
            flex.runtime.watch_backward(output)  # what the module's own hooks returned

    # ``ends`` before the module's other forward hooks: its hook on the output then runs
    # first in the backward, and the end-of-backward callback it queues runs before those
    # that others queue there (FSDP2's root reduce-scatters the gradients in one). The
    # output as the module's own forward hooks leave it is watched too (one may add a
    # tensor, an auxiliary loss, that the loss alone uses): once per backward either way.
    return [module.register_forward_pre_hook(starts),
            module.register_forward_hook(ends, prepend=True),
            module.register_forward_hook(ends_after_others)]


class FlexModel(HookRegistration, HookGroupAPI, nn.Module):
    """Wrap ``module`` to retrieve and edit its activations and gradients with hooks.

    Args:
        module: the model; left invariant (``restore()`` gives it back with nothing attached).
        output_dict: where hooks store what they see, as FlexModel 0.1.0 does:
            ``output_dict[name]`` is a list that grows by one detached CPU tensor per hook
            call, the whole (unsharded) value before editing, filled on the storing rank only.
            ``name`` is the name the hook was registered with, for every hook kind
            (:attr:`HookFunction.output_key`). ``None``: this rank keeps nothing (distributed,
            it still takes part in the gathers, so passing a dict on rank 0 only is fine).
            Under pipelining the stages learn here whether rank 0 keeps values: give rank 0
            a dict (even empty) now if it will ever keep any (see ``docs/pipeline.md``).
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
        overlap_retrieval: retrievals of tensors sharded over one axis start their gather and
            return; the model computes on while the bytes travel; stored values appear when
            forward (backward) returns. Costs one copy of the local piece.

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
        overlap_retrieval: bool = False,
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
                                         batch_dim=batch_dim, refusal=refusal,
                                         overlap_retrieval=overlap_retrieval)
        except RefusedOnEveryRank as exc:
            raise HookRegistrationError(str(exc)) from None
        try:
            self._finish_init(module, output_dict, store, store_on, keep, batch_dim)
        except BaseException:
            # The failure may be this rank's alone: hand the runtime's groups to the next
            # agreed point instead of freeing them here (no collective).
            self.runtime.abandon()
            raise

    def _finish_init(self, module: nn.Module, output_dict: dict[str, Any] | None,
                     store: Store | None, store_on: str, keep: str,
                     batch_dim: int | None) -> None:
        layouts = getattr(self.runtime, "layouts", None)  # a distributed runtime decided it
        if layouts is not None:
            batch_dim = layouts.batch_dim
        elif batch_dim is None:  # one process: the same default, for reduce= alike
            batch_dim = frameworks.batch_dim(module)
        self._shared = SharedState(None, self.save_ctx, self.trainable_modules, keep,
                                   batch_dim=batch_dim, batch_dims=frameworks.batch_dims(module))
        self.store = store
        self._shared.binding, self._store_in_run = bind_store(store, module, self.runtime,
                                                              output_dict, store_on)
        # Names to modules: built on first use, kept, checked against the tree on each use.
        self._names = ModelNames(module)
        # Under pipelining: names of the other stages, so every rank can register every hook.
        mesh = getattr(self.runtime, "mesh", None)
        pipelined = mesh is not None and mesh.pp_size > 1
        keeps = output_dict is not None or self._shared.binding is not None
        self._stages = exchange_stage_facts(self._names.names() if pipelined else set(), keeps,
                                            mesh)
        self._remote_names = self._stages.remote_names
        self._collection_line: StageLink | None = None  # sync_pipeline_outputs without a link
        if keep == "last" and pipelined:
            raise ValueError("keep='last' is not available with pipeline parallelism: every "
                             "stage's calls are collected on rank 0 as lists; use keep='all'")
        self.output_dict = output_dict
        self._groups = HookGroups()
        # None: a module backward hook that is disabled, hence not installed (see _select).
        self._handles: dict[HookFunction, RemovableHandle | None] = {}
        self._handles_by_key: dict[str, list[HookFunction]] = {}
        # What registering hooks changed besides the hook dicts, to put back in restore():
        # modules whose `_is_full_backward_hook` flag we set, parameters whose
        # `_backward_hooks` dict PyTorch created for us.
        self._backward_flag_before: dict[nn.Module, bool | None] = {}
        self._params_without_hooks_before: list[torch.Tensor] = []
        self._selection_key: tuple | None = None
        self._hooks_selected = False
        self._backward_hooks_selected = False
        self._restored = False
        _WRAPPED_BY[module] = weakref.ref(self)
        # One process counts no passes and announces nothing: no hooks there (a FlexModel
        # without hook functions leaves the model without hooks, as FlexModel 0.1.0 does)
        own = hooked_passes(module, weakref.ref(self)) if hasattr(self.runtime, "passes") \
            else []
        layouts = getattr(self.runtime, "layouts", None)
        self._finalizer = weakref.finalize(
            self, detach_hooks, self._handles, self._backward_flag_before,
            self._params_without_hooks_before, getattr(layouts, "unwatch", None), own)

    @property
    def output_dict(self) -> dict[str, Any] | None:
        """Where hooks store what they see (may be replaced, e.g. by a fresh dict per step)."""
        return self._output_dict

    @output_dict.setter
    def output_dict(self, value: dict[str, Any] | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"output_dict must be a dict or None, got {type(value).__name__}")
        if value is not None and self._shared.binding is not None:
            # Hooks write to the store only: the dict would stay empty without a word (and under
            # pipelining receive the other stages' values while this one's go to the store).
            raise ValueError("this FlexModel stores into store=; give either output_dict or "
                             "store, not both (build another FlexModel to keep a dict)")
        mesh, store_on = getattr(self.runtime, "mesh", None), getattr(self.runtime, "store_on", "")
        stages = self._stages
        if value is not None and stages.is_collector(mesh, store_on) and \
                not stages.keeps[stages.stage]:
            # The other stages were told at construction that this rank keeps nothing, so they
            # stage nothing for it: their values would be lost without a word.
            raise ValueError("this rank collects the other pipeline stages' values, but it was "
                             "built with output_dict=None, so the stages keep nothing for it; "
                             "pass a dict (even an empty one) when building the FlexModel on "
                             "the collecting rank")
        self._output_dict = value
        # Under pipelining a stage leader stores its stage's tensors until
        # sync_pipeline_outputs moves them to rank 0: it needs somewhere to keep them even if
        # the user gave this rank no dict (a dict on rank 0 only is a natural SPMD pattern) --
        # but only if rank 0 keeps them: otherwise every edit would pay a copy into a dict that
        # nobody collects, and that grows with every forward.
        staging = value is None and stages.staged_values_are_collected(mesh, store_on)
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
        wait_for_host_copies()  # what a backward that raised left in flight (device copies)
        try:
            output = self.module(*args, **kwargs)
        except BaseException:
            # No deferred gather or host copy of this failed call may cross into the next one.
            try:
                wait_for_host_copies()
            except BaseException:
                pass
            raise
        wait_for_host_copies()  # stored activations are complete when forward returns
        mesh = getattr(self.runtime, "mesh", None)
        if self._store_in_run and (mesh is None or mesh.pp_size == 1):
            # A store that failed in a hook raises here, on every rank. Under pipelining the
            # other stages are not in this forward: sync_pipeline_outputs raises it instead.
            agree_on_store(self._shared.binding, mesh, whole_run=False)
        return output

    def check_store(self) -> None:
        """Raise :class:`~flex_surgery.store.StoreError` on every rank if a store failed on any
        rank since the last check; a no-op without ``store=``.

        A store that fails inside a hook does not raise there (the other ranks would be left
        waiting in the forward's collectives); it stores nothing more and is raised on every
        rank at the end of the forward (without pipelining), of :meth:`sync_pipeline_outputs`,
        or here. Call it after a backward whose hooks store, after calls that bypass
        ``flex(...)``, and before :meth:`close`. Collective: every rank of the run calls it.
        """
        self._check_usable()
        wait_for_host_copies()  # stores still deferred behind an overlapped gather land first
        if self._store_in_run:
            agree_on_store(self._shared.binding, getattr(self.runtime, "mesh", None),
                           whole_run=True)

    def _check_memory_budget(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse the first hooked forward if its plan exceeds ``memory_budget`` (then never
        again: the check is made once)."""
        from flex_surgery.plan.budget import check_memory_budget

        names = {hf.module_name for hf in self._handles
                 if hf.hook_type == "forward" and hf._enabled}
        mesh = getattr(self.runtime, "mesh", None)
        if mesh is not None:
            # Every rank plans the same hooks: a pipeline stage may hold none of them (a hook
            # group matches this stage's modules only), and one that skipped the check, or
            # planned only its own, would decide alone (the others waiting in its agreement).
            everyone: list[Any] = [None] * dist.get_world_size(self._budget_group)
            dist.all_gather_object(everyone, sorted(names), group=self._budget_group)
            names = {n for theirs in everyone for n in theirs}
        if not names:
            return
        check_memory_budget(self.module, sorted(names), mesh, args, kwargs,
                            self._memory_budget, self._budget_group)
        self._memory_budget = None

    def sync_pipeline_outputs(self, link: StageLink | None = None) -> None:
        """Move what the hooks of every pipeline stage stored to global rank 0's
        ``output_dict`` (see :func:`~flex_surgery.parallel.pipeline.collect_stage_outputs`).

        Every rank calls it after the pipeline step; without pipelining it moves nothing. With a
        :class:`~flex_surgery.parallel.pipeline.StageLink` a failed stage makes it raise
        instead of wait. A stage leader without an ``output_dict`` holds its stage's values
        until this call (when rank 0 keeps them): call it after every step, or they pile up.
        On a rank with a ``store=`` the other stages' values are written to the store here,
        and a store that failed on any rank raises :class:`~flex_surgery.store.StoreError` on
        every rank (see :meth:`check_store`).
        """
        self._check_usable()
        # Values whose retrieval is still in flight (overlap_retrieval) are stored first: a
        # pipelining schedule calls the stage module itself, so no flex(...) call has waited.
        wait_for_host_copies()
        self._collect_stages(link)
        self.check_store()  # a write here or in a stage's hooks that failed: every rank raises

    def _collect_stages(self, link: StageLink | None) -> None:
        runtime = self.runtime
        store_on = getattr(runtime, "store_on", "rank0")
        if self._stages.keeps and not self._stages.anyone_collects(store_on):
            return  # nobody keeps: nothing was staged, a stage's own dict keeps its values
        mesh = getattr(runtime, "mesh", None)
        if link is None and mesh is not None and mesh.pp_size > 1:
            if self._collection_line is None:  # one across steps: see blocking_line
                self._collection_line = blocking_line(mesh)
            link = self._collection_line
        collect_stage_outputs(self._shared.output_dict, mesh, store_on, link)
        staged = self._shared.output_dict
        if self._output_dict is None and staged is not None:
            binding = self._shared.binding
            if binding is not None:  # this rank's own hooks wrote to the store: theirs only
                for key, values in staged.items():
                    for value in values:  # reduced on their stage already
                        store_call(binding, key, value, None, self._shared.batch_dim, None)
            staged.clear()  # staging only: this rank keeps nothing

    # -- shared state for editing functions -------------------------------------------------------

    def register_trainable_module(self, name: str, module: nn.Module) -> None:
        """Make ``module`` available to every editing function as ``modules[name]``.

        Its parameters are parameters of this FlexModel (not of the wrapped module), so an
        optimizer over ``flex.trainable_modules.parameters()`` trains it through the edits.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"a trainable module is an nn.Module, got {type(module).__name__}")
        mesh = getattr(self.runtime, "mesh", None)
        if mesh is not None and mesh.pp_size > 1:
            # Its gradient is synchronised within a stage; edits on two stages would each train
            # their own copy (their gradients add up to one process's only if summed across
            # stages, at a point the schedule's micro-batches do not share).
            raise NotImplementedError(
                "trainable modules are not supported under pipeline parallelism: each stage "
                "would train its own copy of the module, with part of its gradient")
        if name in self.trainable_modules and self.trainable_modules[name] is not module:
            raise HookRegistrationError(f"a different trainable module is already registered "
                                        f"as {name!r}")
        self.trainable_modules[name] = module
        self.runtime.sync_trainable_modules(dict(self.trainable_modules.items()))

    def get_module_parameter(self, parameter_name: str,
                             expected_shape: Sequence[int | None] | None = None) -> torch.Tensor:
        """The whole parameter ``parameter_name`` as a detached CPU copy (on every rank)."""
        self._check_usable()
        parameter, owner = self._names.parameter(parameter_name)
        full = self.runtime.full_parameter(parameter_name, parameter, owner)
        expected = None if expected_shape is None else tuple(expected_shape)
        check_expected_shape(full.shape, expected, f"parameter {parameter_name!r}")
        return full

    # -- names ------------------------------------------------------------------------------------

    @property
    def wrapped_module_names(self) -> list[str]:
        """Names of the wrapped module's submodules, as ``named_modules`` spells them (a
        pipeline stage's blocks by their whole-model index, as hooks take them)."""
        walked = list(self.module.named_modules(remove_duplicate=False))
        whole = StageBlockNames(walked)
        return [whole(n) for n, _ in walked]

    @property
    def trainable_modules_names(self) -> list[str]:
        return list(self.trainable_modules.keys())

    @property
    def all_modules_names(self) -> list[str]:
        """Names of the wrapped module's submodules, then of the trainable modules."""
        return self.wrapped_module_names + self.trainable_modules_names

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
        binding = getattr(getattr(self, "_shared", None), "binding", None)
        if binding is not None and binding.failure is not None:
            # Not raised here: close is not a point every rank is known to reach together.
            name, error = binding.failure
            warnings.warn(f"storing {name!r} failed ({type(error).__name__}: {error}) and was "
                          "never raised: call check_store() on every rank before close()",
                          RuntimeWarning, stacklevel=2)
        self._groups = HookGroups()
        self._finalizer()  # detach_hooks, once
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
            self._finalizer()  # detach_hooks, once
            self.runtime.abandon()

    def _check_usable(self) -> None:
        if self._restored:
            raise RuntimeError("this FlexModel was closed or restored (close(), restore() or the "
                               "end of its with block); wrap the module again to use hooks")

    def extra_repr(self) -> str:
        return f"hook_functions={len(self._handles)}, groups={sorted(self._groups.names())}"

