"""Second reader of the recovery after flex_surgery raises inside a backward:
``Framework.abandon_backward`` for DDP, FSDP1 and FSDP2, called from ``HookFunction._call`` and
``DistributedRuntime.announce_in_backward``.

Each test makes a backward raise somewhere the author's tests do not (after a unit's gradient
reduction already ran, in a parameter's gradient hook, in a backward pre hook, in an
accumulated micro-batch, in a recomputation, several times in a row, ...), then runs on and
compares with one process of the same weights and inputs."""

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
    TOL,
    WRAPPERS,
    Branchy,
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

REGISTER = {"full_backward": "register_full_backward_hook",
            "full_backward_pre": "register_full_backward_pre_hook",
            "forward": "register_forward_hook", "tensor": "register_hook"}


def _whole_params(kind, model):
    if kind == "ddp":
        return {clean(n): p.detach().clone() for n, p in model.named_parameters()}
    if kind == "fsdp2":
        return {clean(n): p.detach().full_tensor() for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {clean(n): p.detach().clone() for n, p in model.named_parameters()}


def _reference(x, site, hook_kind, edit=times_two, steps=1):
    """One process: what the hook stored in the last step and the accumulated gradients."""
    model = plain_net()
    stored = {}
    flex = FlexModel(model, stored, process_group=local_group())
    getattr(flex, REGISTER[hook_kind])(HookFunction(site, editing_function=edit))
    for _ in range(steps):
        stored.clear()
        square_loss(flex(x)).backward()
    flex.close()
    return stored[site], plain_grads(model)


def _actual(model, site):
    """``site``'s name in the wrapped model (a parameter by its module's name under FSDP1's
    flat parameters)."""
    names = actual_names(model)
    if site in names:
        return names[site]
    module, _, attr = site.rpartition(".")
    return f"{names[module]}.{attr}"


def _assert_stored(stored, name, want):
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored[name], want, **TOL)


def _fail_then_step(kind, site, hook_kind, failing=(1,), wrap_options=None):
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, site, hook_kind)
    model = wrap(kind, plain_net(), **(wrap_options or {}))
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, site)
    getattr(flex, REGISTER[hook_kind])(HookFunction(name, editing_function=fails_on(*failing)))
    for _ in failing:
        with pytest.raises(RemoteEditError, match="a bug in the editing function"):
            square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()  # no zero_grad: the failed backwards' gradients are gone
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- where in the backward it fails ------------------------------------------------------------


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_failure_after_block1_was_reduced_equals_one_process(kind):
    """The failing hook is on block 0's output gradient: block 1's unit (FSDP) has already
    reduce-scattered its gradients, and DDP's bucket of block 1 may have been all-reduced."""
    _fail_then_step(kind, "blocks.0", "full_backward_pre")


@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2"])  # (FSDP1 flat: no such name)
@distributed(world_size=2, timeout_s=60)
def test_failure_in_a_parameter_gradient_hook_equals_one_process(kind):
    """A gradient hook on a parameter (``register_hook``) whose editing function fails."""
    _fail_then_step(kind, "blocks.1.up.weight", "tensor")


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_failure_in_a_head_backward_pre_hook_equals_one_process(kind):
    """The first hook of the backward (the root's own module under FSDP) fails."""
    _fail_then_step(kind, "head", "full_backward_pre")


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_three_failures_in_a_row_then_success_equals_one_process(kind):
    _fail_then_step(kind, "blocks.0.down", "full_backward", failing=(1, 2, 3))


@distributed(world_size=2, timeout_s=60)
def test_ddp_static_graph_failure_in_the_first_backward_is_refused_clearly():
    """``static_graph=True`` records the graph in its first backward: that one fails. DDP
    cannot record it again (reset, its next backward would say the training graph has
    changed), so every later hooked forward raises saying so, on every rank."""
    _, local_x = batch()
    model = wrap("ddp", plain_net(), static_graph=True)
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction("module.blocks.1.up",
                                                  editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        square_loss(flex(local_x)).backward()
    with pytest.raises(RuntimeError, match=r"first backward .*static_graph=True"):
        flex(local_x)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_ddp_static_graph_failure_in_a_later_backward_equals_one_process():
    """``static_graph=True``: one good step, then a failing one, then a good one (gradients
    zeroed after the first)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, "blocks.1.up", "full_backward")
    model = DDP(plain_net(), static_graph=True)
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_full_backward_hook(HookFunction("module.blocks.1.up",
                                                  editing_function=fails_on(2)))
    square_loss(flex(local_x)).backward()  # a good first iteration: the static graph is learnt
    model.zero_grad(set_to_none=True)
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, "module.blocks.1.up", ref_stored)
    assert_grads_equal(whole_grads("ddp", model), ref_grads, **TOL)
    flex.close()


@distributed(world_size=2, timeout_s=60)
def test_ddp_gradient_as_bucket_view_failure_equals_one_process():
    _fail_then_step("ddp", "blocks.0.down", "full_backward",
                    wrap_options={"gradient_as_bucket_view": True})


@distributed(world_size=2, timeout_s=60)
def test_fsdp2_without_reshard_after_forward_failure_equals_one_process():
    _fail_then_step("fsdp2", "blocks.0", "full_backward_pre",
                    wrap_options={"reshard_after_forward": False})


# -- what must not be reset --------------------------------------------------------------------


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_forward_hook_failure_keeps_the_earlier_gradients(kind):
    """A good step, then a forward whose forward hook's editing function raises (outside any
    backward), then another good step without zeroing: the first step's gradients are kept,
    the sum equals one process running both steps."""
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, "blocks.1.up", "forward", steps=2)
    model = wrap(kind, plain_net())
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, "blocks.1.up")
    flex.register_forward_hook(HookFunction(name, editing_function=fails_on(2)))
    square_loss(flex(local_x)).backward()
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        flex(local_x)
    if kind == "fsdp2":  # FSDP2's own recovery after an exception in its forward
        model.reset_iter_state()
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- accumulated micro-batches -----------------------------------------------------------------


def _no_sync(kind, model):
    import contextlib

    if kind == "fsdp2":
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def _sync(kind, model):
    if kind == "fsdp2":
        model.set_requires_gradient_sync(True)


@pytest.mark.parametrize("fail_in", ["first", "second"])
@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_failure_in_an_accumulated_micro_batch_then_restart_equals_one_process(kind, fail_in):
    """Two micro-batches, the first without gradient sync (``no_sync`` /
    ``set_requires_gradient_sync(False)``); one of their backwards fails. The sequence is
    started again: both micro-batches equal one process's two accumulated backwards."""
    xa, local_a = batch(1)
    xb, local_b = batch(2)
    model = plain_net()
    ref_stored = {}
    ref_flex = FlexModel(model, ref_stored, process_group=local_group())
    ref_flex.register_full_backward_hook(HookFunction("blocks.0.down",
                                                      editing_function=times_two))
    square_loss(ref_flex(xa)).backward()
    ref_stored.clear()
    square_loss(ref_flex(xb)).backward()
    ref_flex.close()
    ref_grads = plain_grads(model)

    model = wrap(kind, plain_net())
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, "blocks.0.down")
    flex.register_full_backward_hook(HookFunction(
        name, editing_function=fails_on(1 if fail_in == "first" else 2)))
    with _no_sync(kind, model):
        if fail_in == "first":
            with pytest.raises(RemoteEditError):
                square_loss(flex(local_a)).backward()
        else:
            square_loss(flex(local_a)).backward()
    _sync(kind, model)
    if fail_in == "second":
        with pytest.raises(RemoteEditError):
            square_loss(flex(local_b)).backward()
    # the sequence again, from its start
    with _no_sync(kind, model):
        square_loss(flex(local_a)).backward()
    _sync(kind, model)
    stored.clear()
    square_loss(flex(local_b)).backward()
    _assert_stored(stored, name, ref_stored["blocks.0.down"])
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- activation checkpointing ------------------------------------------------------------------


class _CheckpointedNet(type(plain_net())):
    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return self.head(x)


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_failure_in_a_recomputed_forward_equals_one_process(kind):
    """A forward hook inside a checkpointed block whose editing function raises when the
    block's forward runs again inside the backward (its second call): raised in the backward,
    the next step equals one process."""
    x, local_x = batch()
    ref_model = plain_net()
    ref_model.__class__ = _CheckpointedNet
    ref_stored = {}
    ref_flex = FlexModel(ref_model, ref_stored, process_group=local_group())
    ref_flex.register_forward_hook(HookFunction("blocks.1.up", editing_function=times_two))
    square_loss(ref_flex(x)).backward()
    ref_flex.close()
    ref_grads = plain_grads(ref_model)

    model = plain_net()
    model.__class__ = _CheckpointedNet
    model = wrap(kind, model)
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, "blocks.1.up")
    flex.register_forward_hook(HookFunction(name, editing_function=fails_on(2)))
    with pytest.raises(RemoteEditError, match="a bug in the editing function"):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored["blocks.1.up"])
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- after the failure: close, a new FlexModel, an optimizer -----------------------------------


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_close_then_a_new_flexmodel_equals_one_process(kind):
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, "blocks.0", "full_backward_pre")
    model = wrap(kind, plain_net())
    flex = FlexModel(model, {})
    name = _actual(model, "blocks.0")
    flex.register_full_backward_pre_hook(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    flex.close()
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_full_backward_pre_hook(HookFunction(name, editing_function=times_two))
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_adam_steps_around_a_failure_equal_one_process(kind):
    """Adam: a good step of the bare model, a failed backward through a FlexModel followed by
    ``optimizer.step()`` (every gradient dropped: nothing moves), then a good step: the
    weights equal one process's after its two good steps."""
    x, local_x = batch()
    ref = plain_net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(2):
        ref_opt.zero_grad()
        square_loss(ref(x)).backward()
        ref_opt.step()
    model = wrap(kind, plain_net())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.zero_grad()
    square_loss(model(local_x)).backward()
    opt.step()
    flex = FlexModel(model, {})
    flex.register_full_backward_hook(HookFunction(_actual(model, "blocks.0.down"),
                                                  editing_function=fails_on(1)))
    opt.zero_grad()
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    opt.step()  # every gradient was dropped: no parameter moves
    flex.close()
    opt.zero_grad()
    square_loss(model(local_x)).backward()
    opt.step()
    got, want = _whole_params(kind, model), {clean(n): p for n, p in ref.named_parameters()}
    assert_grads_equal(got, want, rtol=1e-7, atol=1e-9)


# -- replicate_edit failing on one rank --------------------------------------------------------


def _fails_on_rank_1_once():
    calls = [0]

    def edit(module, grad, ctx, modules):
        calls[0] += 1
        if calls[0] == 1 and dist.get_rank() == 1:
            raise ValueError("rank-local failure")
        return grad * 2

    return edit


@pytest.mark.parametrize("kind", WRAPPERS)
@distributed(world_size=2, timeout_s=60)
def test_replicate_edit_failing_on_one_rank_then_step_equals_one_process(kind):
    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, "blocks.0.down", "full_backward")
    model = wrap(kind, plain_net())
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, "blocks.0.down")
    flex.register_full_backward_hook(HookFunction(name, editing_function=_fails_on_rank_1_once(),
                                                  replicate_edit=True))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- DDP with find_unused_parameters: a failure at the end of the backward ---------------------


@distributed(world_size=2, timeout_s=60)
def test_ddp_unused_parameters_deferred_hook_failure_at_end_of_backward_recovers():
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.hooks.errors import ShapeMismatchError

    x, local_x = batch()
    ref = Branchy()
    square_loss(ref(x)).backward()
    ref_grads = plain_grads(ref)

    group = dist.new_group([0, 1])  # any stray all-reduce stays on this test's own group
    branchy = Branchy()
    model = DDP(branchy, find_unused_parameters=True, process_group=group)
    flex = FlexModel(model, {})
    flex.register_hook(HookFunction("module.net.blocks.1.up.weight", expected_shape=(1, 2)))
    branchy.skip = dist.get_rank() == 1
    with pytest.raises(ShapeMismatchError):
        square_loss(flex(local_x)).backward()
    branchy.skip = False
    flex.close()
    square_loss(model(local_x)).backward()
    assert_grads_equal(whole_grads("ddp", model), ref_grads, **TOL)


# -- FSDP2: ranks at different hooks in the unit whose reduction is at the end -----------------


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_fsdp_ranks_apart_in_block_0_then_step_equals_one_process(kind):
    """Rank 1 skips ``blocks.0.up`` (block 0's input needs no gradient: FSDP2 reduces that
    unit at the end of the backward); rank 0 waits at its backward pre hook. Every rank raises
    ``HookSiteMismatchError``, and the next step equals one process."""
    from flex_surgery.parallel.site_tags import HookSiteMismatchError

    x, local_x = batch()
    ref_stored, ref_grads = _reference(x, "blocks.0.up", "full_backward_pre")
    model = plain_net()
    model.blocks[0].__class__ = SkippableUp
    model = wrap(kind, model)
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, "blocks.0.up")
    flex.register_full_backward_pre_hook(HookFunction(name, editing_function=times_two))
    SkippableUp.skip = dist.get_rank() == 1
    try:
        with pytest.raises(HookSiteMismatchError):
            square_loss(flex(local_x)).backward()
    finally:
        SkippableUp.skip = False
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(whole_grads(kind, model), ref_grads, **TOL)
    flex.close()


# -- FSDP2 x DTensor TP on a 2-D mesh ----------------------------------------------------------


@pytest.mark.parametrize("site, hook_kind", [("blocks.0", "full_backward_pre"),
                                             ("blocks.1.up.weight", "tensor")])
@distributed(world_size=4, timeout_s=60)
def test_fsdp2_x_tp_failure_then_step_equals_one_process(site, hook_kind):
    from parallel_cases import dtensor_plan
    from test_fsdp2_tp_mesh import _dp_slice, _dtensor_grads, _fsdp2, _mesh_2d
    from torch.distributed.tensor.parallel import parallelize_module

    x, _ = batch()
    ref_stored, ref_grads = _reference(x, site, hook_kind)
    mesh = _mesh_2d()
    local_x = _dp_slice(x, mesh.get_local_rank("dp"), 2)
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    _fsdp2(model, mesh["dp"], model.blocks)
    stored = {}
    flex = FlexModel(model, stored)
    name = _actual(model, site)
    getattr(flex, REGISTER[hook_kind])(HookFunction(name, editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    stored.clear()
    square_loss(flex(local_x)).backward()
    _assert_stored(stored, name, ref_stored)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)
    flex.close()


@distributed(world_size=2, timeout_s=60, spends_pool=True)  # a stray all-reduce
def test_ddp_ranks_apart_in_first_iteration_bare_model_says_iteration_did_not_finish():

    from flex_surgery.parallel.site_tags import HookSiteMismatchError

    _, local_x = batch()
    branchy, model, flex = ranks_apart_ddp()
    with pytest.raises(HookSiteMismatchError):
        square_loss(flex(local_x)).backward()
    branchy.skip = False
    flex.close()
    # DDP's own error, as docs/failure.md says: which one depends on the rank and iteration
    with pytest.raises(RuntimeError, match="Expected to have finished reduction|"
                                           "unmarked_param_indices"):
        model(local_x)


# -- more wrapper settings ---------------------------------------------------------------------


@pytest.mark.parametrize("kind, strategy", [
    ("fsdp1", "NO_SHARD"),
    ("fsdp1_flat", "NO_SHARD"), ("fsdp1", "SHARD_GRAD_OP"), ("fsdp1_flat", "SHARD_GRAD_OP")])
@distributed(world_size=2, timeout_s=60)
def test_fsdp1_sharding_strategies_failure_equals_one_process(kind, strategy):
    from torch.distributed.fsdp import ShardingStrategy

    _fail_then_step(kind, "blocks.0", "full_backward_pre",
                    wrap_options={"sharding_strategy": getattr(ShardingStrategy, strategy)})


@pytest.mark.parametrize("fail_in", ["first", "second"])
@distributed(world_size=2, timeout_s=60)
def test_fsdp2_mixed_precision_reduce_dtype_accumulation_failure_equals_one_process(fail_in):
    """FSDP2 reducing in another dtype than it computes accumulates unsynced micro-batches in
    ``unsharded_accumulated_grad``: a failure in either micro-batch, then the sequence again."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    xa, local_a = batch(1)
    xb, local_b = batch(2)
    ref = plain_net()
    square_loss(ref(xa)).backward()
    square_loss(ref(xb)).backward()
    ref_grads = plain_grads(ref)
    model = wrap("fsdp2", plain_net(),
                  mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    flex = FlexModel(model, {})
    flex.register_full_backward_pre_hook(HookFunction(
        _actual(model, "blocks.0"), editing_function=fails_on(1 if fail_in == "first" else 2)))
    model.set_requires_gradient_sync(False)
    if fail_in == "first":
        with pytest.raises(RemoteEditError):
            square_loss(flex(local_a)).backward()
    else:
        square_loss(flex(local_a)).backward()
        model.set_requires_gradient_sync(True)
        with pytest.raises(RemoteEditError):
            square_loss(flex(local_b)).backward()
    flex.close()  # the sequence again, on the bare model
    model.set_requires_gradient_sync(False)
    square_loss(model(local_a)).backward()
    model.set_requires_gradient_sync(True)
    square_loss(model(local_b)).backward()
    assert_grads_equal(whole_grads("fsdp2", model), ref_grads, rtol=1e-5, atol=1e-6)


# -- what is dropped ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_failed_backward_drops_every_gradient_also_earlier_ones(kind):
    """As docs/failure.md says: a backward that raised leaves no gradient at all -- also none
    that an earlier, completed backward accumulated on parameters the failed one never reached
    (block 0 here): an accumulation over micro-batches starts again."""
    _, local_x = batch()
    model = wrap(kind, plain_net())
    square_loss(model(local_x)).backward()  # a complete step: reduced gradients everywhere
    assert any(p.grad is not None for p in model.parameters())
    flex = FlexModel(model, {})
    # the first backward hook of the model: the failed backward reaches nothing before it but
    # the head
    flex.register_full_backward_pre_hook(HookFunction(_actual(model, "blocks.1"),
                                                      editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    flex.close()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@distributed(world_size=2, timeout_s=60)
def test_fsdp1_no_shard_orig_params_stay_parameters_after_a_failure():
    from torch.distributed.fsdp import ShardingStrategy

    _, local_x = batch()
    model = wrap("fsdp1", plain_net(), sharding_strategy=ShardingStrategy.NO_SHARD)
    names = sorted(clean(n) for n, _ in model.named_parameters())
    flex = FlexModel(model, {})
    flex.register_full_backward_pre_hook(HookFunction(_actual(model, "blocks.0"),
                                                      editing_function=fails_on(1)))
    with pytest.raises(RemoteEditError):
        square_loss(flex(local_x)).backward()
    flex.close()
    assert sorted(clean(n) for n, _ in model.named_parameters()) == names
