"""Reductions applied to a hook's whole tensor before it is stored (``HookFunction(reduce=)``).

A reduction turns the whole (gathered) tensor into the statistic the user wants, so the store
holds that instead of the activation. ``"mean_over_batch"`` averages over the batch dim;
``"last_token"`` keeps the last position of the sequence dim (the dim after the batch dim);
a callable gets the whole tensor and returns any tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REDUCTIONS = ("mean_over_batch", "last_token")

Reduction = Callable[[torch.Tensor], torch.Tensor]


def resolve_reduce(reduce: str | Reduction | None) -> str | Reduction | None:
    """Check ``reduce`` at construction: a known name, a callable or ``None``."""
    if reduce is None or callable(reduce) or reduce in REDUCTIONS:
        return reduce
    raise ValueError(f"reduce must be one of {REDUCTIONS}, a callable or None, got {reduce!r}")


def apply_reduce(reduce: str | Reduction, full: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """``reduce`` applied to ``full``, a detached tensor nothing else holds."""
    if reduce == "mean_over_batch":
        return full.mean(dim=batch_dim, keepdim=True) if full.is_floating_point() else \
            full.double().mean(dim=batch_dim, keepdim=True)
    if reduce == "last_token":
        seq = batch_dim + 1
        if full.ndim <= seq:
            raise ValueError(f"last_token needs a sequence dim after batch dim {batch_dim}; "
                             f"the tensor has shape {tuple(full.shape)}")
        return full.narrow(seq, full.shape[seq] - 1, 1).contiguous()
    result = reduce(full)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"a reduce callable must return a tensor, got {type(result).__name__}")
    return result.detach()
