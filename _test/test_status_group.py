"""Editing hooks agree on their outcome on the host (``DistributedRuntime.status_group``).

On an NCCL-only stage group the status of every edit would be a device tensor whose verdict
(``.item()``) makes the host wait for every queued kernel; the runtime makes a gloo group over
the same ranks instead (:func:`flex_surgery.parallel.failures.host_status_group`). These run
that path on CPU by telling the runtime that gloo moves no host tensors: the side group is made,
every agreement goes over it with CPU tensors, the results equal one process, a failure on one
rank still raises on every rank, and the side group is kept and reused by the next FlexModel
over the same ranks (made again, it would take the old group's name and meet its store keys).
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import assert_grads_equal, fairscale_net, local_group, plain_grads, plain_net
from rank_pool import distributed
from test_equivalence_tp import TOL, _fairscale_grads, _inputs
from test_replicate_edit import _run

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel import failures
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.group_lifetime import free_dropped, live_group_count


class _SideGroupPath:
    """Within the block: the runtime believes its stage group moves no host tensors, and every
    status agreement records its group and its tensor's device."""

    def __enter__(self):
        self.seen = []
        self.saved = (failures._moves_host_tensors, failures._all_reduce_max,
                      failures._broadcast)
        moves, reduce, broadcast = self.saved

        def record_reduce(buf, group):
            self.seen.append((group, buf.device.type))
            return reduce(buf, group)

        def record_broadcast(buf, group, src):
            self.seen.append((group, buf.device.type))
            return broadcast(buf, group, src)

        failures._moves_host_tensors = lambda group: False
        failures._all_reduce_max, failures._broadcast = record_reduce, record_broadcast
        return self

    def __exit__(self, *exc):  # the pool rank lives on: undo the patch whatever happens
        (failures._moves_host_tensors, failures._all_reduce_max,
         failures._broadcast) = self.saved


def _settled_groups() -> int:
    free_dropped(None)
    return live_group_count()


@pytest.mark.parametrize("replicate", [False, True])
@distributed(world_size=2)
def test_edits_agree_over_a_host_side_group_and_equal_one_process(replicate):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _inputs(2)
    ref_model = plain_net()
    ref_stored, ref_out, ref_flex = _run(ref_model, x, replicate=False,
                                         process_group=local_group())
    ref_grads = plain_grads(ref_model)
    ref_flex.restore()
    start = _settled_groups()
    model = fairscale_net(plain_net())
    with _SideGroupPath() as path:
        stored, out, flex = _run(model, x, replicate=replicate, tensor_parallel_size=2)
        side = flex.runtime.status_group
        assert side is not flex.runtime.mesh.stage_group
        stage = flex.runtime.mesh.stage_group  # None: the stage is the whole world
        assert dist.get_process_group_ranks(side) == \
            (dist.get_process_group_ranks(stage) if stage is not None else [0, 1])
        assert path.seen and all(group is side and device == "cpu"
                                 for group, device in path.seen), path.seen
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        for key, values in ref_stored.items():
            for got, want in zip(stored[key], values):
                torch.testing.assert_close(got, want, **TOL)
    assert_grads_equal(_fairscale_grads(model, fs.get_model_parallel_group()), ref_grads, **TOL)
    flex.restore()
    assert _settled_groups() <= start + 1  # at most the side group stays, for reuse
    with _SideGroupPath():
        again = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
        assert again.runtime.status_group is side
        again.restore()
    assert _settled_groups() <= start + 1


@pytest.mark.parametrize("replicate", [False, True])
@distributed(world_size=2, timeout_s=60)
def test_a_failure_on_one_rank_is_agreed_over_the_side_group(replicate):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)

    def flaky(module, tensor, ctx, modules):
        if dist.get_rank() == 1 or not replicate:  # the leader path runs on rank 0 only
            raise ValueError("rank-local failure")
        return tensor

    x = _inputs(2)
    with _SideGroupPath():
        flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
        flex.register_forward_hook(HookFunction("blocks.0.up", editing_function=flaky,
                                                replicate_edit=replicate))
        with pytest.raises(RemoteEditError, match="rank-local failure|group rank"):
            flex(x)
        flex.restore()


@distributed(world_size=2)
def test_a_gloo_stage_group_is_its_own_status_group():
    """Where the stage group moves host tensors (gloo), no group is made."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    assert flex.runtime.status_group is flex.runtime.mesh.stage_group
    flex.restore()
