"""PEFT LoRA layers are one linear to surgery: modifications act on the effective weight.

A PEFT LoRA ``Linear`` computes ``base_layer(x) + Σ_a B_a(A_a(dropout(x))) * scaling_a`` over its
contributing adapters, i.e. a linear layer whose effective weight is
``W + Σ_a (B_a @ A_a) * scaling_a``. Modifying its three parameters independently does not
modify that weight the way the user asked (halving ``W``, ``A`` and ``B`` scales the adapter's
part by 0.25). So a theater targets the LoRA layer as one linear, named as in the model without
the adapter (``...q_proj.weight``, the name it has after ``merge_and_unload()``):

- ``scale``: the base weight and every contributing ``B`` are multiplied by ``factor``;
- ``disable``: the base weight and every contributing ``B`` are zeroed (the layer outputs its
  bias);
- ``noise``: added to the base weight only, which adds it to the effective weight exactly;
  seeded by the effective weight's name, so a LoRA model and its merged copy get the same noise;
- ``custom``: the function receives the effective weight (base plus adapter deltas, computed in
  fp32 and cast to the base dtype, as PEFT's merge does) and its delta is added to the base.

Adapters contribute when they are active, not merged and adapters are not disabled; a merged
or disabled layer is its base layer. Parameters named exactly (``...base_layer.weight``,
``...lora_B.default.weight``) are modified as raw parameters. LoRA variants (DoRA and others),
``lora_bias`` and LoRA layers other than ``Linear`` have no effective weight surgery knows how
to edit: selecting them raises ``NotImplementedError``.

PEFT's wrappers (``PeftModel`` and its tuner model) are looked through: names are those of the
base model, as for DDP and FlexModel.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.surgery.shards import LocalShard

__all__ = ["LoraLinear", "adapter_delta", "lora_layers", "peel_peft"]


def peel_peft(model: nn.Module) -> nn.Module:
    """The base model inside PEFT's ``PeftModel`` / tuner wrappers (``model`` itself otherwise)."""
    if "peft" not in sys.modules:
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while True:
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


@dataclass(frozen=True)
class LoraLinear:
    """A PEFT LoRA layer seen as one linear: ``name`` is its clean module name."""

    name: str
    layer: nn.Module
    base: nn.Module
    internals: frozenset[int]  # ids of the modules holding adapter parameters (lora_A, ...)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters whose product is part of the forward now."""
        layer = self.layer
        if layer.disable_adapters or layer.merged:
            return ()
        return tuple(a for a in layer.active_adapters if a in layer.lora_A)

    def effective_name(self, param_name: str) -> str:
        return f"{self.name}.{param_name}" if self.name else param_name

    def check_editable(self, param_name: str) -> None:
        """Raise unless surgery knows the effective ``param_name`` of this layer."""
        from peft.tuners.lora.layer import Linear

        if param_name != "weight":
            return  # the base bias is the layer's bias: LoRA does not add to it
        kind = type(self.layer).__name__
        problem = None
        if not isinstance(self.layer, Linear):
            problem = f"a LoRA {kind} layer"
        else:
            for a in self.adapters:
                if a in getattr(self.layer, "lora_variant", {}) or self.layer.use_dora.get(a):
                    problem = f"adapter {a!r} is a LoRA variant (e.g. DoRA)"
                elif self.layer.lora_bias.get(a):
                    problem = f"adapter {a!r} has lora_bias=True"
        if problem:
            raise NotImplementedError(
                f"{self.name}: {problem}; surgery can edit the effective weight of plain LoRA "
                f"Linear layers only. Name raw parameters (e.g. {self.name}.base_layer.weight) "
                "to modify them one by one."
            )

    def factor_places(self) -> list[tuple[int, str]]:
        """``(id(module), "weight")`` of the ``B`` (up-projection) weights of the contributing
        adapters (places, not parameter objects: FSDP1 replaces the objects)."""
        return [(id(self.layer.lora_B[a]), "weight") for a in self.adapters]


def lora_layers(root: nn.Module) -> dict[int, LoraLinear]:
    """Every PEFT LoRA layer of ``root``, keyed by ``id`` of its base layer."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    found: dict[int, LoraLinear] = {}
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        base_ids = {id(m) for m in base.modules()}
        internals = frozenset(id(m) for m in module.modules()
                              if id(m) not in base_ids and m is not module)
        found[id(base)] = LoraLinear(clean_name(name), module, base, internals)
    return found


def adapter_delta(lora: LoraLinear,
                  shard_at: dict[tuple[int, str], LocalShard]) -> torch.Tensor | None:
    """``Σ_a transpose(B_a @ A_a) * scaling_a`` over the contributing adapters, at the full
    weight's shape in fp32 (``None`` when none contributes). ``shard_at`` maps
    ``(id(module), param_name)`` to the local shard. Sharded factors are gathered
    (collectives: every rank calls this for the same layers in the same order)."""
    total = None
    layer = lora.layer
    for a in lora.adapters:
        weight_a = shard_at[(id(layer.lora_A[a]), "weight")].gather().float()
        weight_b = shard_at[(id(layer.lora_B[a]), "weight")].gather().float()
        delta = weight_b @ weight_a
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        delta = delta * layer.scaling[a]
        total = delta if total is None else total + delta
    return total
