"""Fourth reader of the recovery after flex_surgery raises inside a backward: what DDP does in
the failed backward (a reduction prepared by a forward under grad since DDP's last end of
backward, whatever forwards came after), the forwards a backward reaches (a hook on every
output an autograd node made), and a refused edit of a deferred gradient hook, which drops
every gradient.

Each test makes a backward raise and runs on, compared with one process of the same weights
and inputs (float64), or asserts the documented refusal. Tests where ranks may be left with a
stray all-reduce use their own DDP process group and assert a refusal before any collective on
it, so a defect fails instead of hanging."""

import functools

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
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
    Branchy,
    batch,
    ddp_grads,
    fails_on,
    ranks_apart_ddp,
    square_loss,
    times_two,
)
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.parallel.site_tags import HookSiteMismatchError

SITE = "blocks.1.up"
RESTART = "were at different hooks.*restart the job"


def _ref(steps, site=SITE, edit=times_two, register="register_full_backward_hook"):
    """One process: each step a list of inputs whose losses are summed into one backward.
    The values stored at ``site`` in the last step, and every gradient accumulated."""
    model = plain_net()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    getattr(flex, register)(HookFunction(site, editing_function=edit))
    for xs in steps:
        stored.clear()
        sum(square_loss(flex(x)) for x in xs).backward()
    flex.close()
    return stored[site], plain_grads(model)


def _ranks_apart_model(group=None):
    branchy = Branchy()
    model = DDP(branchy, find_unused_parameters=True,
                process_group=dist.new_group([0, 1]) if group is None else group)
    return branchy, model


def _compare(stored, name, ref_stored, model, ref_grads):
    if dist.get_rank() == 0:
        assert len(stored[name]) == len(ref_stored)
        for got, want in zip(stored[name], ref_stored, strict=True):
            torch.testing.assert_close(got, want, **TOL)
    assert_grads_equal(ddp_grads(model), ref_grads, **TOL)


# -- several forwards in one backward ---------------------------------------------------------


def _refused_on(flex):
    """Which ranks refuse the next hooked forward (``abandon_backward`` kept DDP as it is),
    exchanged over the default group -- not over the DDP's or the FlexModel's, where a rank
    that wrongly reset would meet the other's stray all-reduce and hang instead of failing."""
    mine = torch.tensor([int(flex.runtime._ddp_unfinished is not None)])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t) for t in every]


@pytest.mark.parametrize("order", [
    "no_sync, synced", "synced, no_sync"])
@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_summed_losses_of_a_no_sync_and_a_synced_forward_ranks_apart_is_refused(order):
    """Losses of a ``no_sync`` forward and a synced forward summed into one backward: DDP
    reduces in it, so ranks at different hooks refuse the next hooked forward on every rank
    -- in either order of the forwards."""
    _, local_x = batch()
    branchy, model = _ranks_apart_model()
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.net." + SITE,
                                                  editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    outs = []
    for synced in ([False, True] if order == "no_sync, synced" else [True, False]):
        if synced:
            outs.append(flex(local_x))
        else:
            with model.no_sync():
                outs.append(flex(local_x))
    with pytest.raises(HookSiteMismatchError):
        (square_loss(outs[0]) + square_loss(outs[1])).backward()
    branchy.skip = False
    assert _refused_on(flex) == [1, 1]
    with pytest.raises(RuntimeError, match=RESTART):
        flex(local_x)
    flex.close()


@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_backward_through_a_no_sync_forward_after_a_synced_one_ranks_apart_is_refused():
    """A synced forward (DDP prepares its reduction), then a ``no_sync`` forward, and a
    backward through the ``no_sync`` forward only: DDP all-reduces in it (checked with a
    bare DDP: the gradients come out averaged), so ranks at different hooks are refused."""
    _, local_x = batch()
    branchy, model = _ranks_apart_model()
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.net." + SITE,
                                                  editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    flex(local_x)
    with model.no_sync():
        out = flex(local_x)
    with pytest.raises(HookSiteMismatchError):
        square_loss(out).backward()
    branchy.skip = False
    assert _refused_on(flex) == [1, 1]
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_summed_losses_of_two_no_sync_forwards_ranks_apart_reset_then_equal_one_process():
    """Both forwards under ``no_sync``: DDP reduced nothing, so ranks at different hooks reset
    it. The accumulation started again (two ``no_sync`` forwards summed, then one synced
    step) equals one process."""
    xa, local_a = batch(1)
    xb, local_b = batch(2)
    ref_stored, ref_grads = _ref([[xa, xb], [xb]])
    branchy, model = _ranks_apart_model()
    stored = {}
    flex = FlexModel(model, stored)
    name = "module.net." + SITE
    flex.register_full_backward_hook(HookFunction(name, editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    with model.no_sync():
        outs = [flex(local_a), flex(local_b)]
        with pytest.raises(HookSiteMismatchError):
            (square_loss(outs[0]) + square_loss(outs[1])).backward()
    branchy.skip = False
    assert all(p.grad is None for p in model.parameters())
    with model.no_sync():
        (square_loss(flex(local_a)) + square_loss(flex(local_b))).backward()
    stored.clear()
    square_loss(flex(local_b)).backward()
    _compare(stored, name, ref_stored, model, ref_grads)
    flex.close()


@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_backward_through_one_of_two_outputs_of_a_synced_forward_ranks_apart_is_refused():
    """A model with two outputs, the loss from the second only (the first gets no gradient):
    the backward still reaches the forward, which reduces; ranks apart are refused."""

    class TwoOut(Branchy):
        def forward(self, x):
            y = super().forward(x)
            return y * 3.0, y

    _, local_x = batch()
    branchy, model, flex = ranks_apart_ddp(module=TwoOut())
    with model.no_sync():
        flex(local_x)  # the latest forward before the synced one ran under no_sync
    _, second = flex(local_x)
    with model.no_sync():
        flex(local_x)  # ... and the latest after it too
    with pytest.raises(HookSiteMismatchError):
        square_loss(second).backward()
    branchy.skip = False
    with pytest.raises(RuntimeError, match=RESTART):
        flex(local_x)
    flex.close()


# -- backward by other means ------------------------------------------------------------------


@distributed(world_size=2, timeout_s=60)
def test_retain_graph_second_backward_fails_under_no_sync_then_step_equals_one_process():
    """A ``no_sync`` forward backpropagated twice (``retain_graph=True``), the edit failing in
    the second: reset (each backward is its own graph task, both reach the forward). The next
    steps equal one process's."""
    xa, local_a = batch(1)
    xb, local_b = batch(2)
    ref_stored, ref_grads = _ref([[xa], [xb]])
    model = DDP(plain_net(), process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored)
    name = "module." + SITE
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(2)))
    with model.no_sync():
        loss = square_loss(flex(local_a))
        loss.backward(retain_graph=True)
        with pytest.raises(RemoteEditError):
            loss.backward()
        assert all(p.grad is None for p in model.parameters())
        square_loss(flex(local_a)).backward()
    stored.clear()
    square_loss(flex(local_b)).backward()
    _compare(stored, name, ref_stored, model, {k.removeprefix("module."): v
                                               for k, v in ref_grads.items()})
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_autograd_grad_under_no_sync_ranks_apart_resets_then_step_equals_one_process():
    """``torch.autograd.grad`` (not ``.backward()``) through a ``no_sync`` forward, the ranks at
    different hooks: DDP reduced nothing, so it is reset; the next step equals one process."""
    x, local_x = batch()
    ref_stored, ref_grads = _ref([[x]])
    branchy, model = _ranks_apart_model()
    stored = {}
    flex = FlexModel(model, stored)
    name = "module.net." + SITE
    flex.register_full_backward_hook(HookFunction(name, editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    inp = local_x.clone().requires_grad_()
    with model.no_sync():
        out = flex(inp)
        with pytest.raises(HookSiteMismatchError):
            torch.autograd.grad(square_loss(out), [inp])
    branchy.skip = False
    stored.clear()
    square_loss(flex(local_x)).backward()
    _compare(stored, name, ref_stored, model, ref_grads)
    flex.close()


# -- many forwards between a forward and its backward -----------------------------------------


@distributed(world_size=2, timeout_s=60)
def test_generation_loop_under_no_grad_between_a_no_sync_forward_and_its_backward():
    """A ``no_sync`` forward, then 1100 forwards under ``no_grad`` (a generation loop: more
    than the forwards remembered), then its backward with the ranks apart: the no_grad
    forwards do not count, so the forward is still known to reduce nothing and DDP is reset.
    The next step equals one process."""
    x, local_x = batch()
    ref_stored, ref_grads = _ref([[x]])
    branchy, model = _ranks_apart_model()
    stored = {}
    flex = FlexModel(model, stored)
    name = "module.net." + SITE
    flex.register_full_backward_hook(HookFunction(name, editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    with model.no_sync():
        out = flex(local_x)
    with torch.no_grad():
        for _ in range(1100):
            model(local_x[:, :1])
    with pytest.raises(HookSiteMismatchError):
        square_loss(out).backward()
    branchy.skip = False
    stored.clear()
    square_loss(flex(local_x)).backward()
    _compare(stored, name, ref_stored, model, ref_grads)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_backward_through_an_old_no_sync_forward_ranks_apart_is_reset():
    """1025 ``no_sync`` forwards under grad kept, then a backward through the oldest, ranks
    apart: no forward prepared a reduction, so DDP is reset (no refusal) and no gradient is
    left; the next step runs."""
    _, local_x = batch()
    branchy, model = _ranks_apart_model()
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.net." + SITE,
                                                  editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    small = local_x[:, :1]
    with model.no_sync():
        oldest = flex(small)
        for _ in range(1024):
            model(small)
        with pytest.raises(HookSiteMismatchError):
            square_loss(oldest).backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    branchy.skip = False
    square_loss(flex(local_x)).backward()
    assert all(p.grad is not None for p in model.parameters())
    flex.close()


# -- activation checkpointing -----------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["synced", "no_sync"])
@distributed(world_size=2, timeout_s=60)
def test_failure_inside_a_non_reentrant_checkpointed_block_then_step_equals_one_process(sync):
    """Every block under a non-reentrant activation checkpoint (recomputed inside the
    backward); the edit of a backward hook inside block 1 fails: reset, no gradient left; the
    next step equals one process."""
    x, local_x = batch()
    ref_stored, ref_grads = _ref([[x]])
    net = plain_net()
    apply_activation_checkpointing(
        net, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: any(m is b for b in net.blocks))
    model = DDP(net, process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored)
    name = next(n for n, _ in model.named_modules() if clean(n) == SITE)
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError, match="call 1"):
        if sync:
            square_loss(flex(local_x)).backward()
        else:
            with model.no_sync():
                square_loss(flex(local_x)).backward()
    assert all(p.grad is None for p in model.parameters())
    stored.clear()
    square_loss(flex(local_x)).backward()
    _compare(stored, name, ref_stored, model, ref_grads)
    flex.close()


# -- a refused edit of a deferred gradient hook -----------------------------------------------


def _branch_x(seed=3, takers=(0,)):
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, 8, generator=torch.Generator().manual_seed(seed))
    for rank in (0, 1):
        x[2 * rank:2 * rank + 2, 0, 0] = 5.0 if rank in takers else -5.0
    return x, x[dist.get_rank() * 2:(dist.get_rank() + 1) * 2]


def _branch_reference(xs):
    from test_grad_accumulation import BranchNet

    model = BranchNet()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    flex.register_hook(HookFunction("side.weight"))
    for x in xs:
        stored.clear()
        square_loss(flex(x)).backward()
    flex.close()
    return stored["side.weight"], plain_grads(model)


@pytest.mark.parametrize("options", ["find_unused_parameters", "static_graph"])
@distributed(world_size=2, timeout_s=60)
def test_refused_deferred_edit_after_no_sync_micro_batch_drops_all_then_equals_one_process(
        options):
    """A ``no_sync`` micro-batch accumulates, then a synced one whose deferred gradient hook
    (``side`` used by rank 0 only) edits: refused on every rank after DDP's end of backward,
    every gradient dropped (the accumulation too). The hook made retrieve-only, the next step
    stores and trains as one process -- also for a static-graph DDP, whose failed backward
    was its first (DDP had finished it, so it is reset, not refused)."""
    from test_grad_accumulation import BranchNet

    x, local_x = _branch_x()
    ref_stored, ref_grads = _branch_reference([x])
    model = DDP(BranchNet(), process_group=dist.new_group([0, 1]), **{options: True})
    stored = {}
    flex = FlexModel(model, stored)
    if options == "find_unused_parameters":
        with model.no_sync():
            square_loss(flex(local_x)).backward()
        assert any(p.grad is not None for p in model.parameters())
    hook = HookFunction("module.side.weight", editing_function=times_two)
    flex.register_hook(hook)
    with pytest.raises(RuntimeError, match="retrieved there but not edited"):
        square_loss(flex(local_x)).backward()
    assert stored == {}
    assert all(p.grad is None for p in model.parameters())
    hook.editing_function = None
    square_loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["module.side.weight"][0], ref_stored[0], **TOL)
    assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()
                        if p.grad is not None}, ref_grads, **TOL)
    flex.close()


# -- the per-forward output hooks -------------------------------------------------------------


class _ScaleOut(nn.Module):
    """Returns a parameter of its own beside the output (a temperature, a logit scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_net()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.scale, self.scale


@distributed(world_size=2, timeout_s=60)
def test_outputs_followed_per_forward_do_not_change_values_or_gradients():
    """Three steps of a model that also returns one of its parameters, hooks on a module and
    a parameter: what is stored and every gradient equal one process (the hooks on the
    outputs only watch)."""
    x, local_x = batch()
    ref = _ScaleOut()
    ref_stored = {}
    ref_flex = FlexModel(ref, ref_stored, process_group=local_group())
    ref_flex.register_full_backward_hook(HookFunction("net." + SITE,
                                                      editing_function=times_two))
    ref_flex.register_hook(HookFunction("scale"))
    for _ in range(3):
        out, scale = ref_flex(x)
        (square_loss(out) + scale).backward()
    ref_flex.close()
    model = DDP(_ScaleOut(), process_group=dist.new_group([0, 1]))
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_full_backward_hook(HookFunction("module.net." + SITE,
                                                  editing_function=times_two))
    flex.register_hook(HookFunction("module.scale"))
    for _ in range(3):
        out, scale = flex(local_x)
        (square_loss(out) + scale).backward()
    if dist.get_rank() == 0:
        for key in ("net." + SITE, "scale"):
            assert len(stored["module." + key]) == len(ref_stored[key]) == 3
            for got, want in zip(stored["module." + key], ref_stored[key], strict=True):
                torch.testing.assert_close(got, want, **TOL)
    assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()},
                       plain_grads(ref), **TOL)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_a_parameter_returned_by_the_model_does_not_collect_a_hook_per_forward():
    """A parameter the model returns is an output tensor that requires grad: following each
    forward's outputs must not leave one more hook on the parameter per forward (nor after
    ``close()``): a training loop would grow them without bound, each run in every backward.
    Only a forward hook is registered: no backward hook is selected, so only the new
    per-forward following puts hooks on the outputs."""
    _, local_x = batch()
    inner = _ScaleOut()
    model = DDP(inner, process_group=dist.new_group([0, 1]))
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("module.net." + SITE))
    before = len(inner.scale._backward_hooks or {})
    for _ in range(20):
        out, scale = flex(local_x)
        (square_loss(out) + scale).backward()
    during = len(inner.scale._backward_hooks or {})
    flex.close()
    after = len(inner.scale._backward_hooks or {})
    assert during - before <= 1 and after == before, (before, during, after)
