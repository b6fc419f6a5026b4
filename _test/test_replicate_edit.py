"""``HookFunction(replicate_edit=True)``: every rank all-gathers, runs the editing function on its
own copy and keeps its piece -- no scatter, no broadcast of the result.

The equivalence matrix (``EDIT_MODES`` in ``parallel_cases``) already runs every TP/DP/FSDP case
with this path; here: that the path is really taken (every rank runs the function, nothing is
scattered), that a function coupling the shards (centering over the sharded hidden dim) gets the
one-process values *and gradients* (the all-gather's backward must sum every rank's gradient),
that a failure on one rank only raises on every rank, and when the leader path is kept.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    assert_grads_equal,
    assert_stored_equal,
    fairscale_net,
    local_group,
    plain_grads,
    plain_net,
)
from rank_pool import distributed
from test_equivalence_tp import TOL, _fairscale_grads, _inputs

from flex_surgery import FlexModel, HookFunction
from flex_surgery.hooks.hook_function import pure_edit
from flex_surgery.parallel import collectives
from flex_surgery.parallel.collectives import RemoteEditError

# Sites whose whole tensor couples the TP shards: the column output and the activation after it
# (sharded on the hidden dim), the row output (replicated) and a gradient (sharded).
SITES = [("blocks.0.up", "register_forward_hook"), ("blocks.0.act", "register_forward_hook"),
         ("blocks.1.down", "register_forward_hook"),
         ("blocks.1.act", "register_full_backward_hook")]


def center(module, tensor, ctx, modules):
    """Not elementwise: each output entry depends on every entry of its row, across shards."""
    return tensor - tensor.mean(dim=-1, keepdim=True) * 0.5


def _run(model, x, replicate, calls=None, **kwargs):
    stored = {}
    flex = FlexModel(model, stored, **kwargs)

    def fn(module, tensor, ctx, modules):
        if calls is not None:
            calls.append(tuple(tensor.shape))
        return center(module, tensor, ctx, modules)

    for name, register in SITES:
        getattr(flex, register)(HookFunction(name, editing_function=fn, replicate_edit=replicate))
    out = flex(x)
    out.pow(2).mean().backward()
    return stored, out.detach(), flex


@distributed(world_size=2)
def test_replicated_edit_runs_everywhere_scatters_nothing_and_equals_one_process():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _inputs(2)
    ref_model = plain_net()
    ref_stored, ref_out, _ = _run(ref_model, x, replicate=False, process_group=local_group())
    ref_grads = plain_grads(ref_model)

    def no_scatter(*args, **kwargs):
        raise AssertionError("replicate_edit must not scatter")

    calls = []
    model = fairscale_net(plain_net())
    real_scatter, collectives._scatter = collectives._scatter, no_scatter
    try:  # the pool rank lives on: undo the patch whatever happens
        stored, out, flex = _run(model, x, replicate=True, calls=calls, tensor_parallel_size=2)
    finally:
        collectives._scatter = real_scatter
    # every rank ran the function on every whole tensor: forward sites and the backward one
    assert len(calls) == len(SITES), calls
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    assert_grads_equal(_fairscale_grads(model, fs.get_model_parallel_group()), ref_grads, **TOL)
    flex.restore()


@distributed(world_size=2)
def test_leader_path_runs_once():
    """The default (not declared pure): only the edit leader runs the function."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    calls = []
    x = _inputs(2)
    _, _, flex = _run(fairscale_net(plain_net()), x, replicate=False, calls=calls,
                      tensor_parallel_size=2)
    assert len(calls) == (len(SITES) if dist.get_rank() == 0 else 0)
    flex.restore()


@distributed(world_size=2)
def test_failure_on_one_rank_raises_on_every_rank():
    """A function that fails on rank 1 only: both ranks raise at that call, nobody waits."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)

    def flaky(module, tensor, ctx, modules):
        if dist.get_rank() == 1:
            raise ValueError("rank-local failure")
        return tensor

    x = _inputs(2)
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=flaky,
                                            replicate_edit=True))
    with pytest.raises(RemoteEditError) as info:
        flex(x)
    if dist.get_rank() == 1:
        assert "rank-local failure" in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
    else:
        assert "group rank 1" in str(info.value)
    flex.restore()


@distributed(world_size=2)
def test_trainable_modules_keep_the_leader_path():
    """Only the leader computes a trainable module's gradient (then broadcast): with one
    registered, a replicate_edit hook runs on the leader, the same choice on every rank."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    calls = []
    x = _inputs(2)
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    flex.register_trainable_module("scale", torch.nn.Linear(1, 1))

    def fn(module, tensor, ctx, modules):
        calls.append(1)
        return tensor

    flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=fn,
                                            replicate_edit=True))
    flex(x)
    assert len(calls) == (1 if dist.get_rank() == 0 else 0)
    flex.restore()


def test_pure_edit_declares_the_default():
    @pure_edit
    def zero(module, tensor, ctx, modules):
        return torch.zeros_like(tensor)

    assert HookFunction("a", editing_function=zero).replicate_edit is True
    assert HookFunction("a", editing_function=zero, replicate_edit=False).replicate_edit is False
    assert HookFunction("a", editing_function=center).replicate_edit is False
    with pytest.raises(TypeError, match="replicate_edit"):
        HookFunction("a", editing_function=center, replicate_edit="yes")
