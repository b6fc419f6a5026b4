"""Collectives without autograd that move the pieces of a tensor: padded to one size (gloo's
``gather``/``scatter``/``all_gather`` reject uneven pieces), received into buffers that are
reused where nothing keeps them, joined into one fresh whole tensor.

:mod:`~flex_surgery.parallel.collectives` builds its autograd-aware functions on these;
retrieval (detached, under ``no_grad``) calls them directly. :func:`gather_pieces` gathers a
tensor cut over several mesh axes in one collective (see
:meth:`~flex_surgery.parallel.axis_walk.AxisWalk.to_leader_at_once`).

Where the time goes on the CPU: a gather's bytes are written once by the backend into the
receive buffers and once more into the whole tensor; fresh host memory costs a page fault per
4 KiB page the first time it is written (glibc returns freed blocks of 128 KiB or more to the
system, so a fresh buffer per call pays that on every call). Only the whole tensor, which the
caller keeps, is fresh memory; the receive buffers are a per-thread scratch buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from flex_surgery.parallel.failures import names_lost_ranks, naming_lost_ranks
from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.parallel.site_tags import (
    NO_SITE,
    HookSiteMismatchError,
    check_same_site,
    describe_site,
)

__all__ = ["announce_pieces", "collect_pieces", "exchange_sizes", "gather_pieces", "start_gather"]

Group = dist.ProcessGroup | None


def _group_rank(group: Group) -> int:
    return dist.get_rank(group)


@names_lost_ranks
def exchange_sizes(local: torch.Tensor, dim: int, group: Group,
                   rows: int | None = None, site: int = NO_SITE) -> tuple[int, ...]:
    """Every rank's size along ``dim`` (a tiny all-gather of every rank's shape).

    The pieces are then padded along ``dim`` only, so they must agree in every other dim:
    data-parallel replicas padded to their own longest sequence do not, and a gather of them
    would abort the rank receiving a larger piece (gloo) or fill the whole tensor with
    uninitialised memory. ``rows``: this rank's input rows, for a data-parallel batch dim
    (``ShardSpec.rows``); a piece of one row where its rank's input has more is a table
    broadcast over the batch, not a piece of it. Every rank of ``group`` sees the same rows, so
    every one of them raises ``LayoutError`` here, together. ``site``: the hook site this
    exchange serves (:mod:`~flex_surgery.parallel.site_tags`); ranks at different sites raise
    ``HookSiteMismatchError``, together.
    """
    n = dist.get_world_size(group)
    if local.ndim >= _SHAPE_DIMS:  # more dims than a shape row holds: the sizes alone
        mine = torch.tensor([local.shape[dim], site], dtype=torch.int64, device=local.device)
        out = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(out, mine, group=group)
        check_same_site({_global(group, i): int(t[1]) for i, t in enumerate(out)}, _WHERE)
        return tuple(int(t[0]) for t in out)
    mine = _shape_row(local, rows, site, dim=dim).to(local.device)
    out = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(out, mine, group=group)
    table = [t.tolist() for t in out]
    check_same_site({_global(group, i): r[_SITE] for i, r in enumerate(table)}, _WHERE)
    shapes = [_row_shape(r) for r in table]
    others = {tuple(s[:dim] + s[dim + 1:]) if len(s) == local.ndim else None for s in shapes}
    if len(others) > 1 or None in others:
        raise LayoutError(
            f"the pieces of a tensor split along dim {dim} differ in another dim (shapes "
            f"{shapes}), so they are not pieces of one tensor: data-parallel ranks padding "
            f"their batches to different sequence lengths? Pad every rank to the same length")
    problem = _broadcast_over_batch(dict(enumerate(table)), dim, {})
    if problem:
        raise LayoutError(problem)
    return tuple(s[dim] for s in shapes)


def _broadcast_over_batch(table: dict[int, list[int]], dim: int,
                          others: dict[int, tuple]) -> str | None:
    """Why rows of :func:`_shape_row` (by group rank) are no pieces of a data-parallel batch,
    or ``None``: a piece of one row along ``dim`` where its rank's input has more rows; or
    pieces whose size along ``dim`` is not their ranks' input rows on every rank, with the same
    contents on every data-parallel rank (:func:`_digest`): a table without a batch dim, such
    as nanoGPT's ``wpe(arange(t))`` of ``[t, hidden]``. ``others``: each group rank's
    coordinates on the other cuts (pieces that differ there, a tensor-parallel split of the
    table, are compared among ranks with the same coordinates); ``{}``: one group."""
    odd = [(i, row[_ROWS]) for i, row in sorted(table.items())
           if row[_ROWS] > 1 and row[0] > dim and row[1 + dim] == 1]
    if odd:
        return (f"group rank(s) {[i for i, _ in odd]} hold one row along the batch dim {dim} "
                f"where their input has {sorted({r for _, r in odd})} rows: a table broadcast "
                f"over the batch (rotary or position embeddings) is the same on every replica, "
                f"not a piece of the batch, and concatenating the replicas' copies would be "
                f"wrong; give expected_shape with the whole shape (then it is taken as the same "
                f"on every replica)")
    if len(table) < 2 or not all(row[_DIGEST] for row in table.values()):
        return None
    groups: dict[tuple, list[int]] = {}
    for i, row in table.items():
        groups.setdefault(others.get(i, ()), []).append(row[_DIGEST])
    if any(len(set(digests)) > 1 for digests in groups.values()) or \
            all(len(digests) < 2 for digests in groups.values()):
        return None
    sizes = sorted({row[1 + dim] for row in table.values()})
    rows = sorted({row[_ROWS] for row in table.values()})
    return (f"every data-parallel rank holds the same tensor, with {sizes} along the batch dim "
            f"{dim} where their input has {rows} rows: a table without a batch dim (a position "
            f"table such as nanoGPT's wpe(arange(t)), learned queries) is the same on every "
            f"replica, not a piece of the batch, and concatenating the replicas' copies would "
            f"be wrong; give expected_shape with the whole shape (then it is taken as the same "
            f"on every replica)")


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _padded_shape(shape: Sequence[int], dim: int, size: int) -> list[int]:
    shape = list(shape)
    shape[dim] = size
    return shape


def _sizes(local: torch.Tensor, dim: int, group: Group,
           sizes: Sequence[int] | None) -> tuple[int, ...]:
    if sizes is not None:
        return tuple(sizes)
    return exchange_sizes(local, dim, group)


_SCRATCH = threading.local()
_SCRATCH_SHAPES = 4  # receive buffers kept per thread (one per recent piece shape)


def _scratch(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A CPU receive buffer of ``shape`` reused from call to call (per thread; the last
    ``_SCRATCH_SHAPES`` shapes). Pieces gathered into it are copied out into the whole tensor
    before the call returns, so nothing keeps it. Fresh host memory costs a page fault per page
    the first time it is written -- for a gathered activation as much as the copy itself -- and
    glibc returns freed large blocks to the system, so a fresh buffer per call pays that on
    every call. On a GPU the caching allocator already reuses memory: no scratch is kept there.
    """
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    key = (tuple(shape), like.dtype, like.device)
    buf = cache.pop(key, None)
    if buf is None:
        if len(cache) >= _SCRATCH_SHAPES:
            cache.pop(next(iter(cache)))  # the least recently used shape
        buf = like.new_empty(tuple(shape))
    cache[key] = buf  # most recently used last
    return buf


def _receive_buffers(padded: torch.Tensor, dim: int, sizes: Sequence[int],
                     reuse: bool = True,
                     ) -> tuple[list[torch.Tensor], Callable[[], torch.Tensor]]:
    """Buffers to gather (padded) pieces into, and the function that forms the whole tensor
    from them once they are filled. Along dim 0 with equal pieces the buffers are views of the
    whole tensor itself, so nothing is concatenated; otherwise one concatenation trims the
    padding and joins the pieces into a fresh tensor, and the buffers (only read by it) are a
    reused scratch buffer on the CPU (``reuse=False``: fresh ones, for a gather still in flight
    when the caller returns)."""
    n = len(sizes)
    if dim == 0 and len(set(sizes)) == 1 and padded.shape[0] > 0:
        whole = padded.new_empty((n * padded.shape[0], *padded.shape[1:]))
        return list(whole.chunk(n)), lambda: whole
    if reuse and padded.device.type == "cpu":
        bufs = list(_scratch((n, *padded.shape), padded).unbind(0))
    else:
        bufs = [torch.empty_like(padded) for _ in sizes]
    return bufs, lambda: torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)


# -- plain (non-autograd) collectives -------------------------------------------------------
@names_lost_ranks
def _gather(t: torch.Tensor, dim: int, group: Group, dst: int,
            sizes: Sequence[int]) -> torch.Tensor | None:
    top = max(sizes)
    padded = _pad(t, dim, top)
    if _group_rank(group) == dst:
        bufs, whole = _receive_buffers(padded, dim, sizes)
        dist.gather(padded, bufs, group=group, group_dst=dst)
        return whole()
    dist.gather(padded, None, group=group, group_dst=dst)
    return None


def start_gather(t: torch.Tensor, dim: int, group: Group, dst: int,
                 sizes: Sequence[int]) -> Callable[[], torch.Tensor | None]:
    """Start gathering every rank's ``t`` along ``dim`` to ``dst`` without waiting for it;
    returns ``finish()``, which waits and returns the whole tensor on ``dst`` (``None``
    elsewhere). Not autograd-aware: for retrieval.

    The bytes sent are a private copy (``t`` may be changed in place by the model before they
    have left), so the caller may go on computing while they travel.
    """
    top = max(sizes)
    padded = _pad(t.detach(), dim, top)
    if padded.data_ptr() == t.data_ptr():
        padded = padded.clone()
    bufs, whole = _receive_buffers(padded, dim, sizes, reuse=False) \
        if _group_rank(group) == dst else (None, None)
    with naming_lost_ranks(group, "gather"):
        work = dist.gather(padded, bufs, group=group, group_dst=dst, async_op=True)

    def finish() -> torch.Tensor | None:
        with naming_lost_ranks(group, "gather"):
            work.wait()
        return None if whole is None else whole()

    return finish


@names_lost_ranks
def _scatter(full: torch.Tensor | None, dim: int, group: Group, src: int,
             sizes: Sequence[int], local_shape: Sequence[int], like: torch.Tensor,
             ) -> torch.Tensor:
    top = max(sizes)
    me = _group_rank(group)
    out = like.new_empty(_padded_shape(local_shape, dim, top))
    if me == src:
        assert full is not None
        parts = full.split(list(sizes), dim=dim)
        if full.device.type == "cpu" and not all(p.shape[dim] == top and p.is_contiguous()
                                                 for p in parts):
            # Pieces that need a copy (cut along an inner dim, or padded) are copied into the
            # scratch buffer: the backend only reads them. The padding is never read back.
            pieces = list(_scratch((len(parts), *out.shape), full).unbind(0))
            for buf, part in zip(pieces, parts):
                buf.narrow(dim, 0, part.shape[dim]).copy_(part)
        else:
            pieces = [_pad(p, dim, top) for p in parts]
        dist.scatter(out, pieces, group=group, group_src=src)
    else:
        dist.scatter(out, None, group=group, group_src=src)
    # The receive buffer itself when this rank's piece fills it: not a view, which a model
    # changing the edited tensor in place after the hook could not modify (autograd forbids
    # in-place changes of a view a custom Function returns).
    return out if sizes[me] == top else out.narrow(dim, 0, sizes[me])


@names_lost_ranks
def _all_gather(t: torch.Tensor, dim: int, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    top = max(sizes)
    padded = _pad(t, dim, top)
    bufs, whole = _receive_buffers(padded, dim, sizes)
    dist.all_gather(bufs, padded, group=group)
    return whole()


@names_lost_ranks
def gather_pieces(t: torch.Tensor, cuts: Sequence[tuple[int, Sequence[int], Sequence[int]]],
                  group: Group, dst: int) -> torch.Tensor | None:
    """Every rank's ``t`` to ``dst`` in one gather, put together along several dims at once.

    ``cuts``: per cut dim, ``(dim, sizes, coordinates)`` -- the size of the piece at each
    coordinate along that dim, and the coordinate of each rank of ``group`` (in group rank
    order). Pieces are padded to the largest size along each cut dim (the backend gathers equal
    pieces) and trimmed when they are copied into place. Returns the whole tensor, fresh, on
    ``dst``; ``None`` elsewhere. Not autograd-aware: for retrieval.
    """
    padded = t
    for dim, sizes, _ in cuts:
        padded = _pad(padded, dim, max(sizes))
    padded = padded.contiguous()
    if _group_rank(group) != dst:
        dist.gather(padded, None, group=group, group_dst=dst)
        return None
    n = dist.get_world_size(group)
    shape = (n, *padded.shape)
    stack = _scratch(shape, padded) if padded.device.type == "cpu" else padded.new_empty(shape)
    bufs = list(stack.unbind(0))
    dist.gather(padded, bufs, group=group, group_dst=dst)
    whole_shape = list(padded.shape)
    for dim, sizes, _ in cuts:
        whole_shape[dim] = sum(sizes)
    whole = padded.new_empty(whole_shape)
    for i, buf in enumerate(bufs):
        place = whole
        for dim, sizes, coords in cuts:
            c = coords[i]
            buf = buf.narrow(dim, 0, sizes[c])
            place = place.narrow(dim, sum(sizes[:c]), sizes[c])
        place.copy_(buf)
    return whole


# The tags of collect_pieces' shapes and pieces: apart from each other (no reliance on the order
# in which one connection delivers them) and from any other send/recv.
_SHAPE_TAG, _PIECE_TAG, _STATUS_TAG = 0x7068, 0x7069, 0x706A
_SHAPE_DIMS = 17  # a sent shape: [ndim, dims..., -1...] (up to 16 dims; ndim -1: more)
# then the rank's input rows, the hook site, whether a piece follows and its element size
# (see _shape_row)
# (see _shape_row), and a digest of its contents where its batch size is not its input's rows
_ROWS, _SITE, _SENDS, _ITEM = _SHAPE_DIMS, _SHAPE_DIMS + 1, _SHAPE_DIMS + 2, _SHAPE_DIMS + 3
_DIGEST = _SHAPE_DIMS + 4
_HEAD = _SHAPE_DIMS + 5
_DIGEST_SAMPLES = 4096  # elements a digest reads, evenly spaced
_WHERE = "the exchange of the pieces' shapes"


@names_lost_ranks
def collect_pieces(t: torch.Tensor, cuts: Sequence[tuple[int, Sequence[int] | None,
                                                         Sequence[int]]],
                   senders: Sequence[int], group: Group, dst: int,
                   rows: int | None = None, site: int = NO_SITE) -> torch.Tensor | None:
    """The pieces of ``senders`` (group ranks, ``dst`` among them) sent to ``dst`` point to
    point and put together in place in one fresh tensor; ``None`` elsewhere. CPU tensors: for
    retrieval, not autograd-aware.

    ``cuts`` as for :func:`gather_pieces`, except that ``sizes`` may be ``None`` (a
    data-parallel batch): then every sender first sends its shape, in front of its piece, so
    the sizes cost no exchange -- the senders need nobody's sizes, since nothing is padded --
    and the leader answers each sender whether the shapes form one tensor. Pieces that do not
    (data-parallel ranks with different sequence lengths) are still received (no sender is
    left waiting), then every rank raises ``LayoutError`` at this call; the answer travels
    while the pieces do, so it costs no round trip of its own. With every size known and no
    hook ``site``, nothing but the pieces travels: a piece that is not the shape the layout
    says is the backend's error, as in any collective. Given a ``site``, headers travel
    whatever is known (the leader then takes every piece's shape from its header): that is
    where data-parallel ranks at different hooks meet. Against a ``dist.gather`` (gloo's
    runs on a worker thread), the leader receives every piece straight into the whole tensor
    where its place there is contiguous (else through the scratch buffer), and copies its own
    piece in place while the others arrive. A rank not in ``senders`` (a replica on a
    replicated axis) sends its header only (saying that no piece follows) where headers
    travel, and does nothing otherwise.
    ``rows``: this rank's input rows, sent with its shape for the cut of unknown sizes (see
    :func:`exchange_sizes`): pieces that are a table broadcast over the batch raise too, and so
    do pieces sent for another hook ``site`` than the leader's.
    """
    return _collect(t, cuts, senders, group, dst, rows, site, pieces=True)[0]


@names_lost_ranks
def announce_pieces(t: torch.Tensor, cuts: Sequence[tuple[int, Sequence[int] | None,
                                                          Sequence[int]]],
                    senders: Sequence[int], group: Group, dst: int,
                    rows: int | None = None, site: int = NO_SITE) -> tuple[int, ...]:
    """The exchange of shapes in front of :func:`collect_pieces`, without the pieces: every
    rank sends ``dst`` its header, ``dst`` checks that the pieces of ``senders`` would form one
    tensor (the same checks, the same errors on every rank) and answers every rank with the
    sizes, by coordinate, along the first cut of unknown sizes. Returns those sizes (``()``
    when every size is known: then it announces the hook ``site`` only).

    For a gather that must stay autograd-aware (an edit) on the CPU: its sizes cost no more
    than :func:`exchange_sizes`, and its first message is the one a retrieval at another hook
    sends, so a data-parallel rank at another hook site -- an edit here, a retrieval there --
    raises ``HookSiteMismatchError`` with this one instead of waiting in a different
    collective."""
    return _collect(t, cuts, senders, group, dst, rows, site, pieces=False)[1]


def _collect(t: torch.Tensor, cuts, senders: Sequence[int], group: Group, dst: int,
             rows: int | None, site: int, pieces: bool,
             ) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """:func:`collect_pieces` (``pieces``) or :func:`announce_pieces`: (the whole tensor on
    ``dst``, the sizes by coordinate along the first cut of unknown sizes). One protocol for
    both, so that each recognises the other's messages: a header says whether a piece follows,
    and the answer is ``[status, sizes...]`` for every rank of the group."""
    me, n = _group_rank(group), dist.get_world_size(group)
    unknown_dim = next((dim for dim, sizes, _ in cuts if sizes is None), None)
    # Headers travel for a cut of unknown sizes, and for a hook site (data-parallel ranks may
    # be at different sites: the headers are where they meet, see site_tags).
    header = any(sizes is None for _, sizes, _ in cuts) or site != NO_SITE
    if not header and not pieces:
        raise ValueError("announce_pieces needs a cut of unknown sizes or a hook site "
                         "(nothing to announce)")
    sending = me in senders and pieces
    if me != dst:
        # With headers, every rank of the group sends one, a replica that sends no piece too:
        # the leader then hears from ranks whose layout differs from its own (they reached
        # another hook), receives what they announce, and answers all of them.
        if not sending and not header:
            return None, ()
        works, status, row = [], None, None
        if header:
            row = _shape_row(t, rows, site, sends=sending, dim=unknown_dim)
            works.append(dist.isend(row, group=group, group_dst=dst, tag=_SHAPE_TAG))
            status = torch.zeros(1 + n, dtype=torch.int64)
            works.append(dist.irecv(status, group=group, group_src=dst, tag=_STATUS_TAG))
        sent = (_row_shape(row.tolist()) if header else _known_shape(t, cuts, me)) \
            if sending else (0,)
        if _numel(sent):  # as dst decides (a shape it cannot be told: nothing)
            works.append(dist.isend(t.contiguous(), group=group, group_dst=dst,
                                    tag=_PIECE_TAG))
        for work in works:
            work.wait()
        if status is None:
            return None, ()
        answer = status.tolist()
        if answer[0] == 2:  # the answer holds the leader's site: this rank names both
            check_same_site({_global(group, me): site, _global(group, dst): answer[1]}, _WHERE)
            raise HookSiteMismatchError(  # the leader saw another rank's site differ
                f"{_WHERE}: this rank was at the {describe_site(site)}, as was group rank "
                f"{dst}; another rank of the group was at another hook (group rank {dst}'s "
                f"error names it)")
        if answer[0]:
            raise LayoutError(f"{_what(pieces)}: the pieces of rank(s) {senders} cannot form "
                              f"one tensor (group rank {dst}'s error says why)")
        return None, tuple(s for s in answer[1:] if s >= 0)
    others = [i for i in senders if i != dst]
    shapes = {dst: tuple(t.shape)}
    mismatch = None
    if header:
        askers = [i for i in range(n) if i != dst]
        heads = {i: torch.empty(_HEAD, dtype=torch.int64) for i in askers}
        for work in [dist.irecv(h, group=group, group_src=i, tag=_SHAPE_TAG)
                     for i, h in heads.items()]:
            work.wait()
        table = {i: h.tolist() for i, h in heads.items()}
        table[dst] = _shape_row(t, rows, site, sends=True, dim=unknown_dim).tolist()
        try:
            check_same_site({_global(group, i): r[_SITE] for i, r in table.items()}, _WHERE)
        except HookSiteMismatchError as exc:
            mismatch = exc
        # what each rank announced is received, whatever this rank's layout expects
        arriving = [i for i in askers if table[i][_SENDS]]
        shapes.update({i: _row_shape(table[i]) for i in arriving})
        # announced, nothing should arrive: the shapes to check are the senders' headers
        checked = shapes if pieces else {dst: shapes[dst], **{
            i: _row_shape(table[i]) for i in others}}
        expected, others = (set(senders) - {dst} if pieces else set()), arriving
    else:
        shapes.update({i: _known_shape(t, cuts, i) for i in others})
        checked = shapes
    offsets, error = _places(checked, cuts, t.ndim) if mismatch is None else \
        (None, str(mismatch))
    if header and error is None and set(others) != expected:
        error = (f"group ranks {others} sent pieces where {sorted(expected)} were expected: "
                 f"the ranks see the tensor split differently")
    if header and error is None:  # the shapes fit; are they pieces of the batch?
        for dim, sizes, _ in cuts:
            if sizes is None and error is None:
                apart = {i: tuple(coords[i] for d, _, coords in cuts if d != dim)
                         for i in table}
                error = _broadcast_over_batch(table, dim, apart)
    items = {i: table[i][_ITEM] for i in {*others, *checked} - {dst}} if header else {}
    if error is None and any(size != t.element_size() for size in items.values()):
        error = (f"the pieces' elements are {items} bytes wide where group rank {dst}'s are "
                 f"{t.element_size()}: the ranks hold different dtypes")
    status = 0 if error is None else 2 if mismatch is not None else 1
    announced: tuple[int, ...] = ()
    if header and error is None and unknown_dim is not None:
        announced = tuple(offsets[unknown_dim].values())
    answer = torch.full((1 + n,), -1, dtype=torch.int64)
    answer[0] = status
    answer[1:1 + len(announced)] = torch.tensor(announced, dtype=torch.int64)
    if mismatch is not None:
        answer[1] = table[dst][_SITE]
    answers = [dist.isend(answer, group=group, group_dst=i, tag=_STATUS_TAG)
               for i in askers] if header else []
    whole = None
    if pieces and error is None:
        whole_shape = list(t.shape)
        for dim, _, _ in cuts:
            whole_shape[dim] = sum(offsets[dim].values())
        whole = t.new_empty(whole_shape)
    regions = {} if whole is None else \
        {i: _region(whole, shape, offsets, cuts, i) for i, shape in shapes.items()}
    spare = [i for i in others if _numel(shapes[i]) and
             (whole is None or not regions[i].is_contiguous())]
    if whole is None:  # an error: what was announced is received as bytes (any dtype), dropped
        nbytes = {i: _numel(shapes[i]) * items.get(i, t.element_size()) for i in spare}
        flat = torch.empty(sum(nbytes.values()), dtype=torch.uint8)
    else:
        flat = _scratch((sum(_numel(shapes[i]) for i in spare),), t) if spare else None
    at, works, landing = 0, [], []  # landing: (place in the whole or None, buffer received into)
    for i in others:
        n_i = _numel(shapes[i])
        if not n_i:
            continue
        if whole is None:
            buf = flat.narrow(0, at, nbytes[i])
            at += nbytes[i]
        elif i in spare:
            buf = flat.narrow(0, at, n_i).view(shapes[i])
            at += n_i
        else:
            buf = regions[i]
        landing.append((regions.get(i), buf))
        works.append(dist.irecv(buf, group=group, group_src=i, tag=_PIECE_TAG))
    if whole is not None:
        regions[dst].copy_(t)  # while the others' pieces arrive
    for work, (region, buf) in zip(works, landing):
        work.wait()
        if region is not None and buf is not region:
            region.copy_(buf)
    for work in answers:
        work.wait()
    if mismatch is not None:  # every piece received (no sender is left waiting), then raise
        raise mismatch
    if error is not None:
        raise LayoutError(f"{_what(pieces)}: {error}")
    return whole, announced


def _global(group: Group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def _what(pieces: bool) -> str:
    return "retrieval over the stage" if pieces else "the gather over the stage"


def _shape_row(t: torch.Tensor, rows: int | None = None, site: int = NO_SITE,
               sends: bool = True, dim: int | None = None) -> torch.Tensor:
    """``[ndim, dims..., -1..., rows, site, sends, item, digest]``: a piece's shape (up to 16
    dims; ndim -1: more), its rank's input rows (-1: unknown, see
    :func:`_broadcast_over_batch`), the hook site it is sent for
    (:mod:`~flex_surgery.parallel.site_tags`), whether the piece follows
    (:func:`collect_pieces`: a replica that sends none still sends its row), its element size
    (a leader at another site may hold another dtype: it receives the bytes) and, where its
    size along the batch ``dim`` is not its input's ``rows``, a :func:`_digest` of it (0:
    none)."""
    row = torch.full((_HEAD,), -1, dtype=torch.int64)
    if t.ndim < _SHAPE_DIMS:
        row[0] = t.ndim
        row[1:1 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
    if rows is not None:
        row[_ROWS] = rows
    row[_SITE] = site
    row[_SENDS] = int(sends)
    row[_ITEM] = t.element_size()
    row[_DIGEST] = _digest(t) if rows is not None and dim is not None and \
        0 <= dim < t.ndim and t.shape[dim] != rows else 0
    return row


def _digest(t: torch.Tensor) -> int:
    """A number that data-parallel ranks holding the same tensor (a table without a batch
    dim) compute alike, and ranks holding different pieces almost surely do not: a weighted sum
    of the bytes of up to ``_DIGEST_SAMPLES`` evenly spaced elements (never 0). Only computed
    where a piece's batch size is not its input's rows, which a batch's pieces rarely show.
    Pieces that differ only between the samples read alike, and are refused as a table: an
    error, never a wrong number."""
    flat = t.detach().reshape(-1)
    if flat.numel() > _DIGEST_SAMPLES:
        flat = flat[::flat.numel() // _DIGEST_SAMPLES][:_DIGEST_SAMPLES]
    data = flat.contiguous().view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, data.numel() + 1, dtype=torch.int64, device=data.device)
    return int((data * weights).sum()) % (2**61 - 1) or 1


def _row_shape(row: list[int]) -> tuple[int, ...]:
    """The shape a row of :func:`_shape_row` carries; ``(-1,)`` for more dims than it holds."""
    return tuple(row[1:1 + row[0]]) if row[0] >= 0 else (-1,)


def _known_shape(t: torch.Tensor, cuts, i: int) -> tuple[int, ...]:
    """Group rank ``i``'s piece shape from the known sizes (the uncut dims are ``t``'s)."""
    shape = list(t.shape)
    for dim, sizes, coords in cuts:
        shape[dim] = sizes[coords[i]]
    return tuple(shape)


def _numel(shape: Sequence[int]) -> int:
    """Elements of ``shape``; 0 for the ``(-1,)`` of a shape that could not be sent."""
    if any(s < 0 for s in shape):
        return 0
    n = 1
    for s in shape:
        n *= s
    return n


def _places(shapes: dict[int, tuple[int, ...]], cuts, ndim: int,
            ) -> tuple[dict[int, dict[int, int]], str | None]:
    """Per cut dim, the size at each coordinate (from the pieces' shapes), or why the pieces
    cannot form one tensor (pieces of one coordinate that differ, uneven uncut dims)."""
    sizes: dict[int, dict[int, int]] = {dim: {} for dim, _, _ in cuts}
    cut = {dim for dim, _, _ in cuts}
    first = next(iter(shapes.values()))
    for i, shape in shapes.items():
        if len(shape) != ndim or any(shape[d] != first[d] for d in range(ndim) if d not in cut):
            return sizes, (f"pieces of shapes {shape} and {first} cannot form one tensor: "
                           f"they differ in a dim no axis cuts (data-parallel ranks padding "
                           f"their batches to different sequence lengths? Pad every rank to "
                           f"the same length)")
        for dim, _, coords in cuts:
            seen = sizes[dim].setdefault(coords[i], shape[dim])
            if seen != shape[dim]:
                return sizes, (f"pieces at coordinate {coords[i]} along dim {dim} have sizes "
                               f"{seen} and {shape[dim]}")
    for dim in sizes:
        sizes[dim] = dict(sorted(sizes[dim].items()))
    return sizes, None


def _region(whole: torch.Tensor, shape: tuple[int, ...], sizes: dict[int, dict[int, int]],
            cuts, i: int) -> torch.Tensor:
    """The place of group rank ``i``'s piece in ``whole``."""
    region = whole
    for dim, _, coords in cuts:
        c = coords[i]
        start = sum(s for k, s in sizes[dim].items() if k < c)
        region = region.narrow(dim, start, shape[dim])
    return region
