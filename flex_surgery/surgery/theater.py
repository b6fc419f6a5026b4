"""SurgicalTheater: temporary in-place weight modifications, restored bit-exactly on exit.

Validate every few steps (LoRA, full fine-tuning, RL) or sweep modifications (scale, ablate,
perturb layers) without copying a model that barely fits in memory::

    with SurgicalTheater(model, layers=[0, 1], modification_type="scale", factor=0.5):
        val_loss = evaluate(model)
    # every parameter is now bit-identical to before, in the same storage

How it works: resolve the targets (:mod:`.targets`: module names, glob patterns, block indices
via :mod:`flex_surgery.anatomy`) -> take each parameter's *local* view (:mod:`.shards`; under
FSDP1/FSDP2/fairscale TP/DTensor TP only this rank's shard, no gather) -> snapshot exactly those
elements (:mod:`.snapshot`) -> modify in place. On exit -- normal, exception or
``KeyboardInterrupt`` -- the snapshots are copied back into the same storage. Nothing is ever
subtracted: ``(w + d) - d != w`` in floating point.

While a theater is active it also guards the training state around validation: module
train/eval flags, ``requires_grad`` flags, CPU/CUDA RNG states and the ``.grad`` of every
parameter are put back on exit (:mod:`.training_guard`); ``state_dict()`` returns the original
weights (:mod:`.checkpoint_guard`, which never writes the live weights); and an
``optimizer.step()`` touching a modified parameter raises instead of training on them. PEFT
LoRA layers are one linear whose effective weight is modified (:mod:`.lora`).
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from flex_surgery.parallel import frameworks
from flex_surgery.surgery.checkpoint_guard import install_checkpoint_guard
from flex_surgery.surgery.lora import adapter_delta, peel_peft
from flex_surgery.surgery.shards import LocalShard, local_shards, reshard_for_surgery
from flex_surgery.surgery.snapshot import Snapshot, take_snapshot
from flex_surgery.surgery.targets import (
    PARAMETER_SELECTIONS,
    Edit,
    LayerSpec,
    ParamFilter,
    param_filter,
    resolve_edits,
)
from flex_surgery.surgery.training_guard import TrainingState
from flex_surgery.surgery.training_guard import all_parameters as _all_parameters  # noqa: F401

__all__ = [
    "MODIFICATION_TYPES",
    "PARAMETER_SELECTIONS",
    "NOISE_CHUNK_ELEMENTS",
    "Edit",
    "RestoreError",
    "SurgeryError",
    "SurgicalTheater",
    "active_theaters",
    "noise_seed",
    "surgical_theater",
    "unwrap_model",
]

MODIFICATION_TYPES = ("scale", "disable", "noise", "custom")

# Seeded noise is generated in blocks of whole dim-0 rows of at most this many elements, each
# block from its own CPU generator seeded by (seed, parameter name, block index) and copied to
# the parameter's device. A rank generates only the blocks that overlap its shard, so the
# transient memory is one block, and every layout of the same parameter -- on CPU or CUDA --
# receives the same full-weight noise.
NOISE_CHUNK_ELEMENTS = 1 << 16

_ACTIVE: list[SurgicalTheater] = []


class SurgeryError(RuntimeError):
    """Misuse of a theater: re-entering, exiting out of order, stepping a modified parameter."""


class RestoreError(SurgeryError):
    """Putting the weights back failed part-way (e.g. a device error). The theater keeps every
    snapshot and stays active; :meth:`SurgicalTheater.restore` retries."""


def active_theaters() -> tuple[SurgicalTheater, ...]:
    """The theaters currently entered, outermost first."""
    return tuple(_ACTIVE)


def noise_seed(seed: int, name: str, chunk: int) -> int:
    """The generator seed of noise block ``chunk`` of parameter ``name`` (a stable 63-bit hash,
    the same in every process and on every run)."""
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel wrappers that add a name prefix (DDP's ``module.``, FlexModel's ``module.``), so
    that parameter names -- and with them seeded noise -- are the same with or without them."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "FlexModel" and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT while weights are being put back, then deliver it.

    A Ctrl-C in the middle of the restore loop would leave half the model modified; the restore
    is a sequence of memcpys, so delaying the interrupt by that long is harmless.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


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
            exit, so consecutive theaters draw different noise); ranks then agree only if their
            global generators agree -- pass a seed under parallelism. For ``"custom"`` with an
            int seed, the global RNG is seeded with ``noise_seed(seed, name, 0)`` around each
            call (on the shard unless ``full_parameter``). The delta must have the dtype and
            device of the function's argument: another one is a ``TypeError`` naming the
            parameter (the theater never casts silently).
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
        **fn_kwargs: passed to ``modification_fn``.

    A PEFT LoRA layer is one linear whose effective weight ``W + B @ A * scaling`` is modified
    (:mod:`flex_surgery.surgery.lora`); PEFT's wrappers are looked through for names.

    Contexts nest and unwind LIFO; entering one that is active, or exiting any but the
    innermost, raises :class:`SurgeryError`. If putting the weights back fails part-way, exit
    raises :class:`RestoreError` and the theater stays active with all its snapshots;
    :meth:`restore` retries. Under parallelism every rank must enter and exit the same theaters
    in the same order (``full_parameter`` gathers are collectives).
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
        **fn_kwargs: Any,
    ) -> None:
        if modification_type is None and modification_fn is not None:
            modification_type = "custom"
        if modification_type is not None and modification_type not in MODIFICATION_TYPES:
            raise ValueError(f"modification_type must be one of {MODIFICATION_TYPES} or None, "
                             f"got {modification_type!r}")
        if modification_type == "custom" and modification_fn is None:
            raise ValueError("modification_type='custom' needs modification_fn")
        if modification_fn is not None and modification_type != "custom":
            raise ValueError(f"modification_fn is only used with 'custom', not "
                             f"{modification_type!r}")
        if backup not in ("device", "cpu"):
            raise ValueError(f"backup must be 'device' or 'cpu', got {backup!r}")
        if fn_kwargs and modification_type != "custom":
            raise TypeError(f"unexpected arguments {sorted(fn_kwargs)} (only passed to a "
                            "custom modification_fn)")
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
        self._shard_at: dict[tuple[int, str], LocalShard] = {}
        self._hooks: list[Any] = []
        self._state: TrainingState | None = None
        self._names: list[str] = []
        self._modules: list[nn.Module] = []
        self._sharded = False
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ targets
    def _resolve(self, shards: list[LocalShard]) -> list[Edit]:
        if self.modification_type is None:
            return []
        self._shard_at = {(id(s.module), s.param_name): s for s in shards}
        return resolve_edits(self.root, shards, self.layers, self.params, self._shard_at,
                             with_factors=self.modification_type in ("scale", "disable"))

    # ------------------------------------------------------------ modifications
    def _modify(self, edit: Edit, base_seed: int | None) -> None:
        kind = self.modification_type
        if kind == "scale":
            for s in edit.shards:
                s.local.mul_(self.factor)
        elif kind == "disable":
            for s in edit.shards:
                s.local.zero_()
        elif kind == "noise":
            self._add_noise(edit.shard, edit.name, base_seed)
        elif kind == "custom":
            self._add_custom(edit)

    def _add_noise(self, shard: LocalShard, name: str, base_seed: int | None) -> None:
        """Add this rank's part of the full-shape noise of parameter ``name``: block ``k`` of
        whole rows drawn in fp32 by a CPU generator seeded with ``noise_seed(seed, name, k)``,
        scaled, copied to the parameter's device and added (so CPU and CUDA agree)."""
        shape = shard.full_shape
        n_rows = shape[0] if len(shape) else 1
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        rows_per_chunk = max(1, NOISE_CHUNK_ELEMENTS // max(row_numel, 1))
        first, last = shard.region.row_range(shape)
        local = shard.local
        gen = torch.Generator(device="cpu")
        for chunk in range(first // rows_per_chunk, -(-last // rows_per_chunk)):
            row0 = chunk * rows_per_chunk
            n = min(rows_per_chunk, n_rows - row0)
            gen.manual_seed(noise_seed(base_seed, name, chunk))
            rows = torch.randn((n, *shape[1:]), generator=gen, dtype=torch.float32)
            rows.mul_(self.noise_scale)
            shard.region.add_rows(local, rows.to(local.device), row0)

    def _add_custom(self, edit: Edit) -> None:
        shard = edit.shard
        local = shard.local
        # The adapters' part of a LoRA layer's effective weight (gathers: before any return).
        adapters = adapter_delta(edit.lora, self._shard_at) if edit.lora is not None else None
        if self.full_parameter:
            arg, expected, where = shard.gather(), shard.full_shape, "the parameter"
        elif local.numel() == 0:
            return  # this rank holds none of the parameter (FSDP1 flat shards)
        else:
            arg, expected, where = local, local.shape, "the local shard it got"
        if adapters is not None:  # as PEFT merges: the delta in the weight's dtype, added
            part = adapters if self.full_parameter else shard.region.take(adapters)
            arg = arg + part.to(device=arg.device, dtype=arg.dtype)
        with torch.random.fork_rng(devices=[arg.device] if arg.is_cuda else []):
            if self.seed is not None:
                torch.manual_seed(noise_seed(self.seed, edit.name, 0))
            delta = self.modification_fn(arg, **self.fn_kwargs)
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(expected):
            got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta)
            hint = ("" if self.full_parameter else
                    "; it got this rank's shard -- pass full_parameter=True for the whole "
                    "parameter")
            raise ValueError(f"modification_fn must return a delta of shape {tuple(expected)} "
                             f"for {edit.name}, got {got}{hint}")
        if delta.dtype != arg.dtype or delta.device != arg.device:
            raise TypeError(
                f"modification_fn for {edit.name} returned a delta of {delta.dtype} on "
                f"{delta.device}, but {where} is {arg.dtype} on {arg.device}; the theater never "
                "casts silently: return a delta like its argument (e.g. delta.to(p))"
            )
        if self.full_parameter:
            delta = shard.region.take(delta)
        local.add_(delta.detach())

    # -------------------------------------------------------------------- guard
    def _install_hooks(self) -> None:
        """The optimizer guard (a global step pre-hook) and the checkpoint guard; every handle
        is kept as soon as it exists, so a failure part-way leaves none bound."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        modified = {id(o) for s in self._targets for o in s.owners}
        names = {id(o): s.name for s in self._targets for o in s.owners}

        def refuse_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in modified:
                        raise SurgeryError(
                            f"optimizer.step() inside an active SurgicalTheater would train "
                            f"modified weights ({names[id(p)]}); step after the context exits"
                        )

        if modified:
            self._hooks.append(register_optimizer_step_pre_hook(refuse_step))
        if self._snapshots:
            self._hooks.extend(install_checkpoint_guard(self._modules, self._targets,
                                                        self._snapshots, SurgeryError))

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
        start = time.perf_counter()
        self._modules = list(self.model.modules())
        self._sharded = frameworks.keeps_unsharded_copies(self._modules)
        self._state = TrainingState.capture(self._modules, self.guard_grads)
        try:
            base_seed = self.seed
            if self.modification_type == "noise" and base_seed is None:
                base_seed = int(torch.randint(0, 2**62, (1,)).item())
                self._state.cpu_rng = torch.get_rng_state()
            self._reshard()
            edits = self._resolve(local_shards(self.root))  # :mod:`.targets`
            for edit in edits:
                for shard in edit.shards:  # every view an edit writes is saved before it
                    self._snapshots.append(take_snapshot(shard.local, self.backup))
                    self._targets.append(shard)
                self._modify(edit, base_seed)
            _sync([s.local for s in self._targets])
            self._install_hooks()
        except BaseException:
            try:
                with _interrupts_deferred():
                    self._unwind()
            except RestoreError:
                self._active = True  # what could not be rolled back can be retried: restore()
                _ACTIVE.append(self)
                raise
            raise
        self._active = True
        _ACTIVE.append(self)
        self._names = [s.name for s in self._targets]
        self.stats = {
            "modified_parameters": len(self._targets),
            "modified_elements": sum(s.local.numel() for s in self._targets),
            "modified_bytes": sum(s.local.numel() * s.local.element_size()
                                  for s in self._targets),
            "backup_bytes": sum(s.nbytes for s in self._snapshots),
            "backup": self.backup,
            "enter_s": time.perf_counter() - start,
        }
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.restore()
        return False

    def restore(self) -> None:
        """Put every modified element and the guarded state back and leave the context (what
        ``__exit__`` does). If putting the weights back fails part-way, :class:`RestoreError`
        is raised and the theater stays active with all its snapshots and guards: call
        ``restore()`` again to retry."""
        if not self._active:
            raise SurgeryError("exit of a SurgicalTheater that is not active")
        if _ACTIVE[-1] is not self:
            inner = len(_ACTIVE) - 1 - _ACTIVE.index(self)
            raise SurgeryError(f"SurgicalTheater exited out of order: {inner} context(s) "
                               "entered after it are still active; exit those first (LIFO)")
        start = time.perf_counter()
        with _interrupts_deferred():
            self._unwind()
            _ACTIVE.pop()
            self._active = False
        self.stats["exit_s"] = time.perf_counter() - start

    def _unwind(self) -> None:
        """Put every saved element back (newest first), then the guarded state. Snapshots are
        dropped only once all of them are back: a failed restore can be run again."""
        self._restore_weights()
        self._snapshots = []
        self._targets = []
        self._remove_hooks()
        if self._state is not None:
            self._state.restore()
            self._state = None
        self._modules = []

    def _restore_weights(self) -> None:
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
            raise RestoreError(
                f"putting the weights back failed{where} ({type(exc).__name__}: {exc}); every "
                "snapshot is kept and the theater stays active (optimizer and checkpoint "
                "guards included): call restore() on it to retry"
            ) from exc

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
