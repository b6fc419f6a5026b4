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
    actual_names,
    assert_grads_equal,
    local_group,
    plain_grads,
    plain_net,
)
from rank_pool import distributed
from recovery_cases import (
    TOL,
    WRAPPERS,
    SkippableUp,
    batch,
    fails_on,
    ranks_apart_ddp,
    square_loss,
    times_two,
    whole_grads,
    wrap,
)

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.parallel.site_tags import HookSiteMismatchError


def _reference(x, edit):
    """One process: the stored gradient of ``blocks.1.up``'s input and every gradient."""
    model = plain_net()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    flex.register_full_backward_hook(HookFunction("blocks.1.up", editing_function=edit))
    square_loss(flex(x)).backward()
    flex.close()
    return stored["blocks.1.up"][0], plain_grads(model)


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_step_after_a_failed_edit_in_backward_equals_one_process(kind):
    """The editing function raises in the first backward; the second step, through the same
    FlexModel and without zeroing gradients, stores and trains as one process does."""
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, times_two)
    model = wrap(kind, plain_net())
    stored = {}
    flex = FlexModel(model, stored)
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()  # no zero_grad: the failed backward's gradients are gone
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_bare_model_after_a_failed_backward_equals_one_process(kind):
    """The same failure, then ``close()`` and a plain step of the bare model."""
    x, local_x = batch()
    ref = plain_net()
    square_loss(ref(x)).backward()
    ref_grads = plain_grads(ref)
    model = wrap(kind, plain_net())
    flex = FlexModel(model, {})
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    flex.close()
    square_loss(model(local_x)).backward()
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)


@distributed(world_size=2, timeout_s=60)
def test_ddp_find_unused_parameters_step_after_a_failed_edit_equals_one_process():
    """``find_unused_parameters=True`` with every parameter used by every rank: the same
    recovery (the ranks launched the same reductions before the error)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, times_two)
    model = DDP(plain_net(), find_unused_parameters=True)
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_full_backward_hook(HookFunction("module.blocks.1.up",
                                                  editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["module.blocks.1.up"][0], ref_stored, **TOL)
    assert_grads_equal(whole_grads("ddp", model), ref_grads, **TOL)
    flex.close()


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_fsdp_step_after_ranks_met_at_different_backward_hooks_equals_one_process(kind):
    """Rank 1 skips ``blocks.1.up``: rank 0 reaches its backward hook, rank 1 the next
    announced point (FSDP announces each collective of its backward), and both raise
    ``HookSiteMismatchError`` before any rank launched a collective the other did not. The
    next step, both ranks on the same path, equals one process."""
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, times_two)
    model = plain_net()
    model.blocks[1].__class__ = SkippableUp
    model = wrap(kind, model)
    stored = {}
    flex = FlexModel(model, stored)
    name = actual_names(model)["blocks.1.up"]
    flex.register_full_backward_hook(HookFunction(name, editing_function=times_two))
    SkippableUp.skip = dist.get_rank() == 1
    try:
        with pytest.raises(HookSiteMismatchError):
            square_loss(flex(local_x)).backward()
    finally:
        SkippableUp.skip = False
    stored.clear()
    square_loss(flex(local_x)).backward()
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name][0], ref_stored, **TOL)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_ddp_after_ranks_met_at_different_backward_hooks_refuses_the_next_forward():
    """Rank 1 skips block 1, so the ranks meet at different points of DDP's backward, where one
    may have launched a bucket's all-reduce the other never will: DDP is not reset, and the
    next hooked forward raises on every rank, saying why and what to do, before DDP's own
    misleading "parameters that were not used in producing loss"."""

    _, local_x = batch()
    branchy, model, flex = ranks_apart_ddp()
    with pytest.raises(HookSiteMismatchError):
        square_loss(flex(local_x)).backward()
    branchy.skip = False
    for _ in range(2):  # every hooked forward, not only the first
        with pytest.raises(RuntimeError, match="were at different hooks.*restart the job"):
            flex(local_x)
