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
