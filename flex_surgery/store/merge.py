"""Putting the pieces of one (hook, step) back together as the tensor one process would store."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flex_surgery.store.base import StoreError, WriteMeta


def merge_pieces(name: str, pieces: Sequence[tuple[WriteMeta, torch.Tensor]],
                 batch: slice | None) -> torch.Tensor:
    """The whole tensor of one (hook, step), optionally rows ``batch`` of the global batch.

    Pieces are data-parallel slices (concatenated in batch order along ``batch_dim``), or the
    ``sum``/``count`` parts of a mean over the batch (summed, then divided, so the result is
    the mean over the whole batch however the replicas split it).
    """
    sums = [(m, t) for m, t in pieces if m.kind == "sum"]
    if sums:
        counts = [(m, t) for m, t in pieces if m.kind == "count"]
        # Each replica wrote its sum and its row count: a part missing (a write that failed
        # between the two) would give another mean without a word.
        if sorted(m.writer for m, _ in sums) != sorted(m.writer for m, _ in counts):
            raise StoreError(f"{name!r} holds a mean over the batch with sums from writers "
                             f"{sorted(m.writer for m, _ in sums)} and row counts from "
                             f"{sorted(m.writer for m, _ in counts)}: a part is missing (a "
                             "write failed part-way), so the mean cannot be formed")
        total = torch.stack([t for _, t in sums]).sum(0)
        count = torch.stack([t for _, t in counts]).sum(0)
        if batch is not None:
            raise StoreError(f"{name!r} holds a mean over the batch: it has no rows to slice")
        return (total / count).to(sums[0][1].dtype)
    ordered = sorted(pieces, key=lambda p: (p[0].batch_start, p[0].writer))
    if len(ordered) == 1:
        full = ordered[0][1]
    else:
        starts = [m.batch_start for m, _ in ordered]
        if len(set(starts)) != len(starts):
            raise StoreError(f"{name!r}: two writers stored the same batch rows {starts}")
        full = torch.cat([t for _, t in ordered], dim=ordered[0][0].batch_dim)
    if batch is None:
        return full
    dim = ordered[0][0].batch_dim
    return full.narrow(dim, *_bounds(batch, full.shape[dim]))


def _bounds(batch: slice, size: int) -> tuple[int, int]:
    start, stop, stride = batch.indices(size)
    if stride != 1:
        raise StoreError(f"batch slices must be contiguous, got {batch}")
    return start, max(stop - start, 0)
