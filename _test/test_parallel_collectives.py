"""The autograd-aware collectives against one-process references: forward values and the
gradients their mirror collectives produce, with even and uneven shards, on 2 and 4 ranks."""

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed

from flex_surgery.parallel.collectives import (
    RemoteEditError,
    all_gather,
    broadcast_from_one,
    broadcast_status,
    exchange_sizes,
    gather_to_one,
    keep_on_one,
    one_to_replicas,
    reduce_to_one,
    replica_to_one,
    scatter_from_one,
)
from flex_surgery.parallel.piece_transfer import collect_pieces, gather_pieces

SHAPE = (3, 5, 4)


def _sizes(n: int, dim_size_even: bool, world: int) -> list[int]:
    """Per-rank sizes along the cut dim: equal, or 1, 2, 3, ... (uneven, one maybe empty)."""
    return [n] * world if dim_size_even else [r % 3 for r in range(world)]


def _cases(world):
    for dim in (0, 2):
        for even in (True, False):
            yield dim, _sizes(2, even, world)


def _global(sizes, dim, seed):
    shape = list(SHAPE)
    shape[dim] = sum(sizes)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_all(world):
    rank = dist.get_rank()
    for case, (dim, sizes) in enumerate(_cases(world)):
        x_full = _global(sizes, dim, seed=case)
        w_full = _global(sizes, dim, seed=100 + case)
        pieces = list(x_full.split(sizes, dim))
        w_pieces = list(w_full.split(sizes, dim))

        # gather_to_one: the whole on dst (rank 1 here), its gradient scattered back
        dst = 1
        x = pieces[rank].clone().requires_grad_()
        known = sizes if case % 2 == 0 else None  # sizes given or exchanged
        full = gather_to_one(x, dim, None, dst, known)
        if rank == dst:
            assert torch.equal(full, x_full)
            (full * w_full).sum().backward()
        else:
            assert full.numel() == 0
            full.sum().backward()
        assert torch.equal(x.grad, w_pieces[rank])

        # scatter_from_one: each rank its piece; gradients gathered to src
        src = 0
        start = (x_full.clone() if rank == src else torch.zeros(0, dtype=x_full.dtype))
        start.requires_grad_()
        piece = scatter_from_one(start, dim, sizes, pieces[rank].shape, None, src)
        assert torch.equal(piece, pieces[rank])
        (piece * w_pieces[rank]).sum().backward()
        if rank == src:
            assert torch.equal(start.grad, w_full)

        # all_gather: the whole everywhere; backward sums every rank's gradient
        x = pieces[rank].clone().requires_grad_()
        full = all_gather(x, dim, None, known)
        assert torch.equal(full, x_full)
        (full * (rank + 1)).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, sum(range(1, world + 1))))

        assert exchange_sizes(pieces[rank], dim, None) == tuple(sizes)


def _check_sums(world):
    rank = dist.get_rank()
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = reduce_to_one(x, None, 0)
    if rank == 0:
        assert torch.equal(total, torch.full((2, 3), float(sum(range(1, world + 1))),
                                             dtype=torch.float64))
        (total * 3).sum().backward()
    else:
        assert total.numel() == 0
        total.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))

    y = (torch.arange(6.0).reshape(2, 3) if rank == 0 else torch.zeros(0)).requires_grad_()
    out = broadcast_from_one(y, (2, 3), None, 0)
    assert torch.equal(out, torch.arange(6.0).reshape(2, 3))
    (out * 2).sum().backward()
    if rank == 0:
        assert torch.equal(y.grad, torch.full((2, 3), 2.0 * world))

    # replicas (identical copies computed on redundantly): one process's gradient on each
    r = torch.full((2,), 5.0, requires_grad=True)
    one = replica_to_one(r, None)
    assert one.numel() == (2 if rank == 0 else 0)
    back = one_to_replicas(one * 3 if rank == 0 else one, (2,), None)
    assert torch.equal(back, torch.full((2,), 15.0))
    (back * 2).sum().backward()
    assert torch.equal(r.grad, torch.full((2,), 6.0))

    z = (torch.ones(2, 3) if rank == 0 else torch.zeros(0)).requires_grad_()
    kept = keep_on_one(z, (2, 3), None, 0)
    assert torch.equal(kept, torch.ones(2, 3) * (rank == 0))
    summed = reduce_to_one(kept, None, 0)
    if rank == 0:
        assert torch.equal(summed, torch.ones(2, 3))


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_forward_backward(world):
    from rank_pool import get_pool

    get_pool(world).run(_collectives_body, {"world": world})


@distributed(world_size=2)
def _collectives_body(world):
    _check_all(world)
    _check_sums(world)


@distributed(world_size=4)
def test_status_broadcast_raises_everywhere():
    rank = dist.get_rank()
    broadcast_status(None, None, 2)  # success: nobody raises
    with pytest.raises(RemoteEditError, match="boom on rank 2"):
        broadcast_status("boom on rank 2" if rank == 2 else None, None, 2)
    broadcast_status(None, None, 0)  # the group is still in step afterwards


@distributed(world_size=2)
def test_single_rank_group_is_identity():
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    group = groups[dist.get_rank()]
    x = torch.randn(3, 2)
    assert gather_to_one(x, 0, group) is x
    assert all_gather(x, 1, group) is x


@distributed(world_size=2)
def test_without_autograd_the_same_values_and_fresh_tensors():
    """Under ``no_grad`` (retrieval) the functions run their collective without an autograd
    node and gather through a reused scratch buffer: the values are the same, and a whole tensor
    returned by one call is not changed by the next (the scratch is never what is returned)."""
    rank = dist.get_rank()
    for dim, sizes in _cases(2):
        x_full = _global(sizes, dim, seed=7)
        y_full = _global(sizes, dim, seed=8)
        x, y = x_full.split(sizes, dim)[rank], y_full.split(sizes, dim)[rank]
        with torch.no_grad():
            first = gather_to_one(x, dim, None, 0, sizes)
            second = gather_to_one(y, dim, None, 0, sizes)
            every = [all_gather(x, dim, None, sizes), all_gather(y, dim, None, sizes)]
            start = x_full.clone() if rank == 0 else torch.zeros(0, dtype=x_full.dtype)
            piece = scatter_from_one(start, dim, sizes, x.shape, None, 0)
            again = scatter_from_one(y_full.clone() if rank == 0 else start, dim, sizes,
                                     y.shape, None, 0)
        if rank == 0:
            assert torch.equal(first, x_full) and torch.equal(second, y_full)
            assert first.grad_fn is None
        else:
            assert first.numel() == 0 and second.numel() == 0
        assert torch.equal(every[0], x_full) and torch.equal(every[1], y_full)
        assert torch.equal(piece, x) and torch.equal(again, y)
        # A tensor that requires grad, with grad mode off: no graph either.
        with torch.no_grad():
            out = all_gather(x.clone().requires_grad_(), dim, None, sizes)
        assert out.grad_fn is None and not out.requires_grad


@distributed(world_size=4)
def test_gather_pieces_puts_a_tensor_cut_over_two_axes_together():
    """Four ranks as a 2 x 2 grid whose group order is not the grid order; uneven sizes along
    the first cut dim (one empty), uneven along the second: one gather, the whole on dst."""
    rank = dist.get_rank()
    rows, cols = (3, 0), (2, 1)  # sizes per coordinate along dims 0 and 2
    a_of = [1, 0, 1, 0]  # coordinate along dim 0 of each group rank
    b_of = [0, 0, 1, 1]  # coordinate along dim 2
    whole = torch.randn(sum(rows), 4, sum(cols), generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    a, b = a_of[rank], b_of[rank]
    piece = whole[sum(rows[:a]):sum(rows[:a + 1]), :, sum(cols[:b]):sum(cols[:b + 1])]
    cuts = [(0, rows, a_of), (2, cols, b_of)]
    for dst in (2, 2):  # twice: the scratch buffer reused
        got = gather_pieces(piece, cuts, None, dst)
        if rank == dst:
            assert torch.equal(got, whole)
        else:
            assert got is None


@distributed(world_size=4)
def test_collect_pieces_point_to_point_with_known_and_sent_sizes():
    """collect_pieces: the same 2 x 2 grid (group order not the grid order), sizes known or
    sent in front of each piece (one piece empty), then a tensor cut along dim 0 over two of
    the ranks and replicated over the others (only the first replica sends)."""
    rank = dist.get_rank()
    rows, cols = (3, 0), (2, 1)
    a_of, b_of = [1, 0, 1, 0], [0, 0, 1, 1]
    whole = torch.randn(sum(rows), 4, sum(cols), generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64)
    a, b = a_of[rank], b_of[rank]
    piece = whole[sum(rows[:a]):sum(rows[:a + 1]), :, sum(cols[:b]):sum(cols[:b + 1])]
    for known in (True, False, False):  # sizes known; sent (twice: the scratch reused)
        cuts = [(0, rows if known else None, a_of), (2, cols, b_of)]
        got = collect_pieces(piece, cuts, [0, 1, 2, 3], None, 1)
        if rank == 1:
            assert torch.equal(got, whole)
        else:
            assert got is None
    # Cut along dim 0 over the "a" coordinate, replicated over "b": ranks 0 and 1 send.
    halves = whole[:, :, :1].split([3, 0], 0)
    got = collect_pieces(halves[a_of[rank]] if b_of[rank] == 0 else torch.zeros(9),
                         [(0, None, a_of)], [0, 1], None, 0)
    if rank == 0:
        assert torch.equal(got, whole[:, :, :1])
    else:
        assert got is None


@distributed(world_size=4)
def test_collect_pieces_that_cannot_form_one_tensor_raise_on_every_rank_without_a_hang():
    """Two pieces at one coordinate with different sizes (sizes sent, not known): the leader
    receives every piece, every sender learns of it from the leader's answer, and every rank
    raises at this call; the group goes on."""
    from flex_surgery.parallel.layout import LayoutError

    rank = dist.get_rank()
    cuts = [(0, None, [1, 0, 1, 0]), (1, None, [0, 0, 1, 1])]
    piece = torch.ones(2 if rank == 2 else 1, 3)
    with pytest.raises(LayoutError, match="coordinate 1 along dim 0" if rank == 1 else
                       "cannot form one tensor"):
        collect_pieces(piece, cuts, [0, 1, 2, 3], None, 1)
    dist.barrier()
    assert collect_pieces(torch.ones(1, 3), cuts, [0, 1, 2, 3], None, 1) is None or rank == 1


@distributed(world_size=2)
def test_data_parallel_pieces_of_different_lengths_raise_on_every_rank():
    """Data-parallel ranks whose pieces differ in an uncut dim (different sequence lengths):
    LayoutError on both ranks at the same call, not a leader error and a sender that walks on
    into the next collective."""
    from flex_surgery.parallel.layout import LayoutError

    rank = dist.get_rank()
    piece = torch.zeros(2, 5 if rank == 0 else 7, 4)
    with pytest.raises(LayoutError, match="cannot form one tensor"):
        collect_pieces(piece, [(0, None, [0, 1])], [0, 1], None, 0)
    both = [torch.zeros(1), torch.zeros(1)]
    dist.all_gather(both, torch.ones(1))  # the next collective meets every rank
    assert torch.equal(torch.cat(both), torch.ones(2))


@distributed(world_size=4)
def test_ranks_at_different_hook_sites_raise_on_every_rank_without_a_hang():
    """Ranks that serve different hook sites at one exchange (a hook on a branch some
    data-parallel ranks skip meets another hook's gather): HookSiteMismatchError on every rank
    -- at collect_pieces (a replica that sends no piece too: it sends its header) and at
    exchange_sizes -- and the group goes on; with one site the same calls succeed."""
    from flex_surgery.parallel.site_tags import HookSiteMismatchError, site_tag

    rank = dist.get_rank()
    here, there = site_tag("blocks.0.side", "output"), site_tag("blocks.1", "output")
    cuts = [(0, None, [0, 1, 0, 1])]  # cut over ranks 0 and 1, replicated over 2 and 3
    piece = torch.full((1, 3), float(rank))
    for odd_one in (1, 3):  # a sender at another site; a replica at another site
        site = there if rank == odd_one else here
        with pytest.raises(HookSiteMismatchError,
                           match="different hooks" if rank == 0 else "another hook"):
            collect_pieces(piece, cuts, [0, 1], None, 0, rows=1, site=site)
        with pytest.raises(HookSiteMismatchError, match="rank 3: the output of 'blocks.1'"
                           if odd_one == 3 else "rank 1: the output of 'blocks.1'"):
            exchange_sizes(piece, 0, None, rows=1, site=site)
    got = collect_pieces(piece, cuts, [0, 1], None, 0, rows=1, site=here)
    if rank == 0:
        assert torch.equal(got, torch.tensor([[0.0] * 3, [1.0] * 3]))
    else:
        assert got is None
    assert exchange_sizes(piece, 0, None, rows=1, site=here) == (1, 1, 1, 1)
