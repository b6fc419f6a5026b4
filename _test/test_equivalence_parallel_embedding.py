"""fairscale's ParallelEmbedding (embedding dim split over TP, output gathered) and
VocabParallelEmbedding (vocabulary split, output all-reduced) under FlexModel: hooks on the
embeddings and on the TP MLP after them, edits, parameter-gradient hooks and whole parameters
equal one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery import FlexModel, HookFunction

V, H, F = 24, 8, 16


class EmbedMLP(nn.Module):
    def __init__(self, embed: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.embed, self.up, self.act, self.down = embed, up, nn.GELU(), down

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x + self.down(self.act(self.up(x)))


def _reference() -> EmbedMLP:
    g = torch.Generator().manual_seed(0)
    model = EmbedMLP(nn.Embedding(V, H), nn.Linear(H, F), nn.Linear(F, H))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _sharded(kind: str, ref: EmbedMLP) -> EmbedMLP:
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel import layers

    tp, r = fs.get_model_parallel_world_size(), fs.get_model_parallel_rank()
    if kind == "parallel":
        embed = layers.ParallelEmbedding(V, H)
        piece = ref.embed.weight.chunk(tp, dim=1)[r]
    else:
        embed = layers.VocabParallelEmbedding(V, H)
        piece = ref.embed.weight.chunk(tp, dim=0)[r]
    up = layers.ColumnParallelLinear(H, F, gather_output=False)
    down = layers.RowParallelLinear(F, H, input_is_parallel=True)
    with torch.no_grad():
        embed.weight.copy_(piece)
        up.weight.copy_(ref.up.weight.chunk(tp, 0)[r])
        up.bias.copy_(ref.up.bias.chunk(tp, 0)[r])
        down.weight.copy_(ref.down.weight.chunk(tp, 1)[r])
        down.bias.copy_(ref.down.bias)
    return EmbedMLP(embed, up, down)


def _double(module, tensor, ctx, modules):
    return tensor * 2


def _run(model: nn.Module, ids: torch.Tensor, **kw):
    stored: dict = {}
    flex = FlexModel(model, stored, **kw)
    flex.register_forward_hook(HookFunction("embed", editing_function=_double))
    flex.register_forward_hook(HookFunction("act"))
    flex.register_hook(HookFunction("embed.weight", editing_function=_double))
    flex.register_full_backward_hook(HookFunction("up"))
    out = flex(ids)
    out.pow(2).mean().backward()
    return stored, out, flex


@pytest.mark.parametrize("kind", ["parallel", "vocab"])
@distributed(world_size=2)
def test_fairscale_embeddings_equal_one_process(kind):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = _reference()
    single = dist.new_group([dist.get_rank()])
    want, want_out, ref_flex = _run(ref, ids, process_group=single)
    got, got_out, flex = _run(_sharded(kind, _reference()), ids, tensor_parallel_size=2)

    torch.testing.assert_close(got_out, want_out)
    whole = flex.get_module_parameter("embed.weight")
    torch.testing.assert_close(whole, ref.embed.weight.detach())
    if dist.get_rank() == 0:
        assert got.keys() == want.keys() == {"embed", "act", "embed.weight", "up"}
        for key in want:
            for a, b in zip(got[key], want[key]):
                torch.testing.assert_close(a, b)
    # the edited gradient reached the (sharded) parameter exactly as in one process
    from fairscale.nn.model_parallel import initialize as fsi

    tp, r = 2, fsi.get_model_parallel_rank()
    dim = 1 if kind == "parallel" else 0
    torch.testing.assert_close(flex.module.embed.weight.grad,
                               ref.embed.weight.grad.chunk(tp, dim)[r])
