"""DistributedRuntime behaviour beyond plain equivalence: a failing editing function fails every
rank fast, hook groups chosen per call, trainable modules kept identical on every rank,
whole parameters, ``store_on="all"``."""

import time

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    H,
    assert_stored_equal,
    fairscale_net,
    local_group,
    plain_net,
    run_flex,
    times_two,
)
from rank_pool import destroy_fairscale_model_parallel, distributed
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.distributed_runtime import DistributedRuntime
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.runtime import HookSite


def _x(batch=2):
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(batch, 3, H, generator=torch.Generator().manual_seed(1))


def _fails(module, tensor, ctx, modules):
    raise ValueError("bad edit")


@distributed(world_size=4)
def test_failing_editing_function_fails_every_rank_fast():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)  # tp 2 x dp 2
    x = _x()
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0.act", editing_function=_fails))
    start = time.monotonic()
    with pytest.raises(RemoteEditError, match=r"'blocks.0.act' \(forward\) failed on rank 0: "
                                              r"ValueError: bad edit"):
        flex(x)
    assert time.monotonic() - start < 10
    # every rank is still in step: the next collectives and a clean forward work
    flex.restore()
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 4
    flex = FlexModel(flex.module, {}, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0.act", editing_function=times_two))
    flex(x)


@pytest.mark.parametrize("parallel", ["fairscale_tp", "ddp"])
@distributed(world_size=2)
def test_hook_groups_apply_per_call(parallel):
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = _x(4)

    def flex_for(model, prefix="", **kw):
        stored = {}
        flex = FlexModel(model, stored, **kw)
        flex.create_hook_group("edit", f"{prefix}blocks.0.act", editing_function=times_two)
        flex.create_hook_group("read", f"{prefix}blocks.1.up")
        return flex, stored

    ref, ref_stored = flex_for(plain_net(), process_group=local_group())
    if parallel == "ddp":
        dist_flex, stored = flex_for(DDP(plain_net()), prefix="module.")
        mine = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
        stored_keys = {f"module.{k}": k for k in ("blocks.0.act", "blocks.1.up")}
    else:
        fs.initialize_model_parallel(2)
        dist_flex, stored = flex_for(fairscale_net(plain_net()), tensor_parallel_size=2)
        mine = slice(None)
        stored_keys = {k: k for k in ("blocks.0.act", "blocks.1.up")}
    for groups in ("read", "edit", "read", "all"):
        torch.testing.assert_close(dist_flex(x[mine], groups=groups),
                                   ref(x, groups=groups)[mine])
        seen = {stored_keys[k]: v for k, v in stored.items()}
        if dist.get_rank() == 0:
            assert seen.keys() == ref_stored.keys()
            for key in ref_stored:
                assert len(seen[key]) == len(ref_stored[key])
                for a, b in zip(seen[key], ref_stored[key]):
                    torch.testing.assert_close(a, b)
        else:
            assert seen == {}
    assert len(ref_stored["blocks.1.up"]) == 3 and len(ref_stored["blocks.0.act"]) == 2


def _projected(module, tensor, ctx, modules):
    return modules["proj"](tensor)


@distributed(world_size=4)
def test_trainable_modules_stay_identical_and_get_one_process_gradients():
    """DP x TP: fairscale TP 2 inside DDP over dp 2; the trainable projection runs only on
    rank 0 but every rank ends with rank 0's weights and the one-process gradient."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    fs.initialize_model_parallel(2)
    x = _x(4)
    dp = fs.get_data_parallel_rank()

    def proj(seed):
        torch.manual_seed(seed)
        return nn.Linear(H, H)

    ref = FlexModel(plain_net(), None, process_group=local_group())
    ref.register_trainable_module("proj", proj(0))
    ref.register_forward_hook(HookFunction("blocks.0.down", editing_function=_projected))
    ref(x).pow(2).mean().backward()

    flex = FlexModel(DDP(fairscale_net(plain_net()), process_group=fs.get_data_parallel_group()),
                     None, tensor_parallel_size=2)
    flex.register_trainable_module("proj", proj(dist.get_rank()))  # differs until synced
    flex.register_forward_hook(HookFunction("module.blocks.0.down",
                                            editing_function=_projected))
    flex(x[2 * dp:2 * dp + 2]).pow(2).mean().backward()
    mine, theirs = flex.trainable_modules["proj"], ref.trainable_modules["proj"]
    for a, b in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@distributed(world_size=2)
def test_whole_parameters_under_tp():
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import dtensor_plan
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    fs.initialize_model_parallel(2)
    _x()
    plain = plain_net()
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    for name in ("blocks.0.up.weight", "blocks.0.up.bias", "blocks.1.down.weight",
                 "blocks.1.down.bias", "head.weight"):
        assert torch.equal(flex.get_module_parameter(name), plain.get_parameter(name))
    destroy_fairscale_model_parallel()
    mesh = init_device_mesh("cpu", (2,))
    flex = FlexModel(parallelize_module(plain_net(), mesh, dtensor_plan(True)), {})
    for name in ("blocks.0.up.weight", "blocks.1.down.weight"):
        assert torch.equal(flex.get_module_parameter(name), plain.get_parameter(name))


@distributed(world_size=2)
def test_store_on_all_stores_the_whole_tensor_on_every_rank():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _x()
    model = fairscale_net(plain_net())
    runtime = DistributedRuntime(model, ParallelMesh.from_fairscale(), store_on="all")
    site = HookSite("blocks.0.up", "forward", "output", module=model.blocks[0].up)
    local = model.blocks[0].up(x)
    stored = []
    runtime.retrieve(local, site, stored.append)
    want = plain_net().blocks[0].up(x)
    assert len(stored) == 1
    torch.testing.assert_close(stored[0], want.detach())


@distributed(world_size=4)
def test_a_flexmodel_on_a_subgroup_of_the_world():
    """Two independent data-parallel FlexModels, on ranks {0, 1} and {2, 3}."""
    rank = dist.get_rank()
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = halves[rank // 2]
    x = _x(4)
    model = plain_net(seed=rank // 2)
    stored = {}
    flex = FlexModel(model, stored, process_group=half)
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 1, "pp": 1}
    flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=times_two))
    out = flex(x[2 * (rank % 2):2 * (rank % 2) + 2])
    ref_stored = {}
    ref = FlexModel(plain_net(seed=rank // 2), ref_stored, process_group=local_group())
    ref.register_forward_hook(HookFunction("blocks.0.up", editing_function=times_two))
    ref_out = ref(x)
    torch.testing.assert_close(out, ref_out[2 * (rank % 2):2 * (rank % 2) + 2])
    if rank % 2 == 0:  # each half stores on its own first rank
        torch.testing.assert_close(stored["blocks.0.up"][0], ref_stored["blocks.0.up"][0])
    else:
        assert stored == {}


@distributed(world_size=2)
def test_close_leaves_the_model_without_runtime_hooks():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    model = fairscale_net(plain_net())
    runtime = DistributedRuntime(model, ParallelMesh.from_fairscale())
    assert any(m._forward_hooks for m in model.modules())
    runtime.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@distributed(world_size=2)
def test_flexmodel_restore_under_tp_leaves_no_hook():
    from fairscale.nn.model_parallel import initialize as fs
    from flexmodel_helpers import hooks_left

    fs.initialize_model_parallel(2)
    model = fairscale_net(plain_net())
    stored: dict = {}
    flex = FlexModel(model, stored, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=times_two))
    flex(torch.randn(2, 3, plain_net().blocks[0].up.in_features))
    assert hooks_left(model)
    assert flex.restore() is model
    assert hooks_left(model) == []


def _double_in_place(module, tensor, ctx, modules):
    return tensor.mul_(2)


@distributed(world_size=2)
def test_stored_value_is_the_one_before_an_in_place_edit_under_tp():
    """Storing and editing share one gather; the stored copy must not see the in-place edit."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = torch.randn(2, 3, plain_net().blocks[0].up.in_features, generator=torch.Generator()
                    .manual_seed(1))
    results = []
    for model in (fairscale_net(plain_net()), plain_net()):
        stored: dict = {}
        flex = FlexModel(model, stored, process_group=None if len(results) == 0
                         else local_group())
        flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=_double_in_place))
        flex.register_forward_hook(HookFunction("blocks.1.up"))
        out = flex(x)
        results.append((stored, out))
        flex.restore()
    (tp_stored, tp_out), (ref_stored, ref_out) = results
    torch.testing.assert_close(tp_out, ref_out)
    if dist.get_rank() == 0:
        for key in ("blocks.0.up", "blocks.1.up"):
            torch.testing.assert_close(tp_stored[key][0], ref_stored[key][0])
        with torch.no_grad():
            reference = plain_net().blocks[0].up(x)
        torch.testing.assert_close(tp_stored["blocks.0.up"][0], reference)


@distributed(world_size=2)
def test_ranks_without_an_output_dict_still_take_part_in_retrieval():
    """A common pattern: only rank 0 passes a dict. The other rank must still send its shard."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = torch.randn(2, 3, plain_net().blocks[0].up.in_features)
    stored: dict | None = {} if dist.get_rank() == 0 else None
    flex = FlexModel(fairscale_net(plain_net()), stored, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0.up"))
    flex(x)
    if dist.get_rank() == 0:
        with torch.no_grad():
            torch.testing.assert_close(stored["blocks.0.up"][0], plain_net().blocks[0].up(x))


@pytest.mark.parametrize("rows", [(3, 1), (2, 2)], ids=["uneven", "even"])
def test_dp_x_tp_retrieval_in_one_gather_equals_one_process(rows):
    from rank_pool import get_pool

    get_pool(4).run(_dp_x_tp_retrieval_body, {"rows": rows})


@distributed(world_size=4)
def _dp_x_tp_retrieval_body(rows):
    """fairscale TP=2 inside DDP (dp=2): activations cut over both axes are retrieved in one
    gather over the stage (AxisWalk.to_leader_at_once), the others axis by axis; every stored
    tensor -- forward and backward, uneven replicas -- equals one process's. The gather over
    the stage is what ran (counted), and the rank-0-only store holds nothing elsewhere."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.axis_walk import AxisWalk

    fs.initialize_model_parallel(2)
    x = _x(4)
    dp_rank = fs.get_data_parallel_rank()
    mine = x[sum(rows[:dp_rank]):sum(rows[:dp_rank + 1])]

    def loss(y):  # DDP's average of it is one process's mean over the global batch
        return y.pow(2).sum() * (2 / 4)

    ref, _, _ = run_flex(plain_net(), x, False, process_group=local_group(),
                         loss_fn=lambda y: y.pow(2).sum() / 4)
    calls = []
    original = AxisWalk.to_leader_at_once

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    AxisWalk.to_leader_at_once = counted
    try:
        model = DDP(fairscale_net(plain_net()), process_group=fs.get_data_parallel_group())
        stored, _, flex = run_flex(model, mine, False, tensor_parallel_size=2,
                                   data_parallel_size=2, loss_fn=loss)
    finally:
        AxisWalk.to_leader_at_once = original
    assert calls  # the sharded activations went through the one gather
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref, rtol=1e-10, atol=1e-10)
    else:
        assert stored == {}
    flex.restore()


@distributed(world_size=2)
def test_ddp_retrieval_of_pieces_that_cannot_form_one_tensor_raises_on_every_rank():
    """DDP ranks whose batches differ in sequence length: the retrieval cannot put the
    activation together -- LayoutError on both ranks at that call (not a leader error and a
    rank that walks on into the next collective); the next forward works."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.layout import LayoutError

    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    stored = {}
    flex = FlexModel(DDP(plain_net()), stored, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("module.blocks.0.up"))
    with torch.no_grad():
        with pytest.raises(LayoutError, match="cannot form one tensor"):
            flex(torch.randn(2, 3 + rank, H))
        flex(torch.randn(2, 3, H))
    if rank == 0:  # the failed call stored nothing; the next one the whole batch
        assert [t.shape[:2] for t in stored["module.blocks.0.up"]] == [(4, 3)]
    flex.restore()
