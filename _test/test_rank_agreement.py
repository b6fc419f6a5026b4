"""Every rank takes the same path through every collective.

Each case here is a decision that leads to a collective and that used to be made from one
rank's own history or local data: the shape check against ``expected_shape`` under uneven
data-parallel batches, "does the edited piece require grad" with a frozen model and a trainable
module, "does this group exist" on a pipeline stage without the group's modules, "which rank
leads" on a ``DeviceMesh`` whose first coordinate is not global rank 0, and a
``BaseException`` in an editing function, and "is this model already wrapped" when one rank
still holds the old FlexModel. Each body ends with an all-reduce that every rank must
reach: a rank left behind in a collective makes the pool's timeout fail the test.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    H,
    assert_grads_equal,
    dtensor_plan,
    local_group,
    plain_net,
    run_flex,
)
from pipeline_cases import two_stages
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks import FlexModel, HookFunction, HookRegistrationError, ShapeMismatchError
from flex_surgery.parallel.collectives import RemoteEditError

TIMEOUT_S = 25  # a hang fails the test within this bound, naming the ranks that did not answer


def _everyone_here() -> None:
    """All ranks reach this point together (a rank stuck in a collective fails the test)."""
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()


def _batches(sizes_per_step: list[tuple[int, int]], seed: int = 3) -> list[torch.Tensor]:
    """Whole batches, one per step, of ``sum(sizes)`` rows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(sizes), 3, H, generator=g) for sizes in sizes_per_step]


def _local(x: torch.Tensor, sizes: tuple[int, int]) -> torch.Tensor:
    start = sum(sizes[:dist.get_rank()])
    return x[start:start + sizes[dist.get_rank()]]


# -- uneven data-parallel batches with an expected_shape ---------------------------------------
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_uneven_last_batch_with_expected_shape_is_checked_on_every_rank():
    """Epoch of batches 4, 4, 3 over dp=2 ([2, 2], [2, 2], [2, 1]): every call is checked and
    stored; the last one has local shapes that one rank has seen and the other has not."""
    torch.set_default_dtype(torch.float64)
    steps = [(2, 2), (2, 2), (2, 1)]
    xs = _batches(steps)
    stored: dict = {}
    flex = FlexModel(plain_net(), stored if dist.get_rank() == 0 else None,
                     data_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0", expected_shape=(None, 3, H)))
    flex.register_forward_hook(HookFunction("blocks.1.up", expected_shape=(None, 3, None),
                                            editing_function=lambda m, t, c, mods: t * 2))
    for x, sizes in zip(xs, steps):
        flex(_local(x, sizes))
    if dist.get_rank() == 0:
        ref = plain_net()
        want = [ref.blocks[0](x) for x in xs]
        assert [t.shape[0] for t in stored["blocks.0"]] == [4, 4, 3]
        for got, w in zip(stored["blocks.0"], want):
            torch.testing.assert_close(got, w.detach())
        assert len(stored["blocks.1.up"]) == 3
    flex.restore()
    _everyone_here()


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_shape_mismatch_is_an_error_at_the_call_on_every_rank():
    """Whole batch 4 expected: [2, 2] and [3, 1] match, [3, 2] does not -- although each rank
    has seen its own local shape before. The bad call raises on every rank, stores nothing, and
    the next good call works."""
    torch.set_default_dtype(torch.float64)
    steps = [(2, 2), (3, 1), (3, 2), (1, 3)]
    xs = _batches(steps)
    stored: dict = {}
    flex = FlexModel(plain_net(), stored, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0", expected_shape=(4, 3, H)))
    for i, (x, sizes) in enumerate(zip(xs, steps)):
        if i == 2:
            with pytest.raises(ShapeMismatchError, match=r"\(5, 3, 8\).*expected_shape"):
                flex(_local(x, sizes))
        else:
            flex(_local(x, sizes))
    if dist.get_rank() == 0:
        assert [t.shape[0] for t in stored["blocks.0"]] == [4, 4, 4]
        ref = plain_net()
        torch.testing.assert_close(stored["blocks.0"][2], ref.blocks[0](xs[3]).detach())
    flex.restore()
    _everyone_here()


# -- a frozen model with a trainable module in an editing function ------------------------------
def _adapter() -> nn.Linear:
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(H, H)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(H, H, generator=g) / H ** 0.5)
        lin.bias.copy_(torch.randn(H, generator=g) * 0.1)
    return lin


def _through_adapter(module, tensor, ctx, modules):
    return tensor + modules["adapter"](tensor)


@pytest.mark.parametrize("layout", ["dp", "tp"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_frozen_model_with_a_trainable_module_trains_on_every_rank(layout):
    """Only the adapter requires grad: the edited piece requires grad on the leader, and every
    rank must run the backward of the scatter with it. Its gradient equals one process's."""
    torch.set_default_dtype(torch.float64)
    x = _batches([(2, 2)])[0]
    ref_net, ref_adapter = plain_net().requires_grad_(False), _adapter()
    ref_net.blocks[0].register_forward_hook(lambda m, a, out: out + ref_adapter(out))
    ref_net(x).pow(2).mean().backward()

    if layout == "tp":
        from fairscale.nn.model_parallel import initialize as fs
        from parallel_cases import fairscale_net

        fs.initialize_model_parallel(2)
        net, local_x, sizes = fairscale_net(plain_net()), x, dict(tensor_parallel_size=2)
    else:
        net, local_x, sizes = plain_net(), _local(x, (2, 2)), dict(data_parallel_size=2)
    net.requires_grad_(False)
    flex = FlexModel(net, {}, **sizes)
    adapter = _adapter()
    flex.register_trainable_module("adapter", adapter)
    flex.register_forward_hook(HookFunction("blocks.0", editing_function=_through_adapter))
    flex(local_x).pow(2).mean().backward()
    assert_grads_equal({n: p.grad for n, p in adapter.named_parameters()},
                       {n: p.grad for n, p in ref_adapter.named_parameters()})
    flex.restore()
    _everyone_here()


# -- create_hook_group on a pipeline stage that holds none of the group's modules --------------
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_hook_group_exists_on_a_stage_without_its_modules():
    torch.set_default_dtype(torch.float64)
    stage = two_stages(plain_net(), dist.get_rank())
    flex = FlexModel(stage, {}, pipeline_parallel_size=2)
    created = flex.create_hook_group("late", "blocks.1.up")
    assert len(created) == (1 if dist.get_rank() == 1 else 0)
    assert "late" in flex.hook_groups  # on both stages
    x = torch.randn(2, 3, H)
    flex(x, groups="late")  # every stage can select it
    flex(x, groups="late", complement=True)
    flex.restore()
    _everyone_here()


# -- a DeviceMesh whose first coordinate is not global rank 0 ----------------------------------
@pytest.mark.parametrize("edit", [False, True])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_device_mesh_with_permuted_ranks_equals_one_process(edit):
    """TP over ``DeviceMesh("cpu", [1, 0])``: global rank 1 holds the first column shard. The
    whole tensor is still assembled in mesh order and stored on global rank 0."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = _batches([(2, 0)])[0]
    ref_stored, ref_out, ref_flex = run_flex(plain_net(), x, edit,
                                             process_group=local_group())
    ref_grads = {n: p.grad for n, p in ref_flex.module.named_parameters()}
    ref_flex.restore()

    mesh = DeviceMesh("cpu", [1, 0], mesh_dim_names=("tp",))
    model = parallelize_module(plain_net(), mesh, dtensor_plan(True))
    stored, out, flex = run_flex(model, x, edit)
    torch.testing.assert_close(out, ref_out)
    if dist.get_rank() == 0:
        assert stored.keys() == ref_stored.keys()
        for key in ref_stored:
            torch.testing.assert_close(stored[key], ref_stored[key], msg=key)
    else:
        assert stored == {}
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in model.named_parameters()}
    assert_grads_equal(grads, ref_grads)
    flex.restore()
    _everyone_here()


# -- a BaseException in an editing function on the leader -------------------------------------
def _interrupt(module, tensor, ctx, modules):
    raise KeyboardInterrupt("stop")


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_keyboard_interrupt_on_the_leader_reaches_every_rank():
    """The leader keeps its KeyboardInterrupt; the others raise RemoteEditError naming it."""
    torch.set_default_dtype(torch.float64)
    flex = FlexModel(plain_net(), {}, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0", editing_function=_interrupt))
    x = torch.randn(2, 3, H)
    if dist.get_rank() == 0:
        with pytest.raises(KeyboardInterrupt):
            flex(x)
    else:
        with pytest.raises(RemoteEditError, match="KeyboardInterrupt"):
            flex(x)
    flex.restore()
    _everyone_here()


# -- "is this model already wrapped" on one rank only ------------------------------------------
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_a_model_still_wrapped_on_one_rank_only_is_refused_on_every_rank():
    """Rank 0 still holds the old FlexModel (a results dict, a traceback), rank 1 dropped it.
    Wrapping the model again raises HookRegistrationError on both ranks, at the same point
    (rank 0 used to raise alone while rank 1 waited in the runtime's first exchange)."""
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    old = FlexModel(model, {}, data_parallel_size=2)
    kept = {"flex": old} if dist.get_rank() == 0 else {}
    del old
    gc.collect()
    with pytest.raises(HookRegistrationError, match="already wrapped by a FlexModel"):
        FlexModel(model, {}, data_parallel_size=2)
    kept.clear()
    gc.collect()
    flex = FlexModel(model, {}, data_parallel_size=2)  # dropped on every rank now: it wraps
    flex.register_forward_hook(HookFunction("blocks.0", editing_function=lambda m, t, c, ms: t))
    flex(torch.randn(2, 3, H))
    flex.close()
    _everyone_here()
