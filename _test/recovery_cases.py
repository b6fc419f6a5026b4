"""Shared pieces of the tests of the recovery after flex_surgery raises inside a backward
(``test_backward_recovery*.py``): a batch split over two data-parallel ranks, the loss, the
data-parallel wrappers, their whole gradients, editing functions that fail on given calls, and
models in which a rank can take another path than the others."""

import torch
import torch.distributed as dist
from parallel_cases import Block, H, clean, plain_net
from torch import nn

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
BATCH = 4
WRAPPERS = ["ddp", "fsdp1", "fsdp1_flat", "fsdp2"]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch and this rank's half (float64, reset by the rank pool after each body)."""
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(seed))
    n = BATCH // 2
    return x, x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def square_loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()  # DDP/FSDP average the ranks' means: the whole batch's mean


def wrap(kind: str, model: nn.Module, **options) -> nn.Module:
    """``model`` under DDP, FSDP1 (``fsdp1``: original parameters; ``fsdp1_flat``: flat ones;
    a unit per :class:`~parallel_cases.Block`) or FSDP2 (every block and the root), over the
    default group, with ``options`` for the wrapper."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, **options)
    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}),
                    use_orig_params=kind == "fsdp1", device_id=torch.device("cpu"), **options)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


def whole_grads(kind: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every whole parameter gradient, by plain-model name (a parameter without one: absent)."""
    if kind == "ddp":
        return {clean(n): p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None}
    if kind == "fsdp2":
        return {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()
                if p.grad is not None}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # FSDP1: one SGD step with lr 1 moves every parameter by minus its whole gradient (read
    # under summon_full_params, which shows the original parameters with or without
    # use_orig_params)
    def whole():
        with FSDP.summon_full_params(model, writeback=False):
            return {clean(n): p.detach().clone() for n, p in model.named_parameters()}

    before = whole()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return {k: before[k] - v for k, v in whole().items()}


def ddp_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of a DDP over :class:`Branchy`, by plain-model name."""
    return {clean(n).removeprefix("net."): p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}


def times_two(module, grad, ctx, modules):
    return grad * 2


def fails_on(*failing: int):
    """An editing function that raises at the given calls (1-based) and doubles otherwise
    (it runs on the edit leader only)."""
    calls = [0]

    def edit(module, grad, ctx, modules):
        calls[0] += 1
        if calls[0] in failing:
            raise ValueError(f"a bug in the editing function (call {calls[0]})")
        return grad * 2

    return edit


class Branchy(nn.Module):
    """``plain_net`` whose block 1 a rank may skip (a branch taken on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_net()
        self.skip = False

    def forward(self, x):
        for i, block in enumerate(self.net.blocks):
            if not (self.skip and i == 1):
                x = block(x)
        return self.net.head(x)


class SkippableUp(Block):
    """A block whose ``up`` a rank may skip (inside the FSDP unit, which runs on every rank)."""

    skip = False

    def forward(self, x):
        return x + self.down(self.act(x.repeat(1, 1, 2) if self.skip else self.up(x)))


def ranks_apart_ddp(stored: dict | None = None, module: Branchy | None = None):
    """``module`` (a new :class:`Branchy` by default) under ``DDP(find_unused_parameters=True)``
    on a group of its own (a bucket all-reduce one rank posts and the other never joins stays
    there), in a FlexModel storing into ``stored``, with a doubling backward hook on block 1's
    ``up``, which rank 1 skips from now on. Returns the module, the DDP and the FlexModel."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery import FlexModel, HookFunction

    branchy = Branchy() if module is None else module
    model = DDP(branchy, find_unused_parameters=True, process_group=dist.new_group([0, 1]))
    flex = FlexModel(model, {} if stored is None else stored)
    flex.register_full_backward_hook(HookFunction("module.net.blocks.1.up",
                                                  editing_function=times_two))
    branchy.skip = dist.get_rank() == 1
    return branchy, model, flex
