"""Shared pieces of the distributed equivalence tests: a tiny MLP stack in plain, fairscale-TP
and DTensor-TP form with the same weights, the hook sites every layout is tested at, and one
routine that runs FlexModel on a model and returns what the hooks stored, the output and the
whole parameter gradients -- so every test compares a sharded run with a one-process run."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery import hooks as _hooks  # noqa: F401  (FlexModel lives there)
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel

H, FF, V, T = 8, 16, 6, 3


class Block(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.act, self.down = up, nn.GELU(), down

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Net(nn.Module):
    def __init__(self, blocks: list[Block], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def seeded_linear(i: int, o: int, g: torch.Generator) -> nn.Linear:
    """An ``nn.Linear(i, o)`` whose weights are drawn from ``g`` (same on every rank)."""
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
        lin.bias.copy_(torch.randn(o, generator=g) * 0.1)
    return lin


def llama_tp_plan(layers: int = 2) -> dict:
    """DTensor TP plan for a tiny HF Llama: q/k/v, gate and up column-wise, o and down
    row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return plan


def plain_net(seed: int = 0, ff: int = FF) -> Net:
    g = torch.Generator().manual_seed(seed)

    def linear(i, o):
        return seeded_linear(i, o, g)

    return Net([Block(linear(H, ff), linear(ff, H)) for _ in range(2)], linear(H, V))


def column_like(lin: nn.Linear, gather_output: bool = False) -> nn.Module:
    """``lin``'s weights in a fairscale ColumnParallelLinear: this rank's rows (model parallel
    must be initialised)."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    r, n = fs.get_model_parallel_rank(), lin.out_features // fs.get_model_parallel_world_size()
    layer = ColumnParallelLinear(lin.in_features, lin.out_features, gather_output=gather_output)
    with torch.no_grad():
        layer.weight.copy_(lin.weight[r * n:(r + 1) * n])
        layer.bias.copy_(lin.bias[r * n:(r + 1) * n])
    return layer


def row_like(lin: nn.Linear) -> nn.Module:
    """``lin``'s weights in a fairscale RowParallelLinear taking a split input: this rank's
    columns (model parallel must be initialised)."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    r, n = fs.get_model_parallel_rank(), lin.in_features // fs.get_model_parallel_world_size()
    layer = RowParallelLinear(lin.in_features, lin.out_features, input_is_parallel=True)
    with torch.no_grad():
        layer.weight.copy_(lin.weight[:, r * n:(r + 1) * n])
        layer.bias.copy_(lin.bias)
    return layer


def fairscale_net(plain: Net) -> Net:
    """The same weights in fairscale TP layers (model parallel must be initialised)."""
    blocks = [Block(column_like(b.up), row_like(b.down)) for b in plain.blocks]
    return Net(blocks, column_like(plain.head, gather_output=True))


def fsdp2_net(model: Net) -> Net:
    """``model`` sharded by FSDP2 over every rank (a CPU mesh): each block a unit, the rest the
    root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def dtensor_plan(use_local_output: bool):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(2):
        plan[f"blocks.{i}.up"] = ColwiseParallel(use_local_output=use_local_output)
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    return plan


# Hook sites: (module or parameter name in the plain model, hook kind). The backward ones sit
# in block 1 because block 0's input does not require grad.
SITES = [
    ("blocks.0.up", "forward"),            # column output: tp-sharded
    ("blocks.0.act", "forward"),           # no parameters, after a column layer: tp-sharded
    ("blocks.0.down", "forward"),          # row output: replicated
    ("blocks.0", "forward"),               # a block: replicated
    ("blocks.1.down", "forward_pre"),      # row input: tp-sharded
    ("blocks.1.up", "forward_pre"),        # column input: replicated
    ("blocks.1.act", "full_backward"),     # grad of a sharded input
    ("blocks.1.down", "full_backward"),
    ("blocks.1.up", "full_backward_pre"),  # grad of a sharded output
    ("blocks.1", "full_backward_pre"),     # grad of a replicated output
]
PARAM_SITES = ["blocks.1.up.weight", "blocks.1.down.weight", "blocks.1.down.bias"]

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


# The ways a hook can edit, for the equivalence matrix: no edit, the editing function run once
# on the edit leader and scattered (the default), and run on every rank on its all-gathered copy
# (``replicate_edit=True``). Every mode must match one process.
EDIT_MODES = (False, True, "replicated")


def edit_options(edit: bool | str) -> dict:
    """HookFunction keywords for one of :data:`EDIT_MODES` (``times_two`` as the edit)."""
    if not edit:
        return {}
    return {"editing_function": times_two, "replicate_edit": edit == "replicated"}


def times_two(module, tensor, ctx, modules):
    return tensor * 2


def clean(name: str) -> str:
    """A module/parameter name without DDP / FSDP wrapper components."""
    for w in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(w, "")
    name = name.replace("._fsdp_wrapped_module", "")
    return name[len("module."):] if name.startswith("module.") else name


def actual_names(model: nn.Module) -> dict[str, str]:
    """Plain name -> name in the (wrapped) model; the innermost module wins."""
    names = {}
    for n, _ in model.named_modules():
        names[clean(n)] = n
    for n, _ in model.named_parameters():
        names[clean(n)] = n
    return names


_LOCAL_GROUPS: dict[int, dist.ProcessGroup] = {}  # id of the default group -> this rank's group


def local_group() -> dist.ProcessGroup:
    """A one-rank group for this rank, so FlexModel uses the one-process runtime.

    Created once per pool rank (collective: every rank creates every rank's group) and reused:
    each gloo group holds threads and sockets for the life of the process, so making new ones in
    every test body would grow a long-lived pool rank without bound.
    """
    world = id(dist.distributed_c10d._get_default_group())
    if world not in _LOCAL_GROUPS:
        groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        _LOCAL_GROUPS[world] = groups[dist.get_rank()]
    return _LOCAL_GROUPS[world]


def run_flex(model: nn.Module, x: torch.Tensor, edit: bool, *,
             sites=SITES, param_sites=PARAM_SITES, process_group=None,
             loss_fn: Callable = lambda y: y.float().pow(2).mean(), **sizes):
    """FlexModel on ``model`` with hooks at every site: (stored, output, flex)."""
    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, process_group=process_group, **sizes)
    names = actual_names(model)
    for name, kind in sites:
        getattr(flex, _REGISTER[kind])(HookFunction(names[name], **edit_options(edit)))
    for name in param_sites:
        flex.register_hook(HookFunction(names[name], **edit_options(edit)))
    out = flex(x)
    loss_fn(out).backward()
    return clean_keys(stored), out, flex


def clean_keys(stored: dict) -> dict:
    """``stored`` with every key's module name under its plain-model spelling (the role
    suffix of ``key_by_hook_kind`` kept)."""
    renamed = {}
    for key, vals in stored.items():
        base, sep, role = key.partition(":")
        renamed[clean(base) + sep + role] = vals
    return renamed


def assert_stored_equal(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        assert len(got[key]) == len(want[key]), key
        for a, b in zip(got[key], want[key]):
            assert a.shape == b.shape, (key, a.shape, b.shape)
            torch.testing.assert_close(a, b, msg=lambda m, k=key: f"{k}: {m}", **tol)


def assert_grads_equal(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{k}: {m}",
                                   **tol)


def plain_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {clean(n): p.grad.detach().clone() for n, p in model.named_parameters()}
