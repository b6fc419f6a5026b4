"""Trainable modules, status agreement and parameter hooks over several steps: a backward that
raised no longer switches off the trainable-gradient sync, the status side group of a stage is
reused rather than made again under its old name, trainable modules under pipelining are
refused, and a parameter hook whose gradient arrives in parts (FSDP1) raises."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed

from flex_surgery.hooks import FlexModel, HookFunction


def _steer(module, t, ctx, mods):
    return t + mods["delta"](t)


@distributed(world_size=2, timeout_s=60)
def test_trainable_grads_still_synced_after_a_backward_that_raised():
    """A backward that raises after the trainable-module sync point was passed leaves
    ``TrainableSync._queued`` True on every rank (the end-of-backward callback never runs),
    so no later backward ever broadcasts the leader's trainable gradients again: the other
    ranks keep ``grad`` None (or a stale value) and their optimizer step silently diverges
    from the leader's. docs/failure.md: after an agreed error the next step works."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 4)
    delta = torch.nn.Linear(8, 8)
    torch.nn.init.normal_(delta.weight, std=0.1)

    flex = FlexModel(net, {}, data_parallel_size=2)
    flex.register_trainable_module("delta", delta)
    flex.register_forward_hook(HookFunction("1", editing_function=_steer))
    local = x.chunk(2)[dist.get_rank()]

    # Step 1: the backward raises (on every rank alike) after passing the edit.
    def boom(grad):
        raise ValueError("failing backward")

    handle = net[0].weight.register_hook(boom)
    try:
        flex(local).pow(2).mean().backward()
    except ValueError:
        pass
    else:
        raise AssertionError("the backward should have raised")
    handle.remove()
    delta.zero_grad(set_to_none=True)
    net.zero_grad(set_to_none=True)

    # Step 2: an ordinary step; every rank must end with the leader's (one-process) gradient.
    flex(local).pow(2).mean().backward()
    grads = [None, None]
    dist.all_gather_object(grads, None if delta.weight.grad is None
                           else delta.weight.grad.clone())
    flex.restore()
    assert grads[0] is not None
    assert grads[1] is not None, "rank 1's trainable gradient was never synchronised"
    torch.testing.assert_close(grads[1], grads[0])


@distributed(world_size=2, timeout_s=60)
def test_status_group_made_again_after_close_connects():
    """On a stage group that is not gloo (NCCL on GPUs) the runtime makes a gloo status group
    with ``new_group(..., use_local_synchronization=True)`` and destroys it at ``close()``.
    torch names such groups from their ranks and the number of live groups, so the next
    FlexModel's status group gets the destroyed one's name and meets its stale keys in the
    store -- the very problem docs/parallel.md describes (and mesh.py avoids by caching) for
    sub-group meshes. Simulated on CPU by making the gloo stage group count as non-gloo."""
    from flex_surgery.parallel import failures

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    x = torch.randn(2, 4)
    original = failures._moves_host_tensors
    failures._moves_host_tensors = lambda group: False  # the stage group is "NCCL"
    try:
        for _ in range(10):
            flex = FlexModel(net, {}, data_parallel_size=2)
            assert flex.runtime.status_group is not flex.runtime.mesh.stage_group
            flex.register_forward_hook(HookFunction("1", editing_function=lambda m, t, c, d: t * 2))
            with torch.no_grad():
                flex(x)
            flex.close()
    finally:
        failures._moves_host_tensors = original


@distributed(world_size=2, timeout_s=60)
def test_a_trainable_module_under_pipeline_parallelism_is_refused():
    """Trainable modules are synchronised within a stage: edits on two stages each trained their
    own copy with part of the gradient (one process: the sum), and the copies drifted apart
    after a step. Refused on every rank until gradients are summed across stages."""
    from parallel_cases import plain_net
    from pipeline_cases import two_stages

    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), {}, pipeline_parallel_size=2)
    with pytest.raises(NotImplementedError, match="pipeline parallelism"):
        flex.register_trainable_module("delta", torch.nn.Linear(1, 1))
    flex.restore()


class _Twice(torch.nn.Module):
    """One block applied twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.block(x))))


@distributed(world_size=2, timeout_s=60)
def test_a_parameter_hook_whose_gradient_arrives_in_parts_is_refused():
    """FSDP1 gives each call of a unit its own view of the weight: a hook on a block called twice
    fired once per call, each on a part of the gradient (an edit like ``g / g.norm()`` then
    differed from one process). Now the second part raises on every rank; a plain model's
    hook still fires once per backward, on the whole gradient."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    plain = _Twice()
    stored: dict = {}
    flex = FlexModel(plain, stored, data_parallel_size=2)
    flex.register_hook(HookFunction("block.weight"))
    flex(x).sum().backward()
    flex.restore()
    if dist.get_rank() == 0:
        assert len(stored["block.weight"]) == 1

    torch.manual_seed(0)
    model = _Twice()
    model.block = FSDP(model.block, use_orig_params=True, device_id=torch.device("cpu"))
    model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    flex = FlexModel(model, {})
    flex.register_hook(HookFunction("block.weight"))
    with pytest.raises(RuntimeError, match="arrives in parts"):
        flex(x).sum().backward()
    flex.restore()


@distributed(world_size=2, timeout_s=60)
def test_restore_leaves_no_parameter_hook_mark_on_fsdp2_parameters():
    """FSDP2 keeps one unsharded parameter across steps: the mark that says it has the hook
    stayed on it after restore()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _Twice()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    flex = FlexModel(model, {})
    flex.register_hook(HookFunction("head.weight"))
    flex(torch.randn(3, 4)).sum().backward()
    flex.restore()
    params = [p._unsharded_param for g in model._get_fsdp_state()._fsdp_param_groups
              for p in g.fsdp_params if hasattr(p, "_unsharded_param")]
    assert params
    assert [k for p in params for k in vars(p) if k.startswith("_flex_surgery_hook_")] == []
