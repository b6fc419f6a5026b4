"""What hooks store from CUDA tensors: exact CPU copies, complete when the forward returns.

Device-to-host copies may be issued asynchronously (``non_blocking``); a stored activation read
before its copy finished would hold garbage. Large activations on a busy GPU make that window
wide, so this test would catch a missing synchronisation. Runs on any number of ranks (each rank
hooks its own replica on its own GPU through a one-rank group).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel

WIDTH, ROWS, LAYERS = 2048, 4096, 4


def _one_rank_group() -> dist.ProcessGroup:
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return groups[dist.get_rank()]


@pytest.mark.cuda_only
def test_stored_cuda_activations_are_exact_and_complete(device):
    torch.manual_seed(dist.get_rank())
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).to(device)
    x = torch.randn(ROWS, WIDTH, device=device)
    names = [str(i) for i in range(LAYERS)]

    inputs = (x, torch.flip(x, dims=[0]))  # two calls: the second overwrites GPU buffers
    want: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: want[n].append(out.detach().cpu())) for n in names]
    with torch.no_grad():
        for inp in inputs:
            model(inp)
    for h in handles:
        h.remove()

    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, process_group=_one_rank_group())
    for n in names:
        flex.register_forward_hook(HookFunction(n))
    with torch.no_grad():
        for inp in inputs:
            flex(inp)
    flex.restore()
    for n in names:
        assert [t.device.type for t in stored[n]] == ["cpu", "cpu"]
        for got, expected in zip(stored[n], want[n]):
            assert torch.equal(got, expected), n
