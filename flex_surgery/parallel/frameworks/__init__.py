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

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from flex_surgery.parallel.frameworks.base import HIDDEN as HIDDEN
from flex_surgery.parallel.frameworks.base import SEQUENCE as SEQUENCE
from flex_surgery.parallel.frameworks.base import ActivationShard as ActivationShard
from flex_surgery.parallel.frameworks.base import Framework as Framework
from flex_surgery.parallel.frameworks.base import LayoutError as LayoutError
from flex_surgery.parallel.frameworks.base import TPLayer
from flex_surgery.parallel.frameworks.base import differs_across as differs_across
from flex_surgery.parallel.frameworks.ddp import DDP as DDP
from flex_surgery.parallel.frameworks.dtensor import DTensorTP as DTensorTP
from flex_surgery.parallel.frameworks.dtensor import is_dtensor as is_dtensor
from flex_surgery.parallel.frameworks.dtensor import mesh_axis_of as mesh_axis_of
from flex_surgery.parallel.frameworks.fairscale import FairscaleTP as FairscaleTP
from flex_surgery.parallel.frameworks.fsdp import FSDP1 as FSDP1
from flex_surgery.parallel.frameworks.fsdp import FSDP2 as FSDP2
from flex_surgery.parallel.frameworks.fsdp import (
    fsdp1_gradient_accumulators as fsdp1_gradient_accumulators,
)
from flex_surgery.parallel.frameworks.fsdp import fsdp2_compute_dtypes as fsdp2_compute_dtypes
from flex_surgery.parallel.frameworks.megatron import MegatronCore as MegatronCore
from flex_surgery.parallel.frameworks.megatron import MegatronLayoutError as MegatronLayoutError
from flex_surgery.parallel.frameworks.parameters import (
    check_whole,
    fsdp1_root,
    full_parameter,
    parameter_view,
    parameter_views,
    split_unknown_modules,
    tensor_parallel_group,
    tp_grad_partial_op,
    tp_partition_dim,
)
from flex_surgery.parallel.frameworks.registry import DDP_ as DDP_
from flex_surgery.parallel.frameworks.registry import DTENSOR as DTENSOR
from flex_surgery.parallel.frameworks.registry import FAIRSCALE as FAIRSCALE
from flex_surgery.parallel.frameworks.registry import (
    FRAMEWORKS,
    FSDP_1,
    FSDP_2,
    TENSOR_PARALLEL,
    UnknownLayoutError,
    owner,
    wrapper_kind,
)
from flex_surgery.parallel.frameworks.registry import GROUP_SOURCES as GROUP_SOURCES
from flex_surgery.parallel.frameworks.registry import HOW_TO_DECLARE as HOW_TO_DECLARE
from flex_surgery.parallel.frameworks.registry import MEGATRON as MEGATRON
from flex_surgery.parallel.frameworks.registry import check_known_sharding as check_known_sharding
from flex_surgery.parallel.frameworks.registry import unknown_sharding as unknown_sharding
from flex_surgery.parallel.frameworks.views import BlockRegion as BlockRegion
from flex_surgery.parallel.frameworks.views import FlatRegion as FlatRegion
from flex_surgery.parallel.frameworks.views import IndexRegion as IndexRegion
from flex_surgery.parallel.frameworks.views import LocalShard as LocalShard
from flex_surgery.parallel.frameworks.views import Region as Region
from flex_surgery.parallel.frameworks.views import plain_shard as plain_shard

if TYPE_CHECKING:
    import torch

    from flex_surgery.parallel.mesh import ParallelMesh

# The registry itself (.registry) and the parameter questions (.parameters) live in their own
# files; the protocol's types in .base and .views. Every name is importable from here.
__all__ = [
    "FRAMEWORKS", "UnknownLayoutError", "abandon_backward", "adopt_groups", "batch_dim",
    "batch_dims", "check_whole",
    "first_input_only", "fsdp1_root", "tp_layers_within",
    "full_parameter", "keeps_unsharded_copies", "owner", "parameter_view", "parameter_views",
    "reshard", "sequence_parallel", "split_unknown_modules", "substitutes_parameters",
    "tensor_parallel_group", "tp_grad_partial_op", "tp_layer", "tp_partition_dim",
    "undescribed_split_modules", "wrapper_kind",
]


# -- activations -------------------------------------------------------------------------------
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
        if framework is not None and framework.splits_parameters(m, mesh) and \
                tp_layer(m, mesh) is None:
            found[name] = m
    return found


def stage_input(module: nn.Module) -> tuple[torch.Tensor, ActivationShard] | None:
    """What pipeline stage ``module`` starts its forward from, when it is split (see
    ``Framework.stage_input``)."""
    for f in TENSOR_PARALLEL:
        answer = f.stage_input(module)
        if answer is not None:
            return answer
    return None


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


# -- wrappers and groups -------------------------------------------------------------------------
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


def abandon_backward(modules: Iterable[nn.Module], ddp: bool = True) -> None:
    """After a backward that raised: put every data-parallel wrapper among ``modules`` (DDP
    unless ``ddp`` is false, FSDP1 and FSDP2 roots) back between two iterations and drop the
    gradients that backward left on their parameters (see ``Framework.abandon_backward``).
    No collective."""
    wrappers = (DDP_, FSDP_1, FSDP_2) if ddp else (FSDP_1, FSDP_2)
    for module in modules:
        for framework in wrappers:
            framework.abandon_backward(module)


def adopt_groups(model: nn.Module | None) -> ParallelMesh | None:
    """The :class:`~flex_surgery.parallel.mesh.ParallelMesh` of whatever already runs ``model``
    (HF TP / DeviceMesh, Megatron, fairscale, DDP, FSDP1 -- in that order), or ``None``."""
    for framework in GROUP_SOURCES:
        mesh = framework.groups(model)
        if mesh is not None:
            return mesh
    return None
