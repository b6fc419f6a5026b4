"""Whole weights of a sharded model, for a program exported from its one-process twin.

A model trained or modified under FSDP1/FSDP2, DTensor TP or HF TP keeps only shards on each
rank, but its parameter names are those of the unsharded module (once wrapper tokens are
stripped). So the exported program of the one-process model accepts its weights once every
parameter is gathered whole. Gathering goes through the runtime's ``full_parameter`` -- the
one place that knows how each parallelism splits a parameter -- so this module only walks the
names.
"""

from __future__ import annotations

import torch
from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.parallel.runtime import Runtime, store_copy
from flex_surgery.surgery.theater import unwrap_model

__all__ = ["full_weights"]


def full_weights(model: nn.Module, runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model``, whole, as CPU copies, on every rank.

    Names are wrapper-free (:func:`~flex_surgery.naming.clean_name`), i.e. those of the
    unsharded model; tied parameters are gathered once and share the result. Collective: every
    rank of the model's group must call it, in the same order. ``runtime`` defaults to
    :func:`~flex_surgery.parallel.distributed_runtime.build_runtime` (itself collective).
    """
    model = unwrap_model(model)  # DDP / FlexModel add a "module." prefix, not a layout
    if runtime is None:
        from flex_surgery.parallel.distributed_runtime import build_runtime

        runtime = build_runtime(model)
    owners = dict(model.named_modules(remove_duplicate=False))
    gathered: dict[int, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    # a list first: gathering FSDP1 parameters (summon_full_params) re-registers them
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if id(param) not in gathered:
            gathered[id(param)] = runtime.full_parameter(name, param,
                                                         owners[name.rpartition(".")[0]])
        weights[clean_name(name)] = gathered[id(param)]
    for prefix, sub in model.named_modules(remove_duplicate=False):
        for leaf, buf in sub.named_buffers(recurse=False):
            if leaf not in sub._non_persistent_buffers_set:  # buffers are never sharded
                weights[clean_name(f"{prefix}.{leaf}" if prefix else leaf)] = store_copy(
                    buf, blocking=True)
    return weights
