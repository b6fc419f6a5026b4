"""The training state a validation inside a theater must not disturb, saved and put back.

Validating in the middle of training flips modules to eval, may change ``requires_grad``,
consumes random numbers (dropout) and, with a backward, accumulates gradients. A theater saves
all of it on entry and puts it back on exit, so the training run continues exactly as if the
validation had not happened: module train/eval flags, ``requires_grad`` of every parameter, the
CPU and CUDA RNG states, and (``guard_grads``) the ``.grad`` tensors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrainingState", "all_parameters"]


def all_parameters(modules: nn.Module | list[nn.Module]) -> list[nn.Parameter]:
    """Every parameter object of these modules (or of a model), including FSDP1
    ``FlatParameter``\\ s that ``use_orig_params=True`` hides from ``parameters()`` (they hold
    the real gradients)."""
    if isinstance(modules, nn.Module):
        modules = list(modules.modules())
    params: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module._parameters.values():
            if p is not None:
                params.setdefault(id(p), p)
        # FSDP1 keeps its handle as a plain attribute; reading __dict__ spares every other
        # module nn.Module.__getattr__'s raised-and-caught AttributeError.
        handle = module.__dict__.get("_handle")
        flat = getattr(handle, "flat_param", None) if handle is not None else None
        if flat is not None and isinstance(flat, nn.Parameter):
            params.setdefault(id(flat), flat)
    return list(params.values())


def _bucket_view_grads(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The gradients that are views of a DDP bucket (``gradient_as_bucket_view=True``).

    Why: setting such a ``.grad`` to None does not free the bucket; a backward inside the
    theater makes DDP copy the new gradient into the bucket and all-reduce it there, i.e.
    into the memory of the training gradient the guard put aside. Their values are saved
    and copied back on exit."""
    from torch.nn.parallel import DistributedDataParallel

    found: dict[int, torch.Tensor] = {}
    for module in modules:
        if isinstance(module, DistributedDataParallel) and \
                getattr(module, "gradient_as_bucket_view", False):
            for p in module.parameters():
                if p.grad is not None:
                    found.setdefault(id(p.grad), p.grad)
    return list(found.values())


@dataclass
class TrainingState:
    """Flags, RNG states and gradients of ``modules`` at :meth:`capture` time."""

    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    grads: list[tuple[nn.Parameter, Any]] = field(default_factory=list)
    # (gradient, copy of its values) for gradients whose memory a backward inside writes even
    # though ``.grad`` was set to None: DDP's ``gradient_as_bucket_view`` buckets.
    grad_values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    cpu_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls, modules: list[nn.Module], guard_grads: bool) -> TrainingState:
        """Save the state; with ``guard_grads`` every ``.grad`` is then set to ``None``."""
        params = all_parameters(modules)
        state = cls(
            training=[(m, m.training) for m in modules],
            requires_grad=[(p, p.requires_grad) for p in params],
            grads=[(p, p.grad) for p in params] if guard_grads else [],
            cpu_rng=torch.get_rng_state(),
            cuda_rng=(torch.cuda.get_rng_state_all()
                      if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        )
        if guard_grads:
            state.grad_values = [(g, g.clone()) for g in _bucket_view_grads(modules)]
        for p, _ in state.grads:
            p.grad = None
        return state

    def restore(self) -> None:
        for m, training in self.training:
            if m.training != training:  # nn.Module.__setattr__ is slow; most are unchanged
                m.training = training
        for p, flag in self.requires_grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for p, grad in self.grads:
            p.grad = grad
        for grad, values in self.grad_values:  # the bucket a backward inside reduced into
            grad.copy_(values)
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
