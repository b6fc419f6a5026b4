"""Tensor parallelism through FlexModel equals one process: fairscale TP layers, DTensor TP
(``use_local_output`` True and False, even and uneven shards) and DP x TP on 4 ranks -- what
every hook kind stores, the model output and the whole parameter gradients, with and without
an x2 editing function on every hook."""

import torch
import torch.distributed as dist
from parallel_cases import (
    EDIT_MODES,
    FF,
    H,
    assert_grads_equal,
    assert_stored_equal,
    clean,
    dtensor_plan,
    fairscale_net,
    local_group,
    plain_grads,
    plain_net,
    run_flex,
)
from rank_pool import distributed

from flex_surgery.parallel.collectives import all_gather
from flex_surgery.parallel.layout import fairscale_param_dim

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs


def _inputs(batch: int, seed: int = 1) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(batch, 3, H, generator=torch.Generator().manual_seed(seed))


def _reference(x, edit, ff=FF):
    model = plain_net(ff=ff)
    stored, out, _ = run_flex(model, x, edit, process_group=local_group())
    return stored, out.detach(), plain_grads(model)


def _fairscale_grads(model, tp_group):
    grads = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            dim = fairscale_param_dim(mod, p)
            g = p.grad.detach()
            if dim is not None:
                g = all_gather(g, dim, tp_group)
            grads[clean(f"{mod_name}.{p_name}")] = g
    return grads


def _check_stored(stored, ref_stored):
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    else:
        assert stored == {}


@distributed(world_size=2)
def test_fairscale_tp_equals_one_process():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _inputs(2)
    for edit in EDIT_MODES:
        ref_stored, ref_out, ref_grads = _reference(x, edit)
        model = fairscale_net(plain_net())
        stored, out, flex = run_flex(model, x, edit, tensor_parallel_size=2)
        assert flex.runtime.mesh.source == "fairscale"
        torch.testing.assert_close(out, ref_out, **TOL)
        _check_stored(stored, ref_stored)
        assert_grads_equal(_fairscale_grads(model, fs.get_model_parallel_group()), ref_grads,
                           **TOL)


@distributed(world_size=2)
def test_dtensor_tp_equals_one_process():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    x = _inputs(2)
    # Uneven column shards only with DTensor outputs: a local uneven shard cannot be turned
    # back into a DTensor by RowwiseParallel (it assumes even shards).
    for ff, use_local_output in ((FF, True), (FF, False), (FF - 1, False)):
        if True:
            for edit in EDIT_MODES:
                ref_stored, ref_out, ref_grads = _reference(x, edit, ff)
                model = parallelize_module(plain_net(ff=ff), mesh, dtensor_plan(use_local_output))
                stored, out, _ = run_flex(model, x, edit)
                case = f"ff={ff} use_local_output={use_local_output} edit={edit}"
                torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m, c=case: f"{c}: {m}")
                _check_stored(stored, ref_stored)
                grads = {clean(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                    else p.grad) for n, p in model.named_parameters()}
                assert_grads_equal(grads, ref_grads, **TOL)


@distributed(world_size=4)
def test_dp_x_tp_equals_one_process():
    """fairscale TP=2 inside DDP over fairscale's data-parallel group: 4 ranks."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    fs.initialize_model_parallel(2)
    dp_rank = fs.get_data_parallel_rank()
    x = _inputs(4)
    local_x = x[2 * dp_rank: 2 * dp_rank + 2]
    for edit in EDIT_MODES:
        ref_stored, ref_out, ref_grads = _reference(x, edit)
        net = fairscale_net(plain_net())
        model = DDP(net, process_group=fs.get_data_parallel_group())
        stored, out, flex = run_flex(model, local_x, edit, tensor_parallel_size=2,
                                     data_parallel_size=2)
        assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
        torch.testing.assert_close(out, ref_out[2 * dp_rank: 2 * dp_rank + 2], **TOL)
        _check_stored(stored, ref_stored)
        assert_grads_equal(_fairscale_grads(net, fs.get_model_parallel_group()), ref_grads,
                           **TOL)
