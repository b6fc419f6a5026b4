"""Whole weights of a sharded model, for a program exported from its one-process twin.

A model trained or modified under FSDP1/FSDP2, DTensor TP, HF TP, fairscale or Megatron-core TP
keeps only shards on each rank, but its parameter names are those of the unsharded module (once
wrapper tokens are stripped). So the exported program of the one-process model accepts its
weights once every parameter is gathered whole. How each parameter is split is framework
knowledge: this module walks the framework registry's shard views
(:func:`flex_surgery.parallel.frameworks.parameter_views`, the same views surgery edits) and
gathers each -- a parameter no framework owns that differs across the tensor-parallel ranks is
an :class:`~flex_surgery.parallel.frameworks.UnknownLayoutError`, never this rank's piece.
"""

from __future__ import annotations

import torch
from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.runtime import Runtime, store_copy
from flex_surgery.surgery.theater import unwrap_model

__all__ = ["full_weights"]


def full_weights(model: nn.Module, runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model``, whole, as CPU copies, on every rank.

    Names are wrapper-free (:func:`~flex_surgery.naming.clean_name`), i.e. those of the
    unsharded model; tied parameters are gathered once and share the result. Collective: every
    rank of the model's group must call it, in the same order. ``runtime`` (e.g. a FlexModel's)
    supplies the tensor-parallel group replicated parameters are checked over; by default the
    group of a running Megatron / fairscale state.
    """
    model = unwrap_model(model)  # DDP / FlexModel add a "module." prefix, not a layout
    tp_group = frameworks.tensor_parallel_group(getattr(runtime, "mesh", None))
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for view in frameworks.parameter_views(model, tp_group):
            full = store_copy(view.gather(), blocking=True)
            for name in view.names:
                weights[name] = full
    for prefix, sub in model.named_modules(remove_duplicate=False):
        for leaf, buf in sub.named_buffers(recurse=False):
            if leaf not in sub._non_persistent_buffers_set:  # buffers are never sharded
                weights[clean_name(f"{prefix}.{leaf}" if prefix else leaf)] = store_copy(
                    buf, blocking=True)
    return weights
