"""Parameters through the registry: this rank's in-place view of each, its whole value, and
the check that a parameter no framework owns really is the same on every tensor-parallel rank.

Surgery's shard views and ``full_parameter``, ``FlexModel.get_module_parameter`` and export's
whole weights all read parameters through here (re-exported by
:mod:`flex_surgery.parallel.frameworks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import StageBlockNames, clean_name, join_name
from flex_surgery.parallel.frameworks.base import differs_across
from flex_surgery.parallel.frameworks.dtensor import is_dtensor
from flex_surgery.parallel.frameworks.megatron import MegatronLayoutError
from flex_surgery.parallel.frameworks.registry import (
    DTENSOR,
    FAIRSCALE,
    FSDP_1,
    HOW_TO_DECLARE,
    MEGATRON,
    TENSOR_PARALLEL,
    UnknownLayoutError,
    unknown_sharding,
)
from flex_surgery.parallel.frameworks.views import LocalShard, plain_shard

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["check_whole", "full_parameter", "parameter_view", "parameter_views",
           "split_unknown_modules", "tensor_parallel_group", "tp_grad_partial_op",
           "tp_partition_dim"]


def tp_partition_dim(module: nn.Module, parameter: torch.Tensor) -> int | None:
    """The dim ``module``'s ``parameter`` is split along over ``tp`` by a framework that splits
    parameters of plain tensors (fairscale, Megatron); ``None`` when it is not. Raises
    :class:`MegatronLayoutError` for a split it cannot map (``partition_stride > 1``)."""
    pname = next((n for n, p in module._parameters.items() if p is parameter), None)
    if pname is None:
        return None
    for framework in (MEGATRON, FAIRSCALE):
        dim = framework.partition_dim(module, pname, parameter)
        if dim is not None:
            return dim
    return None


def tp_grad_partial_op(module: nn.Module, parameter: torch.Tensor,
                       name: str = "") -> str | None:
    """How the gradient of ``module``'s replicated ``parameter`` is reduced over ``tp`` by its
    framework after backward (``"sum"``/``"avg"``; ``None``: whole on every rank; see
    ``Framework.grad_partial_op``). ``name``: ``module``'s name in the model."""
    pname = next((n for n, p in module._parameters.items() if p is parameter), None)
    if pname is None:
        return None
    return next((op for f in TENSOR_PARALLEL
                 if (op := f.grad_partial_op(module, pname, parameter, name)) is not None),
                None)


def tensor_parallel_group(mesh: ParallelMesh | None = None,
                          model: nn.Module | None = None) -> dist.ProcessGroup | None:
    """The tensor-parallel group replicated parameters are checked over: the mesh's, else the
    one a running framework set up (Megatron, fairscale), else the ``tp`` axis of ``model``'s
    DTensor parameters (``parallelize_module``, HF TP: no global state says it); ``None`` when
    there is none."""
    if mesh is not None:
        return mesh.group("tp") if mesh.tp_size > 1 else None
    found = next((g for f in TENSOR_PARALLEL if (g := f.tensor_parallel_group()) is not None),
                 None)
    if found is None and model is not None:
        found = DTENSOR.model_tensor_parallel_group(model)
    return found


def _is_plain(module: nn.Module, pname: str, param: torch.Tensor) -> bool:
    """Whether no framework owns ``module.<pname>`` (a parameter Megatron refuses to map is
    owned all the same: it is split, only not in a way flex_surgery handles)."""
    if is_dtensor(param):
        return False
    try:
        return all(f.partition_dim(module, pname, param) is None for f in (MEGATRON, FAIRSCALE))
    except MegatronLayoutError:
        return False


def _plain_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The floating-point parameters of ``module`` itself that no framework owns, in
    registration order (the same on every rank)."""
    return [p.data for n, p in module._parameters.items()
            if p is not None and p.is_floating_point() and _is_plain(module, n, p)]


def _checked_plain(name: str, module: nn.Module, pname: str, param: nn.Parameter,
                   tp_group: dist.ProcessGroup | None) -> LocalShard:
    """A view of a parameter no framework owns; its ``gather`` checks that its *module* is
    replicated over ``tp_group`` and raises :class:`UnknownLayoutError` otherwise.

    The verdict is per module, as :func:`split_unknown_modules`' is: a hand-cut column shard
    whose bias starts at zero has equal biases on every rank, yet the bias is this rank's piece
    of a longer one -- if any plain parameter of the module differs, none of them is whole.
    """
    why = unknown_sharding(module)
    if why is not None:
        raise UnknownLayoutError(f"cannot tell whether {name} is whole: {why}")
    local = param.data
    if tp_group is None:
        return plain_shard(name, module, pname, param)

    def gather() -> torch.Tensor:
        siblings = _plain_parameters(module)
        if not any(t is local for t in siblings):
            siblings.append(local)
        if any(differs_across(siblings, tp_group)):
            raise UnknownLayoutError(
                f"parameter {name!r} of module {type(module).__name__}: the module's "
                f"parameters differ across the tensor-parallel ranks, but no framework says "
                f"how it is split, so the full value of {name!r} is unknown; {HOW_TO_DECLARE}")
        return local

    view = plain_shard(name, module, pname, param, gather=gather)
    view.replicated_over = tp_group
    return view


def check_whole(shards: Sequence[LocalShard]) -> None:
    """Raise :class:`UnknownLayoutError` on every rank if a view in ``shards`` that claims to
    hold its whole parameter (no framework owns it) belongs to a module whose parameters differ
    across the tensor-parallel ranks.

    ``gather`` checks this, but edits that place values by their position in the full
    parameter (seeded noise, masks) never gather: without this, each rank would write the
    first rows of the noise or mask into its own hand-cut piece. One collective for all of
    them, over their group; every rank passes the same views in the same order (a
    :class:`SurgicalTheater` resolves the same edits everywhere), and an empty list or no
    tensor-parallel group communicates nothing.
    """
    checked = [s for s in shards if s.replicated_over is not None]
    if not checked:
        return
    modules: dict[int, tuple[LocalShard, list[torch.Tensor]]] = {}
    for shard in checked:
        if id(shard.module) not in modules:
            siblings = _plain_parameters(shard.module)
            if not any(t is shard.local for t in siblings):
                siblings.append(shard.local)
            modules[id(shard.module)] = (shard, siblings)
    tensors = [t for _, siblings in modules.values() for t in siblings]
    differs = iter(differs_across(tensors, checked[0].replicated_over))
    for shard, siblings in modules.values():
        if any([next(differs) for _ in siblings]):
            raise UnknownLayoutError(
                f"parameter {shard.name!r} of module {type(shard.module).__name__}: the "
                f"module's parameters differ across the tensor-parallel ranks, but no framework "
                f"says how it is split, so where its elements sit in the full parameter is "
                f"unknown; {HOW_TO_DECLARE}")


def parameter_view(name: str, module: nn.Module, pname: str, param: nn.Parameter,
                   tp_group: dist.ProcessGroup | None = None) -> LocalShard:
    """This rank's in-place view of one parameter that lives on its module."""
    for framework in TENSOR_PARALLEL:
        view = framework.parameter_shard(name, module, pname, param)
        if view is not None:
            return view
    return _checked_plain(name, module, pname, param, tp_group)


def parameter_views(model: nn.Module, tp_group: dist.ProcessGroup | None = None,
                    ) -> list[LocalShard]:
    """Every original parameter of ``model`` once (tied ones once, with their aliases), in the
    same order on every rank, as this rank's in-place view.

    ``tp_group``: the group over which parameters no framework owns must be replicated (their
    ``gather`` checks it); default :func:`tensor_parallel_group`.
    """
    if tp_group is None:
        tp_group = tensor_parallel_group(model=model)
    shards, handled = FSDP_1.model_shards(model)
    by_param: dict[int, LocalShard] = {id(o): s for s in shards for o in s.owners}
    whole = StageBlockNames(model)  # a pipeline stage's blocks by whole-model names
    for mname, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None or (id(module), pname) in handled:
                continue
            name = whole(clean_name(join_name(mname, pname)))
            seen = by_param.get(id(param))
            if seen is not None:
                if name not in seen.names:
                    seen.aliases = (*seen.aliases, name)
                continue
            view = parameter_view(name, module, pname, param, tp_group)
            by_param[id(param)] = view
            shards.append(view)
    return shards


def full_parameter(model: nn.Module, name: str, parameter: torch.Tensor,
                   owner_module: nn.Module | None, tp_group: dist.ProcessGroup | None,
                   ) -> torch.Tensor:
    """The whole of one parameter (collective over the ranks that share it).

    Under FSDP1 the parameter lives in a flat parameter, found by its wrapper-free name; else
    the owning module's framework says how it is split. A parameter no framework owns must be
    the same on every rank of ``tp_group`` (checked), or :class:`UnknownLayoutError` is raised.
    """
    if is_dtensor(parameter):  # DTensor TP, HF TP, FSDP2 (and FSDP2 x TP)
        return parameter.detach().full_tensor()
    if fsdp1_root(model) is not None:
        wanted = clean_name(name)
        for view in parameter_views(model, tp_group):
            if wanted in view.names:
                return view.gather()
        raise KeyError(f"no parameter {name!r} in the FSDP model")
    if owner_module is None:
        raise ValueError(f"the module holding {name!r} is needed to tell how it is split")
    leaf = name.rpartition(".")[2]
    return parameter_view(clean_name(name), owner_module, leaf, parameter, tp_group).gather()


def split_unknown_modules(model: nn.Module, tp_group: dist.ProcessGroup | None,
                          ) -> dict[str, nn.Module]:
    """Modules no framework owns whose parameters differ across the ranks of ``tp_group``
    (by name). Collective over ``tp_group``: every rank calls it on the same model.

    Only parameters no framework owns are looked at (no framework view is built), so a model
    with a parameter a framework refuses to map can still be hooked where that parameter is
    not involved."""
    if tp_group is None:
        return {}
    _, handled = FSDP_1.model_shards(model)
    seen: set[int] = set()
    candidates: list[tuple[str, nn.Module, torch.Tensor]] = []
    for mname, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None or (id(module), pname) in handled or id(param) in seen:
                continue
            seen.add(id(param))
            if param.is_floating_point() and _is_plain(module, pname, param):
                full = clean_name(join_name(mname, pname))
                candidates.append((full.rpartition(".")[0], module, param.data))
    differs = differs_across([local for _, _, local in candidates], tp_group)
    found: dict[str, nn.Module] = {}
    for (name, module, _), d in zip(candidates, differs):
        if d:
            found.setdefault(name, module)
    return found


def fsdp1_root(model: nn.Module) -> nn.Module | None:
    """The outermost FSDP1 unit of ``model``, if any."""
    return next((m for m in model.modules() if FSDP_1.owns(m)), None)
