"""Temporary weight masks: multiply parameters by given full-shape masks inside a context.

Masks are how pruning and circuit-discovery experiments ask "what if only these weights were
there": a boolean mask keeps or removes weights, a continuous one (continuous sparsification:
``sigmoid(logits / temperature)``, annealed towards a hard 0/1 mask) scales them. Masks are given
at the *full* parameter shape, whatever the layout; each rank multiplies its shard by its own
part of the mask (cut with the shard's region, no gather), and the weights are restored bit for
bit on exit like any :class:`~flex_surgery.surgery.theater.SurgicalTheater` modification.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flex_surgery.surgery.targets import Edit
from flex_surgery.surgery.theater import SurgicalTheater

__all__ = ["MaskTheater", "continuous_mask", "hard_mask"]


def continuous_mask(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``sigmoid(logits / temperature)``: a soft mask in (0, 1) that tends to the hard mask
    ``logits > 0`` as ``temperature`` goes to 0."""
    return torch.sigmoid(logits / temperature)


def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask a continuous mask anneals to: keep the weights whose logit is positive."""
    return logits > 0


def _refuse(p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
    raise AssertionError("MaskTheater applies masks itself")


class MaskTheater(SurgicalTheater):
    """Multiply each named parameter by its mask for the duration of the context.

    Args:
        model: as for :class:`SurgicalTheater`.
        masks: ``{parameter name: mask}``; each mask has the parameter's full (unsharded) shape
            and is boolean or floating. Every rank passes the same masks.
        **kwargs: ``backup``, ``guard_grads`` as for :class:`SurgicalTheater`.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor],
                 **kwargs: Any) -> None:
        if not masks:
            raise ValueError("MaskTheater needs at least one mask")
        super().__init__(model, layers=list(masks), modification_fn=_refuse, params="all",
                         **kwargs)
        self.masks = dict(masks)
        self.modification_type = "mask"  # reported by modifications_summary

    def _places_by_position(self) -> bool:
        return True  # each element is multiplied by the mask's element at its place

    def _modify(self, edit: Edit, base_seed: int | None) -> None:
        shard = edit.shard
        if edit.lora is not None:
            raise NotImplementedError(
                f"{edit.name} is the effective weight of a PEFT LoRA layer, which a mask cannot "
                f"multiply through its factors; mask {shard.name} and the adapter weights by "
                "their own names")
        given = [n for n in shard.names if n in self.masks]
        if not given:
            raise ValueError(f"masks are keyed by parameter names; {shard.name} was selected "
                             f"through a module name in {sorted(self.masks)}")
        name, mask = given[0], self.masks[given[0]]
        for other in given[1:]:  # tied names of one tensor (lm_head and the embeddings)
            if self.masks[other] is not mask and not torch.equal(self.masks[other], mask):
                raise ValueError(
                    f"{name} and {other} are one tensor (tied), and their masks differ; give "
                    "one mask under one of the names (a product of both, if that is meant)")
        if tuple(mask.shape) != tuple(shard.full_shape):
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(shard.full_shape)} (masks are given at the full shape)")
        local = shard.local
        # A mask is a factor, not a delta: boolean masks need the cast, and a float mask is
        # documented to be applied in the parameter's dtype.
        local.mul_(shard.region.take(mask).to(device=local.device, dtype=local.dtype))
