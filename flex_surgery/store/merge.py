"""Putting the pieces of one (hook, step) back together as the tensor one process would store.

A step is either one whole tensor (``batch_stop == -1``: stored by the stage leader), or pieces
of rows that data-parallel replicas wrote (``store_on="replica_leaders"``), or the ``sum`` and
``count`` parts of a mean over the batch. Pieces of rows must tile the global batch exactly:
rows missing (a writer's buffer lost in a crash, a put that failed, a replica leader whose
store holds only its own rows) or stored twice (calls of two runs under one step) raise a
:class:`StoreError` that names the step and the rows; they are never concatenated into a
tensor of another size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flex_surgery.store.base import StoreError, WriteMeta

KINDS = ("tensor", "sum", "count")


def merge_pieces(name: str, pieces: Sequence[tuple[WriteMeta, torch.Tensor]],
                 batch: slice | None) -> torch.Tensor:
    """The whole tensor of one (hook, step), optionally rows ``batch`` of the global batch.

    Pieces are data-parallel slices (concatenated in batch order along ``batch_dim`` once they
    are checked to tile ``[0, batch_total)``), or the ``sum``/``count`` parts of a mean over
    the batch (summed, then divided, so the result is the mean over the whole batch however the
    replicas split it; their rows must tile the batch too).
    """
    step = pieces[0][0].step
    kinds = {m.kind for m, _ in pieces}
    if not kinds <= set(KINDS):
        raise StoreError(f"{name!r} step {step}: unknown piece kind(s) "
                         f"{sorted(kinds - set(KINDS))}; known: {KINDS}")
    if kinds & {"sum", "count"}:
        if "tensor" in kinds:
            raise StoreError(f"{name!r} step {step} holds both a tensor and the parts of a mean "
                             "over the batch: calls of different runs under one step")
        return _mean(name, step, pieces, batch)
    whole = [m for m, _ in pieces if m.batch_stop < 0]
    if whole:
        if len(pieces) != 1:
            raise StoreError(
                f"{name!r} step {step} holds {len(whole)} whole tensor(s) and "
                f"{len(pieces) - len(whole)} piece(s) of rows "
                f"{_rows([m for m, _ in pieces if m.batch_stop >= 0])} (writers "
                f"{sorted(m.writer for m, _ in pieces)}): a whole tensor is the only piece of its "
                "step, so these are calls of different runs stored under one step")
        full = pieces[0][1]
        dim = pieces[0][0].batch_dim
    else:
        ordered = _tiling(name, step, "rows", pieces)
        dim = ordered[0][0].batch_dim
        for m, t in ordered:
            if t.ndim <= dim or t.shape[dim] != m.batch_stop - m.batch_start:
                raise StoreError(f"{name!r} step {step}: writer {m.writer}'s piece of rows "
                                 f"[{m.batch_start}, {m.batch_stop}) has shape "
                                 f"{tuple(t.shape)} (batch dim {dim})")
        full = ordered[0][1] if len(ordered) == 1 else \
            torch.cat([t for _, t in ordered], dim=dim)
    if batch is None:
        return full
    return full.narrow(dim, *_bounds(batch, full.shape[dim]))


def _mean(name: str, step: int, pieces: Sequence[tuple[WriteMeta, torch.Tensor]],
          batch: slice | None) -> torch.Tensor:
    sums = [(m, t) for m, t in pieces if m.kind == "sum"]
    counts = [(m, t) for m, t in pieces if m.kind == "count"]
    # Each replica wrote its sum and its row count: a part missing (a write that failed
    # between the two) would give another mean without a word.
    if sorted(m.writer for m, _ in sums) != sorted(m.writer for m, _ in counts):
        raise StoreError(f"{name!r} holds a mean over the batch with sums from writers "
                         f"{sorted(m.writer for m, _ in sums)} and row counts from "
                         f"{sorted(m.writer for m, _ in counts)}: a part is missing (a "
                         "write failed part-way), so the mean cannot be formed")
    # The sums must cover the whole batch: a replica's sum missing gives the mean of the rest.
    _tiling(name, step, "sums over rows", sums)
    _tiling(name, step, "row counts of rows", counts)
    for m, t in counts:
        if t.numel() != 1 or int(t) != m.batch_stop - m.batch_start:
            raise StoreError(f"{name!r} step {step}: writer {m.writer}'s row count {t.tolist()} "
                             f"does not match its rows [{m.batch_start}, {m.batch_stop})")
    if batch is not None:
        raise StoreError(f"{name!r} holds a mean over the batch: it has no rows to slice")
    total = torch.stack([t for _, t in sums]).sum(0)
    count = torch.stack([t for _, t in counts]).sum(0)
    wanted = {m.mean_dtype for m, _ in sums}
    if len(wanted) != 1:
        raise StoreError(f"{name!r} step {step}: the sums of a mean over the batch ask for "
                         f"different dtypes {sorted(wanted)}: calls of different runs")
    dtype = wanted.pop()
    if dtype:
        known = getattr(torch, dtype, None)
        if not isinstance(known, torch.dtype):
            raise StoreError(f"{name!r} step {step}: unknown dtype {dtype!r} for the mean")
        return (total / count).to(known)
    return (total / count).to(sums[0][1].dtype)


def _tiling(name: str, step: int, what: str, pieces: Sequence[tuple[WriteMeta, torch.Tensor]]
            ) -> list[tuple[WriteMeta, torch.Tensor]]:
    """``pieces`` in batch order, after checking that their rows tile ``[0, batch_total)``.

    A piece written before totals were recorded has ``batch_total == -1``: its rows are still
    checked to follow one another from row 0, but where the batch ends is unknown (read as
    before). Pieces that record a total must all record the same one, and end there.
    """
    ordered = sorted(pieces, key=lambda p: (p[0].batch_start, p[0].batch_stop, p[0].writer))
    metas = [m for m, _ in ordered]
    totals = {m.batch_total for m in metas}
    dims = {m.batch_dim for m in metas}
    if any(m.batch_stop < 0 for m in metas):
        raise StoreError(f"{name!r} step {step}: {what} {_rows(metas)} mixed with a whole "
                         "tensor: calls of different runs under one step")
    if len(dims) != 1:
        raise StoreError(f"{name!r} step {step}: {what} {_rows(metas)} split along different "
                         f"batch dims {sorted(dims)}")
    if len(totals) != 1:
        raise StoreError(f"{name!r} step {step}: {what} {_rows(metas)} record different batch "
                         f"sizes {sorted(totals)} (writers {[m.writer for m in metas]}): calls "
                         "of different runs under one step")
    total = totals.pop()
    end, missing, twice = 0, [], []
    for m in metas:
        if m.batch_start > end:
            missing.append((end, m.batch_start))
        elif m.batch_start < end:
            twice.append((m.batch_start, min(end, m.batch_stop)))
        end = max(end, m.batch_stop)
    if total >= 0 and end < total:
        missing.append((end, total))
    beyond = [(total, end)] if 0 <= total < end else []
    if missing or twice or beyond:
        size = f"a batch of {total}" if total >= 0 else "a batch of unrecorded size"
        problems = [f"rows {_spans(spans)} {said}" for spans, said in (
            (missing, "are missing"), (twice, "are stored more than once"),
            (beyond, "lie past the batch's end")) if spans]
        raise StoreError(
            f"{name!r} step {step}: {what} {_rows(metas)} (writers "
            f"{[m.writer for m in metas]}) do not tile {size}: {' and '.join(problems)}. A "
            "writer's piece was lost (a crash before its buffer was written, a put that "
            "failed), a replica leader's store holds only its own rows, or two runs stored "
            "under one step; read another step, or store again with every replica leader "
            "writing to the same DiskStore directory")
    return ordered


def _rows(metas: Sequence[WriteMeta]) -> str:
    return _spans([(m.batch_start, m.batch_stop) for m in metas])


def _spans(spans: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in spans) or "(none)"


def _bounds(batch: slice, size: int) -> tuple[int, int]:
    start, stop, stride = batch.indices(size)
    if stride != 1:
        raise StoreError(f"batch slices must be contiguous, got {batch}")
    return start, max(stop - start, 0)
