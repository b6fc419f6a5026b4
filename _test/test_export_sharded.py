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


def dtensor_tp_llama():
    """The tiny Llama with its MLPs split over a 2-rank DTensor TP mesh (collective)."""
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
    return parallelize_module(tiny_hf_model("llama", seed=0), mesh, plan)


@distributed(world_size=2)
def test_dtensor_tp_weights_into_one_process_program():
    sharded = dtensor_tp_llama()
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


def _check_rank0_only(sharded: torch.nn.Module, torch_path: bool) -> None:
    """``rank0_only=True`` gives rank 0 exactly the every-rank weights (same names, same
    values, tied parameters one tensor) and the other ranks nothing."""
    from flex_surgery.export.gather import torch_checkpoint_understands
    from flex_surgery.surgery.theater import unwrap_model

    assert torch_checkpoint_understands(unwrap_model(sharded)) is torch_path
    everywhere = full_weights(sharded)
    on_rank0 = full_weights(sharded, rank0_only=True)
    if dist.get_rank() != 0:
        assert on_rank0 == {}
        return
    assert sorted(on_rank0) == sorted(everywhere)
    for name, value in everywhere.items():
        assert type(on_rank0[name]) is torch.Tensor and on_rank0[name].device.type == "cpu"
        assert torch.equal(on_rank0[name], value), name
    if "lm_head.weight" in on_rank0 and torch.equal(on_rank0["lm_head.weight"],
                                                    on_rank0["model.embed_tokens.weight"]):
        assert on_rank0["lm_head.weight"] is on_rank0["model.embed_tokens.weight"]


@distributed(world_size=2)
def test_rank0_only_fsdp2_takes_torch_checkpoint():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = tiny_hf_model("llama", seed=0, tie_word_embeddings=True)
    mesh = init_device_mesh("cpu", (2,))
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    _check_rank0_only(sharded, torch_path=True)


@distributed(world_size=2)
def test_rank0_only_fsdp1_keeps_the_views_ddp_takes_torch_checkpoint():
    """FSDP1's full state dict with cpu_offload=True dies with SIGSEGV in torch 2.13 on CPU:
    its flat parameters are gathered by the registry's views."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    sharded = FSDP(tiny_hf_model("llama", seed=0), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                   device_id=torch.device("cpu"))
    _check_rank0_only(sharded, torch_path=False)
    _check_rank0_only(DDP(tiny_hf_model("llama", seed=1)), torch_path=True)


@distributed(world_size=2)
def test_rank0_only_dtensor_tp_takes_torch_checkpoint():
    from parallel_cases import llama_tp_plan
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    sharded = parallelize_module(tiny_hf_model("llama", seed=0), mesh, llama_tp_plan())
    _check_rank0_only(sharded, torch_path=True)


@distributed(world_size=2)
def test_rank0_only_megatron_keeps_the_registry_path():
    """Megatron-core's parameters are plain tensors to torch's checkpoint (it would return this
    rank's shard as the whole weight): the registry's views gather them."""
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp

    with megatron_parallel(2):
        plain = plain_mlp()
        model = megatron_mlp(plain)
        _check_rank0_only(model, torch_path=False)
        got = full_weights(model, rank0_only=True)  # collective: every rank calls it
        if dist.get_rank() == 0:
            for name, value in plain.named_parameters():
                assert torch.equal(got[name], value.detach()), name


@distributed(world_size=2)
def test_a_buffer_or_hand_cut_parameter_that_differs_across_dtensor_tp_ranks_is_refused():
    """No framework splits buffers, and the llama's norms are parameters no framework owns: each
    rank's value was taken as the whole one. Under DTensor TP (no global state names the group:
    it is read from the parameters' mesh) a buffer or such a parameter that differs across the
    ranks is an UnknownLayoutError on every rank, on both gathering paths; equal ones are
    gathered as before."""
    import pytest
    from parallel_cases import llama_tp_plan
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    sharded = parallelize_module(tiny_hf_model("llama", seed=0), mesh, llama_tp_plan())
    sharded.register_buffer("scale", torch.ones(3))
    assert torch.equal(full_weights(sharded)["scale"], torch.ones(3))
    sharded.scale += dist.get_rank()
    for rank0_only in (False, True):
        with pytest.raises(UnknownLayoutError, match="scale"):
            full_weights(sharded, rank0_only=rank0_only)
    sharded.scale.fill_(1.0)
    norm = sharded.model.norm.weight
    with torch.no_grad():
        norm.add_(dist.get_rank())
    for rank0_only in (False, True):
        with pytest.raises(UnknownLayoutError, match="norm"):
            full_weights(sharded, rank0_only=rank0_only)
