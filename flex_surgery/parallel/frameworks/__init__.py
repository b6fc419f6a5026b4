"""The framework registry: one module per parallelism framework, one place to ask.

Activation layouts (:mod:`flex_surgery.parallel.layout`), surgery's shard views and
``full_parameter`` (:mod:`flex_surgery.surgery.shards`), ``FlexModel.get_module_parameter``,
export's whole weights, the hook map and mesh adoption (:mod:`flex_surgery.parallel.mesh`) all
ask the functions here; none of them imports a framework's classes. Each framework answers the
protocol of :class:`~flex_surgery.parallel.frameworks.base.Framework`:

==============  ===============================================================================
module          framework
==============  ===============================================================================
``megatron``    Megatron-core ``tensor_parallel`` layers, ``LanguageModelEmbedding``,
                ``parallel_state`` groups
``fairscale``   fairscale ``model_parallel`` layers and state
``dtensor``     DTensor parameters: DTensor TP, HF ``tp_plan``, FSDP2 storage; DeviceMesh groups
``fsdp``        FSDP1 flat parameters and FSDP2 modules (wrappers, resharding)
``ddp``         DistributedDataParallel (wrapper, data-parallel group)
==============  ===============================================================================

Unknown means error: a parameter no framework owns is replicated only if it *is* the same on
every tensor-parallel rank -- :func:`split_unknown_modules` checks that (one collective), and a
full parameter of such a module raises :class:`UnknownLayoutError` naming it instead of
returning this rank's piece. The verdict is per module: if one of its plain parameters differs,
none of them is whole (a zero-initialised bias of a hand-cut shard is equal on every rank).
A module a framework splits but does not describe (:func:`undescribed_split_modules`) has
activations of unknown layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.parallel.frameworks.base import HIDDEN as HIDDEN
from flex_surgery.parallel.frameworks.base import SEQUENCE as SEQUENCE
from flex_surgery.parallel.frameworks.base import ActivationShard as ActivationShard
from flex_surgery.parallel.frameworks.base import Framework, LayoutError, differs_across
from flex_surgery.parallel.frameworks.base import TPLayer as TPLayer
from flex_surgery.parallel.frameworks.ddp import DDP
from flex_surgery.parallel.frameworks.dtensor import DTensorTP, is_dtensor
from flex_surgery.parallel.frameworks.dtensor import mesh_axis_of as mesh_axis_of
from flex_surgery.parallel.frameworks.fairscale import FairscaleTP
from flex_surgery.parallel.frameworks.fsdp import FSDP1, FSDP2
from flex_surgery.parallel.frameworks.megatron import MegatronCore
from flex_surgery.parallel.frameworks.megatron import MegatronLayoutError as MegatronLayoutError
from flex_surgery.parallel.frameworks.views import BlockRegion as BlockRegion
from flex_surgery.parallel.frameworks.views import FlatRegion as FlatRegion
from flex_surgery.parallel.frameworks.views import IndexRegion as IndexRegion
from flex_surgery.parallel.frameworks.views import LocalShard, plain_shard
from flex_surgery.parallel.frameworks.views import Region as Region

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

# Defined here; the protocol's types live in .base and .views (importable from here too).
__all__ = [
    "FRAMEWORKS", "UnknownLayoutError", "adopt_groups", "batch_dim", "batch_dims",
    "first_input_only", "fsdp1_root", "tp_layers_within",
    "full_parameter", "keeps_unsharded_copies", "owner", "parameter_view", "parameter_views",
    "reshard", "sequence_parallel", "split_unknown_modules", "substitutes_parameters",
    "tensor_parallel_group", "tp_grad_is_partial", "tp_layer", "tp_partition_dim",
    "undescribed_split_modules", "wrapper_kind",
]

MEGATRON, FAIRSCALE, DTENSOR = MegatronCore(), FairscaleTP(), DTensorTP()
FSDP_1, FSDP_2, DDP_ = FSDP1(), FSDP2(), DDP()

#: Every registered framework. Order matters where two could answer: frameworks that say
#: exactly how a module is split (from its attributes) come before those read from shapes.
FRAMEWORKS: tuple[Framework, ...] = (MEGATRON, FAIRSCALE, DTENSOR, FSDP_1, FSDP_2, DDP_)
#: The tensor-parallel frameworks, in the order layouts and shard views are asked.
TENSOR_PARALLEL: tuple[Framework, ...] = (MEGATRON, FAIRSCALE, DTENSOR)
#: The order running groups are adopted in.
GROUP_SOURCES: tuple[Framework, ...] = (DTENSOR, MEGATRON, FAIRSCALE, DDP_, FSDP_1)

HOW_TO_DECLARE = (
    "declare the layout: give the hook an explicit expected_shape (the unsharded shape), or "
    "build the module from a supported tensor-parallel framework (fairscale, Megatron-core, "
    "DTensor / parallelize_module); see docs/architecture.md, 'Adding a framework'")


class UnknownLayoutError(LayoutError):
    """flex_surgery cannot tell how a tensor is split across ranks, and does not guess."""


# Signs of a parameter-sharding system no framework module describes: DeepSpeed ZeRO-3 leaves
# each parameter an empty placeholder carrying these attributes; wrappers whose class names say
# they shard (Megatron's own FSDP, DeepSpeed engines, a future torch FSDP) but that no framework
# module owns. Matched by name so that asking never imports those libraries.
_FOREIGN_SHARDED_PARAM_ATTRS = ("ds_id", "ds_numel", "ds_tensor")
_FOREIGN_WRAPPER_NAME = re.compile(r"FullyShard|FSDP|ZeRO|DeepSpeed")


def unknown_sharding(module: nn.Module) -> str | None:
    """Why flex_surgery cannot tell how ``module``'s parameters are sharded, or ``None``.

    Read from the module alone (class name, parameter attributes), so every rank gives the
    same answer without a collective."""
    for pname, param in module._parameters.items():
        attrs = [a for a in _FOREIGN_SHARDED_PARAM_ATTRS if hasattr(param, a)]
        if attrs:
            return (f"its parameter {pname!r} carries {attrs} (DeepSpeed ZeRO-3 partitioning), "
                    "which no framework module of flex_surgery maps")
    cls = type(module)
    if _FOREIGN_WRAPPER_NAME.search(cls.__name__) and wrapper_kind(module) is None and \
            not FSDP_1.owns(module) and not FSDP_2.owns(module):
        return (f"it is a {cls.__module__}.{cls.__qualname__}, a sharding wrapper no framework "
                "module describes")
    return None


def check_known_sharding(model: nn.Module) -> None:
    """Raise :class:`UnknownLayoutError` naming the first module of ``model`` whose parameter
    sharding no framework module describes (see :func:`unknown_sharding`)."""
    for name, module in model.named_modules():
        why = unknown_sharding(module)
        if why is not None:
            raise UnknownLayoutError(
                f"cannot tell how {clean_name(name) or 'the model'} is sharded: {why}; its "
                "activations, gradients and whole parameters would be guesses. Unwrap it, or "
                "use a supported wrapper (DDP, FSDP1, FSDP2); to teach flex_surgery a new one "
                "see docs/architecture.md, 'Adding a framework'")


# -- activations -------------------------------------------------------------------------------
def owner(module: nn.Module) -> Framework | None:
    """The tensor-parallel framework ``module`` belongs to, if any."""
    return next((f for f in TENSOR_PARALLEL if f.owns(module)), None)


def tp_layer(module: nn.Module, mesh: ParallelMesh) -> TPLayer | None:
    """How ``module`` splits its activations over ``tp`` (``None``: not a TP layer)."""
    for framework in TENSOR_PARALLEL:
        answer = framework.tp_layer(module, mesh)
        if answer is not None:
            return answer
    return None


def undescribed_split_modules(model: nn.Module, mesh: ParallelMesh) -> dict[str, nn.Module]:
    """Modules of ``model`` (by name) whose parameters a tensor-parallel framework splits but
    whose activations it does not describe: Transformer-Engine linears, MoE ``GroupedMLP``,
    any layer built with Megatron's ``set_tensor_model_parallel_attributes``. What they
    return is this rank's piece of something whose split nothing says, so their activations
    (and those after them) are errors unless declared. No collective: read from the modules.
    """
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        framework = owner(m)
        if framework is not None and framework.splits_parameters(m) and \
                tp_layer(m, mesh) is None:
            found[name] = m
    return found


def sequence_parallel(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs sequence parallelism."""
    return any(f.sequence_parallel(m) for m in model.modules() for f in TENSOR_PARALLEL)


def batch_dim(model: nn.Module) -> int:
    """The activation dim data parallelism splits: 1 for Megatron (``[s, b, h]``), else 0."""
    for m in model.modules():
        for f in TENSOR_PARALLEL:
            answer = f.batch_dim(m)
            if answer is not None:
                return answer
    return 0


def tp_layers_within(model: nn.Module) -> dict[nn.Module, TPLayer]:
    """Modules of ``model`` whose split a tensor-parallel layer around them declares (see
    ``Framework.tp_layers_within``)."""
    found: dict[nn.Module, TPLayer] = {}
    for f in TENSOR_PARALLEL:
        found.update(f.tp_layers_within(model))
    return found


def first_input_only(module: nn.Module) -> bool:
    """Whether only the first input tensor of ``module`` has a batch dim its framework can tell
    (see ``Framework.first_input_only``)."""
    return any(f.first_input_only(module) for f in TENSOR_PARALLEL)


def batch_dims(model: nn.Module) -> dict[nn.Module, tuple[int, int]]:
    """``(input, output)`` batch dims of the modules whose batch is not on
    :func:`batch_dim` (see ``Framework.batch_dims``)."""
    found: dict[nn.Module, tuple[int, int]] = {}
    for f in TENSOR_PARALLEL:
        found.update(f.batch_dims(model))
    return found


# -- parameters --------------------------------------------------------------------------------
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


def tp_grad_is_partial(module: nn.Module, parameter: torch.Tensor) -> bool:
    """Whether the gradient of ``module``'s replicated ``parameter`` is a per-rank summand over
    ``tp`` until the framework reduces it (see ``Framework.grad_is_partial``)."""
    pname = next((n for n, p in module._parameters.items() if p is parameter), None)
    return pname is not None and any(f.grad_is_partial(module, pname, parameter)
                                     for f in TENSOR_PARALLEL)


def tensor_parallel_group(mesh: ParallelMesh | None = None) -> dist.ProcessGroup | None:
    """The tensor-parallel group replicated parameters are checked over: the mesh's, else the
    one a running framework set up (Megatron, fairscale); ``None`` when there is none."""
    if mesh is not None:
        return mesh.group("tp") if mesh.tp_size > 1 else None
    return next((g for f in TENSOR_PARALLEL if (g := f.tensor_parallel_group()) is not None),
                None)


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

    return plain_shard(name, module, pname, param, gather=gather)


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
        tp_group = tensor_parallel_group()
    shards, handled = FSDP_1.model_shards(model)
    by_param: dict[int, LocalShard] = {id(o): s for s in shards for o in s.owners}
    for mname, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None or (id(module), pname) in handled:
                continue
            name = clean_name(f"{mname}.{pname}" if mname else pname)
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
                full = clean_name(f"{mname}.{pname}" if mname else pname)
                candidates.append((full.rpartition(".")[0], module, param.data))
    differs = differs_across([local for _, _, local in candidates], tp_group)
    found: dict[str, nn.Module] = {}
    for (name, module, _), d in zip(candidates, differs):
        if d:
            found.setdefault(name, module)
    return found


# -- wrappers and groups -------------------------------------------------------------------------
def wrapper_kind(module: nn.Module) -> str | None:
    """``"DDP"``, ``"FSDP1 unit"``, ``"FSDP2"`` for a framework's wrapper, else ``None``."""
    for framework in (DDP_, FSDP_1, FSDP_2):
        kind = framework.wrapper_kind(module)
        if kind is not None:
            return kind
    return None


def substitutes_parameters(model: nn.Module) -> bool:
    """Whether forward runs with stand-ins for registered parameters somewhere in ``model``."""
    return any(f.substitutes_parameters(m) for m in model.modules() for f in (FSDP_1, FSDP_2))


def keeps_unsharded_copies(modules: list[nn.Module]) -> bool:
    """Whether any module may keep gathered copies that surgery must drop (FSDP1/FSDP2)."""
    return any(FSDP_1.owns(m) or FSDP_2.owns(m) for m in modules)


def reshard(modules: Iterable[nn.Module]) -> None:
    """Drop every unsharded copy FSDP keeps after a forward (see ``Framework.reshard``)."""
    for module in modules:
        FSDP_1.reshard(module)
        FSDP_2.reshard(module)


def fsdp1_root(model: nn.Module) -> nn.Module | None:
    """The outermost FSDP1 unit of ``model``, if any."""
    return next((m for m in model.modules() if FSDP_1.owns(m)), None)


def adopt_groups(model: nn.Module | None) -> ParallelMesh | None:
    """The :class:`~flex_surgery.parallel.mesh.ParallelMesh` of whatever already runs ``model``
    (HF TP / DeviceMesh, Megatron, fairscale, DDP, FSDP1 -- in that order), or ``None``."""
    for framework in GROUP_SOURCES:
        mesh = framework.groups(model)
        if mesh is not None:
            return mesh
    return None

