"""Stored values are what the hook saw, on several gloo ranks: whatever the model, a collective,
a framework or the user writes after the hook (in-place ops, a buffer refilled every
micro-batch, several micro-batches and steps before one pipeline collection, values the user
writes between steps, editing functions that write in place), every rank stores exactly what
one process stores."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import column_like, row_like
from pipeline_cases import BlockStage
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel

H = 8
ROWS = 3  # rows of one micro-batch


class _Scratch(nn.Module):
    """Returns one buffer, refilled every call (a static cache the next module reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(ROWS, H))

    def forward(self, y):
        self.buf.copy_(y)
        return self.buf


class _Mutating(nn.Module):
    """Every value a hook sees here is written in place after its hook: ``up``'s output by the
    in-place ReLU (``act``'s output is the same memory) and the ``+=`` residual, ``scratch``'s
    buffer by ``mul_`` now and by ``copy_`` at the next micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(H, H)
        self.act = nn.ReLU(inplace=True)
        self.scratch = _Scratch()

    def forward(self, x):
        y = self.up(x)
        self.act(y)
        y += x
        s = self.scratch(y)
        s.mul_(0.5)
        return s + 1.0


def _blocks() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([_Mutating() for _ in range(4)])


_SITES = [(f"blocks.{i}{m}", kind) for i in range(4)
          for m, kind in ((".up", "forward"), (".act", "forward"), (".scratch", "forward"),
                          ("", "forward_pre"))]  # a block's input: stage 1's from a recv


def _register(flex: FlexModel, names: set[str]) -> None:
    for name, kind in _SITES:
        if name in names:
            hook = HookFunction(name)
            if kind == "forward":
                flex.register_forward_hook(hook)
            else:
                flex.register_forward_pre_hook(hook)


def _reference(micro_batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """One process, the whole stack, micro-batch after micro-batch: what it stores."""
    out: dict = {}
    model = BlockStage(_blocks(), [0, 1, 2, 3])
    flex = FlexModel(model, out, process_group=_one_rank_group())
    _register(flex, {n for n, _ in model.named_modules()})
    with torch.no_grad():
        for mb in micro_batches:
            flex(mb)
    flex.restore()
    assert out and all(len(v) == len(micro_batches) for v in out.values())
    return out


def _one_rank_group():
    from parallel_cases import local_group

    return local_group()


def _two_stages(out, **kwargs) -> FlexModel:
    rank = dist.get_rank()
    model = BlockStage(_blocks(), [0, 1] if rank == 0 else [2, 3])
    flex = FlexModel(model, out, pipeline_parallel_size=2, **kwargs)
    _register(flex, {n for n, _ in BlockStage(_blocks(), [0, 1, 2, 3]).named_modules()})
    return flex


def _stage_step(flex: FlexModel, micro_batches: list[torch.Tensor]) -> None:
    """Hand-split pipeline: stage 0 runs blocks 0-1 and sends each micro-batch on."""
    with torch.no_grad():
        for mb in micro_batches:
            if dist.get_rank() == 0:
                dist.send(flex(mb).contiguous(), 1)
            else:
                recv = torch.empty(ROWS, H)
                dist.recv(recv, 0)
                flex(recv)


def _micro_batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ROWS, H, generator=g) for _ in range(n)]


def _assert_lists_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
        assert len(got[key]) == len(want[key]), (key, len(got[key]), len(want[key]))
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            assert torch.equal(a, b), (key, i)


@distributed(world_size=2)
def test_pp_several_micro_batches_and_steps_before_one_sync():
    """Stage 1 keeps its snapshots across 4 micro-batches x 2 steps before the only sync: by
    then the ReLU, the ``+=`` and the buffer refilled every micro-batch have written every
    activation many times. Rank 0 receives exactly one process's values."""
    first, second = _micro_batches(4, 1), _micro_batches(4, 2)
    want = _reference(first + second)
    out: dict = {}
    flex = _two_stages(out)
    _stage_step(flex, first)
    _stage_step(flex, second)  # the next step's forward before the previous step's sync
    flex.sync_pipeline_outputs()
    if dist.get_rank() == 0:
        _assert_lists_equal(out, want)
        # the buffers did change under the snapshots
        assert not torch.equal(want["blocks.3.scratch"][0], want["blocks.3.scratch"][-1])
    else:
        assert out == {}
    flex.restore()


@distributed(world_size=2)
def test_pp_store_on_all_values_written_by_the_user_between_steps():
    """``store_on="all"``: each stage keeps its own snapshots (marked collected) and sends them
    to the other. The user then writes every kept value in place -- the stage's own snapshots
    share memory with the model's buffers and activations, the received ones are fresh --
    before the next step: the model's next step, and what the next sync brings, stay one
    process's."""
    first, second = _micro_batches(2, 3), _micro_batches(2, 4)
    want = _reference(first + second)
    out: dict = {}
    flex = _two_stages(out, store_on="all")
    _stage_step(flex, first)
    flex.sync_pipeline_outputs()
    for values in out.values():
        for v in values:
            v.add_(100.0)  # the user's own in-place write of what was stored
    _stage_step(flex, second)
    flex.sync_pipeline_outputs()
    got_first = {k: [v - 100.0 for v in vs[:2]] for k, vs in out.items()}
    got_second = {k: vs[2:] for k, vs in out.items()}
    _assert_lists_equal(got_second, {k: vs[2:] for k, vs in want.items()})
    for key in want:
        for a, b in zip(got_first[key], want[key][:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    flex.restore()


class _TPBlock(nn.Module):
    """fairscale column -> row parallel, a replicated LayerNorm, in-place ops after each."""

    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down, self.norm = up, down, nn.LayerNorm(H)

    def forward(self, x):
        h = self.up(x)           # sharded over tp
        h.relu_()
        y = self.down(h)         # replicated (all-reduced): a snapshot on the leader
        y += x
        z = self.norm(y)         # replicated
        z.mul_(2.0)
        return z


def _tp_blocks() -> tuple[nn.ModuleList, nn.ModuleList]:
    """Two blocks, and the same weights in fairscale layers (model parallel initialised)."""
    torch.manual_seed(0)
    plain = nn.ModuleList(_TPBlock(nn.Linear(H, 2 * H), nn.Linear(2 * H, H)) for _ in range(2))
    sharded = nn.ModuleList()
    for b in plain:
        block = _TPBlock(column_like(b.up), row_like(b.down))
        block.norm.load_state_dict(b.norm.state_dict())
        sharded.append(block)
    return plain, sharded


@pytest.mark.parametrize("store_on", ["rank0", "all"])
@distributed(world_size=2)
def test_fairscale_tp_replicated_values_written_in_place(store_on):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    plain, sharded = _tp_blocks()
    x = _micro_batches(2, 6)
    names = [f"{i}.{m}" for i in range(2) for m in ("up", "down", "norm")]
    want: dict = {}
    ref = FlexModel(nn.Sequential(*plain), want, process_group=_one_rank_group())
    for name in names:
        ref.register_forward_hook(HookFunction(name))
    with torch.no_grad():
        ref_out = [ref(mb).clone() for mb in x]
    ref.restore()
    got: dict = {}
    flex = FlexModel(nn.Sequential(*sharded), got, store_on=store_on)
    for name in names:
        flex.register_forward_hook(HookFunction(name))
    with torch.no_grad():
        outs = [flex(mb).clone() for mb in x]
    for a, b in zip(outs, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if dist.get_rank() == 0 or store_on == "all":
        assert sorted(got) == sorted(want)
        for key in want:
            assert len(got[key]) == len(want[key])
            for a, b in zip(got[key], want[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    else:
        assert got == {}
    flex.restore()


class _Cache(nn.Module):
    """A table the model refills from its input every forward and returns as it is (the same
    on every replica: ``expected_shape``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(2, H))

    def forward(self, x):
        self.table.copy_(x.mean(0, keepdim=True).expand(2, H))
        return self.table


class _CacheNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cache = _Cache()
        self.lin = nn.Linear(H, H)

    def forward(self, x):
        t = self.cache(x)
        t.add_(1.0)  # written in place after the hook
        return self.lin(x + t.sum(0))


def _scale_in_place(module, tensor, ctx, modules):
    return tensor.mul_(3.0)


@pytest.mark.parametrize("replicate_edit", [False, True])
@pytest.mark.parametrize("store_on", ["rank0", "all"])
@distributed(world_size=2)
def test_ddp_replicated_buffer_rewritten_every_forward(store_on, replicate_edit):
    """DDP: a replicated table (stored from the leader's own memory, not gathered) that the
    model refills every forward, writes after the hook, and an editing function scales in
    place. Every storing rank keeps each forward's value as the hook saw it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, H, generator=g) for _ in range(3)]
    # every replica gets the same rows, so the table is the same on every replica
    torch.manual_seed(0)
    want: dict = {}
    ref = FlexModel(_CacheNet(), want, process_group=_one_rank_group())
    # the stored value is taken before the edit: one process's stored values without it
    ref.register_forward_hook(HookFunction("cache", expected_shape=(2, H)))
    with torch.no_grad():
        for x in xs:
            ref(x)
    ref.restore()
    torch.manual_seed(0)
    model = DDP(_CacheNet())
    got: dict = {}
    flex = FlexModel(model, got, store_on=store_on)
    flex.register_forward_hook(HookFunction("module.cache", editing_function=_scale_in_place,
                                            replicate_edit=replicate_edit,
                                            expected_shape=(2, H)))
    with torch.no_grad():
        for x in xs:
            flex(x)
    if dist.get_rank() == 0 or store_on == "all":
        assert len(got["module.cache"]) == 3
        for a, b in zip(got["module.cache"], want["cache"]):
            assert torch.equal(a, b)
    flex.restore()
