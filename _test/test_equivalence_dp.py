"""Data parallelism through FlexModel equals one process on the global batch: DDP, FSDP1
(``use_orig_params`` True and False), FSDP2, FSDP2 x DTensor TP on a 2-D mesh, and tiny HF
models under FSDP1/FSDP2 -- what every hook kind stores (the whole batch, gradients as the
global-mean loss gives them), the output and the whole parameter gradients, with and without an
x2 editing function on every hook."""

import functools

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    EDIT_MODES,
    PARAM_SITES,
    Block,
    H,
    assert_grads_equal,
    assert_stored_equal,
    clean,
    dtensor_plan,
    local_group,
    plain_grads,
    plain_net,
    run_flex,
)
from rank_pool import distributed

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
BATCH = 4


def _setup():
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))


def _local(x, dp_rank, dp_size):
    n = x.shape[0] // dp_size
    return x[dp_rank * n:(dp_rank + 1) * n]


def _reference(x, edit, param_sites=PARAM_SITES):
    model = plain_net()
    stored, out, _ = run_flex(model, x, edit, param_sites=param_sites,
                              process_group=local_group())
    return stored, out.detach(), plain_grads(model), model


def _check(stored, ref_stored, out, ref_out):
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    else:
        assert stored == {}


def _grads_by_sgd_step(model, full_params):
    """Whole gradients of a sharded model: one SGD step with lr 1 changes every parameter by
    exactly minus its gradient; ``full_params()`` reads the whole parameters."""
    before = {k: v.clone() for k, v in full_params().items()}
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    after = full_params()
    return {k: before[k] - after[k] for k in before}


def _fsdp1_params(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {clean(n): p.detach().clone() for n, p in model.named_parameters()}


def _dtensor_params(model):
    return {clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@distributed(world_size=2)
def test_ddp_equals_one_process():
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = _setup()
    local_x = _local(x, dist.get_rank(), 2)
    for edit in EDIT_MODES:
        ref_stored, ref_out, ref_grads, ref_model = _reference(x, edit)
        model = DDP(plain_net())
        stored, out, flex = run_flex(model, local_x, edit)
        assert flex.runtime.mesh.sizes["dp"] == 2
        _check(stored, ref_stored, out, _local(ref_out, dist.get_rank(), 2))
        assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()}, ref_grads,
                           **TOL)
        full = flex.get_module_parameter("module.blocks.1.up.weight")
        assert torch.equal(full, ref_model.blocks[1].up.weight.detach())


@pytest.mark.parametrize("use_orig_params", [True, False])
@distributed(world_size=2)
def test_fsdp1_equals_one_process(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    x = _setup()
    local_x = _local(x, dist.get_rank(), 2)
    for edit in EDIT_MODES:
        # parameter names exist only with use_orig_params (otherwise: flat parameters)
        param_sites = PARAM_SITES if use_orig_params else []
        ref_stored, ref_out, ref_grads, ref_model = _reference(x, edit, param_sites)
        model = FSDP(plain_net(), auto_wrap_policy=ModuleWrapPolicy({Block}),
                     use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        stored, out, flex = run_flex(model, local_x, edit, param_sites=param_sites)
        _check(stored, ref_stored, out, _local(ref_out, dist.get_rank(), 2))
        assert_grads_equal(_grads_by_sgd_step(model, functools.partial(_fsdp1_params, model)),
                           ref_grads, **TOL)
        if use_orig_params:
            name = next(n for n, _ in model.named_parameters() if clean(n) == "head.weight")
            full = flex.get_module_parameter(name)
            assert torch.allclose(full, ref_model.head.weight - ref_grads["head.weight"])


@distributed(world_size=2)
def test_fsdp2_equals_one_process():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x = _setup()
    mesh = init_device_mesh("cpu", (2,))
    local_x = _local(x, dist.get_rank(), 2)
    for edit in EDIT_MODES:
        ref_stored, ref_out, ref_grads, ref_model = _reference(x, edit)
        model = plain_net()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        stored, out, flex = run_flex(model, local_x, edit)
        assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 1, "pp": 1}
        _check(stored, ref_stored, out, _local(ref_out, dist.get_rank(), 2))
        grads = {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()}
        assert_grads_equal(grads, ref_grads, **TOL)
        full = flex.get_module_parameter("blocks.0.down.weight")
        assert torch.equal(full, ref_model.blocks[0].down.weight.detach())


@distributed(world_size=4)
def test_fsdp2_x_dtensor_tp_on_a_2d_mesh_equals_one_process():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    x = _setup()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    local_x = _local(x, dp_rank, 2)
    for edit in EDIT_MODES:
        ref_stored, ref_out, ref_grads, _ = _reference(x, edit)
        model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        stored, out, flex = run_flex(model, local_x, edit)
        assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
        _check(stored, ref_stored, out, _local(ref_out, dp_rank, 2))
        assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


def _dtensor_grads(model):
    return {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()}


# -- tiny HF models ----------------------------------------------------------------------------
HF_SITES = [
    ("model.layers.0.mlp.up_proj", "forward"),
    ("model.layers.0.mlp.act_fn", "forward"),
    ("model.layers.1.self_attn.o_proj", "forward_pre"),
    ("model.layers.1.mlp.down_proj", "full_backward"),
    ("model.layers.1.mlp", "full_backward_pre"),
]


def _hf_inputs():
    from flex_surgery.models import example_inputs

    return example_inputs("llama", batch=BATCH, seq=5)["input_ids"]


def _hf_model():
    from flex_surgery.models import tiny_hf_model

    return tiny_hf_model("llama", dtype=torch.float64)


@pytest.mark.parametrize("wrapper", ["fsdp1", "fsdp2"])
@distributed(world_size=2)
def test_hf_llama_under_fsdp_equals_one_process(wrapper):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    ids = _hf_inputs()
    local_ids = _local(ids, dist.get_rank(), 2)
    run = functools.partial(run_flex, sites=HF_SITES, param_sites=[],
                            loss_fn=lambda out: out.logits.pow(2).mean())
    for edit in EDIT_MODES:
        ref = _hf_model()
        ref_stored, ref_out, _ = run(ref, ids, edit, process_group=local_group())
        ref_grads = plain_grads(ref)
        model = _hf_model()
        if wrapper == "fsdp1":
            model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                         use_orig_params=True, device_id=torch.device("cpu"))
            full_params = functools.partial(_fsdp1_params, model)
        else:
            mesh = init_device_mesh("cpu", (2,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            full_params = functools.partial(_dtensor_params, model)
        stored, out, _ = run(model, local_ids, edit)
        _check(stored, ref_stored, out.logits, _local(ref_out.logits, dist.get_rank(), 2))
        assert_grads_equal(_grads_by_sgd_step(model, full_params), ref_grads, **TOL)


@distributed(world_size=2, timeout_s=60)
def test_a_table_broadcast_over_the_batch_is_not_concatenated_over_replicas():
    """DDP over a HF Llama: ``model.rotary_emb`` returns ``(cos, sin)`` of shape ``[1, s, d]``
    (position ids ``[1, s]``, broadcast over the batch), the same on every replica. It was taken
    as each replica's rows and concatenated: ``[2, s, d]`` stored where one process has
    ``[1, s, d]``, without a word. Each replica's input has 2 rows, so a piece of one row is no
    piece of the batch: every rank raises at that call, and with ``expected_shape`` (the whole
    shape) the table is stored once, equal to one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery import FlexModel, HookFunction
    from flex_surgery.models import example_inputs, tiny_hf_model
    from flex_surgery.parallel.layout import LayoutError

    ids = example_inputs("llama", batch=4, seq=6)["input_ids"]
    rank = dist.get_rank()
    ref = {}
    with FlexModel(tiny_hf_model("llama"), ref, process_group=local_group()) as flex:
        flex.register_forward_hook(HookFunction("model.rotary_emb"))
        with torch.no_grad():
            flex(input_ids=ids)
    want = ref["model.rotary_emb"][0]
    assert want.shape == (1, 6, 16)
    model = DDP(tiny_hf_model("llama"))
    for kind in ("hook", "edit"):
        with FlexModel(model, {}) as flex:
            edit = (lambda m, t, c, mods: t) if kind == "edit" else None
            flex.register_forward_hook(HookFunction("module.model.rotary_emb",
                                                    editing_function=edit))
            refused = pytest.raises(LayoutError, match="broadcast over the batch|cannot form one")
            with torch.no_grad(), refused:
                flex(input_ids=ids[2 * rank:2 * rank + 2])
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction("module.model.rotary_emb",
                                                expected_shape=(1, 6, 16)))
        with torch.no_grad():
            flex(input_ids=ids[2 * rank:2 * rank + 2])
    if rank == 0:
        torch.testing.assert_close(stored["module.model.rotary_emb"][0], want)
