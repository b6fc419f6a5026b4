"""Third reader of the recovery after flex_surgery raises inside a backward: DDP reset under
``no_sync()``, a static-graph DDP's failed first backward refused, deferred gradient hooks run
after DDP's end of backward, FSDP1 NO_SHARD original parameters restored.

Each test makes a backward raise and runs on, compared with one process of the same weights
and inputs (float64), or asserts the documented refusal. Tests where ranks may be left with a
stray all-reduce use their own DDP process group and assert a refusal before any collective
on it, so a defect fails instead of hanging."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    actual_names,
    assert_grads_equal,
    clean,
    local_group,
    plain_grads,
    plain_net,
)
from rank_pool import distributed
from recovery_cases import (
    BATCH,
    TOL,
    batch,
    ddp_grads,
    fails_on,
    ranks_apart_ddp,
    square_loss,
    times_two,
)
from torch import nn

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.parallel.site_tags import HookSiteMismatchError


def _ref_accumulated(xs, site="blocks.1.up", edit=times_two):
    model = plain_net()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    flex.register_full_backward_hook(HookFunction(site, editing_function=edit))
    for x in xs:
        stored.clear()
        square_loss(flex(x)).backward()
    flex.close()
    return stored[site][0], plain_grads(model)


@distributed(world_size=2, timeout_s=60)
def test_no_sync_micro_batch_ranks_apart_then_accumulation_equals_one_process():
    """A micro-batch under ``no_sync()`` whose ranks meet at different hooks (rank 1 skips
    block 1): DDP reduced nothing, so it is reset; the accumulation started again (no_sync
    micro-batch, then the synced one) equals one process's two backwards."""

    xa, local_a = batch(1)
    xb, local_b = batch(2)
    ref_stored, ref_grads = _ref_accumulated([xa, xb])
    stored = {}
    branchy, model, flex = ranks_apart_ddp(stored)
    name = "module.net.blocks.1.up"
    with model.no_sync():
        with pytest.raises(HookSiteMismatchError):
            square_loss(flex(local_a)).backward()
    branchy.skip = False
    with model.no_sync():
        square_loss(flex(local_a)).backward()
    stored.clear()
    square_loss(flex(local_b)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)
    flex.close()


@pytest.mark.parametrize("order", [
    "synced, no_grad",
    "synced, no_sync",
    "no_sync, synced"])
@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_ranks_apart_in_a_reducing_backward_is_refused_whatever_forward_came_after(order):
    """The backward runs through a synced forward (DDP reduces in it) and the ranks meet at
    different hooks: refused, also when another forward (an evaluation under ``no_grad``, a
    micro-batch under ``no_sync``) came between the forward and its backward."""

    _, local_x = batch()
    branchy, model, flex = ranks_apart_ddp()
    if order == "no_sync, synced":
        with model.no_sync():
            flex(local_x)
    out = flex(local_x)
    if order == "synced, no_grad":
        with torch.no_grad():
            model(local_x)
    elif order == "synced, no_sync":
        with model.no_sync():
            flex(local_x)
    with pytest.raises(HookSiteMismatchError):
        square_loss(out).backward()
    branchy.skip = False
    with pytest.raises(RuntimeError, match="were at different hooks.*restart the job"):
        flex(local_x)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_static_graph_failed_first_backward_after_a_no_grad_forward_is_refused():
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, local_x = batch()
    model = DDP(plain_net(), static_graph=True, process_group=dist.new_group([0, 1]))
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.blocks.1.up",
                                                  editing_function=fails_on(1)))
    out = flex(local_x)
    with torch.no_grad():
        model(local_x)  # an evaluation between the forward and its backward
    with pytest.raises(RemoteEditError):
        square_loss(out).backward()
    with pytest.raises(RuntimeError, match=r"first backward .*static_graph=True"):
        flex(local_x)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_static_graph_failure_in_a_new_flexmodel_after_a_good_first_iteration_recovers():
    """A static-graph DDP's first iteration through one FlexModel, closed; a new FlexModel's
    first backward fails (DDP's second): reset, the next step equals one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, local_x = batch()
    ref_stored, ref_grads = _ref_accumulated([x])
    model = DDP(plain_net(), static_graph=True, process_group=dist.new_group([0, 1]))
    first = FlexModel(model, {})
    square_loss(first(local_x)).backward()
    first.close()
    model.zero_grad(set_to_none=True)
    stored = {}
    flex = FlexModel(model, stored)
    name = "module.blocks.1.up"
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)
    flex.close()


def _branch_x(seed=3):
    """Rows 0-1 (rank 0) take ``BranchNet``'s ``side``, rows 2-3 (rank 1) do not."""
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, 8, generator=torch.Generator().manual_seed(seed))
    x[:2, 0, 0], x[2:, 0, 0] = 5.0, -5.0
    return x, x[dist.get_rank() * 2:(dist.get_rank() + 1) * 2]


def _branch_reference(x, edit_site=None):
    from test_grad_accumulation import BranchNet

    model = BranchNet()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    if edit_site is not None:
        flex.register_full_backward_hook(HookFunction(edit_site, editing_function=times_two))
    flex.register_hook(HookFunction("side.weight"))
    square_loss(flex(x)).backward()
    flex.close()
    return {k: v[0] for k, v in stored.items()}, plain_grads(model)


@pytest.mark.parametrize("overlap", [False, True])
@distributed(world_size=2, timeout_s=60)
def test_deferred_hook_failure_with_an_editing_hook_then_step_equals_one_process(overlap):
    """A deferred hook (``side`` used by rank 0 only) with a wrong ``expected_shape`` raises
    after DDP's end of backward, in a backward whose editing hook on ``blocks.1.down`` ran:
    reset. Fixed shape, the next step (no zero_grad) stores both values and trains as one
    process, also with ``overlap_retrieval`` (its end-of-backward callback ordering)."""
    from test_grad_accumulation import BranchNet
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.hooks.errors import ShapeMismatchError

    x, local_x = _branch_x()
    ref_stored, ref_grads = _branch_reference(x, edit_site="blocks.1.down")
    model = DDP(BranchNet(), find_unused_parameters=True, process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored, overlap_retrieval=overlap)
    flex.register_full_backward_hook(HookFunction("module.blocks.1.down",
                                                  editing_function=times_two))
    deferred = HookFunction("module.side.weight", expected_shape=(1, 2))
    flex.register_hook(deferred)
    with pytest.raises(ShapeMismatchError):
        square_loss(flex(local_x)).backward()
    deferred.expected_shape = (8, 8)
    stored.clear()
    square_loss(flex(local_x)).backward()  # no zero_grad
    if dist.get_rank() == 0:
        assert sorted(stored) == ["module.blocks.1.down", "module.side.weight"]
        torch.testing.assert_close(stored["module.side.weight"][0], ref_stored["side.weight"],
                                   **TOL)
        torch.testing.assert_close(stored["module.blocks.1.down"][0],
                                   ref_stored["blocks.1.down"], **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_static_graph_deferred_hook_failure_in_first_backward_leaves_the_model_usable():
    """docs/layouts/ddp.md: a deferred hook that raises "leaves DDP's iteration finished and
    the model usable" -- also in a static-graph DDP's first backward (``static_graph=True``
    defers like ``find_unused_parameters``)."""
    from test_grad_accumulation import BranchNet
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.hooks.errors import ShapeMismatchError

    x, local_x = _branch_x()
    ref_stored, ref_grads = _branch_reference(x)
    model = DDP(BranchNet(), static_graph=True, process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored)
    deferred = HookFunction("module.side.weight", expected_shape=(1, 2))
    flex.register_hook(deferred)
    with pytest.raises(ShapeMismatchError):
        square_loss(flex(local_x)).backward()
    deferred.expected_shape = (8, 8)
    stored.clear()
    square_loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["module.side.weight"][0], ref_stored["side.weight"],
                                   **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)
    flex.close()


def _fsdp1_mixed(strategies):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    model = plain_net()
    cpu = torch.device("cpu")
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP(block, sharding_strategy=getattr(ShardingStrategy, strategies[i]),
                               use_orig_params=True, device_id=cpu)
    return FSDP(model, sharding_strategy=getattr(ShardingStrategy, strategies[2]),
                use_orig_params=True, device_id=cpu)


def _fsdp1_whole_params(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {clean(n): p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("site, register", [("blocks.0", "register_full_backward_pre_hook"),
                                            ("blocks.1.up", "register_full_backward_hook")])
@pytest.mark.parametrize("strategies", [("NO_SHARD", "FULL_SHARD", "NO_SHARD"),
                                        ("FULL_SHARD", "NO_SHARD", "FULL_SHARD")])
@distributed(world_size=2, timeout_s=60)
def test_fsdp1_mixed_no_shard_optimizer_made_before_the_failure_steps_as_one_process(
        strategies, site, register):
    """FSDP1 ``use_orig_params=True`` with NO_SHARD and FULL_SHARD units mixed: after the
    abandon, ``model.parameters()`` are the very nn.Parameters an optimizer made before the
    failure holds, and its step after a good backward equals one process's SGD step."""
    x, local_x = batch()
    ref = plain_net()
    ref_stored = {}
    ref_flex = FlexModel(ref, ref_stored, process_group=local_group())
    getattr(ref_flex, register)(HookFunction(site, editing_function=times_two))
    square_loss(ref_flex(x)).backward()
    ref_flex.close()
    want = {n: p.detach() - p.grad for n, p in ref.named_parameters()}
    model = _fsdp1_mixed(strategies)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    stored = {}
    flex = FlexModel(model, stored)
    name = actual_names(model)[site]
    getattr(flex, register)(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    after = list(model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params, strict=True))
    assert all(type(p) is nn.Parameter for p in after)
    stored.clear()
    square_loss(flex(local_x)).backward()
    opt.step()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored[site][0], **TOL)
    flex.close()
    assert_grads_equal(_fsdp1_whole_params(model), want, **TOL)


@distributed(world_size=2, timeout_s=60)
def test_even_failure_after_an_uneven_backward_without_gradient_hooks_recovers():
    """Step 1: ranks use different parameters (no gradient hook, so nothing deferred runs);
    step 2, every rank on the same path: an editing function fails; step 3 equals one
    process. ``meets_at_sites`` off emulates NCCL (no end-of-backward announcement)."""
    from test_grad_accumulation import BranchNet
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, local_x = _branch_x()
    both = x.clone()
    both[:, 0, 0] = 5.0
    local_both = both[dist.get_rank() * 2:(dist.get_rank() + 1) * 2]
    ref_stored, ref_grads = _branch_reference(both, edit_site="blocks.1.down")
    model = DDP(BranchNet(), find_unused_parameters=True, process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored)
    flex.runtime.meets_at_sites = False  # as under NCCL
    name = "module.blocks.1.down"
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(2)))
    square_loss(flex(local_x)).backward()  # uneven, completes
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_both)).backward()
    stored.clear()
    square_loss(flex(local_both)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored["blocks.1.down"], **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)
    flex.close()
