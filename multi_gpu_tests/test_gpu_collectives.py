"""flex_surgery's collectives over NCCL: gather to one rank, scatter from it, all-gather with
autograd, with uneven shards (NCCL, unlike gloo, would accept them unpadded; the collectives pad
anyway, so the same code path is checked on both backends)."""

import pytest
import torch
import torch.distributed as dist

from flex_surgery.parallel.backend import backend_for_device
from flex_surgery.parallel.collectives import all_gather, gather_to_one, scatter_from_one


def _piece(rank: int, device) -> torch.Tensor:
    """Rank r holds r + 1 rows: every rank can rebuild every other rank's piece."""
    rows = torch.arange((rank + 1) * 3, dtype=torch.float32).reshape(rank + 1, 3)
    return (rows + 100 * rank).to(device)


def _whole(world_size: int, device) -> torch.Tensor:
    return torch.cat([_piece(r, device) for r in range(world_size)])


def test_backend_follows_the_device(device):
    assert dist.get_backend() == backend_for_device(device)


@pytest.mark.cuda_only
def test_nccl_on_gpus(device):
    assert device.type == "cuda" and dist.get_backend() == "nccl"


@pytest.mark.world_size(2)
def test_gather_to_one_with_uneven_pieces(device):
    rank, size = dist.get_rank(), dist.get_world_size()
    full = gather_to_one(_piece(rank, device), dim=0, dst=0)
    if rank == 0:
        assert full.device == device
        assert torch.equal(full, _whole(size, device))
    else:
        assert full.numel() == 0


@pytest.mark.world_size(2)
def test_scatter_from_one_is_the_inverse_of_gather(device):
    rank, size = dist.get_rank(), dist.get_world_size()
    sizes = [r + 1 for r in range(size)]
    full = _whole(size, device) if rank == 0 else torch.empty(0, 3, device=device)
    piece = scatter_from_one(full, dim=0, sizes=sizes, local_shape=(rank + 1, 3), src=0)
    assert torch.equal(piece, _piece(rank, device))


@pytest.mark.world_size(2)
def test_all_gather_backward_sums_every_ranks_gradient(device):
    rank, size = dist.get_rank(), dist.get_world_size()
    x = _piece(rank, device).requires_grad_()
    full = all_gather(x, dim=0)
    # Each rank weighs the whole tensor differently; the gradient of its own rows is the sum
    # of all ranks' weights over those rows.
    weights = [torch.full_like(full, float(r + 1)) * torch.arange(full.shape[0], device=device)
               [:, None] for r in range(size)]
    (full * weights[rank]).sum().backward()
    start = sum(r + 1 for r in range(rank))
    expected = sum(w[start:start + rank + 1] for w in weights)
    assert torch.equal(full.detach(), _whole(size, device))
    torch.testing.assert_close(x.grad, expected)
