"""The forked rank pool itself: results come back per rank, failures name their rank, a hung
collective fails the test within the timeout and the pool recovers."""

import pytest
import torch
import torch.distributed as dist
from rank_pool import RankFailure, RankPool, distributed, get_pool


@distributed(world_size=4)
def test_all_reduce_four_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    assert t.item() == 0 + 1 + 2 + 3
    assert dist.get_backend() == "gloo"


@pytest.mark.parametrize("world_size", [2, 8])
def test_worlds_of_other_sizes(world_size):
    ranks = get_pool(world_size).run(_rank_and_size)
    assert ranks == [(r, world_size) for r in range(world_size)]


@distributed(world_size=2)
def _rank_and_size():
    return dist.get_rank(), dist.get_world_size()


@pytest.mark.parametrize("scale", [1.0, 3.0])
@distributed(world_size=2)
def test_parameters_reach_every_rank(scale, tmp_path):
    t = torch.ones(2) * scale
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((2,), 2 * scale))
    assert tmp_path.exists()


@distributed(world_size=2)
def _live_groups():
    from flex_surgery.parallel.group_lifetime import live_group_count

    return live_group_count()


@distributed(world_size=2)
def _initialise_fairscale(destroy_in_body):
    from fairscale.nn.model_parallel import initialize as fs
    from rank_pool import destroy_fairscale_model_parallel

    fs.initialize_model_parallel(2)
    if destroy_in_body:
        destroy_fairscale_model_parallel()


@pytest.mark.parametrize("destroy_in_body", [False, True])
def test_fairscale_groups_do_not_outlive_the_body(destroy_in_body):
    """fairscale's destroy_model_parallel only forgets its groups: a pool rank that lives for
    the session would keep three gloo groups (threads, sockets) per fairscale body."""
    pool = get_pool(2)
    before = pool.run(_live_groups)
    for _ in range(3):
        pool.run(_initialise_fairscale, dict(destroy_in_body=destroy_in_body))
    assert pool.run(_live_groups) == before


@distributed(world_size=2)
def _fails_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return "fine"


def test_failure_names_the_rank_and_keeps_the_pool():
    pool = get_pool(2)
    with pytest.raises(RankFailure, match=r"rank 1 \(err\)[\s\S]*boom from rank one"):
        pool.run(_fails_on_rank_one)
    assert pool.alive
    assert pool.run(_rank_and_size) == [(0, 2), (1, 2)]


@distributed(world_size=2)
def _hangs_on_rank_zero():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins: a hung collective


def test_hung_collective_times_out_and_pool_is_replaced():
    pool = RankPool(2, timeout_s=3)
    try:
        with pytest.raises(RankFailure, match=r"rank 0 \(timeout\)"):
            pool.run(_hangs_on_rank_zero)
        assert not pool.alive
    finally:
        pool.close(force=True)
    assert get_pool(2).run(_rank_and_size) == [(0, 2), (1, 2)]


@distributed(world_size=2)
def _rank_one_dies():
    import os

    if dist.get_rank() == 1:
        os._exit(5)
    return "survived"


def test_a_dead_rank_is_reported_and_the_world_replaced():
    pool = get_pool(2)
    outcomes = pool.run_outcomes(_rank_one_dies, timeout_s=30)
    assert outcomes[0] == ("ok", "survived")
    assert outcomes[1][0] == "died" and "exit code 5" in outcomes[1][1]
    assert not pool.alive
    assert get_pool(2).run(_rank_and_size) == [(0, 2), (1, 2)]  # forked again
