"""Stored values are what the hook saw: whatever writes the activation or the stored value
afterwards -- an in-place op of the model, an editing function, a buffer the model reuses or
grows every forward, the user's input buffer refilled through numpy or DLPack, autograd
accumulating into ``.grad``, a store's writer thread -- the stored value stays the same, and
writing a stored value never reaches the model. In one process and on a pipeline stage whose
values reach rank 0 only after the stage has run (the distributed cases are in
``test_stored_values_distributed.py``)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pipeline_cases import BlockStage
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.runtime import store_copy
from flex_surgery.store import DiskStore, MemoryStore


class _InPlaceAfter(nn.Module):
    """``up`` (hooked), then an in-place ReLU and an in-place add on ``up``'s output."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(h, h)
        self.act = nn.ReLU(inplace=True)
        self.down = nn.Linear(h, h)

    def forward(self, x):
        y = self.up(x)
        self.act(y)
        y.add_(1.0)
        return self.down(y)


class _ReusedBuffer(nn.Module):
    """Returns the same buffer every forward, written in place (a static cache)."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, h))

    def forward(self, x):
        self.cache.copy_(x)
        return self.cache


def test_in_place_writes_after_the_hook_do_not_reach_the_stored_value():
    torch.manual_seed(0)
    model = _InPlaceAfter()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model.up(x).clone()  # the value the hook sees, before ReLU and add_
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction("up"))
    y = flex(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)  # the forward is unchanged
    assert torch.equal(out["up"][0], want)
    assert (want < 0).any()  # the ReLU did change the live activation
    flex.restore()


def test_an_in_place_editing_function_leaves_the_stored_value_as_it_was():
    torch.manual_seed(0)
    model = _InPlaceAfter()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model.up(x).clone()
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction(
        "up", editing_function=lambda m, t, ctx, mods: t.mul_(3.0)))
    flex(x)
    assert torch.equal(out["up"][0], want)
    flex.restore()


def test_a_buffer_the_model_writes_every_forward_keeps_each_forwards_value():
    model = _ReusedBuffer()
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction(""))
    xs = [torch.randn(2, 8) for _ in range(3)]
    for x in xs:
        flex(x)
    assert len(out[""]) == 3
    for got, x in zip(out[""], xs):
        assert torch.equal(got, x)
    assert torch.equal(model.cache, xs[-1])  # the model's buffer is still its own
    flex.restore()


def test_writing_a_stored_value_does_not_reach_the_model():
    model = _ReusedBuffer()
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction(""))
    x = torch.randn(2, 8)
    flex(x)
    out[""][0].zero_()
    assert torch.equal(model.cache, x)
    flex.restore()


def test_numpy_backed_memory_written_later_does_not_reach_a_stored_value():
    arr = np.zeros((2, 8), dtype=np.float32)
    snap = store_copy(torch.from_numpy(arr))
    arr[:] = 5.0
    assert torch.equal(snap, torch.zeros(2, 8))


def test_a_hooked_input_from_numpy_is_copied():
    """A forward-pre hook on the root sees the user's batch: one made from a numpy array the
    user refills for the next batch must not change the stored value."""
    model = nn.Linear(8, 8)
    arr = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    want = torch.from_numpy(arr.copy())
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_pre_hook(HookFunction(""))
    flex(torch.from_numpy(arr))
    arr[:] = 0.0
    assert torch.equal(out[""][0], want)
    flex.restore()


def test_gradient_values_survive_accumulation_into_grad():
    """A parameter's gradient stored by a tensor hook becomes that parameter's ``.grad``
    (autograd keeps the tensor it was given); a second backward then adds into ``.grad`` in
    place. The first stored gradient stays what the hook saw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_hook(HookFunction("0.weight"))
    flex(x).sum().backward()
    first = out["0.weight"][0].clone()
    assert torch.equal(model[0].weight.grad, first)
    flex(x).sum().backward()
    assert torch.equal(model[0].weight.grad, 2 * first)  # accumulated in place
    assert torch.equal(out["0.weight"][0], first)
    assert torch.equal(out["0.weight"][1], first)  # same input, same gradient
    flex.restore()


@pytest.mark.parametrize("which", ["memory", "disk"])
def test_stores_keep_what_the_hook_saw_under_in_place_writes(which, tmp_path):
    torch.manual_seed(0)
    model = _InPlaceAfter(16)
    xs = [torch.randn(4, 16) for _ in range(6)]
    with torch.no_grad():
        want = [model.up(x).clone() for x in xs]
    store = MemoryStore() if which == "memory" else DiskStore(tmp_path, buffer_bytes=256)
    flex = FlexModel(model, None, store=store)
    flex.register_forward_hook(HookFunction("up"))
    for x in xs:  # the writer thread writes earlier buffers while the model runs
        flex(x)
    flex.restore()
    if which == "disk":
        store.close()
        store = DiskStore(tmp_path)
    assert store.steps("up") == list(range(len(xs)))
    for step, w in enumerate(want):
        assert torch.equal(store.read("up", step), w), step
    assert any((w < 0).any() for w in want)  # the ReLU did write the live activation


# -- the user's memory: buffers filled through numpy, DLPack, pointers -------------------------
def test_an_input_buffer_filled_through_its_numpy_view_keeps_every_batch():
    """A preallocated input refilled through its numpy view for every batch."""
    buf = torch.empty(2, 4)
    view = buf.numpy()
    out: dict = {}
    flex = FlexModel(nn.Linear(4, 4), out)
    flex.register_forward_pre_hook(HookFunction(""))
    for i in range(3):
        view[:] = i
        flex(buf)
    assert [o[0, 0].item() for o in out[""]] == [0.0, 1.0, 2.0]
    flex.restore()


def test_an_input_buffer_filled_through_dlpack_keeps_every_batch():
    """The same through DLPack: numpy writes the memory without torch knowing."""
    buf = torch.empty(2, 4)
    view = np.from_dlpack(buf)  # a writable numpy array on buf's memory
    out: dict = {}
    flex = FlexModel(nn.Linear(4, 4), out)
    flex.register_forward_pre_hook(HookFunction(""))
    for i in range(3):
        view[:] = i
        flex(buf)
    flex.restore()
    assert [o[0, 0].item() for o in out[""]] == [0.0, 1.0, 2.0]


# -- storages that grow after the hook -------------------------------------------------------
def test_an_input_buffer_resized_for_each_batch_stays_writable():
    """``resize_`` then ``copy_`` per batch (torch 2.13 fails a write to a grown storage that a
    copy-on-write clone shares: ``ctx != nullptr INTERNAL ASSERT FAILED``)."""
    buf = torch.empty(0, 4)
    out: dict = {}
    flex = FlexModel(nn.Linear(4, 4), out)
    flex.register_forward_pre_hook(HookFunction(""))
    try:
        for n in (2, 3, 5):
            buf.resize_(n, 4).copy_(torch.full((n, 4), float(n)))
            flex(buf)
    finally:
        flex.restore()
    assert [o.shape[0] for o in out[""]] == [2, 3, 5]
    assert all(torch.equal(o, torch.full_like(o, o.shape[0])) for o in out[""])


class _OutBuffer(nn.Module):
    """Writes its result into the same buffer every forward (``out=``), resized as needed."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.empty(0), persistent=False)

    def forward(self, x):
        return torch.mul(x, 2, out=self.buf)


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_a_module_whose_out_buffer_grows_keeps_running():
    model = nn.Sequential(_OutBuffer(), nn.Linear(4, 4))
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction("0"))
    try:
        for n in (2, 3):
            flex(torch.full((n, 4), float(n)))
    finally:
        flex.restore()
    assert [o[0, 0].item() for o in out["0"]] == [4.0, 6.0]


# -- overlapping views: a plain copy is dense, a clone would repeat elements -------------------
class _ExpandHalf(nn.Module):
    """Returns the first half of a fresh tensor expanded over the whole of it: its memory is
    exactly the tensor's size at offset 0, but the elements overlap (stride 0)."""

    def forward(self, x):
        y = x * 2.0  # (2, 4): 8 elements of memory
        return y.view(-1)[:4].expand(2, 4)


def test_an_overlapping_output_is_stored_dense_and_writable():
    """An output whose elements overlap (stride 0) is stored dense, so the user can write it."""
    x = torch.arange(8.0).view(2, 4)
    whole = (x * 2.0)
    tensor = whole.view(-1)[:4].expand(2, 4)
    model = nn.Sequential(_ExpandHalf(), nn.Flatten(0))
    out: dict = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction("0"))
    flex(x)
    stored = out["0"][0]
    want = tensor.contiguous()
    assert torch.equal(stored, want) and stored.stride() == want.stride()
    stored.add_(1.0)  # the user may write a stored value
    assert torch.equal(stored, want + 1.0)
    flex.restore()


class _StageBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(h, h)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.up(x)
        self.act(y)  # writes the hooked value after its hook, before collection
        return y


@distributed(world_size=2)
def test_a_pipeline_stage_sends_the_values_its_hooks_saw():
    """Stage 1's values are collected after the stage has run, by which time the in-place ReLU
    has written every hooked activation: rank 0 still receives what the hooks saw."""
    torch.manual_seed(0)
    h = 8
    blocks = nn.ModuleList([_StageBlock(h) for _ in range(4)])
    x = torch.randn(3, h)
    want, t = [], x.clone()
    with torch.no_grad():
        for block in blocks:
            want.append(block.up(t).clone())
            t = block(t)
    rank = dist.get_rank()
    out: dict = {}
    flex = FlexModel(BlockStage(blocks, [0, 1] if rank == 0 else [2, 3]), out,
                     pipeline_parallel_size=2)
    for i in range(4):
        flex.register_forward_hook(HookFunction(f"blocks.{i}.up"))
    with torch.no_grad():
        if rank == 0:
            dist.send(flex(x).contiguous(), 1)
        else:
            recv = torch.empty(3, h)
            dist.recv(recv, 0)
            flex(recv)
    flex.sync_pipeline_outputs()
    if rank == 0:
        assert sorted(out) == [f"blocks.{i}.up" for i in range(4)]
        for i in range(4):
            assert torch.equal(out[f"blocks.{i}.up"][0], want[i]), i
        assert any((w < 0).any() for w in want)  # the ReLU changed what it wrote
    flex.restore()
