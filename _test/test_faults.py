"""Fault injection: what every rank sees when something goes wrong in the middle of a step.

Each case runs on 2-4 forked gloo ranks with a bound: a rank that hangs fails the test with the
pool's message naming it, well before any CI timeout. Cases:

* an editing function that raises on the leader (every rank raises ``RemoteEditError``), on one
  rank only (a pipeline stage's leader: the other stage fails fast), and with a
  ``BaseException`` (the leader keeps its ``SystemExit``, the others learn of it);
* a rank that dies (``os._exit``) mid-forward and mid-backward: the survivors raise
  ``LostRankError`` naming it within the process-group timeout (a short one here), and the
  ``SurgicalTheater`` around the step leaves no modified weight behind;
* a checkpoint written inside surgery while a ``state_dict`` hook raises, and an optimizer step
  attempted inside surgery;
* one rank failing where its peer does not (a stage that fails just after the other closed the
  link, an exception that ends one rank's ``with FlexModel`` block): the rank leaving runs no
  collective, and the groups are freed where every rank agrees.

The soak and the bad-input catalogue live in ``test_fault_soak.py`` and
``test_fault_bad_inputs.py``.
"""

from __future__ import annotations

import datetime
import gc
import os
import time

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, plain_net, times_two
from pipeline_cases import hand_split_step, inputs, two_stages
from rank_pool import distributed, get_pool

from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.collectives import LostRankError, RemoteEditError
from flex_surgery.parallel.group_lifetime import free_dropped, live_group_count
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.pipeline import PipelineStageError, StageLink
from flex_surgery.surgery import SurgeryError, SurgicalTheater

BOUND_S = 60  # no case may take longer; a hang fails with the ranks that did not answer
PG_TIMEOUT_S = 3.0  # the process-group timeout of the lost-rank cases


def _everyone_here() -> None:
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} was left modified"


def _boom(module, tensor, ctx, modules):
    raise ValueError("boom in the editing function")


def _exit(module, tensor, ctx, modules):
    raise SystemExit(7)


# -- an editing function that raises ------------------------------------------------------------
@distributed(world_size=2, timeout_s=BOUND_S)
def test_editing_function_raising_on_the_leader_fails_every_rank():
    """Every rank raises RemoteEditError naming the hook and the leader; no weight changed; the
    FlexModel stays usable for the next call."""
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    before = _weights(model)
    flex = FlexModel(model, {}, data_parallel_size=2)
    bad = HookFunction("blocks.0.up", editing_function=_boom)
    flex.register_forward_hook(bad)
    x = torch.randn(2, 3, H)
    with pytest.raises(RemoteEditError, match=r"'blocks.0.up'.*rank 0.*ValueError: boom"):
        flex(x).sum().backward()
    _assert_same_weights(model, before)
    flex.remove_hook_function(bad)
    flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=times_two))
    flex(x)  # the next call works on every rank
    flex.restore()
    _everyone_here()


@distributed(world_size=2, timeout_s=BOUND_S)
def test_editing_function_raising_on_one_rank_only_fails_the_other_stage_fast():
    """Two pipeline stages: the hook lives on stage 1, so only rank 1 raises; rank 0, waiting
    for stage 1's gradient, fails within the link's timeout naming stage 1."""
    x, _, x_mbs, t_mbs = inputs(4, 2)
    stage = two_stages(plain_net(), dist.get_rank())
    flex = FlexModel(stage, {}, pipeline_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.1.up", editing_function=_boom))
    link = StageLink(flex.runtime.mesh, timeout_s=10)
    start = time.monotonic()
    if dist.get_rank() == 1:
        with pytest.raises(RemoteEditError, match="boom"):
            hand_split_step(flex, link, x_mbs, t_mbs)
    else:
        with pytest.raises(PipelineStageError, match=r"stage 1 .*boom"):
            hand_split_step(flex, link, x_mbs, t_mbs)
    assert time.monotonic() - start < 10
    link.close()
    flex.restore()
    _everyone_here()


@distributed(world_size=4, timeout_s=BOUND_S)
def test_base_exception_in_an_editing_function_reaches_every_rank():
    """tp=2 x dp=2: the leader keeps its SystemExit, the three others raise RemoteEditError."""
    torch.set_default_dtype(torch.float64)
    flex = FlexModel(plain_net(), {}, tensor_parallel_size=2, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.1", editing_function=_exit))
    x = torch.randn(2, 3, H)
    if dist.get_rank() == 0:
        with pytest.raises(SystemExit):
            flex(x)
    else:
        with pytest.raises(RemoteEditError, match="SystemExit"):
            flex(x)
    flex.restore()
    _everyone_here()


# -- a rank that dies ---------------------------------------------------------------------------
def _die(*args):
    os._exit(3)


@distributed(world_size=3)
def _lose_a_rank(phase: str) -> float:
    """dp=3 over a group with a short timeout, inside a SurgicalTheater; rank 2 exits in the
    middle of the forward or of the backward. Survivors return how long they took to fail."""
    torch.set_default_dtype(torch.float64)
    group = dist.new_group(list(range(3)), timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    model = plain_net()
    before = _weights(model)
    flex = FlexModel(model, {}, process_group=group)
    flex.register_forward_hook(HookFunction("blocks.0", editing_function=times_two))
    flex.register_full_backward_hook(HookFunction("blocks.0.up", editing_function=times_two))
    if dist.get_rank() == 2:
        if phase == "forward":
            model.blocks[0].up.register_forward_hook(_die)
        else:
            model.blocks[1].register_full_backward_hook(_die)
    x = torch.randn(2, 3, H, requires_grad=True)
    start = time.monotonic()
    with SurgicalTheater(model, layers=["blocks.0.up", "blocks.1.down"],
                         modification_type="scale", factor=0.5):
        with pytest.raises(LostRankError, match=r"lost rank\(s\) \[2\] \(process exited\)"):
            flex(x).pow(2).mean().backward()
    took = time.monotonic() - start
    _assert_same_weights(model, before)
    flex.restore()
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.blocks[0].modules())
    return took


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_rank_that_dies_is_named_by_the_survivors(phase):
    outcomes = get_pool(3).run_outcomes(_lose_a_rank, {"phase": phase}, timeout_s=BOUND_S)
    assert outcomes[2][0] == "died", outcomes[2]
    for rank in (0, 1):
        kind, value = outcomes[rank]
        assert kind == "ok", f"rank {rank}: {value}"
        assert value < PG_TIMEOUT_S + 2, f"rank {rank} took {value:.1f} s to notice"


# -- surgery: a checkpoint that fails, an optimizer step -----------------------------------------
def _failing_checkpoint_hook(module, state_dict, prefix, local_metadata):
    raise OSError("No space left on device")


@pytest.mark.parametrize("hook_first", [True, False])
@distributed(world_size=2, timeout_s=BOUND_S)
def test_a_checkpoint_that_raises_inside_surgery_leaves_weights_and_guard_intact(hook_first,
                                                                                 tmp_path):
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    before = _weights(model)
    flex = FlexModel(model, {}, data_parallel_size=2)
    handle = model.register_state_dict_post_hook(_failing_checkpoint_hook) if hook_first \
        else None
    with SurgicalTheater(flex, layers=["blocks.0.up", "blocks.1.down"],
                         modification_type="scale", factor=0.5):
        if handle is None:
            handle = model.register_state_dict_post_hook(_failing_checkpoint_hook)
        with pytest.raises(OSError, match="No space"):
            torch.save(model.state_dict(), tmp_path / f"ckpt{dist.get_rank()}.pt")
        assert not torch.equal(model.blocks[0].up.weight, before["blocks.0.up.weight"])
        handle.remove()
        saved = model.state_dict()  # the guard still serves the original weights
        for name, value in before.items():
            assert torch.equal(saved[name], value), name
    _assert_same_weights(model, before)
    flex.restore()
    _everyone_here()


@distributed(world_size=2, timeout_s=BOUND_S)
def test_an_optimizer_step_inside_surgery_is_refused_and_changes_nothing():
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    before = _weights(model)
    flex = FlexModel(model, {}, data_parallel_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, H)
    with SurgicalTheater(flex, layers=["blocks.0.up"], modification_type="scale", factor=0.5):
        flex(x).pow(2).mean().backward()
        with pytest.raises(SurgeryError, match="optimizer.step"):
            opt.step()
    _assert_same_weights(model, before)
    flex(x).pow(2).mean().backward()
    opt.step()  # outside surgery it trains
    assert not torch.equal(model.blocks[0].up.weight, before["blocks.0.up.weight"])
    flex.restore()
    _everyone_here()


# -- leaving a link or a FlexModel when one rank failed: no collective ---------------------------
def _signal(name: str) -> None:
    dist.distributed_c10d._get_default_store().set(f"test_faults/{name}", "1")


def _await(name: str, timeout_s: float) -> None:
    store = dist.distributed_c10d._get_default_store()
    store.wait([f"test_faults/{name}"], datetime.timedelta(seconds=timeout_s))


@distributed(world_size=2, timeout_s=BOUND_S)
def test_a_stage_failing_after_its_peer_closed_the_link_does_not_hold_the_peer():
    """Stage 0 closes the link while stage 1 has not failed yet; stage 1 fails a moment later.
    Stage 0's close returns at once (it used to read "no failure" and wait in a barrier on the
    link's group that stage 1, seeing the failure, never joined). At the next collective point
    the ranks agree that the link failed: its group is discarded on both, not torn down."""
    mesh = ParallelMesh.build(pp=2)
    free_dropped(None)
    link = StageLink(mesh, timeout_s=PG_TIMEOUT_S)
    key = link._key.rsplit("/", 2)[1]
    if link.is_first:
        start = time.monotonic()
        link.close()
        took = time.monotonic() - start
        _signal(f"{key}/closed")
        assert took < 1.0, f"close() waited {took:.1f} s for the other stage"
    else:
        _await(f"{key}/closed", 4 * PG_TIMEOUT_S)
        link.fail("stage 1 failed after stage 0 closed the link")
        link.close()
    assert link._owned.groups and not link._owned.freed  # queued, nothing torn down yet
    free_dropped(None)  # the agreed point: every rank finds the link spent
    assert link._owned.freed and link._owned.groups == []
    _everyone_here()
    for group in mesh.created_groups():
        dist.destroy_process_group(group)


@distributed(world_size=2, timeout_s=BOUND_S)
def test_an_exception_on_one_rank_leaves_the_with_block_without_a_collective():
    """An exception ends rank 0's ``with FlexModel(...)`` block while rank 1 is still inside:
    rank 0 removes its hooks and queues the groups at once (it used to wait in a barrier on the
    runtime's groups, which rank 1 was not going to join there). Rank 1 leaves later, also on
    an exception; the next FlexModel built on both frees the groups."""
    torch.set_default_dtype(torch.float64)
    model = plain_net()
    gc.collect()
    free_dropped(None)
    groups = live_group_count()
    x = torch.randn(2, 3, H)
    start = time.monotonic()
    with pytest.raises(ValueError, match="this rank alone"):
        with FlexModel(model, {}, data_parallel_size=2) as flex:
            flex.register_forward_hook(HookFunction("blocks.0", editing_function=times_two))
            flex(x)
            created = live_group_count() - groups
            assert created > 0
            if dist.get_rank() == 0:
                start = time.monotonic()
                raise ValueError("this rank alone")
            _await("with_block/left", 4 * PG_TIMEOUT_S)
            raise ValueError("this rank alone, later")
    if dist.get_rank() == 0:
        took = time.monotonic() - start
        _signal("with_block/left")
        assert took < 1.0, f"leaving the block waited {took:.1f} s on the other rank"
    assert all(not m._forward_hooks for m in model.modules()), "hooks were left on the model"
    assert live_group_count() == groups + created  # queued, not torn down
    FlexModel(model, {}, data_parallel_size=2).close()
    assert live_group_count() == groups
    _everyone_here()
    if dist.get_rank() == 0:
        dist.distributed_c10d._get_default_store().delete_key("test_faults/with_block/left")
