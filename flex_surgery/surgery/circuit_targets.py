"""Which layers a :class:`~flex_surgery.surgery.circuits.CircuitModel` masks, and where each
rank's part of every mask lies.

Resolving names to supported layers, asking the framework registry for this rank's shard view
of each masked parameter (:func:`layer_views`, the one place that does), refusing layouts a mask
cannot follow (data-parallel replicas nothing averages mask gradients over, unknown splits), and
electing one rank per distinct mask region to count it in global sums. Kept apart from the
model wrapper so that the wrapper reads as what it does with the masks.
"""

from __future__ import annotations

import difflib
import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import nn

from flex_surgery.naming import clean_name, modules_by_clean_name
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.frameworks.base import differs_across
from flex_surgery.surgery.circuit_masks import ABLATIONS, LayerMask

__all__ = ["SUPPORTED_LAYERS", "check_ablation", "elect_leaders", "layer_views",
           "resolve_targets"]

SUPPORTED_LAYERS = ("nn.Linear", "nn.Conv1d", "nn.Conv2d", "transformers Conv1D",
                    "fairscale ColumnParallelLinear", "fairscale RowParallelLinear",
                    "Megatron-core ColumnParallelLinear", "Megatron-core RowParallelLinear",
                    "DTensor-TP and FSDP2 nn.Linear")


def check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation {ablation!r}; expected one of {ABLATIONS}")


def _supported(module: nn.Module) -> bool:
    if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return True
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and \
            frameworks.wrapper_kind(module) == "FSDP2":  # fully_shard's dynamic subclass
        return True
    tf = sys.modules.get("transformers.pytorch_utils")
    if tf is not None and type(module) is tf.Conv1D:
        return True
    fs = sys.modules.get("fairscale.nn.model_parallel.layers")
    if fs is not None and type(module) in (fs.ColumnParallelLinear, fs.RowParallelLinear):
        return True
    # Megatron-core's own layers (their forward reads ``self.weight`` / ``self.bias``, which
    # the mask's pre-hook swaps); Transformer Engine's fused layers are not among them.
    mc = sys.modules.get("megatron.core.tensor_parallel.layers")
    return mc is not None and type(module) in (mc.ColumnParallelLinear, mc.RowParallelLinear)


def resolve_targets(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{clean name: module}`` for each target, or a ValueError naming every bad one."""
    modules = modules_by_clean_name(model)
    found, problems = {}, []
    for name in names:
        module = modules.get(clean_name(name))
        if module is None:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
            problems.append(f"{name!r} matches no module" +
                            (f" (did you mean one of {close}?)" if close else ""))
        elif not _supported(module):
            problems.append(f"{name!r} is a {type(module).__module__}.{type(module).__name__}, "
                            f"not a supported layer ({', '.join(SUPPORTED_LAYERS)})")
        else:
            found[clean_name(name)] = module
    by_module: dict[int, list[str]] = {}
    for name, module in found.items():
        by_module.setdefault(id(module), []).append(name)
    for names in by_module.values():  # masked twice and counted twice in the L0
        if len(names) > 1:
            problems.append(f"{names} are one module (shared); name it once")
    if problems:
        raise ValueError("cannot mask these target layers: " + "; ".join(problems))
    return found


def layer_views(model: nn.Module, targets: dict[str, nn.Module], mask_bias: bool,
                group: dist.ProcessGroup | None) -> dict[str, dict[str, frameworks.LocalShard]]:
    """This rank's shard view of each masked parameter (the one place that asks the framework
    registry how a weight is split); refuses layouts a mask cannot follow."""
    wrappers = {frameworks.wrapper_kind(m) for m in model.modules()} - {None, "FSDP2"}
    if wrappers:
        raise frameworks.UnknownLayoutError(
            f"circuit masks do not support {sorted(wrappers)}: mask gradients would not be "
            "averaged over the data-parallel replicas (use FSDP2, or wrap the CircuitModel)")
    frameworks.reshard(model.modules())
    tp_group = frameworks.tensor_parallel_group(model=model)
    views: dict[str, dict[str, frameworks.LocalShard]] = {}
    for name, module in targets.items():
        views[name] = {}
        for pname in ("weight", "bias"):
            param = module._parameters.get(pname)
            if param is None:
                if pname == "weight":
                    raise ValueError(f"{name} has no weight to mask")
                if mask_bias:  # NeuroSurgeon's behaviour: mask what there is
                    warnings.warn(f"cannot mask the bias of {name}: it has none", stacklevel=3)
                continue
            if pname == "bias" and not mask_bias:
                continue
            if frameworks.is_dtensor(param) and param.device_mesh.ndim > 1:
                raise frameworks.UnknownLayoutError(
                    f"{name}.{pname} is a DTensor on a {param.device_mesh.ndim}-D mesh (FSDP2 "
                    "over tensor parallelism); circuit masks follow 1-D DTensor layouts only")
            view = frameworks.parameter_view(f"{name}.{pname}", module, pname, param, tp_group)
            if view.kind not in ("plain", "fairscale", "megatron", "dtensor"):
                raise frameworks.UnknownLayoutError(
                    f"{name}.{pname} is a {view.kind} shard; circuit masks follow plain, "
                    "fairscale-TP, Megatron-core-TP, DTensor-TP and FSDP2 parameters (use "
                    "FSDP2 instead of FSDP1)")
            views[name][pname] = view
    _refuse_unaveraged_replicas(views, tp_group,
                                any(frameworks.is_dtensor(p) for p in model.parameters()),
                                dist.get_world_size(group) if group is not None else 1)
    plain = [(n, v["weight"]) for n, v in views.items() if v["weight"].kind == "plain"]
    if tp_group is not None and plain:
        differ = differs_across([v.local for _, v in plain], tp_group)
        bad = [n for (n, _), d in zip(plain, differ) if d]
        if bad:
            raise frameworks.UnknownLayoutError(
                f"target layers {bad} differ across tensor-parallel ranks but no framework says "
                f"how they are split, so their full masks are unknown; {frameworks.HOW_TO_DECLARE}")
    return views


def _refuse_unaveraged_replicas(views: dict[str, dict[str, frameworks.LocalShard]],
                               tp_group: dist.ProcessGroup | None,
                               sharded_model: bool, world: int) -> None:
    """Refuse masks held whole by data-parallel replicas that nothing averages over.

    A mask is trained consistently only over the ranks whose framework splits (or averages) its
    weight: the DTensor mesh (DTensor TP, FSDP2, whose all-gather averages the gradient) or the
    tensor-parallel group. Ranks beyond those are data-parallel replicas training on other
    batches; no hook averages the mask gradients over them, so their masks would drift apart
    while the L0 statistics count one of them. Every rank sees the same world and group sizes,
    so every rank raises alike.

    A model with no parallel layout at all on several ranks is taken as what the tests and the
    examples use it for, the one-process twin built on every rank; its statistics are counted
    once across the ranks, so its ranks must train it on the same data. A plain layer of a
    model that is otherwise sharded (``sharded_model``: DTensor parameters, e.g. a head left
    outside every ``fully_shard`` unit) is a data-parallel replica like the others.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    bad = []
    for name, params in views.items():
        for pname, view in params.items():
            if view.kind == "plain" and tp_group is None and not sharded_model:
                continue  # a model without parallelism: every rank's own circuit (see above)
            covered = tp
            if view.kind == "dtensor":
                covered = view.module._parameters[view.param_name].device_mesh.size()
            if covered < world:
                bad.append(f"{name}.{pname}")
    if bad:
        raise frameworks.UnknownLayoutError(
            f"circuit masks on {bad} would be trained by {world // max(1, tp)} data-parallel "
            "replicas that nothing averages mask gradients over (fairscale or Megatron-core "
            "tensor parallelism with a data-parallel group, or DTensor on a sub-mesh); use "
            "FSDP2 for data parallelism, or give each replica its own circuit "
            "(CircuitModel(config, model, process_group=<the replica's tensor-parallel "
            "group>))")


def elect_leaders(layers: list[LayerMask], group: dist.ProcessGroup | None) -> None:
    """One rank per distinct region of each mask counts it in global sums (collective over
    ``group``, the ranks that hold the model); regions that do not tile the full mask exactly
    are refused."""
    if group is None:
        return
    mine = [layer.region_keys() for layer in layers]
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    rank = dist.get_rank(group)
    for i, layer in enumerate(layers):
        for j, mp in enumerate(layer.params.values()):
            keys = [every[r][i][j] for r in range(len(every))]
            mp.leader = keys.index(keys[rank]) == rank
            distinct = {k: None for k in keys}
            covered = sum(_key_numel(k) for k in distinct)
            if covered != math.prod(mp.full_shape):
                raise frameworks.UnknownLayoutError(
                    f"the shards of {layer.name}.{mp.pname} cover {covered} of "
                    f"{math.prod(mp.full_shape)} elements across ranks; cannot place its mask")


def _key_numel(key: tuple) -> int:
    if key[0] == "block":
        return math.prod(key[2])
    return math.prod(len(i) for i in key[1])
