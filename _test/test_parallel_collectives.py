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
