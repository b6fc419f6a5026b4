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
