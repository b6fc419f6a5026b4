"""HookFunction: what one hook reads or edits, and the path of one hook call.

A :class:`HookFunction` names a module (or, for gradient hooks, a parameter), optionally an
editing function, and which tensor of the hooked value to work on. Registering it with a
:class:`~flex_surgery.hooks.wrapper.FlexModel` binds it to one hook kind and to the model's
runtime; from then on every call of the PyTorch hook takes the same short path::

    unpack the tensor (unpack.py)
      -> no editing function: runtime.retrieve stores a detached copy of the whole tensor;
         return None, PyTorch keeps the value untouched
      -> runtime.gather_for_edit -> runtime.retrieve_gathered (the same whole tensor, stored
         before editing) -> runtime.run_on_leader(editing function + checks)
      -> runtime.scatter_from_edit -> repack
      (replicate_edit: the whole tensor is gathered to every rank, every rank runs the editing
      function on it and keeps its own piece: no scatter)

Everything a call needs (the :class:`~flex_surgery.parallel.runtime.HookSite`, the output key,
the store callback) is computed once at registration, so a call does no name lookups, and a
disabled hook returns after reading one attribute.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from flex_surgery.hooks.errors import ShapeMismatchError, UnpackError, check_edit_result
from flex_surgery.hooks.unpack import unpack, unpack_inputs
from flex_surgery.parallel.pipeline import is_metadata_pass
from flex_surgery.parallel.runtime import (
    HookSite,
    LocalRuntime,
    Runtime,
    defer,
    store_copy,
    stores_pending,
)
from flex_surgery.parallel.site_tags import HookSiteMismatchError
from flex_surgery.store.hooks import host_copies_landed, store_call
from flex_surgery.store.reduce import apply_reduce, check_reduce_input, resolve_reduce

EditingFunction = Callable[[nn.Module, torch.Tensor, SimpleNamespace, nn.ModuleDict],
                           torch.Tensor]


# What ``output_key(..., by_hook_kind=True)`` appends to the name, per hook kind.
KIND_SUFFIXES = {"forward": "", "forward_pre": ":input", "full_backward": ":grad_input",
                 "full_backward_pre": ":grad_output", "tensor": ":grad"}

# What ``output_dict`` keeps per key: every call's tensor in a list, or the latest call's.
KEEP_MODES = ("all", "last")


def output_key(module_name: str, hook_type: str, by_hook_kind: bool = False) -> str:
    """Key of ``output_dict`` under which a hook stores what it sees.

    By default the name the hook was registered with, for every hook kind, as in FlexModel
    0.1.0: hooks of several kinds on one module then share one entry, in call order. With
    ``by_hook_kind`` the kinds other than forward append the role of the tensor they see, so
    they never share: ``name:input`` (forward-pre), ``name:grad_input`` (full backward),
    ``name:grad_output`` (full backward-pre), ``name:grad`` (parameter gradient).
    """
    if hook_type not in KIND_SUFFIXES:
        raise ValueError(f"unknown hook type {hook_type!r}; choose from {tuple(KIND_SUFFIXES)}")
    return module_name + KIND_SUFFIXES[hook_type] if by_hook_kind else module_name


def shape_matches(shape: Sequence[int], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e is None or e == s for s, e in zip(shape, expected))


def check_expected_shape(shape: Sequence[int], expected: tuple[int | None, ...] | None,
                         owner: object) -> None:
    """Raise if ``shape`` disagrees with ``expected`` (``None`` entries match any size)."""
    if expected is not None and not shape_matches(shape, expected):
        raise ShapeMismatchError(
            f"{owner!r}: the whole tensor has shape {tuple(shape)} but expected_shape is "
            f"{expected} (None matches any size)"
        )


# A forward hook that fires while autograd runs a backward is activation checkpointing
# recomputing the forward: the value was stored when the forward ran, so it is not stored
# again, but edits are applied again so the recomputed forward matches the original one.
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


@dataclass
class SharedState:
    """What every hook of one FlexModel shares: where to store, the save context, modules."""

    output_dict: dict[str, Any] | None
    save_ctx: SimpleNamespace
    modules: nn.ModuleDict
    keep: str = "all"  # one of KEEP_MODES
    binding: Any = None  # a StoreBinding when FlexModel was given store=
    batch_dim: int = 0  # the activation dim data parallelism splits (for reduce=)
    #: Modules whose (input, output) batch dims are not ``batch_dim`` (Megatron's token ids
    #: and logits are batch-first in a ``[s, b, h]`` model): ``frameworks.batch_dims``.
    batch_dims: dict = field(default_factory=dict)

    @property
    def output_ptr(self) -> dict[str, Any] | None:
        """FlexModel 0.1.0's name for :attr:`output_dict`."""
        return self.output_dict

    def batch_dim_of(self, site: Any) -> int:
        """The batch dim of the tensor a hook at ``site`` sees (what ``reduce=`` reduces)."""
        dims = self.batch_dims.get(site.module) if site is not None else None
        if dims is None:
            return self.batch_dim
        return dims[0 if site.role in ("input", "grad_input") else 1]


def pure_edit(editing_function: EditingFunction) -> EditingFunction:
    """Declare an editing function pure, so that :class:`HookFunction` runs it on every rank
    (``replicate_edit``) instead of on one rank and scattering its result.

    Pure means: the result depends only on the arguments, identically on every rank -- no
    randomness drawn from a rank's own generator, no side effect that must happen once (writing
    to ``save_ctx``, counting calls). Returns the function itself, marked::

        @pure_edit
        def zero(module, tensor, ctx, modules):
            return torch.zeros_like(tensor)
    """
    editing_function.replicate_edit = True
    return editing_function


class HookFunction:
    """Read and optionally edit one tensor of one module (or one parameter's gradient).

    Args:
        module_name: dotted name of the module in the wrapped model, as in
            ``named_modules()``; for :meth:`FlexModel.register_hook` the dotted name of a
            parameter (``"model.layers.0.mlp.up_proj.weight"``).
        expected_shape: shape of the *whole* (unsharded) tensor; ``None`` entries match any
            size. Optional: layouts come from the model; this only checks them, and a
            disagreement raises :class:`~flex_surgery.hooks.errors.ShapeMismatchError`. Checked
            at every call, on every rank, before anything is gathered (distributed: the ranks
            first agree on the layout and the whole shape, one small all-gather per call).
        editing_function: ``fn(current_module, tensor, save_ctx, modules) -> tensor``. It gets
            the whole tensor (autograd-connected) and returns a tensor of the same shape and
            dtype that replaces it. ``current_module`` is the hooked module (for parameter
            hooks, the module owning the parameter); ``save_ctx`` a namespace shared by every
            hook across calls; ``modules`` the model's trainable modules.
        unpack_idx: which tensor of the hooked value to work on, counting only tensor leaves
            in pytree order (see :mod:`flex_surgery.hooks.unpack`).
        reduce: store a statistic of the whole tensor instead of the tensor:
            ``"mean_over_batch"``, ``"last_token"`` or a callable (see ``docs/store.md``).
        replicate_edit: the editing function is pure -- its result depends only on its
            arguments, the same on every rank (no rank-local randomness, no side effects that
            must happen once). Then every rank all-gathers the whole tensor, runs the function
            on its own copy and keeps its own piece: no scatter, no broadcast of the result
            (the ranks only agree, in one small all-reduce, that none failed). ``None`` (the
            default) reads the function's own ``replicate_edit`` attribute (set by
            :func:`pure_edit`), else ``False``: the function runs once, on the edit leader, and
            the result is scattered. Ignored in one process; the leader path is taken while
            trainable modules are registered (only the leader computes their gradients).
    """

    def __init__(
        self,
        module_name: str,
        expected_shape: Sequence[int | None] | None = None,
        editing_function: EditingFunction | None = None,
        unpack_idx: int = 0,
        reduce: Any = None,
        replicate_edit: bool | None = None,
    ) -> None:
        if not isinstance(module_name, str):
            raise TypeError(f"module_name must be a str, got {type(module_name).__name__}")
        if expected_shape is not None:
            expected_shape = tuple(expected_shape)
            if not all(d is None or (isinstance(d, int) and d >= 0) for d in expected_shape):
                raise ValueError(f"expected_shape entries must be ints >= 0 or None, got "
                                 f"{expected_shape}")
        if editing_function is not None and not callable(editing_function):
            raise TypeError(f"editing_function must be callable, got "
                            f"{type(editing_function).__name__}")
        if isinstance(unpack_idx, bool) or not isinstance(unpack_idx, int) or unpack_idx < 0:
            raise ValueError(f"unpack_idx must be an int >= 0, got {unpack_idx!r}")
        if replicate_edit is None:
            replicate_edit = bool(getattr(editing_function, "replicate_edit", False))
        if not isinstance(replicate_edit, bool):
            raise TypeError(f"replicate_edit must be a bool or None, got {replicate_edit!r}")
        self.replicate_edit = replicate_edit
        self.module_name = module_name
        self.expected_shape: tuple[int | None, ...] | None = expected_shape
        self.editing_function = editing_function
        self.unpack_idx = unpack_idx
        self.reduce = resolve_reduce(reduce)

        # Bound by FlexModel at registration (see _bind); cleared by _unbind.
        self.hook_type: str | None = None
        self.output_key: str | None = None
        self._site: HookSite | None = None
        self._runtime: Runtime | None = None
        self._shared: SharedState | None = None
        self._owner: weakref.ref | None = None
        self._local = False  # bound to a one-process runtime (see _local_call)
        self._store_in_run = False  # some rank of the FlexModel's run has a store=
        self._enabled = True

    def __repr__(self) -> str:
        kind = self.hook_type or "unregistered"
        edit = "" if self.editing_function is None else ", editing"
        return f"HookFunction({self.module_name!r}, {kind}{edit})"

    @property
    def is_registered(self) -> bool:
        return self.owner is not None

    @property
    def owner(self) -> object | None:
        """The FlexModel this hook function is registered with (``None`` when unregistered,
        or when that FlexModel was dropped)."""
        return None if self._owner is None else self._owner()

    @property
    def _shared_state(self) -> SharedState | None:
        """FlexModel 0.1.0's name for what the hooks of one FlexModel share: ``output_ptr``
        (the ``output_dict``), ``save_ctx`` and ``modules`` (the trainable modules), the same
        objects as the FlexModel's. ``None`` until registered (and for a hook of another
        pipeline stage)."""
        return self._shared

    # -- binding (called by FlexModel) -----------------------------------------------------

    def _bind(self, owner: object, hook_type: str, key: str, site: HookSite, runtime: Runtime,
              shared: SharedState) -> None:
        # A weak reference: PyTorch's hook dicts hold this HookFunction, and a strong one would
        # keep the FlexModel alive as long as the model, so its finalizer could never run.
        self._owner = weakref.ref(owner)
        self.hook_type = hook_type
        self.output_key = key
        self._site = site
        self._runtime = runtime
        self._shared = shared
        # The short path skips the runtime's methods: only for LocalRuntime itself, so that a
        # subclass overriding them (to count, log or redirect) is still asked.
        self._local = type(runtime) is LocalRuntime
        # The same on every rank (agreed when the FlexModel was built): decides how a failed
        # reduction reaches every rank (see _reduce_then_store).
        self._store_in_run = bool(getattr(owner, "_store_in_run", False))
        self._enabled = True

    def _bind_remote(self, owner: object, hook_type: str, key: str) -> None:
        """Registered for a module that lives on another pipeline stage: it never fires here
        (the owning stage runs it), but counts as registered and can join groups."""
        self._owner = weakref.ref(owner)
        self.hook_type = hook_type
        self.output_key = key
        self._site = self._runtime = self._shared = None
        self._local = False
        self._enabled = True

    @property
    def is_remote(self) -> bool:
        """Registered for a module of another pipeline stage (see :meth:`_bind_remote`)."""
        return self.owner is not None and self._site is None

    def _unbind(self) -> None:
        self._owner = None
        self.hook_type = None
        self.output_key = None
        self._site = self._runtime = self._shared = None
        self._local = False
        self._enabled = True

    def torch_hook(self) -> Callable[..., Any]:
        """The callable to hand to PyTorch's registration function for this hook kind."""
        return {
            "forward": self._forward_hook,
            "forward_pre": self._forward_pre_hook,
            "full_backward": self._full_backward_hook,
            "full_backward_pre": self._full_backward_pre_hook,
            "tensor": self._tensor_hook,
        }[self.hook_type]

    # -- the PyTorch hooks: select the hooked value, return a replacement or None ----------

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._enabled:
            return None
        store = _current_graph_task_id() == -1
        if store and self._local and isinstance(output, Tensor) and not self.unpack_idx:
            # One process, a bare tensor (linear layers, norms, MLPs): nothing to unpack.
            return self._local_call(output, None, True)
        return self._call(output, store=store)

    def _forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        # Registered with with_kwargs=True: a module called as attn(hidden_states=h) still has
        # its tensor found; tensors of args come first, then those of kwargs.
        if not self._enabled:
            return None
        return self._call((args, kwargs), store=_current_graph_task_id() == -1, inputs=True)

    def _full_backward_hook(self, module: nn.Module, grad_input: tuple,
                            grad_output: tuple) -> Any:
        if not self._enabled:
            return None
        if self.unpack_idx >= sum(isinstance(g, torch.Tensor) for g in grad_input):
            # torch hands a full backward hook the gradients of the module's *positional*
            # tensor inputs that require grad, and nothing for keyword arguments
            raise UnpackError(
                f"{self!r}: the full_backward hook's grad_input holds "
                f"{sum(isinstance(g, torch.Tensor) for g in grad_input)} tensor(s), and "
                f"unpack_idx={self.unpack_idx}: torch passes the gradients of the module's "
                f"positional tensor inputs that require grad only, none for keyword arguments "
                f"(Megatron's TransformerLayer takes hidden_states=...). Hook the gradient of "
                f"what the module returns (register_full_backward_pre_hook), or the input of "
                f"its first sub-module")
        return self._call(grad_input)

    def _full_backward_pre_hook(self, module: nn.Module, grad_output: tuple) -> Any:
        return self._call(grad_output) if self._enabled else None

    def _tensor_hook(self, grad: torch.Tensor | None) -> Any:
        # None: autograd calls a parameter's hooks with no gradient when it reached the
        # parameter only through an output the loss does not use (DDP with
        # find_unused_parameters marks such outputs); one process has nothing to store either
        return self._call(grad) if self._enabled and grad is not None else None

    # -- one hook call ---------------------------------------------------------------------

    def _call(self, value: Any, store: bool = True, inputs: bool = False) -> Any:
        """One hook call on ``value`` (``(args, kwargs)`` when ``inputs``).

        ``store=False`` for a forward re-run by activation checkpointing. An error raised
        inside a backward leaves the model's data-parallel wrappers ready for the next
        iteration (:meth:`~flex_surgery.parallel.runtime.Runtime.abandon_backward`).
        """
        try:
            return self._hook_call(value, store, inputs)
        except BaseException as exc:
            # Every error of a hook call but a site mismatch is agreed by all ranks at this
            # same call; a mismatch means the ranks are at different points
            runtime = self._runtime
            if runtime is not None and _current_graph_task_id() != -1:
                runtime.abandon_backward(ranks_apart=isinstance(exc, HookSiteMismatchError))
            raise

    def _hook_call(self, value: Any, store: bool, inputs: bool) -> Any:
        if self.editing_function is None and not store:
            return None
        if inputs:
            tensor, repack = unpack_inputs(*value, self.unpack_idx, self)
        else:
            tensor, repack = unpack(value, self.unpack_idx, self)
        if self._local:
            return self._local_call(tensor, repack, store)
        if is_metadata_pass(tensor):  # a pipeline stage's shape inference: not a real call
            return None
        runtime, site = self._runtime, self._site
        if self.expected_shape is not None:
            # Every call, on every rank, before anything is gathered: the whole shape is agreed
            # by all ranks (uneven data-parallel batches differ from call to call), so a
            # mismatch raises everywhere at this call and nothing of it is stored.
            check_expected_shape(runtime.whole_shape(tensor, site), self.expected_shape, self)
        # Retrieval is a collective: every rank takes part even if its own output_dict is None
        # (a rank that keeps nothing), or the storing rank would wait for it forever.
        storing = store and (self._shared.output_dict is not None
                             or self._shared.binding is not None
                             or not isinstance(runtime, LocalRuntime))
        if storing and self.reduce is not None:
            # From the dims and batch dim every rank shares: a reduction that cannot apply
            # raises on every rank here, before anything is gathered.
            check_reduce_input(self.reduce, tensor.ndim, self._shared.batch_dim_of(site), self)
        if self.editing_function is None:
            if storing and self.reduce is not None and \
                    getattr(runtime, "store_on", "rank0") == "rank0":
                self._reduce_then_store(tensor, site)
            elif storing and self._reduces_apart():
                # Each storing rank reduces its own copy, at this call: agreed here.
                into = self._target()
                runtime.run_everywhere(site, "the reduce=", lambda: runtime.retrieve(
                    tensor, site, partial(self._store, into=into)))
            elif storing:  # where to store is bound now: an overlapped retrieval stores at
                # the end of the forward, when this hook may have been removed already
                runtime.retrieve(tensor, site, partial(self._store, into=self._target()))
            return None
        full, ctx = runtime.gather_for_edit(tensor, site, everywhere=self.replicate_edit)
        failed: list[Exception] = []  # a reduction of the stored copy that raised (no store=)
        if storing:  # one gather serves both storing and editing
            runtime.retrieve_gathered(full, ctx, partial(self._store, failed=failed),
                                      keeps=self._shared.output_dict is not None
                                      or self._shared.binding is not None)
            if self._reduces_apart():  # ranks other than the leader reduced: agreed first
                runtime.run_everywhere(site, "the reduce=", partial(_raise_first, failed))
        # The outcome of the editing function is agreed by every rank; a failed reduction on
        # the rank that runs it is raised there, so it is agreed with it.
        edited = runtime.run_on_leader(ctx, partial(self._edit_unless, failed, full))
        return repack(runtime.scatter_from_edit(edited, ctx))

    def _reduces_apart(self) -> bool:
        """Whether ranks other than the edit leader run this hook's ``reduce=`` at the call, on
        their own copies (``store_on`` ``"all"`` or ``"replica_leaders"``, no store): a
        reduction that fails on some of them only must then be agreed (the same answer on
        every rank: the FlexModel's settings)."""
        return self.reduce is not None and not self._store_in_run and \
            getattr(self._runtime, "store_on", "rank0") != "rank0"

    def _local_call(self, tensor: torch.Tensor, repack: Any, store: bool) -> Any:
        """One process: the tensor is the whole tensor, nothing to gather or scatter -- the same
        steps as the runtime path without the calls into the runtime (a hook on every module of
        a large model makes this path hot). ``repack=None``: the hooked value was the tensor."""
        if is_metadata_pass(tensor):  # a pipeline stage's shape inference: not a real call
            return None
        if self.expected_shape is not None:
            check_expected_shape(tensor.shape, self.expected_shape, self)
        shared = self._shared
        if store and (shared.output_dict is not None or shared.binding is not None):
            if self.reduce is not None:
                check_reduce_input(self.reduce, tensor.ndim, shared.batch_dim_of(self._site),
                                   self)
            if self.reduce is not None and self.editing_function is None:
                # reduce first: only the reduction is copied
                self._store(self._reduced_copy(tensor.detach(), shared.batch_dim_of(self._site)),
                            reduced=True)
            else:  # before editing: the editing function may edit in place
                self._store(store_copy(tensor))
        if self.editing_function is None:
            return None
        edited = self._edit(tensor, True)
        return edited if repack is None else repack(edited)

    def _reduce_then_store(self, tensor: torch.Tensor, site: HookSite) -> None:
        """``reduce=`` with one storing rank: gather the whole tensor to it, reduce it where it
        lives (on the device), and copy only the reduction to the host.

        The reduction runs on the storing rank alone, so a failure (a callable that raises or
        returns no tensor) must reach the other ranks, which go on into the forward's next
        collectives. With a store in the run it is a failure of the store: kept by
        :func:`~flex_surgery.store.hooks.store_call` and raised as ``StoreError`` on every rank
        at the end of the forward. Without one (``output_dict``) there is no such later point:
        the ranks agree on the outcome at this call, as on an editing function's
        (``run_on_leader``: ``RemoteEditError`` on every rank). Which of the two is decided
        from ``_store_in_run``, the same on every rank.
        """
        batch_dim = self._shared.batch_dim_of(site)
        with torch.no_grad():
            full, ctx = self._runtime.gather_to_leader(tensor, site)
            if not self._store_in_run:
                reduced = self._runtime.run_on_leader(
                    ctx, partial(self._reduce, full, batch_dim), what="the reduce=")
                if full is not None:  # the storing rank
                    self._store(store_copy(reduced), reduced=True)
            elif full is not None and (self._shared.binding is not None
                                       or self._shared.output_dict is not None):
                self._store(self._reduced_copy(full.detach(), batch_dim), reduced=True)

    def _reduce(self, full: torch.Tensor, batch_dim: int) -> torch.Tensor:
        try:
            return apply_reduce(self.reduce, full, batch_dim)
        except Exception as error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"raised by the reduce= of {self!r}")
            raise

    def _reduced_copy(self, full: torch.Tensor, batch_dim: int) -> torch.Tensor | Exception:
        """The reduction of ``full`` copied to the host; with a store, the exception it raised
        instead (the store path keeps it and raises it on every rank, see ``store_call``)."""
        try:
            return store_copy(self._reduce(full, batch_dim))
        except Exception as error:
            if self._shared.binding is None:  # one process, output_dict: raised at the call
                raise
            return error

    def _edit_unless(self, failed: list[Exception], full: torch.Tensor) -> torch.Tensor:
        """The editing function, unless the reduction of the stored copy failed: then that
        failure, raised where the function runs, so every rank agrees on it."""
        if failed:
            raise failed.pop(0)
        return self._edit(full)

    def _target(self) -> tuple[Any, str, int]:
        """Where this call's value goes: the FlexModel's shared state, the output key and the
        value's batch dim, as they are while the hook fires (removing the hook unbinds them)."""
        return self._shared, self.output_key, self._shared.batch_dim_of(self._site)

    def _store(self, full: torch.Tensor | Exception, rows: Any = None, reduced: bool = False,
               into: tuple[Any, str, int] | None = None,
               failed: list[Exception] | None = None) -> None:
        """Store ``full`` (or, with a store, the exception producing it raised: a failure of
        this call, see ``store_call``), behind any retrieval of this pass still in flight.

        Without a store the reduction runs now, at the hook call, where a failure can still be
        agreed with the other ranks: it is appended to ``failed`` (the caller raises it where
        every rank learns of it), or raised when ``failed`` is ``None``."""
        into = into if into is not None else self._target()
        shared, _, batch_dim = into
        if not reduced and self.reduce is not None and shared.binding is None and \
                shared.output_dict is not None:
            host_copies_landed(full)
            try:
                full = self._reduce(full, batch_dim)
            except Exception as error:
                if failed is None:
                    raise
                failed.append(error)
                return
            reduced = True
        if stores_pending():  # behind a retrieval of this pass still in flight (overlap)
            defer(partial(self._store_now, full, rows, reduced, into), stores=True)
        else:
            self._store_now(full, rows, reduced, into)

    def _store_now(self, full: torch.Tensor, rows: Any, reduced: bool,
                   into: tuple[Any, str, int]) -> None:
        shared, key, batch_dim = into
        reduce = None if reduced else self.reduce
        if shared.binding is not None:
            store_call(shared.binding, key, full, reduce, batch_dim, rows)
            return
        if shared.output_dict is None:  # this rank takes part but keeps nothing
            return
        if isinstance(full, Exception):  # a store= was dropped since (cannot happen in a hook)
            raise full
        if reduce is not None:  # output_dict given after this call was deferred
            full = apply_reduce(self.reduce, full, batch_dim)
        if shared.keep == "last":
            shared.output_dict[key] = full
        else:
            shared.output_dict.setdefault(key, []).append(full)

    def _edit(self, full: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """Run the editing function on the whole tensor and check what it returns.

        ``checked``: ``full`` is the tensor whose shape the call has already checked against
        ``expected_shape`` (one process). What the function returns is checked by one fast
        comparison; :func:`check_edit_result` says what is wrong only when it fails.
        """
        shape, dtype = full.shape, full.dtype
        if not checked:
            check_expected_shape(shape, self.expected_shape, self)
        shared = self._shared
        try:
            result = self.editing_function(self._site.module, full, shared.save_ctx,
                                           shared.modules)
        except Exception as error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"raised by the editing function of {self!r}")
            raise
        # Compared with the shape and dtype ``full`` had *before* the call: an in-place op
        # returns its input with another shape or dtype (``unsqueeze_``, ``t_``, ``.data =``),
        # so the input itself is no proof that the contract holds. (Its device is not
        # compared: only ``.data =`` or ``set_`` can move the same tensor object.)
        if not (isinstance(result, Tensor) and result.shape == shape and result.dtype is dtype
                and (result is full or result.device == full.device)):
            check_edit_result(self, result, shape, dtype, full.device)  # raises: what is wrong
        return result


def _raise_first(failed: list[Exception]) -> None:
    """Raise the first failure this rank met, if any (inside an agreement)."""
    if failed:
        raise failed.pop(0)
