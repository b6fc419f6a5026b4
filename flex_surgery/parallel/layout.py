"""Layout: how one tensor seen by a hook is split across the mesh, inferred from the module.

A :class:`Layout` lists, per mesh axis, either a :class:`ShardSpec` (the tensor is cut along one
dim; the shard sizes may be uneven) or a :class:`PartialSpec` (every rank holds a summand). The
gather order is fixed: ``tp`` first, then ``dp`` -- so the whole tensor ends on the rank whose
coordinates are 0 on every gathered axis.

Inference rules (:class:`LayoutInference`), for the tensor a hook sees:

* **DTensor** (DTensor TP with ``use_local_output=False``, hooks registered before
  ``parallelize_module``): its placements, mapped onto the mesh axes by process group.
* **fairscale TP layers** (exact, from the module's attributes):
  ``ColumnParallelLinear`` output is last-dim sharded unless ``gather_output``; input replicated.
  ``RowParallelLinear`` input is last-dim sharded if ``input_is_parallel``; output replicated.
  ``VocabParallelEmbedding`` and ``ParallelEmbedding`` outputs are replicated (both reduce or
  gather before returning).
* **modules with DTensor TP weights** (``parallelize_module`` with ``use_local_output=True``, HF
  TP): a weight ``Shard(0)`` (Linear) / ``Shard(1)`` (Embedding) makes the layer column-wise: its
  output's last dim is sharded when the observed local size is this rank's chunk of the full
  size; a weight ``Shard(1)`` (Linear) makes it row-wise: its input's last dim is sharded by the
  same shape check; the output is replicated.
* **any other module** takes the layout of the output of the *innermost TP layer that produced
  it*: the TP layer that ran last before the module returned (for ``output``) or started (for
  ``input``), if the observed last-dim size matches that layer's local output size; replicated
  over tp otherwise. A GELU after a ``ColumnParallelLinear`` is sharded; a block ending with a
  ``RowParallelLinear`` is replicated. Gradients take the layout recorded in the last forward.
* **data parallel** (DDP, FSDP1, FSDP2): activations and their gradients are the local
  micro-batch: ``batch_dim`` (0 by default) is sharded over ``dp`` with sizes exchanged at run
  time -- unless ``expected_shape`` gives that dim the local size: then every dp rank holds the
  tensor whole (no batch dim, e.g. rotary tables) and it is replicated over ``dp``. Parameter
  gradients are a partial *average* over ``dp`` (DDP/FSDP average them).
* ``expected_shape`` (the unsharded shape, ``None`` for "any") is checked: dims where the local
  size is smaller than the expected one are sharded (the batch dim over ``dp``, others over
  ``tp``). It decides for modules whose layout comes from shapes; for fairscale TP layers a
  disagreement with the module is an error, as is a shape no layout can explain.

Activation gradients carry ``grad_scale = 1 / dp``: with a loss averaged over the local batch,
the local activation gradient is ``dp`` times the gradient of the global-mean loss that one
process would compute (DDP/FSDP then average parameter gradients over ``dp``). The runtime
multiplies by ``grad_scale`` after gathering and divides by it before scattering an edit back.
Activations carry ``backward_scale = 1 / dp`` for the same reason: the gradient that flows back
*through* an editing function is scaled by it on the way in and by ``dp`` on the way out, so
the editing function (and trainable modules in it) see the one-process gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.mesh import ParallelMesh

__all__ = [
    "Layout", "LayoutError", "LayoutInference", "PartialSpec", "ShardSpec", "TPLayer",
    "chunk_sizes", "dtensor_layout", "fairscale_param_dim", "is_dtensor", "tp_layer",
]

GATHER_ORDER = ("tp", "dp")
ACTIVATION_ROLES = ("output", "input", "grad_output", "grad_input")


class LayoutError(ValueError):
    """The observed shape contradicts the module's sharding or the ``expected_shape`` hint."""


@dataclass(frozen=True)
class ShardSpec:
    """The tensor is cut along ``dim`` over mesh axis ``axis``; ``sizes`` per rank if known."""

    axis: str
    dim: int
    sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PartialSpec:
    """Every rank of ``axis`` holds a summand; ``op`` is ``"sum"`` or ``"avg"``."""

    axis: str
    op: str = "sum"


@dataclass(frozen=True)
class Layout:
    shards: tuple[ShardSpec, ...] = ()
    partials: tuple[PartialSpec, ...] = ()
    grad_scale: float = 1.0
    backward_scale: float = 1.0

    @property
    def is_replicated(self) -> bool:
        return not self.shards and not self.partials

    def spec_for(self, axis: str) -> ShardSpec | PartialSpec | None:
        for s in (*self.shards, *self.partials):
            if s.axis == axis:
                return s
        return None

    def steps(self) -> list[ShardSpec | PartialSpec]:
        """The per-axis operations in gather order (scatter runs them reversed)."""
        return [s for a in GATHER_ORDER if (s := self.spec_for(a)) is not None]

    def global_shape(self, local_shape: Sequence[int]) -> tuple[int | None, ...]:
        """Unsharded shape; ``None`` where a shard's sizes are only known at run time."""
        shape: list[int | None] = list(local_shape)
        for s in self.shards:
            shape[s.dim] = sum(s.sizes) if s.sizes is not None else None
        return tuple(shape)


def chunk_sizes(full: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``torch.chunk(full, parts)`` padded with empty chunks (DTensor's ``Shard`` rule;
    equal to ``full / parts`` when it divides)."""
    step = -(-full // parts)
    return tuple(max(0, min(step, full - i * step)) for i in range(parts))


# -- TP layers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPLayer:
    """What a tensor-parallel layer does to the last dim of its input and output.

    ``*_sharded`` is ``True``/``False`` when the module says so exactly (fairscale), ``None``
    when it must be decided from the observed shape (DTensor weights).
    """

    full_in: int | None
    full_out: int | None
    input_sharded: bool | None
    output_sharded: bool | None
    exact: bool


def tp_layer(module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
    """The TP description of ``module``, or ``None`` if it is not a tensor-parallel layer."""
    fs = _fairscale_layers()
    if fs is not None:
        col, row, vocab_emb, emb = fs
        if isinstance(module, col):
            return TPLayer(module.in_features, module.out_features, False,
                           not module.gather_output, exact=True)
        if isinstance(module, row):
            return TPLayer(module.in_features, module.out_features,
                           module.input_is_parallel, False, exact=True)
        if isinstance(module, (vocab_emb, emb)):
            return TPLayer(None, module.embedding_dim, False, False, exact=True)
    weight = getattr(module, "weight", None)
    placement = _tp_shard_dim(weight, mesh) if weight is not None else None
    if placement is None:
        return None
    full = tuple(weight.shape)
    if isinstance(module, nn.Embedding):
        # Shard(1): embedding dim split -> output sharded; Shard(0): vocab split -> replicated.
        return TPLayer(None, full[1], False, None if placement == 1 else False, False)
    if placement == 0:  # colwise Linear: weight (out, in) split on out
        return TPLayer(full[1], full[0], False, None, exact=False)
    return TPLayer(full[1], full[0], None, False, exact=False)


def _fairscale_layers():
    try:
        from fairscale.nn.model_parallel import layers
    except ImportError:  # pragma: no cover
        return None
    return (layers.ColumnParallelLinear, layers.RowParallelLinear,
            layers.VocabParallelEmbedding, layers.ParallelEmbedding)


def is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def mesh_axis_of(device_mesh, mesh_dim: int, mesh: ParallelMesh) -> str | None:
    """Which of our axes a DeviceMesh dim is, by comparing the ranks of their groups."""
    ranks = dist.get_process_group_ranks(device_mesh.get_group(mesh_dim))
    for axis, group in mesh.groups.items():
        if group is not None and dist.get_process_group_ranks(group) == ranks:
            return axis
    return None


def _tp_shard_dim(weight: torch.Tensor, mesh: ParallelMesh) -> int | None:
    """The tensor dim a DTensor weight is sharded along over ``tp``, if any."""
    if mesh.tp_size == 1 or not is_dtensor(weight):
        return None
    for i, p in enumerate(weight.placements):
        if p.is_shard() and mesh_axis_of(weight.device_mesh, i, mesh) == "tp":
            return p.dim
    return None


def dtensor_layout(t, mesh: ParallelMesh) -> Layout:
    """The layout of a DTensor's local piece, from its placements."""
    shards, partials = [], []
    for i, p in enumerate(t.placements):
        axis = mesh_axis_of(t.device_mesh, i, mesh)
        if p.is_replicate():
            continue
        if axis is None:
            raise LayoutError(f"DTensor mesh dim {i} is not one of the mesh's dp/tp groups")
        if p.is_shard():
            dim = p.dim % t.ndim
            shards.append(ShardSpec(axis, dim, chunk_sizes(t.shape[dim], mesh.size(axis))))
        elif p.is_partial():
            partials.append(PartialSpec(axis, "avg" if p.reduce_op == "avg" else "sum"))
    return Layout(tuple(shards), tuple(partials))


# -- inference -------------------------------------------------------------------------------
class LayoutInference:
    """Infers layouts for hook sites of one model over one mesh (see the module docstring)."""

    def __init__(self, mesh: ParallelMesh, batch_dim: int = 0) -> None:
        self.mesh = mesh
        self.batch_dim = batch_dim
        self._tp: weakref.WeakKeyDictionary[nn.Module, TPLayer | None] = \
            weakref.WeakKeyDictionary()
        # The TP layer that ran last, and its output's tp shard (None: replicated).
        self._current: tuple[int, ShardSpec] | None = None
        self._entry: weakref.WeakKeyDictionary[nn.Module, tuple | None] = \
            weakref.WeakKeyDictionary()
        self._exit: weakref.WeakKeyDictionary[nn.Module, tuple | None] = \
            weakref.WeakKeyDictionary()
        self._handles: list = []

    # The tracker: remembers, per module, the TP layer output state at its entry and exit.
    def watch(self, model: nn.Module) -> None:
        """Track which TP layer ran last, so non-TP modules inherit its output layout."""
        if self.mesh.tp_size == 1:
            return
        for m in model.modules():
            if self.tp_layer(m) is not None:
                self._handles.append(m.register_forward_hook(self._tp_layer_ran))
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave))

    def unwatch(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, module, args):
        self._entry[module] = self._current

    def _leave(self, module, args, output):
        self._exit[module] = self._current

    def _tp_layer_ran(self, module, args, output):
        info = self.tp_layer(module)
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or is_dtensor(out):
            self._current = None
            return
        spec = self._tp_output_shard(info, out)
        self._current = (out.shape[-1], spec) if spec is not None else None

    def tp_layer(self, module: nn.Module) -> TPLayer | None:
        if module not in self._tp:
            self._tp[module] = tp_layer(module, self.mesh)
        return self._tp[module]

    def _tp_sizes(self, full: int) -> tuple[int, ...]:
        return chunk_sizes(full, self.mesh.tp_size)

    def _last_dim_shard(self, sharded: bool | None, full: int | None,
                        local: torch.Tensor) -> ShardSpec | None:
        if full is None or local.ndim == 0 or sharded is False:
            return None
        sizes = self._tp_sizes(full)
        mine = sizes[self.mesh.rank("tp")]
        if sharded is None:  # decide from the observed shape
            sharded = local.shape[-1] == mine and full != mine
        if not sharded:
            return None
        if local.shape[-1] != mine:
            raise LayoutError(f"local last dim {local.shape[-1]} is not this rank's tp shard "
                              f"{mine} of {full}")
        return ShardSpec("tp", local.ndim - 1, sizes)

    def _tp_output_shard(self, info: TPLayer, out: torch.Tensor) -> ShardSpec | None:
        return self._last_dim_shard(info.output_sharded, info.full_out, out)

    def _tp_spec(self, module: nn.Module | None, role: str, local: torch.Tensor,
                 in_forward: bool) -> tuple[ShardSpec | None, bool]:
        """tp shard of an activation, and whether it is known exactly from the module."""
        if self.mesh.tp_size == 1 or module is None:
            return None, False
        info = self.tp_layer(module)
        is_out = role in ("output", "grad_output")
        if info is not None:
            if is_out:
                return self._last_dim_shard(info.output_sharded, info.full_out, local), info.exact
            return self._last_dim_shard(info.input_sharded, info.full_in, local), info.exact
        if in_forward and role in ("output", "input"):
            state = self._current
        else:
            state = (self._exit if is_out else self._entry).get(module)
        if state is None or local.ndim == 0:
            return None, False
        local_size, spec = state
        if local.shape[-1] != local_size:
            return None, False
        return replace(spec, dim=local.ndim - 1), False

    def layout(self, local: torch.Tensor, module: nn.Module | None, role: str,
               parameter: torch.Tensor | None = None,
               expected_shape: Sequence[int | None] | None = None) -> Layout:
        """The layout of ``local``, the tensor a hook on ``module`` sees in ``role``."""
        if is_dtensor(local):
            layout = dtensor_layout(local, self.mesh)
            return self._add_dp(layout, local, role)
        if role == "param_grad":
            return self._param_layout(module, parameter)
        in_forward = role in ("output", "input")
        tp_spec, exact = self._tp_spec(module, role, local, in_forward)
        layout = Layout((tp_spec,) if tp_spec is not None else ())
        if expected_shape is not None:
            hinted = self._from_hint(local, expected_shape)
            if hinted != layout and exact:
                raise LayoutError(
                    f"expected_shape {tuple(expected_shape)} contradicts the layout of "
                    f"{type(module).__name__} ({role}): local shape {tuple(local.shape)} is "
                    f"sharded as {layout}")
            layout = hinted
        return self._add_dp(layout, local, role, expected_shape)

    def _add_dp(self, layout: Layout, local: torch.Tensor, role: str,
                expected_shape: Sequence[int | None] | None = None) -> Layout:
        if self.mesh.dp_size == 1 or layout.spec_for("dp") is not None:
            return layout
        if role not in ACTIVATION_ROLES or local.ndim == 0:
            return layout
        dim = self.batch_dim % local.ndim
        if expected_shape is not None and expected_shape[dim] == local.shape[dim]:
            return layout  # every dp rank holds it whole (no batch dim): replicated over dp
        scale = 1.0 / self.mesh.dp_size
        grad_role = role.startswith("grad")
        return Layout(layout.shards + (ShardSpec("dp", dim),), layout.partials,
                      grad_scale=scale if grad_role else 1.0,
                      backward_scale=1.0 if grad_role else scale)

    def _from_hint(self, local: torch.Tensor, expected: Sequence[int | None]) -> Layout:
        """tp shards read off an ``expected_shape`` hint (the dp batch dim is added later)."""
        if len(expected) != local.ndim:
            raise LayoutError(f"expected_shape {tuple(expected)} has {len(expected)} dims, the "
                              f"tensor {local.ndim}")
        shards = []
        batch = self.batch_dim % local.ndim if local.ndim else None
        for d, (have, want) in enumerate(zip(local.shape, expected)):
            if want is None or have == want:
                continue
            if d == batch and self.mesh.dp_size > 1:
                continue
            sizes = chunk_sizes(want, self.mesh.tp_size)
            if self.mesh.tp_size == 1 or have != sizes[self.mesh.rank("tp")]:
                raise LayoutError(f"local shape {tuple(local.shape)} cannot be a shard of "
                                  f"expected_shape {tuple(expected)} (dim {d})")
            shards.append(ShardSpec("tp", d, sizes))
        if len(shards) > 1:
            raise LayoutError(f"expected_shape {tuple(expected)}: more than one dim would be "
                              f"sharded over tp")
        return Layout(tuple(shards))

    def _param_layout(self, module: nn.Module | None, parameter: torch.Tensor | None) -> Layout:
        shards: tuple[ShardSpec, ...] = ()
        if module is not None and parameter is not None and self.mesh.tp_size > 1:
            dim = fairscale_param_dim(module, parameter)
            if dim is not None:
                full = parameter.shape[dim] * self.mesh.tp_size
                shards = (ShardSpec("tp", dim, self._tp_sizes(full)),)
        partials = (PartialSpec("dp", "avg"),) if self.mesh.dp_size > 1 else ()
        return Layout(shards, partials)


def fairscale_param_dim(module: nn.Module, parameter: torch.Tensor) -> int | None:
    """The dim along which a fairscale TP layer's parameter is split (None: replicated)."""
    fs = _fairscale_layers()
    if fs is None:
        return None
    col, row, vocab_emb, emb = fs
    if isinstance(module, col):
        return 0
    if isinstance(module, row):
        return 1 if parameter is module.weight else None
    if isinstance(module, vocab_emb):
        return 0
    if isinstance(module, emb):
        return 1
    return None

