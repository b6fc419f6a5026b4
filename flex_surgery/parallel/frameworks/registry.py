"""The registered frameworks, in the order they are asked, and the verdicts that need no
collective: which framework owns a module, which wrapper it is, whether its sharding is one no
framework describes. Split from :mod:`flex_surgery.parallel.frameworks` (which re-exports every
public name here) so the parameter and activation questions can share it without a cycle.
"""

from __future__ import annotations

import re

from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.parallel.frameworks.base import Framework, LayoutError
from flex_surgery.parallel.frameworks.ddp import DDP
from flex_surgery.parallel.frameworks.dtensor import DTensorTP
from flex_surgery.parallel.frameworks.fairscale import FairscaleTP
from flex_surgery.parallel.frameworks.fsdp import FSDP1, FSDP2
from flex_surgery.parallel.frameworks.megatron import MegatronCore

__all__ = ["FRAMEWORKS", "GROUP_SOURCES", "HOW_TO_DECLARE", "TENSOR_PARALLEL",
           "UnknownLayoutError", "check_known_sharding", "owner", "unknown_sharding",
           "wrapper_kind"]

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


def owner(module: nn.Module) -> Framework | None:
    """The tensor-parallel framework ``module`` belongs to, if any."""
    return next((f for f in TENSOR_PARALLEL if f.owns(module)), None)


def wrapper_kind(module: nn.Module) -> str | None:
    """``"DDP"``, ``"FSDP1 unit"``, ``"FSDP2"`` for a framework's wrapper, else ``None``."""
    for framework in (DDP_, FSDP_1, FSDP_2):
        kind = framework.wrapper_kind(module)
        if kind is not None:
            return kind
    return None
