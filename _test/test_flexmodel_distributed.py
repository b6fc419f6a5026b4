"""FlexModel's own checks under a sharded runtime: they see the whole tensor, and a failing one
fails every rank at once instead of leaving the others waiting in a collective."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import FF, H, fairscale_net, plain_net
from rank_pool import distributed

from flex_surgery.hooks import FlexModel, FlexModelError, HookFunction
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.layout import LayoutError


@distributed(world_size=2)
def test_expected_shape_checks_the_whole_tensor_on_every_rank():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    stored: dict = {}
    flex = FlexModel(fairscale_net(plain_net()), stored, tensor_parallel_size=2)
    good = HookFunction("blocks.0.up", expected_shape=(None, 3, FF))  # column output: sharded
    flex.register_forward_hook(good)
    flex(x)
    flex(x)
    if dist.get_rank() == 0:
        assert [t.shape for t in stored["blocks.0.up"]] == [(2, 3, FF)] * 2

    flex.register_forward_hook(HookFunction("blocks.1.up", expected_shape=(5, 3, FF)))
    # Caught by the layout inference or by the storing rank's check: either way on every rank.
    with pytest.raises((RemoteEditError, FlexModelError, LayoutError), match="expected_shape"):
        flex(x)
    flex.restore()
    t = torch.ones(1)
    dist.all_reduce(t)  # every rank left the failed forward at the same point
    assert t.item() == 2


@distributed(world_size=2)
def test_bad_editing_result_fails_every_rank():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    flex = FlexModel(fairscale_net(plain_net()), {}, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction(
        "blocks.0.up", editing_function=lambda m, full, ctx, mods: full[..., :FF // 2]))
    with pytest.raises((RemoteEditError, FlexModelError), match="must keep the input's shape"):
        flex(x)
    flex.restore()
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


class _SharedAct(torch.nn.Module):
    """One activation module called twice: after a column layer (its tensor is tp-sharded),
    then after a row layer (replicated) -- or, with ``same``, twice in a row after the column
    layer (one layout)."""

    def __init__(self, same: bool = False) -> None:
        super().__init__()
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.same = same
        self.up = ColumnParallelLinear(8, 32, gather_output=False)
        self.down = RowParallelLinear(32, 8, input_is_parallel=True)
        self.act = torch.nn.Tanh()

    def forward(self, x):
        h = self.act(self.up(x))
        return self.down(self.act(h)) if self.same else self.act(self.down(h))


@distributed(world_size=2)
def test_a_backward_hook_on_a_module_called_twice_with_two_layouts_is_refused():
    """Forward hooks see each call's layout; backward hooks read the layout recorded at the
    module's entry or exit, which the second call overwrote: the first call's tp-sharded
    gradient was taken as replicated (rank 0's half stored as the whole; with an identity edit,
    rank 0's half broadcast over rank 1's). Now the backward hook raises on every rank, and a
    module called twice with one layout still works."""
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    fs.initialize_model_parallel(2)
    torch.manual_seed(0)
    model = _SharedAct()
    stored: dict = {}
    flex = FlexModel(model, stored, tensor_parallel_size=2, key_by_hook_kind=True)
    flex.register_forward_hook(HookFunction("act"))
    flex.register_full_backward_pre_hook(HookFunction("act"))
    out = flex(torch.randn(4, 8))
    if dist.get_rank() == 0:
        assert [tuple(t.shape) for t in stored["act"]] == [(4, 32), (4, 8)]
    with pytest.raises(UnknownLayoutError, match="'act'.*more than once in one forward"):
        out.sum().backward()
    flex.restore()

    torch.manual_seed(0)
    same = _SharedAct(same=True)
    stored = {}
    flex = FlexModel(same, stored, tensor_parallel_size=2, key_by_hook_kind=True)
    flex.register_full_backward_pre_hook(HookFunction("act"))
    flex(torch.randn(4, 8)).sum().backward()
    flex.restore()
    if dist.get_rank() == 0:
        assert [tuple(t.shape) for t in stored["act:grad_output"]] == [(4, 32), (4, 32)]


@distributed(world_size=2)
def test_an_edit_that_does_not_use_the_gathered_tensor_does_not_hang_backward():
    """A result that requires grad through a trainable module but not through the gathered
    tensor (steering by a learned vector: ``t.detach() + delta``): the leader's gather got no
    gradient, so it skipped the gather's backward (a scatter) that the other rank waited in.
    Backward now finishes on every rank and the learned vector's gradient equals one
    process's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 4)
    delta = torch.nn.Linear(1, 8, bias=False)

    def steer(module, t, ctx, mods):
        return t.detach() + mods["delta"].weight.view(-1)

    ref_delta = torch.nn.Linear(1, 8, bias=False)
    ref_delta.load_state_dict(delta.state_dict())
    handle = net[1].register_forward_hook(
        lambda m, a, out: out.detach() + ref_delta.weight.view(-1))
    net(x).pow(2).mean().backward()
    handle.remove()
    want = ref_delta.weight.grad.clone()
    net.zero_grad()

    flex = FlexModel(net, {}, data_parallel_size=2)
    flex.register_trainable_module("delta", delta)
    flex.register_forward_hook(HookFunction("1", editing_function=steer))
    flex(x.chunk(2)[dist.get_rank()]).pow(2).mean().backward()
    flex.restore()
    torch.testing.assert_close(delta.weight.grad, want)


@distributed(world_size=2)
def test_a_forward_does_not_inherit_the_last_tp_layer_of_the_previous_one():
    """Modules that run before any TP layer inherit "no TP layer yet" (replicated), in every
    forward: the tracker kept the previous forward's last TP layer, so from the second forward a
    plain embedding whose width equals the last column layer's local width was read as that
    layer's shard (its two replicas joined side by side)."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    fs.initialize_model_parallel(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8),
                                ColumnParallelLinear(8, 16, gather_output=False))
    ids = torch.tensor([[1, 2, 3]])
    want = model[0](ids).detach()
    stored: dict = {}
    flex = FlexModel(model, stored, tensor_parallel_size=2)
    flex.register_forward_hook(HookFunction("0"))
    with torch.no_grad():
        flex(ids)
        flex(ids)
    flex.restore()
    if dist.get_rank() == 0:
        assert [tuple(t.shape) for t in stored["0"]] == [(1, 3, 8), (1, 3, 8)]
        assert all(torch.equal(t, want) for t in stored["0"])
