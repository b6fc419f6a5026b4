"""Interop with megatron-core, where it is installed: flex_surgery's collectives over Megatron's
own tensor-parallel group gather exactly what Megatron's mapping gathers ([seq, batch, hidden]
activations, hidden split over TP)."""

import pytest
import torch
import torch.distributed as dist

from flex_surgery.parallel.collectives import all_gather, gather_to_one

pytest.importorskip("megatron.core", reason="megatron-core is not installed")


@pytest.mark.cuda_only
@pytest.mark.world_size(2)
def test_gather_agrees_with_megatron_on_its_tensor_parallel_group(device):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    size = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=size)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        generator = torch.Generator().manual_seed(tp_rank)
        local = torch.randn(5, 2, 3, generator=generator).to(device)  # [seq, batch, hidden/tp]
        theirs = gather_from_tensor_model_parallel_region(local)
        everywhere = all_gather(local, dim=-1, group=group)
        on_leader = gather_to_one(local, dim=-1, group=group, dst=0)
    finally:
        parallel_state.destroy_model_parallel()
    assert theirs.shape == (5, 2, 3 * size)
    assert torch.equal(everywhere, theirs)
    if tp_rank == 0:
        assert torch.equal(on_leader, theirs)
