"""ParallelMesh: built in (pp, dp, tp) order, adopted from fairscale (dp, pp, tp) and from a
DeviceMesh, and a clear error when sizes do not multiply to the world."""

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery.parallel.mesh import MeshSizeError, ParallelMesh


def _ranks(group):
    return dist.get_process_group_ranks(group) if group is not None else None


@distributed(world_size=4)
def test_built_mesh_orders_pp_dp_tp():
    rank = dist.get_rank()
    mesh = ParallelMesh.build(tp=2, dp=2)
    assert mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    assert mesh.coords == {"dp": rank // 2, "tp": rank % 2, "pp": 0}
    assert _ranks(mesh.group("tp")) == [rank - rank % 2, rank - rank % 2 + 1]
    assert _ranks(mesh.group("dp")) == [rank % 2, rank % 2 + 2]
    assert mesh.group("pp") is None and mesh.stage_group is None
    assert mesh.is_stage_leader() == (rank == 0)

    staged = ParallelMesh.build(tp=2, pp=2)  # dp fills in: 1
    assert staged.sizes == {"dp": 1, "tp": 2, "pp": 2}
    assert staged.stage == rank // 2
    assert _ranks(staged.stage_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert staged.stage_leader() == rank - rank % 2
    assert _ranks(staged.group("pp")) == [rank % 2, rank % 2 + 2]


@distributed(world_size=4)
def test_sizes_that_do_not_multiply_to_the_world_are_an_error():
    with pytest.raises(MeshSizeError, match=r"dp=3 x tp=2 x pp=1 = 6 does not match .* 4"):
        ParallelMesh.build(tp=2, dp=3)
    with pytest.raises(MeshSizeError, match="does not divide"):
        ParallelMesh.build(tp=3)


@distributed(world_size=8)
def test_fairscale_groups_are_adopted_in_their_order():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2, pipeline_length=2)
    rank = dist.get_rank()
    mesh = ParallelMesh.adopt(nn.Linear(2, 2))
    assert mesh.source == "fairscale"
    # fairscale: ranks = (dp, pp, tp) grid
    assert mesh.coords == {"tp": rank % 2, "pp": (rank // 2) % 2, "dp": rank // 4}
    assert mesh.group("tp") is fs.get_model_parallel_group()
    assert mesh.group("dp") is fs.get_data_parallel_group()
    stage = [r for r in range(8) if (r // 2) % 2 == mesh.stage]
    assert _ranks(mesh.stage_group) == stage
    assert mesh.stage_leader() == stage[0]
    with pytest.raises(MeshSizeError, match="tp size 4 was requested"):
        ParallelMesh.adopt(nn.Linear(2, 2), tp=4)


@distributed(world_size=4)
def test_device_mesh_is_adopted_from_dtensor_parameters():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    rank = dist.get_rank()
    mesh = ParallelMesh.from_device_mesh(device_mesh)
    assert mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    assert mesh.coords == {"dp": rank // 2, "tp": rank % 2, "pp": 0}
    assert _ranks(mesh.group("tp")) == _ranks(device_mesh.get_group("tp"))

    torch.manual_seed(0)
    model = parallelize_module(nn.Sequential(nn.Linear(4, 8)), device_mesh["tp"],
                               {"0": ColwiseParallel()})
    adopted = ParallelMesh.adopt(model)
    assert adopted.source == "device_mesh"
    assert adopted.sizes == {"dp": 2, "tp": 2, "pp": 1}
    assert adopted.coords == mesh.coords


@distributed(world_size=2)
def test_unnamed_one_dim_meshes_are_tp_for_tp_and_dp_for_fsdp2():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    device_mesh = init_device_mesh("cpu", (2,))
    tp_model = parallelize_module(nn.Linear(4, 8), device_mesh, ColwiseParallel())
    assert ParallelMesh.adopt(tp_model).sizes == {"dp": 1, "tp": 2, "pp": 1}
    fsdp_model = fully_shard(nn.Sequential(nn.Linear(4, 8)), mesh=device_mesh)
    assert ParallelMesh.adopt(fsdp_model).sizes == {"dp": 2, "tp": 1, "pp": 1}
    plain = ParallelMesh.adopt(nn.Linear(2, 2))
    assert plain.sizes == {"dp": 2, "tp": 1, "pp": 1} and plain.source == "built"


@distributed(world_size=4)
def test_built_mesh_is_torchs_device_mesh_with_the_worlds_timeout():
    """The groups come from ``init_device_mesh`` (and ``_flatten`` for the stage group), carry
    the world's timeout, and freeing them never touches the default group."""
    from flex_surgery.parallel.group_lifetime import OwnedGroups, group_timeout

    rank = dist.get_rank()
    world_timeout = group_timeout(None)
    for sizes, stage in (({"tp": 2, "pp": 2}, [rank - rank % 2, rank - rank % 2 + 1]),
                         ({"pp": 4}, [rank]), ({"tp": 4}, None), ({"dp": 2, "pp": 2}, None)):
        mesh = ParallelMesh.build(**sizes)
        dm = mesh.device_mesh
        for axis in ("dp", "tp", "pp"):
            if mesh.size(axis) > 1:
                assert dm.get_group(axis) is mesh.group(axis)
                assert group_timeout(mesh.group(axis)) == world_timeout, (sizes, axis)
                assert mesh.group(axis) is not dist.group.WORLD  # its own, freeable
        if stage is not None:
            assert _ranks(mesh.stage_group) == stage
        if mesh.pp_size > 1:
            assert group_timeout(mesh.stage_group) == world_timeout
        owned = OwnedGroups(mesh.created_groups())
        assert all(g is not dist.group.WORLD for g in owned.groups)
        owned.free()
    dist.barrier()  # the default group is alive


@distributed(world_size=4)
def test_adopted_framework_groups_stay_the_frameworks():
    """fairscale's groups in a DeviceMesh (``from_group``): the same objects; only the stage
    group is made (flattened dp x tp), and freeing it leaves fairscale's groups working."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2, pipeline_length=2)
    mesh = ParallelMesh.adopt(nn.Linear(2, 2))
    assert mesh.device_mesh.get_group("tp") is fs.get_model_parallel_group()
    assert mesh.device_mesh.get_group("pp") is fs.get_pipeline_parallel_group()
    made = mesh.created_groups()
    assert made == [mesh.stage_group]
    assert all(made[0] is not g for g in (fs.get_model_parallel_group(),
                                          fs.get_pipeline_parallel_group()))
    for group in made:
        dist.destroy_process_group(group)
    t = torch.ones(1)
    dist.all_reduce(t, group=fs.get_model_parallel_group())
    assert t.item() == 2
