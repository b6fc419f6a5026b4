"""SurgicalTheater: temporary in-place weight modifications, restored bit-exactly on exit.

Validate every few steps (LoRA, full fine-tuning, RL) or sweep modifications (scale, ablate,
perturb layers) without copying a model that barely fits in memory::

    with SurgicalTheater(model, layers=[0, 1], modification_type="scale", factor=0.5):
        val_loss = evaluate(model)
    # every parameter is now bit-identical to before, in the same storage

How it works: resolve the targets (:mod:`.targets`: module names, glob patterns, block indices
via :mod:`flex_surgery.anatomy`) -> take each parameter's *local* view (:mod:`.shards`; under
FSDP1/FSDP2/fairscale TP/DTensor TP only this rank's shard, no gather) -> snapshot exactly those
elements (:mod:`.snapshot`) -> modify in place (the kinds: :mod:`.modifications`). On exit --
normal, exception or ``KeyboardInterrupt`` -- the snapshots are copied back into the same
storage. Nothing is ever subtracted: ``(w + d) - d != w`` in floating point.

While a theater is active it also guards the training state around validation: module
train/eval flags, ``requires_grad`` flags, CPU/CUDA RNG states and the ``.grad`` of every
parameter are put back on exit (:mod:`.training_guard`); ``state_dict()`` returns the original
weights (:mod:`.checkpoint_guard`, which never writes the live weights); and an
``optimizer.step()`` touching a modified parameter raises instead of training on them
(:mod:`.guard`). PEFT LoRA layers are one linear whose effective weight is modified
(:mod:`.lora`).

A theater entered again reuses the snapshot buffers of its previous entry where the same
parameter has the same shape, dtype and device: a validation loop that enters one theater every
N steps allocates (and page-faults) its snapshots once, not N times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import unwrap_model as unwrap_model
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.failures import LostRankError
from flex_surgery.surgery import agreement
from flex_surgery.surgery.guard import RestoreError as RestoreError
from flex_surgery.surgery.guard import SurgeryError as SurgeryError
from flex_surgery.surgery.guard import install_guards, interrupts_deferred
from flex_surgery.surgery.lora import peel_peft
from flex_surgery.surgery.modifications import MODIFICATION_TYPES as MODIFICATION_TYPES
from flex_surgery.surgery.modifications import NOISE_CHUNK_ELEMENTS as NOISE_CHUNK_ELEMENTS
from flex_surgery.surgery.modifications import Modification
from flex_surgery.surgery.modifications import noise_seed as noise_seed
from flex_surgery.surgery.shards import LocalShard, local_shards, reshard_for_surgery
from flex_surgery.surgery.snapshot import Snapshot, take_snapshot
from flex_surgery.surgery.targets import PARAMETER_SELECTIONS as PARAMETER_SELECTIONS
from flex_surgery.surgery.targets import Edit, LayerSpec, ParamFilter, param_filter, resolve_edits
from flex_surgery.surgery.training_guard import TrainingState
from flex_surgery.surgery.training_guard import all_parameters as _all_parameters  # noqa: F401

# The theater's own objects; the errors (:mod:`.guard`), ``noise_seed`` and the modification
# kinds (:mod:`.modifications`), ``unwrap_model`` and the parameter selections (:mod:`.targets`)
# are importable from here too, as they always were.
__all__ = ["SurgicalTheater", "active_theaters", "surgical_theater"]

_ACTIVE: list[SurgicalTheater] = []


def active_theaters() -> tuple[SurgicalTheater, ...]:
    """The theaters currently entered, outermost first."""
    return tuple(_ACTIVE)


# Added to the autograd version counter of every modified parameter while a theater is active
# (and taken off on exit): the theater writes through ``.data``, which autograd does not see, so
# a graph that saved a weight on one side of the block and ran backward on the other would mix
# modified and original weights without a word. With the counters moved, torch raises its usual
# "modified by an inplace operation" instead; a graph from before the block is valid again after
# it (the weights are bit-identical). Large, so that ordinary in-place ops after the block
# (an optimizer step) cannot bring a counter back to a value a graph inside saved.
_INSIDE_VERSION = 1 << 20


def _set_versions(pairs: Sequence[tuple[torch.Tensor, int]]) -> None:
    """Set autograd version counters (torch's private setter: a sequence API since 2.5, one
    tensor at a time before)."""
    if not pairs:
        return
    setter = torch._C._autograd._unsafe_set_version_counter
    try:
        setter(tuple(t for t, _ in pairs), tuple(v for _, v in pairs))
    except TypeError:
        for t, v in pairs:
            setter(t, v)


def _sync(tensors: Sequence[torch.Tensor]) -> None:
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()


class SurgicalTheater:
    """Context manager that modifies weights in place and restores them bit-exactly on exit.

    Args:
        model: the model (plain, DDP, FSDP1, FSDP2, fairscale TP, DTensor TP, or a FlexModel
            around any of them). Names are those of the unwrapped model.
        layers: what to modify. An ``int`` is a transformer-block index of a known architecture
            (:mod:`flex_surgery.anatomy`; negative counts from the end); a ``str`` is a module
            or parameter name, or a glob pattern over them (``"model.layers.*.mlp"``); a list
            mixes both. ``None`` means the whole model. Unknown names raise ``ValueError`` with
            close matches.
        modification_type: ``"scale"`` (multiply by ``factor``), ``"disable"`` (set to zero),
            ``"noise"`` (add Gaussian noise of std ``noise_scale``), ``"custom"``
            (``modification_fn(tensor, **fn_kwargs)`` returns a delta that is added in place).
            ``None`` with no ``modification_fn`` makes a pure validation guard (nothing is
            modified; flags, RNG, grads, state_dict are still guarded).
        factor, noise_scale: parameters of ``"scale"`` and ``"noise"``.
        modification_fn: the custom function; implies ``modification_type="custom"``. It gets
            this rank's local shard (or, with ``full_parameter=True``, the full parameter) and
            must return a delta of the same shape without modifying its argument.
        seed: noise and custom-function randomness. ``"noise"`` with an int seed adds, to each
            parameter, the noise of CPU generators seeded by ``noise_seed(seed, name, block)``,
            copied to the parameter's device: the same full-weight noise for every layout (one
            process, DDP, FSDP, TP), on CPU and CUDA, on every run.
            With ``seed=None`` a base seed is drawn from torch's global CPU generator on entry
            (the only draw the theater makes; the RNG state is restored to just after it on
            exit, so consecutive theaters draw different noise); on a distributed model every
            rank uses the draw of the model's first rank (:mod:`.agreement`). For ``"custom"``
            with an int seed, the global RNG is seeded with ``noise_seed(seed, name, 0)``
            around each call (on the shard unless ``full_parameter``). The delta must have the
            dtype and device of the function's argument: another one is a ``TypeError`` naming
            the parameter (the theater never casts silently).
        backup: where snapshots live: ``"device"`` (fastest, extra device memory = modified
            local bytes) or ``"cpu"`` (zero extra device memory).
        full_parameter: a custom function that needs the whole parameter (e.g. an SVD) gets it
            gathered (a collective over the ranks sharing the parameter); its delta is then
            cut to this rank's shard. Elementwise functions do not need it.
        params: which parameters of the targeted modules are modified: ``"linear"`` (default:
            the ``weight`` of ``nn.Linear``, GPT-2 ``Conv1D`` and fairscale parallel linears),
            ``"weights"`` (every parameter called ``weight``, norms and embeddings included),
            ``"all"``, or a callable ``(name, module, param_name) -> bool``. A parameter named
            exactly in ``layers`` is always included.
        guard_grads: set every ``.grad`` to ``None`` on entry and put the original gradient
            tensors back on exit, so a backward during validation cannot leak into training.
        keep_snapshots: keep the snapshot buffers after exit and write the next entry's
            snapshots into them (where a parameter's shape, dtype and device are unchanged), so
            entering the same theater every N steps pays copies only, not fresh allocations and
            page faults. The cost: between entries the theater holds ``stats["backup_bytes"]``
            (the modified local bytes, on the device with ``backup="device"``) -- the memory it
            needs while active anyway. :meth:`release_snapshots` frees them; so does dropping
            the theater. ``False`` frees them on every exit.
        **fn_kwargs: passed to ``modification_fn``.

    A PEFT LoRA layer is one linear whose effective weight ``W + B @ A * scaling`` is modified
    (:mod:`flex_surgery.surgery.lora`); PEFT's wrappers are looked through for names.

    Contexts nest and unwind LIFO; entering one that is active, or exiting any but the
    innermost, raises :class:`SurgeryError`. If putting the weights back fails part-way, exit
    raises :class:`RestoreError` and the theater stays active with all its snapshots;
    :meth:`restore` retries. Under parallelism every rank must enter and exit the same theaters
    in the same order: on a distributed model the ranks agree on the outcome of entering and of
    putting the weights back (one small collective each, :mod:`.agreement`), so a failure on
    one rank is raised on every rank, after every rank rolled back.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Sequence[LayerSpec] | None = None,
        modification_type: str | None = None,
        factor: float = 0.9,
        noise_scale: float = 0.01,
        modification_fn: Callable[..., torch.Tensor] | None = None,
        seed: int | None = None,
        backup: str = "device",
        full_parameter: bool = False,
        params: str | ParamFilter = "linear",
        guard_grads: bool = True,
        keep_snapshots: bool = True,
        **fn_kwargs: Any,
    ) -> None:
        modification_type = Modification.check(modification_type, modification_fn, fn_kwargs)
        if backup not in ("device", "cpu"):
            raise ValueError(f"backup must be 'device' or 'cpu', got {backup!r}")
        self.model = model
        self.root = peel_peft(unwrap_model(model))
        self.layers = layers
        self.modification_type = modification_type
        self.factor = factor
        self.noise_scale = noise_scale
        self.modification_fn = modification_fn
        self.seed = seed
        self.backup = backup
        self.full_parameter = full_parameter
        self.params = params
        param_filter(params)  # an unknown selection is an error here, not on entry
        self.guard_grads = guard_grads
        self.fn_kwargs = fn_kwargs
        self._active = False
        self._targets: list[LocalShard] = []  # every view written, parallel to _snapshots
        self._snapshots: list[Snapshot] = []
        self.keep_snapshots = keep_snapshots
        self._kept: dict[str, torch.Tensor] = {}  # parameter name -> buffer of the last entry
        self._shard_at: dict[tuple[int, str], LocalShard] = {}
        self._hooks: list[Any] = []
        self._state: TrainingState | None = None
        self._names: list[str] = []
        self._modules: list[nn.Module] = []
        self._sharded = False
        self._resolved: tuple[tuple, list[Edit]] | None = None  # (model key, edits) of last entry
        self._layout: tuple = ()  # (id, class) of every module at the last entry
        self._modification = Modification(None)
        self._groups: agreement.ModelGroups = ()  # the ranks sharing the model
        self._exit_agrees = True  # whether restore() agrees with the other ranks (see there)
        self._versions: list[tuple[torch.Tensor, int]] = []  # (parameter, version at entry)
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ targets
    def _resolve(self, shards: list[LocalShard]) -> list[Edit]:
        if self.modification_type is None:
            return []
        self._shard_at = {(id(s.module), s.param_name): s for s in shards}
        return resolve_edits(self.root, shards, self.layers, self.params, self._shard_at,
                             with_factors=self.modification_type in ("scale", "disable"))

    def _edits(self) -> list[Edit]:
        """This entry's edits: the last entry's when :meth:`_model_key` is unchanged and they
        were all plain parameters (no LoRA, no shards), else resolved anew.

        Why: resolving walks every module and name and asks the framework registry about every
        parameter; for a ~13M-weight model that costs a third of copying its weights, and a
        validation loop would pay it at every entry for the same answer.
        """
        key = self._model_key()
        if key is not None and self._resolved is not None and self._resolved[0] == key:
            return self._resolved[1]
        edits = self._resolve(local_shards(self.root))  # :mod:`.targets`
        plain = all(e.lora is None and s.kind == "plain" for e in edits for s in e.shards)
        self._resolved = (key, edits) if key is not None and plain else None
        return edits

    def _model_key(self) -> tuple | None:
        """What the resolved edits depend on, in one process: the arguments and, for every
        module, its identity and its parameters' identity, storage, shape and dtype (a module
        or parameter replaced, or ``.data`` reassigned, changes it). The cached edits hold the
        modules and parameters they name, so no identity can be recycled while cached. None
        (never cached) under a process group or with FSDP's unsharded copies."""
        if self._sharded or (dist.is_available() and dist.is_initialized()):
            return None
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        found = [(n, p) for m in self._modules for n, p in m._parameters.items() if p is not None]
        if any(p.layout != torch.strided for _, p in found):
            return None
        params = tuple((id(p), n, p.data_ptr(), p.storage_offset(), p.shape, p.stride(), p.dtype)
                       for n, p in found)
        return (self.modification_type, layers, self.params, self._layout, params)

    # ------------------------------------------------------------ modifications
    def _modify(self, edit: Edit, base_seed: int | None) -> None:
        """Write one edit (:mod:`.modifications`); subclasses apply other kinds here."""
        self._modification.apply(edit, base_seed, self._shard_at)

    # -------------------------------------------------------------------- guard
    def _install_hooks(self) -> None:
        install_guards(self._modules, self._targets, self._snapshots, self._hooks)

    def _remove_hooks(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _reshard(self) -> None:
        if self._sharded:
            reshard_for_surgery(self.root, self._modules)

    # -------------------------------------------------------------- enter / exit
    def __enter__(self) -> SurgicalTheater:
        if self._active:
            raise SurgeryError("this SurgicalTheater is already active; create a new one to "
                               "nest contexts")
        self._exit_agrees = True
        start = time.perf_counter()
        self._modules = list(self.model.modules())
        # Whether FSDP may keep unsharded copies depends on the modules and their classes only
        # (FSDP1 wraps in new modules, FSDP2 changes the class in place): asked once per set.
        layout = tuple((id(m), type(m)) for m in self._modules)
        if layout != self._layout:
            self._layout = layout
            self._sharded = frameworks.keeps_unsharded_copies(self._modules)
        self._modification = Modification(self.modification_type, self.factor, self.noise_scale,
                                          self.modification_fn, self.fn_kwargs, self.seed,
                                          self.full_parameter)
        self._groups = agreement.model_groups(self._modules)
        reused = 0
        try:
            self._state = TrainingState.capture(self._modules, self.guard_grads)
            base_seed = self.seed
            if self.modification_type == "noise" and base_seed is None:
                base_seed = int(torch.randint(0, 2**62, (1,)).item())
                self._state.cpu_rng = torch.get_rng_state()
                if self._groups:  # replicas and shards: the first rank's noise everywhere
                    base_seed = agreement.agree_on_seed(base_seed, self._groups)
            self._reshard()
            edits = self._edits()
            if self._places_by_position():  # noise, masks: never gather, so check here
                frameworks.check_whole([s for edit in edits for s in edit.shards])
            gathers = 0  # agreements before gathers still to come (:func:`.agreement.check_peers`)
            if self._groups and self.modification_type == "custom":
                gathers = agreement.check_peers(self._groups, sum(map(self._communicates, edits)))
            kept, self._kept = self._kept, {}  # each buffer is handed out at most once
            for edit in edits:
                for shard in edit.shards:  # every view an edit writes is saved before it
                    buffer = kept.pop(shard.name, None)
                    self._snapshots.append(take_snapshot(shard.local, self.backup, buffer))
                    reused += self._snapshots[-1].backup is buffer
                    self._targets.append(shard)
                if gathers and self._communicates(edit):
                    agreement.check_peers(self._groups)  # no gather that a failed rank skips
                    gathers -= 1
                self._modify(edit, base_seed)
            del kept  # buffers of parameters not modified this time are freed
            _sync([s.local for s in self._targets])
            self._move_versions()
            self._install_hooks()
            for _ in range(gathers + bool(self._groups)):  # as many as any other rank
                agreement.check_peers(self._groups)
        except BaseException as exc:
            with interrupts_deferred():  # no half-rolled-back theater (see restore())
                exc, error = agreement.settle_failed_entry(exc, self._groups, self._restore_weights)
                if error is None:
                    self._forget()
            if error is not None:
                self._active = True  # what could not be rolled back can be retried: restore()
                _ACTIVE.append(self)
                raise error from exc
            raise exc
        self._active = True
        _ACTIVE.append(self)
        self._names = [s.name for s in self._targets]
        self.stats = {
            "modified_parameters": len(self._targets),
            "modified_elements": sum(s.local.numel() for s in self._targets),
            "modified_bytes": sum(s.local.numel() * s.local.element_size()
                                  for s in self._targets),
            "backup_bytes": sum(s.nbytes for s in self._snapshots),
            "reused_snapshots": reused,
            "backup": self.backup,
            "enter_s": time.perf_counter() - start,
        }
        return self

    def _move_versions(self) -> None:
        """Move the autograd version counter of every modified parameter (see
        ``_INSIDE_VERSION``): a backward through a graph that saved it before the block raises
        inside, and one through a graph saved inside raises after the block."""
        owners = {id(o): o for s in self._targets for o in s.owners}.values()
        self._versions = [(o, o._version) for o in owners]
        _set_versions([(o, v + _INSIDE_VERSION) for o, v in self._versions])

    def _places_by_position(self) -> bool:
        """Whether this theater's edits write values chosen by each element's place in the full
        parameter (seeded noise; masks in :class:`MaskTheater`), so a view taken as whole
        must be checked to be whole."""
        return self.modification_type == "noise"

    def _communicates(self, edit: Edit) -> bool:
        """Whether writing ``edit`` gathers (the full parameter, or sharded LoRA factors)."""
        return self.modification_type == "custom" and (self.full_parameter or
                                                       edit.lora is not None)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        # An exception from the body: the ranks are no longer in step (the others may be in a
        # collective of the body), so an exit agreement could be matched with a peer's body
        # collective and hand it a wrong value. This rank puts its own weights back and leaves.
        self._restore(agree=exc_type is None)
        return False

    def restore(self) -> None:
        """Put every modified element and the guarded state back and leave the context (what
        ``__exit__`` does). If putting the weights back fails part-way, :class:`RestoreError`
        is raised and the theater stays active with all its snapshots and guards: call
        ``restore()`` again to retry -- agreeing with the other ranks only if the failed exit did
        (an exit by an exception from the body agrees with nobody, and neither does its retry:
        the other ranks have left)."""
        self._restore(agree=self._exit_agrees)

    def _restore(self, agree: bool) -> None:
        if not self._active:
            raise SurgeryError("exit of a SurgicalTheater that is not active")
        if _ACTIVE[-1] is not self:
            inner = len(_ACTIVE) - 1 - _ACTIVE.index(self)
            raise SurgeryError(f"SurgicalTheater exited out of order: {inner} context(s) "
                               "entered after it are still active; exit those first (LIFO)")
        self._exit_agrees = agree  # a retry after a RestoreError keeps the failed exit's mode
        start = time.perf_counter()
        # Ctrl-C is held for the whole exit, the agreement of a distributed model's ranks
        # included: a collective blocks it in C++ anyway, and an interrupt landing between the
        # verdict and leaving would strand guards or weights.
        with interrupts_deferred():
            error = self._restore_weights()
            if self._groups and agree:
                try:
                    error = agreement.agree_on_restore(error, self._groups)
                except LostRankError:
                    if error is None:  # this rank's weights are back: leave, then say so
                        self._leave()
                    raise
            if error is not None:
                raise error
            self._leave()
        self.stats["exit_s"] = time.perf_counter() - start

    def _leave(self) -> None:
        self._forget()
        _ACTIVE.pop()
        self._active = False

    def _forget(self) -> None:
        """Once every weight is back (newest first, :meth:`_restore_weights`): drop the
        snapshots (kept as buffers for the next entry), the guards and the guarded state.
        Snapshots are dropped only then, so a failed restore can be run again."""
        if self.keep_snapshots:
            self._kept = {t.name: s.backup for t, s in zip(self._targets, self._snapshots)}
        self._snapshots = []
        self._targets = []
        _set_versions(self._versions)  # graphs saved inside now raise; older ones are valid
        self._versions = []
        self._remove_hooks()
        if self._state is not None:
            self._state.restore()
            self._state = None
        self._modules = []

    def _restore_weights(self) -> RestoreError | None:
        """Copy every snapshot back; the error if that failed part-way (snapshots kept)."""
        name = None
        try:
            self._reshard()  # drop gathered copies that saw the modification
            for shard, snap in zip(reversed(self._targets), reversed(self._snapshots)):
                name = shard.name
                snap.restore()
            name = None
            _sync([s.local for s in self._snapshots])
        except Exception as exc:
            where = f" at {name}" if name else ""
            error = RestoreError(
                f"putting the weights back failed{where} ({type(exc).__name__}: {exc}); every "
                "snapshot is kept and the theater stays active (optimizer and checkpoint "
                "guards included): call restore() on it to retry")
            error.__cause__ = exc
            return error
        return None

    def release_snapshots(self) -> None:
        """Free the snapshot buffers kept for the next entry (``keep_snapshots``) and the
        resolved targets; the next entry allocates and resolves anew. Inside the context the
        current snapshots stay: they are what the exit restores."""
        self._kept = {}
        self._resolved = None

    # --------------------------------------------------------------- reporting
    @property
    def modified_names(self) -> list[str]:
        """Names of the parameters modified by the current (or last) entry."""
        return list(self._names)

    @property
    def modifications_summary(self) -> dict[str, list[str]]:
        """``{modification_type: [parameter names]}`` (SurgicalTheater's original report)."""
        if not self._names:
            return {}
        return {self.modification_type: self.modified_names}


def surgical_theater(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None = None,
                     modification_type: str = "scale", **kwargs: Any) -> SurgicalTheater:
    """Shorthand for ``SurgicalTheater(model, layers, modification_type, **kwargs)``."""
    return SurgicalTheater(model, layers, modification_type, **kwargs)
