"""DTensor parameters: DTensor TP (``parallelize_module``), HF transformers' ``tp_plan``, and
the DTensor storage of FSDP2 (alone or on a 2-D mesh with TP).

Activations: a module whose weight is a DTensor sharded over ``tp`` is a TP layer whose layout
is read from shapes (not exact): weight ``Shard(0)`` (Linear) / ``Shard(1)`` (Embedding) makes
it column-wise -- its output's last dim is sharded when the observed size is this rank's chunk
of the full size; weight ``Shard(1)`` (Linear) makes it row-wise -- its input's last dim is
sharded by the same shape check, its output replicated. Activations that are DTensors carry
their own placements (:func:`flex_surgery.parallel.layout.dtensor_layout`).

Parameters: the local tensor, region given by the placements (a block for ``Shard``, index
lists for ``_StridedShard``); ``full_tensor()`` gathers.

Groups: HF's TP mesh (``model.device_mesh``), else the ``DeviceMesh`` of DTensor parameters
(its root mesh when the TP mesh was sliced from a ``("dp", "tp")`` mesh).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.frameworks.base import (
    HIDDEN,
    ActivationShard,
    Framework,
    TPLayer,
    closure_value,
)
from flex_surgery.parallel.frameworks.views import BlockRegion, IndexRegion, LocalShard

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["DTensorTP", "is_dtensor", "mesh_axis_of"]


def is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def mesh_axis_of(device_mesh, mesh_dim: int, mesh) -> str | None:
    """Which of our axes a DeviceMesh dim is, by comparing the ranks of their groups."""
    ranks = dist.get_process_group_ranks(device_mesh.get_group(mesh_dim))
    for axis, group in mesh.groups.items():
        if group is not None and dist.get_process_group_ranks(group) == ranks:
            return axis
    return None


def _tp_placement(weight: torch.Tensor, mesh):
    """The placement a DTensor weight has over ``tp`` if it splits it (``Shard`` or
    ``_StridedShard``, which is not a ``Shard`` and answers ``is_shard()`` with False), else
    ``None``."""
    from torch.distributed.tensor.placement_types import _StridedShard

    if mesh.tp_size == 1 or not is_dtensor(weight):
        return None
    for i, p in enumerate(weight.placements):
        if (p.is_shard() or isinstance(p, _StridedShard)) and \
                mesh_axis_of(weight.device_mesh, i, mesh) == "tp":
            return p
    return None


def _tp_shard_dim(weight: torch.Tensor, mesh) -> int | None:
    """The tensor dim a DTensor weight is sharded along over ``tp``, if any."""
    placement = _tp_placement(weight, mesh)
    return None if placement is None else placement.dim


class DTensorTP(Framework):
    name = "dtensor"

    def owns(self, module: nn.Module) -> bool:
        return any(is_dtensor(p) for p in module.parameters(recurse=False))

    def tp_layer(self, module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
        from torch.distributed.tensor.placement_types import _StridedShard

        if mesh.tp_size > 1 and _hf_style(module) == "MoeExpertsParallel":
            # HF's moe_tp_experts: replicated hidden states in, each rank's part of every
            # expert summed over tp on the way out (whole); inside, pieces.
            return TPLayer(None, None, exact=True, opaque=True)
        weight = getattr(module, "weight", None)
        shard = _tp_placement(weight, mesh) if weight is not None else None
        sequence_out = _sequence_output(module) if shard is not None else None
        if shard is not None and sequence_out is None and \
                _off_the_hidden_dim(module, _column_like(module, shard.dim)):
            # A style that declares a partial sum, or a split of what the layer returns other
            # than the rules below (RowwiseParallel(output_layouts=Partial()), Shard(0),
            # Shard(-2), a row layer's Shard(-1)): the shapes the rules read cannot tell that
            # split from another, so the layer is undescribed (its activations, and those after
            # it, need a hint).
            return None
        if shard is None or isinstance(shard, _StridedShard):
            # A strided split over tp (interleaved blocks, e.g. a fused projection sharded so
            # each rank holds a slice of every part) does not give each rank one contiguous
            # block of the output: the activations' layout is unknown, so the module is an
            # undescribed split module (splits_parameters) rather than a colwise/rowwise layer.
            return None
        placement = shard.dim
        full = tuple(weight.shape)
        if sequence_out is not None:
            # torch's sequence parallelism (torchtitan's plan): the output hook reduce-scatters
            # (row-wise, embedding) or redistributes (column-wise) what the layer computed onto
            # the sequence dim; each rank returns its torch.chunk of the sequence, whole in
            # the hidden dim. A row-wise layer still takes its input split on the hidden dim.
            takes = ActivationShard(HIDDEN, full[1], sharded=None) \
                if placement == 1 and not isinstance(module, nn.Embedding) else None
            return TPLayer(takes, sequence_out, exact=False)
        if isinstance(module, nn.Embedding):
            # Shard(1): embedding dim split -> output sharded; Shard(0): vocab split -> replicated
            out = ActivationShard(HIDDEN, full[1], sharded=None) if placement == 1 else None
            return TPLayer(None, out, exact=False)
        if placement == 0:  # colwise Linear: weight (out, in) split on out
            return TPLayer(None, ActivationShard(HIDDEN, full[0], sharded=None), exact=False)
        return TPLayer(ActivationShard(HIDDEN, full[1], sharded=None), None, exact=False)

    def sequence_parallel(self, module: nn.Module) -> bool:
        # A torch ParallelStyle that declares a split on dim 0 or 1 (the sequence of [b, s, h]
        # or [s, b, h]): SequenceParallel, ColwiseParallel(input_layouts=Shard(1)), ...
        return any(_non_hidden_shard(p) for p in _declared_placements(module))

    def splits_parameters(self, module: nn.Module, mesh: ParallelMesh | None = None) -> bool:
        # Any parameter sharded over tp, whatever its name: tp_layer reads ``weight`` only, so
        # a module whose split parameter is called otherwise has undescribed activations.
        return mesh is not None and any(_tp_shard_dim(p, mesh) is not None
                                        for p in module.parameters(recurse=False))

    def parameter_shard(self, name: str, module: nn.Module, pname: str,
                        param: nn.Parameter) -> LocalShard | None:
        if not is_dtensor(param):
            return None
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        from torch.distributed.tensor.placement_types import _StridedShard

        local = param._local_tensor
        strided = False
        for p in param.placements:
            if isinstance(p, _StridedShard):
                strided = True
            elif type(p) not in (Shard, Replicate):
                raise NotImplementedError(
                    f"{name}: placement {p} is not supported by surgery (Shard, _StridedShard "
                    "and Replicate are); edit a partial-sum tensor after reducing it")
        if strided:
            region = _strided_region(param)
            shape = tuple(len(i) for i in region.indices)
        else:
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements)
            region = BlockRegion(tuple(offset), tuple(shape))
        if tuple(local.shape) != tuple(shape):  # FSDP2 may pad the local storage
            local = local[tuple(slice(0, s) for s in shape)]
        sharded = [p.dim for p in param.placements if p.is_shard()]
        return LocalShard(
            name=name, aliases=(), local=local, full_shape=param.shape, region=region,
            module=module, param_name=pname, gather=lambda: param.detach().full_tensor(),
            owners=(param,), kind=self.name,
            partition_dim=sharded[0] if len(set(sharded)) == 1 else None,
        )

    def model_tensor_parallel_group(self, model: nn.Module) -> dist.ProcessGroup | None:
        """The ``tp`` group of ``model``'s DTensor parameters, read from their mesh alone (no
        collective; unlike :meth:`groups`, the mesh need not cover the world, as under
        pipeline stages): the dim named ``tp`` (or an alias), or an unnamed 1-D mesh in a model
        without FSDP2; ``None`` when there is none of size > 1."""
        from flex_surgery.parallel.frameworks.fsdp import FSDP2
        from flex_surgery.parallel.mesh import AXIS_NAMES, dtensor_root_meshes

        meshes = {id(m): m for m in dtensor_root_meshes(model)}
        for device_mesh in meshes.values():
            names = device_mesh.mesh_dim_names
            if names is None:
                if device_mesh.ndim == 1 and device_mesh.size(0) > 1 and \
                        not any(FSDP2().owns(m) for m in model.modules()):
                    return device_mesh.get_group(0)
                continue
            for dim, name in enumerate(names):
                if name in AXIS_NAMES["tp"] and device_mesh.size(dim) > 1:
                    return device_mesh.get_group(dim)
        return None

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        from flex_surgery.parallel.frameworks.fsdp import FSDP2
        from flex_surgery.parallel.mesh import (
            ParallelMesh,
            _without_trivial_dims,
            dtensor_root_meshes,
        )

        if model is None:
            return None
        # HF transformers keeps its TP mesh on the model; DDP and FSDP1 keep the device_mesh
        # they were given (data parallel) under the same attribute names: only a transformers
        # model's is a TP mesh.
        hf_mesh = getattr(model, "device_mesh", None) or getattr(model, "_device_mesh", None)
        if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
            hf_mesh = None  # (FSDP2 subclasses the model's class: look through it)
        if hf_mesh is not None and hasattr(hf_mesh, "mesh_dim_names"):
            hf_mesh = _without_trivial_dims(hf_mesh)
            mesh = ParallelMesh.from_device_mesh(hf_mesh, {"tp": hf_mesh.mesh_dim_names[0]}
                                                 if hf_mesh.ndim == 1 and hf_mesh.mesh_dim_names
                                                 else None)
            mesh.source = "hf_tp"
            return mesh
        meshes = dtensor_root_meshes(model)
        if not meshes:
            return None
        device_mesh = max(meshes, key=lambda m: m.ndim)
        if device_mesh.mesh_dim_names is None and device_mesh.ndim == 1:
            fsdp2 = FSDP2()
            axis = "dp" if any(fsdp2.owns(m) for m in model.modules()) else "tp"
            return ParallelMesh.from_device_mesh(device_mesh, {axis: None})
        return ParallelMesh.from_device_mesh(device_mesh)


def _declared_placements(module: nn.Module) -> list:
    """The placements a torch ParallelStyle applied to ``module`` by ``parallelize_module``
    declares for its inputs and outputs (``input_layouts``, ``desired_input_layouts``,
    ``output_layouts``, ``SequenceParallel``'s ``sequence_sharding``). ``distribute_module``
    registers hooks that close over ``input_fn`` / ``output_fn``, partials of the style's
    ``_prepare_input_fn`` / ``_prepare_output_fn`` given those layouts; ``[]`` where none."""
    import functools

    found = []
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        for name in ("input_fn", "output_fn"):
            fn = closure_value(hook, name)
            if isinstance(fn, functools.partial):
                found += _placements_in(fn.args)
        found += _prepared_placements(hook)
    return found


_PREPARED_LAYOUTS = ("input_layouts", "desired_input_layouts", "input_kwarg_layouts",
                     "desired_input_kwarg_layouts", "output_layouts", "desired_output_layouts")


def _prepared_placements(hook) -> list:
    """The placements of a ``PrepareModuleInput`` / ``PrepareModuleOutput`` style whose hook
    is ``hook``: its ``_apply`` registers a lambda over the style itself (``self``), not a
    partial of declared layouts."""
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput

    style = closure_value(hook, "self")
    if not isinstance(style, (PrepareModuleInput, PrepareModuleOutput)):
        return []
    found = []
    for name in _PREPARED_LAYOUTS:
        value = getattr(style, name, None)
        if isinstance(value, dict):
            value = tuple(value.values())
        if value is not None:
            found += _placements_in((value,))
    return found


def _prepares_output(module: nn.Module) -> bool:
    """Whether a ``PrepareModuleOutput`` redistributes what ``module`` returns."""
    from torch.distributed.tensor.parallel import PrepareModuleOutput

    return any(isinstance(closure_value(hook, "self"), PrepareModuleOutput)
               for hook in module._forward_hooks.values())


def _non_hidden_shard(placement) -> bool:
    """A split on any dim but the last: the batch or sequence of an activation (``Shard(0)``,
    ``Shard(1)``, ``Shard(-2)``), or a dim that only the activation's rank could name as the
    hidden one (``Shard(2)``). Only ``Shard(-1)`` is the hidden dim whatever the rank."""
    return placement.is_shard() and placement.dim != -1


def _column_like(module: nn.Module, weight_dim: int) -> bool:
    """Whether the layer computes a piece of the hidden dim of its output (a Linear split on
    its output features, an Embedding on its embedding dim): ColwiseParallel's default output
    layout ``Shard(-1)`` keeps that piece."""
    return weight_dim == (1 if isinstance(module, nn.Embedding) else 0)


def _off_the_hidden_dim(module: nn.Module, column: bool) -> bool:
    """Whether ``module``'s style declares a partial sum anywhere, or a split of what the layer
    returns other than a column layer's piece of the hidden dim (``Shard(-1)``): a row
    layer's reduce-scatter onto the hidden dim, a split on the batch or sequence dim however
    spelled. A split of what it takes is undone by its input hook before the layer runs
    (ColwiseParallel(input_layouts=Shard(1)) still computes on whole rows)."""
    import functools

    if _prepares_output(module):  # what it returns is redistributed again
        return True
    for hook in module._forward_hooks.values():
        fn = closure_value(hook, "output_fn")
        if isinstance(fn, functools.partial) and any(
                p.is_shard() and not (column and p.dim == -1)
                for p in _placements_in(fn.args)):
            return True
    return any(p.is_partial() for p in _declared_placements(module))


def _sequence_output(module: nn.Module) -> ActivationShard | None:
    """What ``module`` returns when its style declares ``Shard(1)`` for its output (the
    sequence of ``[b, s, h]``) and no partial sum anywhere: each rank's piece of the sequence,
    sizes by ``torch.chunk`` (exchanged: the sequence need not divide). ``None`` otherwise,
    and for ``Shard(0)``, which is the batch dim that data parallelism splits too."""
    import functools

    if any(p.is_partial() for p in _declared_placements(module)):
        return None
    for hook in module._forward_hooks.values():
        fn = closure_value(hook, "output_fn")
        if isinstance(fn, functools.partial):
            shards = [p for p in _placements_in(fn.args) if p.is_shard()]
            if shards and all(p.dim == 1 for p in shards):
                return ActivationShard(1, sharded=True, uneven=True)
    return None


def _placements_in(args: tuple) -> list:
    from torch.distributed.tensor.placement_types import Placement

    out = []
    for arg in args:
        out += [p for p in (arg if isinstance(arg, (tuple, list)) else (arg,))
                if isinstance(p, Placement)]
    return out


def _hf_style(module: nn.Module) -> str | None:
    """The class name of the HF transformers tensor-parallel style installed on ``module``
    (``install_forward`` replaces ``module.forward`` by a closure over the style), else
    ``None``."""
    style = closure_value(module.__dict__.get("forward"), "self")
    if style is None or not type(style).__module__.startswith("transformers."):
        return None
    return type(style).__name__


def _strided_region(param) -> IndexRegion:
    """Global indices held locally along each dim, by splitting an ``arange`` per dim with the
    same placements (a local split: ``src_data_rank=None`` communicates nothing)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    indices = []
    for d, size in enumerate(param.shape):
        placements = []
        for p in param.placements:
            if isinstance(p, _StridedShard) and p.dim == d:
                placements.append(_StridedShard(0, split_factor=p.split_factor))
            elif isinstance(p, Shard) and p.dim == d:
                placements.append(Shard(0))
            else:
                placements.append(Replicate())
        ar = torch.arange(size, device=param._local_tensor.device)
        dt = distribute_tensor(ar, param.device_mesh, placements, src_data_rank=None)
        indices.append(dt._local_tensor.clone())
    return IndexRegion(tuple(indices))
