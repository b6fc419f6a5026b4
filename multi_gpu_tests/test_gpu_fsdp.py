"""FlexModel on a tiny Llama sharded with FSDP2 (``fully_shard`` per decoder layer, then the
root) over every GPU of the job, against the same model in one process on the global batch."""

import copy

import pytest
import torch
import torch.distributed as dist

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.models import example_inputs, tiny_hf_model

SITE = "model.layers.0.mlp"


def _times_two(module, tensor, save_ctx, modules):
    return tensor * 2


def _reference(model, input_ids):
    """One process: the pre-edit MLP output and the logits with the same edit applied."""
    seen = []

    def hook(module, args, output):
        seen.append(output.detach().clone())
        return output * 2

    handle = model.get_submodule(SITE).register_forward_hook(hook)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    handle.remove()
    return seen[0], logits


@pytest.mark.world_size(2)
def test_fsdp2_hooks_see_the_global_batch(device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, size = dist.get_rank(), dist.get_world_size()
    model = tiny_hf_model("llama").to(device)
    reference = copy.deepcopy(model)
    mesh = init_device_mesh(device.type, (size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # Data parallel: rank r feeds its own sequences; the global batch is their concatenation.
    batches = [example_inputs("llama", batch=1, seed=r)["input_ids"].to(device)
               for r in range(size)]
    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, data_parallel_size=size)
    flex.register_forward_hook(HookFunction(SITE, editing_function=_times_two))
    with torch.no_grad():
        logits = flex(input_ids=batches[rank]).logits
    flex.restore()

    want_mlp, want_logits = _reference(reference, torch.cat(batches))
    torch.testing.assert_close(logits, want_logits[rank:rank + 1], rtol=1e-4, atol=1e-5)
    if rank == 0:
        (got_mlp,) = stored[SITE]
        assert got_mlp.shape == want_mlp.shape  # every rank's batch, stored on rank 0
        torch.testing.assert_close(got_mlp, want_mlp.cpu(), rtol=1e-4, atol=1e-5)
    else:
        assert stored.get(SITE, []) == []
