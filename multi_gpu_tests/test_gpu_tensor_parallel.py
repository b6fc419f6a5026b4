"""FlexModel on tensor-parallel MLPs over every GPU of the job: DTensor's ColwiseParallel /
RowwiseParallel, and fairscale's ColumnParallelLinear / RowParallelLinear; hooks must see and
edit the whole activation, and outputs and gradients must equal one process's."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel

D = 8


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _scale_features(module, hidden, save_ctx, modules):
    return hidden * torch.linspace(0.0, 2.0, hidden.shape[-1], device=hidden.device)


def _run(model, x, stored=None, flex_sizes=None):
    """Forward with an editing hook on ``up`` and a retrieval hook on ``down``, then backward."""
    if flex_sizes is None:  # the one-process reference, with plain PyTorch hooks
        seen = {}

        def edit(module, args, out):
            seen["up"] = out.detach().clone()
            return _scale_features(module, out, None, None)

        handles = [model.up.register_forward_hook(edit),
                   model.down.register_forward_hook(
                       lambda m, a, out: seen.__setitem__("down", out.detach().clone()))]
        out = model(x)
        out.pow(2).sum().backward()
        for h in handles:
            h.remove()
        return out.detach(), seen
    flex = FlexModel(model, stored, **flex_sizes)
    flex.register_forward_hook(HookFunction("up", editing_function=_scale_features))
    flex.register_forward_hook(HookFunction("down"))
    out = flex(x)
    out.pow(2).sum().backward()
    flex.restore()
    return out.detach(), {k: v[0] for k, v in stored.items()}


def _check(rank, out, seen, want_out, want_seen, grads, want_grads):
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5)
    if rank == 0:
        assert seen.keys() == want_seen.keys()
        for key, value in want_seen.items():
            torch.testing.assert_close(seen[key], value.cpu(), rtol=1e-4, atol=1e-5)
    else:
        assert seen == {}


@pytest.mark.world_size(2)
def test_dtensor_colwise_rowwise(device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = MLP(4 * size).to(device)
    model = copy.deepcopy(reference)
    mesh = init_device_mesh(device.type, (size,))
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1)).to(device)

    out, seen = _run(model, x, {}, dict(tensor_parallel_size=size))
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # collective
    want_out, want_seen = _run(reference, x)
    want_grads = {n: p.grad for n, p in reference.named_parameters()}
    _check(rank, out, seen, want_out, want_seen, grads, want_grads)


@pytest.mark.world_size(2)
def test_fairscale_column_row_parallel(device):
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    rank, size = dist.get_rank(), dist.get_world_size()
    fs.initialize_model_parallel(size)
    try:
        torch.manual_seed(0)
        reference = MLP(4 * size).to(device)
        model = MLP(4 * size)
        model.up = ColumnParallelLinear(D, 4 * size, gather_output=False)
        model.down = RowParallelLinear(4 * size, D, input_is_parallel=True)
        rows = slice(rank * 4, (rank + 1) * 4)
        with torch.no_grad():
            model.up.weight.copy_(reference.up.weight[rows])
            model.up.bias.copy_(reference.up.bias[rows])
            model.down.weight.copy_(reference.down.weight[:, rows])
            model.down.bias.copy_(reference.down.bias)
        model.to(device)
        x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1)).to(device)

        out, seen = _run(model, x, {}, dict(tensor_parallel_size=size))
        want_out, want_seen = _run(reference, x)
        grads = {"up.weight": model.up.weight.grad, "down.weight": model.down.weight.grad}
        want_grads = {"up.weight": reference.up.weight.grad[rows],
                      "down.weight": reference.down.weight.grad[:, rows]}
        _check(rank, out, seen, want_out, want_seen, grads, want_grads)
    finally:
        fs.destroy_model_parallel()
