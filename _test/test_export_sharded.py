"""Weights gathered from a sharded model (FSDP1, FSDP2, DTensor TP), injected into the program
exported from its one-process twin, give exactly the one-process model's output -- also under
surgery (the theater's seeded noise is the same full-weight noise for every layout)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from rank_pool import distributed

from flex_surgery.export import ExportedModel, full_weights
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgicalTheater

NOISE = dict(layers=[0], modification_type="noise", noise_scale=0.1, seed=3)


def _check_against_one_process(sharded: torch.nn.Module) -> None:
    with SurgicalTheater(sharded, **NOISE):
        modified = full_weights(sharded)
    plain = full_weights(sharded)
    assert all(type(t) is torch.Tensor for t in modified.values())
    if dist.get_rank() != 0:
        return
    reference = tiny_hf_model("llama", seed=0)
    ids = example_inputs("llama")["input_ids"]
    exported = ExportedModel.export(reference, example_kwargs={"input_ids": ids})
    with torch.no_grad():
        with SurgicalTheater(reference, **NOISE):
            want_modified = reference(input_ids=ids).logits
        want_plain = reference(input_ids=ids).logits
        assert not torch.equal(want_modified, want_plain)
        exported.inject(modified)
        assert torch.equal(exported(input_ids=ids), want_modified)
        exported.inject(plain)
        assert torch.equal(exported(input_ids=ids), want_plain)


@distributed(world_size=2)
def test_fsdp2_weights_into_one_process_program():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = tiny_hf_model("llama", seed=0)
    mesh = init_device_mesh("cpu", (2,))
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert sharded.lm_head.weight.to_local().shape[0] == 64  # half of the vocabulary
    _check_against_one_process(sharded)


@distributed(world_size=2)
def test_dtensor_tp_weights_into_one_process_program():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    plan = {}
    for i in range(2):
        plan.update({f"model.layers.{i}.mlp.gate_proj": ColwiseParallel(),
                     f"model.layers.{i}.mlp.up_proj": ColwiseParallel(),
                     f"model.layers.{i}.mlp.down_proj": RowwiseParallel()})
    sharded = parallelize_module(tiny_hf_model("llama", seed=0), mesh, plan)
    assert sharded.model.layers[0].mlp.down_proj.weight.to_local().shape == (64, 64)  # of 128
    _check_against_one_process(sharded)


@distributed(world_size=2)
def test_fsdp1_weights_into_one_process_program():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    sharded = FSDP(tiny_hf_model("llama", seed=0), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                   device_id=torch.device("cpu"))
    assert any(p.numel() == 0 for p in sharded.parameters())  # rank-local pieces of flat params
    _check_against_one_process(sharded)
