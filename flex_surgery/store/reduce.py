"""Reductions applied to a hook's whole tensor before it is stored (``HookFunction(reduce=)``).

A reduction turns the whole (gathered) tensor into the statistic the user wants, so the store
holds that instead of the activation. ``"mean_over_batch"`` averages over the batch dim;
``"last_token"`` keeps the last position of the sequence dim (beside the batch dim: dim 1 of
``[batch, seq, ...]``, dim 0 of Megatron's ``[seq, batch, ...]``);
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


def sequence_dim(batch_dim: int) -> int:
    """The sequence dim beside ``batch_dim``: 1 for ``[batch, seq, ...]``, 0 for Megatron's
    ``[seq, batch, ...]``. Any other batch dim has no known sequence dim: an error, not a
    guess (the dim after it would be the hidden dim of ``[seq, batch, hidden]``)."""
    if batch_dim not in (0, 1):
        raise ValueError(f"last_token knows [batch, seq, ...] (batch dim 0) and [seq, batch, "
                         f"...] (batch dim 1) tensors; the batch dim here is {batch_dim}")
    return 1 - batch_dim


def check_reduce_input(reduce: str | Reduction, ndim: int, batch_dim: int,
                       owner: object = None) -> None:
    """Raise ``ValueError`` if the named reduction ``reduce`` cannot apply to a tensor of ``ndim``
    dims whose batch dim is ``batch_dim``; a callable is not checked (only running it tells).

    Decided from what every rank of a hook call shares (the number of dims and the batch dim,
    not the values), so a hook checks it on every rank before anything is gathered: the
    mistake raises on every rank at that call rather than on the storing rank alone.
    """
    prefix = "" if owner is None else f"{owner!r}: "
    if reduce == "mean_over_batch" and not -ndim <= batch_dim < ndim:
        raise ValueError(f"{prefix}mean_over_batch averages over the batch dim {batch_dim}, but "
                         f"the tensor has {ndim} dim(s)")
    if reduce == "last_token":
        try:
            sequence_dim(batch_dim)
        except ValueError as error:
            raise ValueError(f"{prefix}{error}") from None
        if ndim < 2:
            raise ValueError(f"{prefix}last_token needs a batch dim and a sequence dim; the "
                             f"tensor has {ndim} dim(s)")


def apply_reduce(reduce: str | Reduction, full: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """``reduce`` applied to ``full``, a detached tensor nothing else holds."""
    if not callable(reduce):
        check_reduce_input(reduce, full.ndim, batch_dim)
    if reduce == "mean_over_batch":
        return full.mean(dim=batch_dim, keepdim=True) if full.is_floating_point() else \
            full.double().mean(dim=batch_dim, keepdim=True)
    if reduce == "last_token":
        seq = sequence_dim(batch_dim)
        return full.narrow(seq, full.shape[seq] - 1, 1).contiguous()
    result = reduce(full)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"a reduce callable must return a tensor, got {type(result).__name__}")
    return result.detach()
