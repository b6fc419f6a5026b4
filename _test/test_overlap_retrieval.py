"""``overlap_retrieval``: a retrieval starts its gather and returns; the value is stored at the
end of the pass. It must store exactly what the synchronous path stores (one process's values),
even when the model changes the hooked tensor in place right after the hook, and the values must
really arrive late (else the path was not taken)."""

import torch
import torch.distributed as dist
from parallel_cases import assert_stored_equal, fairscale_net, local_group, plain_net
from rank_pool import distributed
from test_equivalence_tp import TOL, _inputs

from flex_surgery import FlexModel, HookFunction

# Sharded over tp (one gather each), replicated, and a gradient (stored at the end of backward).
SITES = [("blocks.0.up", "register_forward_hook"), ("blocks.0.act", "register_forward_hook"),
         ("blocks.1.down", "register_forward_hook"),
         ("blocks.1.act", "register_full_backward_hook")]


def _run(model, x, overlap, seen=None, **kwargs):
    stored = {}
    flex = FlexModel(model, stored, **kwargs)
    if hasattr(flex.runtime, "overlap_retrieval"):
        flex.runtime.overlap_retrieval = overlap
    for name, register in SITES:
        getattr(flex, register)(HookFunction(name))

    def mutate(module, args, output):
        # The model changes the hooked activation in place after the hook has run: a gather
        # still travelling must not send the changed bytes.
        if seen is not None:
            seen.append(sorted(stored))
        output.mul_(3.0)

    handle = model.blocks[0].up.register_forward_hook(mutate)
    out = flex(x)
    out.pow(2).mean().backward()
    handle.remove()
    flex.restore()
    return stored, out.detach()


@distributed(world_size=2)
def test_overlapped_retrieval_stores_what_one_process_stores():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _inputs(2)
    ref_stored, ref_out = _run(plain_net(), x, overlap=False, process_group=local_group())
    seen = []
    stored, out = _run(fairscale_net(plain_net()), x, overlap=True, seen=seen,
                       tensor_parallel_size=2)
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert seen == [[]], seen  # blocks.0.up's value was still travelling in the forward
        assert_stored_equal(stored, ref_stored, **TOL)
    else:
        assert stored == {}


@distributed(world_size=2)
def test_synchronous_retrieval_stores_at_the_hook():
    """The control: without overlap the value is stored when the hook returns."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _inputs(2)
    seen = []
    _run(fairscale_net(plain_net()), x, overlap=False, seen=seen, tensor_parallel_size=2)
    assert seen == ([["blocks.0.up"]] if dist.get_rank() == 0 else [[]]), seen


@distributed(world_size=4)
def test_dp_x_tp_retrieval_gathers_every_piece_at_once():
    """A tensor cut over dp (batch, uneven: 3 + 1 rows) and tp (hidden) reaches rank 0 in one
    gather over the stage group; it equals one process's tensor."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel import axis_walk

    fs.initialize_model_parallel(2)
    dp_rank = fs.get_data_parallel_rank()
    x = _inputs(4)
    local_x = x[:3] if dp_rank == 0 else x[3:]
    ref_stored: dict = {}
    ref = FlexModel(plain_net(), ref_stored, process_group=local_group())
    ref.register_forward_hook(HookFunction("blocks.0.up"))
    with torch.no_grad():
        ref(x)
    ref.restore()
    calls = []
    real = axis_walk.AxisWalk.to_leader_at_once

    def spy(self, t, layout):
        calls.append(tuple(t.shape))
        return real(self, t, layout)

    axis_walk.AxisWalk.to_leader_at_once = spy
    try:  # the pool rank lives on: undo the patch whatever happens
        net = fairscale_net(plain_net())
        stored: dict = {}
        flex = FlexModel(DDP(net, process_group=fs.get_data_parallel_group()), stored,
                         tensor_parallel_size=2, data_parallel_size=2)
        flex.register_forward_hook(HookFunction("module.blocks.0.up"))
        with torch.no_grad():
            flex(local_x)
        flex.restore()
    finally:
        axis_walk.AxisWalk.to_leader_at_once = real
    assert calls, "the one-gather path was not taken"
    if dist.get_rank() == 0:
        assert len(stored["module.blocks.0.up"]) == 1
        torch.testing.assert_close(stored["module.blocks.0.up"][0], ref_stored["blocks.0.up"][0],
                                   **TOL)
    else:
        assert stored == {}
