"""The unembedding side of the logit lens: this rank's vocabulary slice and the exact top-k.

Split from :mod:`flex_surgery.lens` (which re-exports :class:`LensError`) because it is the
part that knows frameworks: which vocabulary rows a tensor-parallel head holds is the framework
registry's shard view of its weight, and the exact global top-k over a vocabulary split across
the tensor-parallel ranks needs one all-gather of ``2k + 1`` numbers per position (each rank's
local top-k and local log-sum-exp; the global top-k is among the union of the local ones, and
the global log-sum-exp is the log-sum-exp of the local ones).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["LensError", "local_topk", "merge_topk"]


class LensError(RuntimeError):
    """The lens cannot run on this model (no known head, an unembedding split it cannot
    follow, a block that did not run, ...)."""


@dataclass
class _Unembedding:
    """This rank's slice of the unembedding: ``logits = h @ weight.T + bias`` for the vocabulary
    ids ``offset .. offset + len(weight) - 1`` of ``vocab_size``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    offset: int
    vocab_size: int


_LINEAR_HEADS = ("Linear", "ColumnParallelLinear")
_EMBEDDING_HEADS = ("Embedding", "VocabParallelEmbedding")


def _weight_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [vocab, hidden], bias)`` of a head module, as the module holds them."""
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise LensError(f"the unembedding {kind} has no 2-D weight")
    if kind == "Conv1D":  # transformers' GPT-2 style: weight is [hidden, vocab]
        return weight.t(), getattr(module, "bias", None)
    if isinstance(module, nn.Linear) or kind in _LINEAR_HEADS:
        return weight, getattr(module, "bias", None)
    if isinstance(module, nn.Embedding) or kind in _EMBEDDING_HEADS:
        return weight, None
    raise LensError(
        f"the unembedding is a {kind}; the lens knows nn.Linear, nn.Embedding (tied), "
        "transformers' Conv1D, and fairscale / Megatron-core ColumnParallelLinear and "
        "VocabParallelEmbedding")


def _local_unembedding(module: nn.Module, mesh: Any) -> _Unembedding:
    """How this rank computes its part of the logits (see the module docstring).

    Which vocabulary rows this rank holds is the framework registry's shard view of the weight
    (:func:`~flex_surgery.parallel.frameworks.parameter_view`: fairscale, Megatron-core,
    DTensor / HF ``tp_plan``); a weight no framework owns must be the same on every
    tensor-parallel rank (checked). The tensor-parallel ranks then exchange their row ranges
    (one ``all_gather_object``, entered by all of them whatever they hold) and go on only if
    the ranges tile the vocabulary exactly -- a split along the hidden dim, over another axis
    than tensor parallelism, or with strided rows is an error on every rank.
    """
    from flex_surgery.parallel import frameworks
    from flex_surgery.parallel.frameworks.base import LayoutError, differs_across
    from flex_surgery.parallel.layout import chunk_sizes

    kind = type(module).__name__
    _, bias = _weight_rows(module)  # a head the lens knows, with a 2-D weight
    vocab_dim = 1 if kind == "Conv1D" else 0  # of the stored weight
    tp = mesh.tp_size if mesh is not None else 1
    tp_group = mesh.group("tp") if tp > 1 else None
    try:  # the same answer on every tensor-parallel rank (module attributes, placements)
        view = frameworks.parameter_view(f"{kind}.weight", module, "weight", module.weight)
        bias_view = None if bias is None else \
            frameworks.parameter_view(f"{kind}.bias", module, "bias", bias)
    except (LayoutError, NotImplementedError) as err:  # e.g. interleaved Megatron partitions
        raise LensError(f"the unembedding {kind}: {err}") from err
    vocab, hidden = view.full_shape[vocab_dim], view.full_shape[1 - vocab_dim]
    problem = None
    if not isinstance(view.region, frameworks.BlockRegion):
        problem = (f"the unembedding {kind}'s weight is split into strided rows "
                   f"({view.kind}); the lens follows a vocabulary split into blocks")
    elif view.local.shape[1 - vocab_dim] != hidden:
        problem = (f"the unembedding {kind} is split along its hidden dimension; the lens "
                   "needs whole hidden vectors (a vocabulary split)")
    start = view.region.offsets[vocab_dim] if problem is None else 0
    piece = (problem, view.kind, start, int(view.local.shape[vocab_dim]), int(vocab))
    pieces = [piece]
    if tp_group is not None:
        pieces = [None] * tp
        dist.all_gather_object(pieces, piece, group=tp_group)
    problems = [p[0] for p in pieces if p[0]]
    if not problems and len({p[4] for p in pieces}) > 1:
        problems = [f"the unembedding {kind} has vocabularies of sizes {[p[4] for p in pieces]} "
                    "on the tensor-parallel ranks; they must agree"]
    if problems:
        raise LensError(problems[0])
    if view.kind == "plain" and tp_group is not None and differs_across([view.local],
                                                                          tp_group)[0]:
        raise LensError(
            f"the unembedding {kind} is a plain module that differs across tensor-parallel "
            "ranks, so how its vocabulary is split is unknown; build it from a tensor-parallel "
            "layer (fairscale / Megatron ColumnParallelLinear, VocabParallelEmbedding, an HF "
            "tp_plan) or keep it whole on every rank")
    weight = view.local.t() if vocab_dim else view.local
    local_bias = None if bias_view is None else bias_view.local
    tp_rank = mesh.rank("tp") if tp > 1 else 0
    if all(count == vocab for *_, count, _ in pieces):
        # Whole on every rank: the tensor-parallel ranks still share the work by vocabulary.
        sizes = chunk_sizes(vocab, tp)
        first = sum(sizes[:tp_rank])
        rows = slice(first, first + sizes[tp_rank])
        return _Unembedding(weight[rows], None if local_bias is None else local_bias[rows],
                            first, vocab)
    ranges = sorted((first, count) for _, _, first, count, _ in pieces)
    if [first for first, _ in ranges] != list(itertools.accumulate(
                [0] + [count for _, count in ranges[:-1]])) or \
            sum(count for _, count in ranges) != vocab:
        raise LensError(
            f"the unembedding {kind}'s vocabulary rows (first, count) per tensor-parallel rank "
            f"are {[(p[2], p[3]) for p in pieces]} of {vocab}: they do not split the "
            "vocabulary over tensor parallelism exactly (a split over another axis -- FSDP "
            "shards it over the data-parallel ranks -- or overlapping rows); the lens follows a "
            "vocabulary split over tensor parallelism only")
    if local_bias is not None and local_bias.shape[0] != weight.shape[0]:
        local_bias = local_bias[start:start + weight.shape[0]]  # a bias kept whole
    return _Unembedding(weight, local_bias, start, vocab)


def _topk_smaller_id(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``logits`` (``k <= logits.shape[-1]``), ties broken by
    the smaller column: ``(values, columns)``, in no particular order.

    A NaN counts as larger than any number, as in :func:`torch.topk`, :func:`torch.sort` and
    :func:`torch.argmax`. :func:`torch.topk` returns the right values but any members of a tie,
    so it is asked for ``k + 1``: where the ``k``-th and ``(k + 1)``-th values differ, the ``k``
    returned are the only possible ones. Rows tied there (frequent in bf16) ask for
    ``_TIE_SLACK`` (64) more; where the last of those is below the ``k``-th value every tied column
    is among them, and they are ordered by (value, column). Only rows with more ties than that
    take a pass over their logits: every column above the ``k``-th value, then the smallest
    columns equal to it. No row's logits are ever sorted."""
    n = logits.shape[-1]
    values, columns = logits.topk(min(k + 1, n), dim=-1)
    if values.shape[-1] == k:  # the whole row
        return values, columns
    tied = _not_below(values[:, k], values[:, k - 1])
    values, columns = values[:, :k], columns[:, :k]
    rows = tied.nonzero().squeeze(-1)
    if not rows.numel():
        return values, columns
    part = logits[rows]
    more, cols = part.topk(min(k + _TIE_SLACK, n), dim=-1)
    last, kth = more.shape[-1] - 1, more[:, k - 1:k]
    done = torch.ones_like(rows, dtype=torch.bool) if last == n - 1 else \
        ~_not_below(more[:, last], kth[:, 0])  # every tied column is a candidate
    order = torch.argsort(cols, dim=-1, stable=True)
    more, cols = more.gather(-1, order), cols.gather(-1, order)
    best = torch.argsort(more, dim=-1, descending=True, stable=True)[:, :k]  # NaN first
    values[rows[done]] = more.gather(-1, best)[done]
    columns[rows[done]] = cols.gather(-1, best)[done]
    if not done.all():
        left = (~done).nonzero().squeeze(-1)
        part, t = part[left], kth[left]
        nan, t_nan = part.isnan(), t.isnan()
        above = ~t_nan & (nan | (part > t))  # nothing is above a NaN
        equal = torch.where(t_nan, nan, part == t)
        need = k - above.sum(-1, keepdim=True)
        keep = above | (equal & (equal.cumsum(-1) <= need))  # exactly k per row
        picked = keep.nonzero()[:, 1].view(len(left), k)  # ascending columns, row by row
        values[rows[left]], columns[rows[left]] = part.gather(-1, picked), picked
    return values, columns


# How many more candidates than k a row whose k-th value is tied asks torch.topk for.
_TIE_SLACK = 64


def _not_below(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x >= y`` elementwise, with a NaN above any number (for ``x <= y`` in that order, as
    in :func:`torch.topk`'s output: then it is ``x == y``)."""
    return (x >= y) | x.isnan()


def local_topk(u: _Unembedding, h: torch.Tensor, k: int, chunk_elements: int) -> torch.Tensor:
    """``[rows, 2k + 1]``: this rank's top-k logits of each row of ``h``, their vocabulary ids,
    and the log-sum-exp of its slice (float64; -inf / -1 where the slice has fewer than k).

    The top-k is exact under the lens's rule -- the k largest, ties broken by the smaller id,
    a NaN above any number (:func:`_topk_smaller_id`) -- so every rank's candidates hold the
    global top-k under that rule, whatever the vocabulary split.

    Every row goes through the same weight, so all are decoded together, in chunks whose
    logits stay under ``chunk_elements`` elements (the weight is read once per chunk)."""
    out = torch.full((h.shape[0], 2 * k + 1), -math.inf, dtype=torch.float64)
    out[:, k:2 * k] = -1
    kk = min(k, u.weight.shape[0])
    if not kk or not h.shape[0]:
        return out
    step = max(1, chunk_elements // u.weight.shape[0])
    with torch.no_grad():
        for first in range(0, h.shape[0], step):
            logits = F.linear(h[first:first + step], u.weight, u.bias).float()
            values, ids = _topk_smaller_id(logits, kk)
            rows = slice(first, first + logits.shape[0])
            out[rows, :kk] = values.double().cpu()
            out[rows, k:k + kk] = (ids + u.offset).double().cpu()
            out[rows, 2 * k] = torch.logsumexp(logits, dim=-1).double().cpu()
    return out


def merge_topk(packed: torch.Tensor, k: int, mesh: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k ids and log-probabilities from every tensor-parallel rank's candidates
    (:func:`local_topk` rows): one all-gather of ``[layers, rows, 2k + 1]``.

    Ordered by value, largest first (a NaN first, as in :func:`torch.sort`), ties by the smaller
    id; a rank's padding (id -1, where its slice has fewer than k ids) comes after every real
    candidate, -inf ones included."""
    if mesh is not None and mesh.tp_size > 1:
        parts = [torch.empty_like(packed) for _ in range(mesh.tp_size)]
        dist.all_gather(parts, packed, group=mesh.group("tp"))
    else:
        parts = [packed]
    values = torch.cat([p[..., :k] for p in parts], dim=-1)
    ids = torch.cat([p[..., k:2 * k] for p in parts], dim=-1)
    lse = torch.logsumexp(torch.stack([p[..., 2 * k] for p in parts], dim=-1), dim=-1)
    # Ties broken by the smaller id, whatever the rank order; padding last.
    order = torch.argsort(torch.where(ids < 0, math.inf, ids), dim=-1, stable=True)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    best = torch.argsort(values, dim=-1, descending=True, stable=True)[..., :k]
    top_values, top_ids = values.gather(-1, best), ids.gather(-1, best)
    return top_ids.long(), (top_values - lse.unsqueeze(-1)).float()
