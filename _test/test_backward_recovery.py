"""A backward that raises inside flex_surgery leaves DDP, FSDP1 and FSDP2 ready for the next
iteration, with that backward's gradients dropped.

An editing function that fails in a backward hook, or ranks that meet at different hooks in a
backward, raise on every rank in the middle of the data-parallel wrapper's iteration: the
wrapper's own end of backward (a callback autograd skips when the backward raises) never runs.
Left so, DDP's next forward raises "Expected to have finished reduction in the prior
iteration", FSDP1 stays in its backward, and FSDP2 after ``reset_iter_state()`` adds the failed
backward's unsharded gradients to the next one's (a wrong gradient, no error). Each test makes a
backward raise, then runs the next step -- through the FlexModel with the hook fixed, or
through the bare model after ``close()`` -- *without* zeroing gradients, and compares it with
one process: the stored gradient and every whole parameter gradient."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    Block,
    H,
    actual_names,
    assert_grads_equal,
    clean,
    local_group,
    plain_grads,
    plain_net,
)
from rank_pool import distributed
from torch import nn

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.parallel.site_tags import HookSiteMismatchError

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
BATCH = 4
WRAPPERS = ["ddp", "fsdp1", "fsdp1_flat", "fsdp2"]


def _setup():
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    n = BATCH // 2
    return x, x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def _loss(out):
    return out.pow(2).mean()  # DDP/FSDP average the ranks' means: the whole batch's mean


def _wrap(kind, model):
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}),
                    use_orig_params=kind == "fsdp1", device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _whole_grads(kind, model):
    """Every whole parameter gradient, by plain-model name (a parameter without one: absent)."""
    if kind == "ddp":
        return {clean(n): p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None}
    if kind == "fsdp2":
        return {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()
                if p.grad is not None}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # FSDP1: one SGD step with lr 1 moves every parameter by minus its whole gradient (read
    # under summon_full_params, which shows the original parameters with or without
    # use_orig_params)
    def whole():
        with FSDP.summon_full_params(model, writeback=False):
            return {clean(n): p.detach().clone() for n, p in model.named_parameters()}

    before = whole()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return {k: before[k] - v for k, v in whole().items()}


def _reference(x, edit):
    """One process: the stored gradient of ``blocks.1.up``'s input and every gradient."""
    model = plain_net()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    flex.register_full_backward_hook(HookFunction("blocks.1.up", editing_function=edit))
    _loss(flex(x)).backward()
    flex.close()
    return stored["blocks.1.up"][0], plain_grads(model)


def _times_two(module, grad, ctx, modules):
    return grad * 2


def _fails_once():
    calls = [0]

    def edit(module, grad, ctx, modules):  # runs on the edit leader only
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("a bug in the editing function")
        return grad * 2

    return edit


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_step_after_a_failed_edit_in_backward_equals_one_process(kind):
    """The editing function raises in the first backward; the second step, through the same
    FlexModel and without zeroing gradients, stores and trains as one process does."""
    x, local_x = _setup()
    ref_stored, ref_grads = _reference(x, _times_two)
    model = _wrap(kind, plain_net())
    stored = {}
    flex = FlexModel(model, stored)
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=_fails_once()))
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        _loss(flex(local_x)).backward()
    stored.clear()
    _loss(flex(local_x)).backward()  # no zero_grad: the failed backward's gradients are gone
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(_whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_bare_model_after_a_failed_backward_equals_one_process(kind):
    """The same failure, then ``close()`` and a plain step of the bare model."""
    x, local_x = _setup()
    ref = plain_net()
    _loss(ref(x)).backward()
    ref_grads = plain_grads(ref)
    model = _wrap(kind, plain_net())
    flex = FlexModel(model, {})
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=_fails_once()))
    with pytest.raises(RemoteEditError):
        _loss(flex(local_x)).backward()
    flex.close()
    _loss(model(local_x)).backward()
    assert_grads_equal(_whole_grads(kind, model), ref_grads, **TOL)


@distributed(world_size=2, timeout_s=60)
def test_ddp_find_unused_parameters_step_after_a_failed_edit_equals_one_process():
    """``find_unused_parameters=True`` with every parameter used by every rank: the same
    recovery (the ranks launched the same reductions before the error)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, local_x = _setup()
    ref_stored, ref_grads = _reference(x, _times_two)
    model = DDP(plain_net(), find_unused_parameters=True)
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_full_backward_hook(HookFunction("module.blocks.1.up",
                                                  editing_function=_fails_once()))
    with pytest.raises(RemoteEditError):
        _loss(flex(local_x)).backward()
    stored.clear()
    _loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["module.blocks.1.up"][0], ref_stored, **TOL)
    assert_grads_equal(_whole_grads("ddp", model), ref_grads, **TOL)
    flex.close()


class _SkippableUp(Block):
    """A block whose ``up`` a rank may skip (inside the FSDP unit, which runs on every rank)."""

    skip = False

    def forward(self, x):
        return x + self.down(self.act(x.repeat(1, 1, 2) if self.skip else self.up(x)))


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_fsdp_step_after_ranks_met_at_different_backward_hooks_equals_one_process(kind):
    """Rank 1 skips ``blocks.1.up``: rank 0 reaches its backward hook, rank 1 the next
    announced point (FSDP announces each collective of its backward), and both raise
    ``HookSiteMismatchError`` before any rank launched a collective the other did not. The
    next step, both ranks on the same path, equals one process."""
    x, local_x = _setup()
    ref_stored, ref_grads = _reference(x, _times_two)
    model = plain_net()
    model.blocks[1].__class__ = _SkippableUp
    model = _wrap(kind, model)
    stored = {}
    flex = FlexModel(model, stored)
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=_times_two))
    _SkippableUp.skip = dist.get_rank() == 1
    try:
        with pytest.raises(HookSiteMismatchError):
            _loss(flex(local_x)).backward()
    finally:
        _SkippableUp.skip = False
    stored.clear()
    _loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(_whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


class _Branchy(nn.Module):
    """``plain_net`` whose block 1 a rank may skip (a branch taken on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_net()
        self.skip = False

    def forward(self, x):
        for i, block in enumerate(self.net.blocks):
            if not (self.skip and i == 1):
                x = block(x)
        return self.net.head(x)


@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_ddp_after_ranks_met_at_different_backward_hooks_refuses_the_next_forward():
    """Rank 1 skips block 1, so the ranks meet at different points of DDP's backward, where one
    may have launched a bucket's all-reduce the other never will: DDP is not reset, and the
    next hooked forward raises on every rank, saying why and what to do, before DDP's own
    misleading "parameters that were not used in producing loss"."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, local_x = _setup()
    group = dist.new_group([0, 1])  # the stray all-reduce stays on this test's own group
    branchy = _Branchy()
    model = DDP(branchy, find_unused_parameters=True, process_group=group)
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.net.blocks.1.up",
                                                  editing_function=_times_two))
    branchy.skip = dist.get_rank() == 1
    with pytest.raises(HookSiteMismatchError):
        _loss(flex(local_x)).backward()
    branchy.skip = False
    for _ in range(2):  # every hooked forward, not only the first
        with pytest.raises(RuntimeError, match="were at different hooks.*restart the job"):
            flex(local_x)
