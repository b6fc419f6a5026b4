"""FlexModel on a tiny Llama sharded with FSDP over every GPU of the job -- FSDP2
(``fully_shard`` per decoder layer, then the root) and FSDP1 (``FullyShardedDataParallel`` with a
per-layer wrap policy) -- against the same model in one process on the global batch."""

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


def _fsdp2(model, device, size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, SITE


def _fsdp1(model, device, size):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_type = type(model.model.layers[0])
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_type}),
                                       device_id=device, use_orig_params=True)
    # FSDP1 inserts wrapper modules into the names; hooks take the name the model now has.
    name = next(n for n, m in wrapped.named_modules() if m is model.get_submodule(SITE))
    return wrapped, name


@pytest.mark.world_size(2)
@pytest.mark.parametrize("shard", [_fsdp2, _fsdp1], ids=["fsdp2", "fsdp1"])
def test_fsdp_hooks_see_the_global_batch(device, shard):
    rank, size = dist.get_rank(), dist.get_world_size()
    model = tiny_hf_model("llama").to(device)
    reference = copy.deepcopy(model)
    model, site = shard(model, device, size)

    # Data parallel: rank r feeds its own sequences; the global batch is their concatenation.
    batches = [example_inputs("llama", batch=1, seed=r)["input_ids"].to(device)
               for r in range(size)]
    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, data_parallel_size=size)
    flex.register_forward_hook(HookFunction(site, editing_function=_times_two))
    with torch.no_grad():
        logits = flex(input_ids=batches[rank]).logits
    flex.restore()

    want_mlp, want_logits = _reference(reference, torch.cat(batches))
    torch.testing.assert_close(logits, want_logits[rank:rank + 1], rtol=1e-4, atol=1e-5)
    if rank == 0:
        (got_mlp,) = stored[site]
        assert got_mlp.shape == want_mlp.shape  # every rank's batch, stored on rank 0
        torch.testing.assert_close(got_mlp, want_mlp.cpu(), rtol=1e-4, atol=1e-5)
    else:
        assert stored.get(site, []) == []
