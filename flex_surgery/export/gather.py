"""Whole weights of a sharded model, for a program exported from its one-process twin.

A model trained or modified under FSDP1/FSDP2, DTensor TP, HF TP, fairscale or Megatron-core TP
keeps only shards on each rank, but its parameter names are those of the unsharded module (once
wrapper tokens are stripped). So the exported program of the one-process model accepts its
weights once every parameter is gathered whole. Two paths do that:

* **torch's own** -- ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
  ``full_state_dict=True, cpu_offload=True`` -- for ``rank0_only=True`` on models whose
  sharding torch's distributed checkpoint understands (FSDP2, DTensor TP, HF TP, DDP, or
  none). It gathers one tensor at a time, moves it to the CPU and keeps it on rank 0 only.
* **the framework registry's shard views** (:func:`flex_surgery.parallel.frameworks.
  parameter_views`, the same views surgery edits), one parameter at a time, for the rest:

  - whole weights on *every* rank (the default): ``get_model_state_dict`` gives every rank
    the weights only with ``cpu_offload=False``, which returns the whole model as device
    tensors at once (on a GPU, a second copy of the model per rank), where the views hold one
    parameter on the device; on CPU both cost the same (benchmarks/export_gather.py);
  - FSDP1: its full state dict with ``cpu_offload=True`` kills rank 0 with SIGSEGV in torch
    2.13 on CPU (2 ranks, gloo, ``use_orig_params=True``);
  - fairscale / Megatron-core TP: their parameters are plain tensors carrying the framework's
    own attributes; the distributed checkpoint takes them as whole tensors and would return
    this rank's shard as the whole weight.

On both paths a parameter no framework owns that differs across the tensor-parallel ranks is an
:class:`~flex_surgery.parallel.frameworks.UnknownLayoutError`, never this rank's piece.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import StageBlockNames, clean_name, join_name, unwrap_model
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.runtime import Runtime, store_copy
from flex_surgery.surgery.checkpoint_guard import state_dict_is_guarded

__all__ = ["full_weights"]


def full_weights(model: nn.Module, runtime: Runtime | None = None, *,
                 rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model``, whole, as CPU copies, on every rank
    (with ``rank0_only``: on global rank 0; the other ranks get ``{}``).

    Names are wrapper-free (:func:`~flex_surgery.naming.clean_name`), i.e. those of the
    unsharded model; tied parameters are gathered once and share the result. Collective: every
    rank of the model's group must call it, in the same order, with the same ``rank0_only``.
    ``runtime`` (e.g. a FlexModel's) supplies the tensor-parallel group replicated parameters
    are checked over; by default the group of a running Megatron / fairscale state.

    With ``rank0_only``, models torch's distributed checkpoint understands (FSDP2, DTensor TP,
    HF TP, DDP; see :func:`torch_checkpoint_understands`) are gathered by
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; every other case by the
    framework registry's shard views, one parameter at a time (the module docstring of
    ``flex_surgery.export.gather`` says why, measured).
    """
    root = model
    while type(root).__name__ == "FlexModel" and isinstance(getattr(root, "module", None),
                                                            nn.Module):
        root = root.module  # the distributed checkpoint strips DDP's and FSDP's own prefixes
    model = unwrap_model(model)  # DDP / FlexModel add a "module." prefix, not a layout
    tp_group = frameworks.tensor_parallel_group(getattr(runtime, "mesh", None), model)
    _check_buffers_replicated(model, tp_group)
    # Inside a theater, state_dict() gives the original weights (its checkpoint guard) where
    # full_weights promises the live ones: the shard views read those.
    if rank0_only and torch_checkpoint_understands(model) and not state_dict_is_guarded(root):
        return _rank0_state_dict(root, model, tp_group)
    weights = _gathered_views(model, tp_group)
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return weights


def _check_buffers_replicated(model: nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Raise :class:`~flex_surgery.parallel.frameworks.UnknownLayoutError` on every rank if a
    persistent buffer differs across the tensor-parallel ranks: no framework splits buffers,
    so each rank's value is taken as the whole one (one collective over ``tp_group`` for all
    of them; nothing without a group)."""
    if tp_group is None:
        return
    found = [(clean_name(join_name(prefix, leaf)), buf)
             for prefix, sub in model.named_modules()
             for leaf, buf in sub.named_buffers(recurse=False)
             if leaf not in sub._non_persistent_buffers_set and buf.is_floating_point()
             and not frameworks.is_dtensor(buf)]
    differs = frameworks.differs_across([buf for _, buf in found], tp_group)
    split = [name for (name, _), d in zip(found, differs) if d]
    if split:
        raise frameworks.UnknownLayoutError(
            f"buffer(s) {split[:4]} differ across the tensor-parallel ranks; no framework says "
            f"how a buffer is split, so their whole values are unknown (make them the same on "
            f"every rank, or non-persistent if they are not part of the weights)")


def torch_checkpoint_understands(model: nn.Module) -> bool:
    """Whether ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gives
    ``model``'s whole weights here: no parameter belongs to a framework that splits plain
    tensors (fairscale, Megatron-core), no module is an FSDP1 unit (see below), and no module's
    sharding is one no framework describes (read from the modules alone, so
    every rank answers the same without a collective)."""
    for module in model.modules():
        if frameworks.unknown_sharding(module) is not None:
            return False
        if frameworks.FSDP_1.owns(module):
            # torch 2.13 (CPU, gloo) dies with SIGSEGV in FSDP1's full state dict with
            # cpu_offload=True (rank0_only): see docs/export.md. The flat-parameter views do it.
            return False
        owner = frameworks.owner(module)
        if owner is not None and owner is not frameworks.DTENSOR:
            return False
    return True


def _gathered_views(model: nn.Module, tp_group: dist.ProcessGroup | None,
                    ) -> dict[str, torch.Tensor]:
    """Every rank's whole weights, from the registry's shard views, one parameter at a time."""
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for view in frameworks.parameter_views(model, tp_group):
            full = store_copy(view.gather(), blocking=True)
            for name in view.names:
                weights[name] = full
    whole = StageBlockNames(model)  # a pipeline stage's blocks by whole-model names
    for prefix, sub in model.named_modules(remove_duplicate=False):
        for leaf, buf in sub.named_buffers(recurse=False):
            if leaf not in sub._non_persistent_buffers_set:  # checked the same on every rank
                weights[whole(clean_name(join_name(prefix, leaf)))] = store_copy(
                    buf, blocking=True)
    return weights


def _rank0_state_dict(root: nn.Module, model: nn.Module, tp_group: dist.ProcessGroup | None,
                      ) -> dict[str, torch.Tensor]:
    """Rank 0's whole weights from torch's distributed checkpoint (``{}`` elsewhere).

    A parameter no framework owns is taken whole by the checkpoint; it is checked first to be
    the same on every rank of ``tp_group`` (one collective), as the shard views' gather does.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    split = frameworks.split_unknown_modules(model, tp_group)
    if split:
        name, module = next(iter(split.items()))
        raise frameworks.UnknownLayoutError(
            f"module {name!r} ({type(module).__name__}): its parameters differ across the "
            f"tensor-parallel ranks, but no framework says how they are split, so their full "
            f"values are unknown; {frameworks.HOW_TO_DECLARE}")
    gathered = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    # The checkpoint hands a CPU tensor that needed no gather or offload back as it is: the
    # model's own parameter (a norm next to a DTensor-parallel MLP, any unsharded CPU weight).
    # full_weights promises copies that later in-place updates of the model cannot reach.
    live = set()
    for tensor in (*model.parameters(), *model.buffers()):
        local = tensor.to_local() if frameworks.is_dtensor(tensor) else tensor
        live.add(local.untyped_storage().data_ptr())
    weights = {clean_name(name): value.detach().clone()
               if value.untyped_storage().data_ptr() in live else value
               for name, value in gathered.items()
               if isinstance(value, torch.Tensor)}  # not the extra state a module may keep
    # Tied parameters come under each of their names, gathered separately; give them one
    # tensor, as the shard views do.
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(clean_name(name))
    for names in tied.values():
        first = next((n for n in names if n in weights), None)
        for name in names:
            if first is not None and name in weights:
                weights[name] = weights[first]
    return weights
