"""The real shapes of hooked activations, from a forward on the meta device.

The model is built from its config on ``torch.device("meta")`` -- no weights are allocated --
and run once on meta inputs of one data-parallel replica's batch. Forward hooks record the
shape and dtype of the tensor a :class:`~flex_surgery.hooks.HookFunction` would see
(``unpack_idx`` 0 of the output), how often the module runs per forward, and when it runs
relative to the model's blocks (which decides its pipeline stage). The shapes are therefore the
model's own, not a formula that could drift from it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import partial

import torch

from flex_surgery.hooks.groups import name_matcher
from flex_surgery.plan.errors import PlanError

# A block of the model's main stack: "model.layers.3", "transformer.h.3", "encoder.layer.3".
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class HookShape:
    """What one hooked module produces per forward of one replica's batch."""

    name: str
    shape: tuple[int, ...]  # of one call, one replica's batch, unsharded
    dtype: torch.dtype
    calls: int  # calls per forward
    block: int | None  # index of the block it belongs to; None outside the blocks
    before_blocks: bool  # runs before the first block (pipeline stage 0)
    # Its output comes after a column-parallel layer of the config's TP plan, with that layer's
    # width and no row-parallel layer between: the runtime reads it as that layer's tp shard.
    after_colwise: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of all calls per forward, one replica's batch, unsharded."""
        return self.numel * self.dtype.itemsize * self.calls


def block_of(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def hook_shapes(config, batch: int, seq: int, dtype: torch.dtype,
                patterns: list[str]) -> list[HookShape]:
    """Shapes of the modules matching ``patterns`` (glob or ``re:``) on a meta forward."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise PlanError(f"cannot build a causal LM from this config: {exc}") from exc
    matchers = [name_matcher(p) for p in patterns]
    names = [n for n, _ in model.named_modules() if n and any(m(n) for m in matchers)]
    if not names:
        raise PlanError(f"no module of {type(model).__name__} matches {patterns}; module names "
                        f"look like {[n for n, _ in model.named_modules() if n][:4]}")
    seen: dict[str, list] = {}
    order = {"first_block_seen": False}

    def record(name: str):
        def hook(module, args, output):
            if block_of(name) is not None or name in blocks:
                order["first_block_seen"] = True
            tensor = _first_tensor(output)
            if tensor is None:
                raise PlanError(f"module {name!r} returns no tensor to hook")
            last = order.get("tp_layer")
            entry = seen.setdefault(name, [tuple(tensor.shape), tensor.dtype, 0,
                                           not order["first_block_seen"],
                                           last is not None and last[0] == "colwise"
                                           and tensor.ndim > 0
                                           and tensor.shape[-1] == last[1]])
            entry[2] += 1
        return hook

    blocks = {n for n, _ in model.named_modules() if block_of(n) is not None}
    # The TP plan's layers, watched first: what a hooked module returns after a column layer
    # of its width is a shard of it (the runtime's rule for modules outside the plan).
    handles = [module.register_forward_hook(partial(_tp_layer_ran, order, style))
               for n, module in model.named_modules() if (style := tp_plan_style(config, n))]
    handles += [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    # Blocks are watched too, so modules outside them are placed before or after them.
    handles += [model.get_submodule(n).register_forward_hook(
        lambda *a: order.__setitem__("first_block_seen", True))
        for n in blocks if n not in names and n.count(".") == _block_depth(n)]
    meta = torch.device("meta")
    kwargs = dict(input_ids=torch.zeros(batch, seq, dtype=torch.long, device=meta),
                  # A 4-D additive mask and explicit positions: nothing data-dependent to read.
                  attention_mask=torch.zeros(batch, 1, seq, seq, dtype=dtype, device=meta),
                  position_ids=torch.zeros(batch, seq, dtype=torch.long, device=meta))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return [HookShape(n, *seen[n][:3], block_of(n), seen[n][3], seen[n][4])
            for n in names if n in seen]


def _tp_layer_ran(order: dict, style: str, module, args, output) -> None:
    tensor = _first_tensor(output)
    order["tp_layer"] = (style, tensor.shape[-1] if tensor is not None and tensor.ndim else None)


def tp_plan_style(config, name: str) -> str | None:
    """The style the config's TP plan (``base_model_tp_plan``) gives module ``name`` (matched
    with or without its first component, ``model.``), or ``None`` outside the plan."""
    tp_plan = getattr(config, "base_model_tp_plan", None) or {}
    inner = name.split(".", 1)[1] if "." in name else name
    for pattern, style in tp_plan.items():
        if fnmatch.fnmatchcase(inner, pattern) or fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _block_depth(name: str) -> int:
    """Dots in the name of a block itself (``model.layers.3`` -> 2)."""
    match = _BLOCK.search(name)
    return name[:match.end()].rstrip(".").count(".")


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(value, "to_tuple"):
        return _first_tensor(value.to_tuple())
    return None
