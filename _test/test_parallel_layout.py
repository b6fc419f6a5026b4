"""Layouts the runtime handles, checked through DistributedRuntime on hand-made tensors:
several sharded dims (sequence over dp and hidden over tp on a 2-D mesh), uneven shards,
partial sums, uneven data-parallel batches, and the ``expected_shape`` hint (it decides for
modules whose layout comes from shapes, and contradicting a fairscale layer is an error)."""

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery.parallel.distributed_runtime import DistributedRuntime
from flex_surgery.parallel.layout import Layout, LayoutError, ShardSpec, chunk_sizes
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.runtime import HookSite


def _site(module, hint=None, hook_type="forward"):
    return HookSite("m", hook_type, HookSite.role_for(hook_type), module=module,
                    expected_shape=hint)


def _retrieve(runtime, local, site):
    stored = []
    runtime.retrieve(local, site, stored.append)
    return stored[0] if stored else None


def _edit_round_trip(runtime, local, site, fn):
    full, ctx = runtime.gather_for_edit(local, site)
    edited = runtime.run_on_leader(ctx, lambda: fn(full))
    return runtime.scatter_from_edit(edited, ctx)


def test_chunk_sizes_follow_torch_chunk():
    assert chunk_sizes(8, 2) == (4, 4)
    assert chunk_sizes(5, 2) == (3, 2)
    assert chunk_sizes(5, 4) == (2, 2, 1, 0)
    assert Layout((ShardSpec("tp", 2, (3, 2)),)).global_shape((4, 3, 3)) == (4, 3, 5)


@distributed(world_size=4)
def test_dtensor_sharded_on_two_dims_over_a_2d_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    runtime = DistributedRuntime(nn.Identity(), ParallelMesh.from_device_mesh(mesh))
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    site = _site(nn.Identity())
    for placements in ([Shard(1), Shard(2)], [Shard(0), Shard(2)], [Shard(2), Shard(1)]):
        dt = distribute_tensor(x, mesh, placements)  # uneven: 5 and 7 split in two
        stored = _retrieve(runtime, dt, site)
        if dist.get_rank() == 0:
            assert torch.equal(stored, x)
        else:
            assert stored is None
        leaf = dt.detach().requires_grad_()
        out = _edit_round_trip(runtime, leaf, site, lambda t: t * 3)
        assert out.placements == dt.placements
        assert torch.equal(out.full_tensor(), x * 3)
        out.to_local().sum().backward()
        assert torch.equal(leaf.grad.full_tensor(), torch.full_like(x, 3.0))


@distributed(world_size=2)
def test_partial_sums_are_reduced_and_edits_split_back_into_summands():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    runtime = DistributedRuntime(nn.Identity(), ParallelMesh.from_device_mesh(mesh))
    rank = dist.get_rank()
    summand = torch.full((2, 3), float(rank + 1))
    dt = DTensor.from_local(summand, mesh, [Partial()])
    site = _site(nn.Identity())
    stored = _retrieve(runtime, dt, site)
    if rank == 0:
        assert torch.equal(stored, torch.full((2, 3), 3.0))
    out = _edit_round_trip(runtime, dt, site, lambda t: t * 2)
    assert torch.equal(out.full_tensor(), torch.full((2, 3), 6.0))


@distributed(world_size=2)
def test_uneven_data_parallel_batches():
    runtime = DistributedRuntime(nn.Identity(), ParallelMesh.build(dp=2))
    rank = dist.get_rank()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    local = x[:3] if rank == 0 else x[3:]
    site = _site(nn.Identity())
    stored = _retrieve(runtime, local, site)
    if rank == 0:
        assert torch.equal(stored, x)
    leaf = local.clone().requires_grad_()
    out = _edit_round_trip(runtime, leaf, site, lambda t: t + torch.arange(4.0)[:, None])
    assert torch.equal(out, local + torch.arange(4.0)[:, None][:3 if rank == 0 else None]
                       [3 * rank:])
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(local))
    # a tensor without a batch dim (the same on every dp rank), told by expected_shape
    table = torch.arange(6.0).reshape(1, 6)
    stored = _retrieve(runtime, table, _site(nn.Identity(), (1, 6)))
    assert stored is None or torch.equal(stored, table)
    assert (stored is not None) == (rank == 0)


@distributed(world_size=2)
def test_expected_shape_decides_and_is_checked():
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    fs.initialize_model_parallel(2)
    rank = dist.get_rank()
    col = ColumnParallelLinear(4, 6, gather_output=False)
    runtime = DistributedRuntime(col, ParallelMesh.adopt(col))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))

    # a parameter-free module whose output is sharded on the hidden dim, told by the hint
    stored = _retrieve(runtime, x[..., 3 * rank:3 * rank + 3], _site(nn.Identity(), (2, 3, 6)))
    if rank == 0:
        assert torch.equal(stored, x)
    # sequence parallel: the hint says dim 1 is split (uneven 2 + 1)
    local = x[:, :2] if rank == 0 else x[:, 2:]
    stored = _retrieve(runtime, local, _site(nn.Identity(), (2, None, 6)))
    assert stored is None or stored.shape == local.shape  # None entries: nothing to infer
    stored = _retrieve(runtime, local, _site(nn.Identity(), (2, 3, 6)))
    if rank == 0:
        assert torch.equal(stored, x)
    # the fairscale layer says "sharded": a hint saying "replicated" contradicts it
    out = col(torch.randn(2, 3, 4))
    with pytest.raises(LayoutError, match="contradicts"):
        runtime.layout_of(out, _site(col, (2, 3, 3)))
    with pytest.raises(LayoutError, match="cannot be a shard"):
        runtime.layout_of(out, _site(nn.Identity(), (2, 3, 9)))
    assert runtime.layout_of(out, _site(col)) == Layout((ShardSpec("tp", 2, (3, 3)),))


def _sizes_only_mesh(dp: int, tp: int, tp_rank: int = 0) -> ParallelMesh:
    """Sizes and coordinates without groups: layouts are inferred without a collective."""
    return ParallelMesh({"dp": None, "tp": None, "pp": None}, {"dp": dp, "tp": tp, "pp": 1},
                        {"dp": 0, "tp": tp_rank, "pp": 0})


def test_a_tensor_without_the_batch_dim_is_never_split_over_dp_on_another_dim():
    """Batch dim 1 (Megatron's ``[s, b, h]``) and a 1-D tensor (a bias a layer returns): dim 0
    is not the batch; the hint's tp split is kept, nothing is concatenated over dp, and
    without a hint it is an error naming the module, not a guess."""
    from flex_surgery.parallel.frameworks import UnknownLayoutError
    from flex_surgery.parallel.layout import LayoutInference

    layouts = LayoutInference(_sizes_only_mesh(dp=2, tp=2), batch_dim=1)
    bias = torch.zeros(3)
    assert layouts.layout(bias, nn.Identity(), "output", expected_shape=(6,)) == \
        Layout((ShardSpec("tp", 0, (3, 3)),))
    assert layouts.layout(bias, nn.Identity(), "output", expected_shape=(3,)) == Layout()
    with pytest.raises(UnknownLayoutError, match="data parallelism splits"):
        layouts.layout(bias, nn.Identity(), "output")
    # with the batch dim present, dp splits it
    got = layouts.layout(torch.zeros(4, 1, 3), nn.Identity(), "output",
                         expected_shape=(4, 2, 6))
    assert got.shards == (ShardSpec("tp", 2, (3, 3)), ShardSpec("dp", 1))


def test_a_parameter_handed_on_as_an_activation_is_not_split_over_dp():
    """A layer that returns its own bias (Megatron's ``skip_bias_add``): the tensor is the
    parameter, the same on every data-parallel rank."""
    from flex_surgery.parallel.layout import LayoutInference

    layouts = LayoutInference(_sizes_only_mesh(dp=2, tp=1), batch_dim=0)
    linear = nn.Linear(3, 4)
    layouts.watch(linear)
    assert layouts.layout(linear.bias, linear, "output") == Layout()
    assert layouts.layout(linear.bias.detach() + 0, linear, "output").spec_for("dp") == \
        ShardSpec("dp", 0)


@distributed(world_size=4)
def test_a_tensor_declared_whole_over_dp_must_be_the_same_on_every_dp_rank():
    """dp=2 x tp=2, batch dim 1 (Megatron's ``[s, b, h]``): a batch-first ``[b, s, h]`` tensor
    declared by its whole shape looks like a tp shard on dim 0 and whole over dp; the dp ranks
    hold different rows, so it is an error on every rank, not the tp ranks' copies of one
    replica's rows put side by side. A tensor that is the same on every dp rank is stored."""
    from flex_surgery.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.build(tp=2, dp=2)
    runtime = DistributedRuntime(nn.Identity(), mesh, batch_dim=1)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    rows = x[mesh.rank("dp"):mesh.rank("dp") + 1]  # [1, 4, 3]: this replica's batch row
    site = _site(nn.Identity(), (2, 4, 3))
    with pytest.raises(LayoutError, match="data-parallel ranks hold different values"):
        runtime.whole_shape(rows, site)
    same = x[mesh.rank("tp"):mesh.rank("tp") + 1]  # a true tp shard, equal over dp
    assert runtime.whole_shape(same, site) == (2, 4, 3)
    stored = _retrieve(runtime, same, site)
    assert stored is None or torch.equal(stored, x)
    assert (stored is not None) == (dist.get_rank() == 0)
    runtime.close()


@distributed(world_size=2)
def test_the_shape_agreement_does_not_keep_the_activation_alive():
    """whole_shape hands its layout to the same call's gather; if the call stops in between
    (an error after the shape check), the runtime must not hold the activation until the next
    hook call -- on a large model that is a whole activation of memory."""
    import gc
    import weakref

    mesh = ParallelMesh.build(tp=2)
    runtime = DistributedRuntime(nn.Identity(), mesh)
    site = _site(nn.Identity(), (2, 8))
    local = torch.randn(2, 4)
    assert runtime.whole_shape(local, site) == (2, 8)
    alive = weakref.ref(local)
    del local
    gc.collect()
    assert alive() is None
    piece = torch.randn(2, 4)  # the next call on a new tensor still infers its own layout
    assert runtime.whole_shape(piece, site) == (2, 8)
    runtime.close()


@pytest.mark.parametrize("seq", [4, 5], ids=["even", "uneven"])
@distributed(world_size=2)
def test_a_dtensor_row_output_split_on_the_sequence_is_described(seq):
    """``RowwiseParallel(output_layouts=Shard(1))`` (torch's sequence parallelism): the weights
    say replicated, the hook sees one rank's piece of the sequence (once stored as the whole,
    then refused unless declared). The style's declared output layout now says it: split on
    dim 1 by torch.chunk (5 over 2 ranks: 3 and 2, sizes exchanged), equal to one process with
    and without expected_shape."""
    from collections import OrderedDict

    from parallel_cases import plain_net
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from flex_surgery.hooks import FlexModel, HookFunction

    def mlp():  # up -> act -> down of one block, no residual (the output stays split)
        b = plain_net().blocks[0]
        return nn.Sequential(OrderedDict(up=b.up, act=b.act, down=b.down))

    x = torch.randn(2, seq, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mlp()(x)
    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(mlp(), mesh, {
        "up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=Shard(1))})
    for hint in (None, tuple(want.shape)):
        stored: dict = {}
        flex = FlexModel(model, stored)
        flex.register_forward_hook(HookFunction("down", expected_shape=hint))
        try:
            with torch.no_grad():
                out = flex(x)
            assert out.shape[1] == ((3, 2)[dist.get_rank()] if seq == 5 else seq // 2)
            if dist.get_rank() == 0:
                torch.testing.assert_close(stored["down"][0], want)
        finally:
            flex.restore()


class _Tokens(nn.Module):
    """``[seq, batch, hidden]`` -> ``[seq * batch, hidden]``, as packed or routed tokens are."""

    def forward(self, x):
        return x.flatten(0, 1)


@distributed(world_size=2)
def test_a_2d_tensor_in_a_seq_first_model_is_not_split_over_dp_on_its_hidden_dim():
    """Batch dim 1 (Megatron's ``[s, b, h]``) under DP=2: a ``[tokens, hidden]`` tensor has
    that dim as its hidden dim. Before, the replicas' hidden units were concatenated (shape
    ``[s*b, 2h]``); now it is an error on every rank, and a 3-D tensor is still gathered
    along dim 1."""
    from flex_surgery.hooks import FlexModel, HookFunction
    from flex_surgery.parallel.frameworks import UnknownLayoutError

    model = nn.Sequential(nn.Identity(), _Tokens())
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    whole = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(whole, x)
    for name in ("1", "0"):
        stored: dict = {}
        flex = FlexModel(model, stored, data_parallel_size=2, batch_dim=1)
        flex.register_forward_hook(HookFunction(name))
        try:
            if name == "1":
                with pytest.raises(UnknownLayoutError, match="last dim"):
                    flex(x)
            else:
                flex(x)
                if dist.get_rank() == 0:
                    assert torch.equal(stored["0"][0], torch.cat(whole, dim=1))
        finally:
            flex.restore()


class _Projection(nn.Module):
    """A linear map by a (DTensor) parameter called ``name``."""

    def __init__(self, w: torch.Tensor, name: str = "w") -> None:
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(w))

    def forward(self, x):
        w = getattr(self, self.name)
        w = w.to_local() if hasattr(w, "to_local") else w
        return x @ w.T  # under TP: this rank's columns of the output


def _hook_on_first_module_raises(model: nn.Module, x: torch.Tensor, error, match: str) -> None:
    from flex_surgery.hooks import FlexModel, HookFunction

    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("0"))
    try:
        with pytest.raises(error, match=match):
            flex(x)
    finally:
        flex.restore()


@distributed(world_size=2)
def test_a_dtensor_split_parameter_not_named_weight_makes_the_module_undescribed():
    """Its weight is split over tp (``Shard(0)``) but tp_layer reads ``weight`` only: hooks on
    it raise on every rank (before: replicated -- rank 0's columns stored as the whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    mesh = init_device_mesh("cpu", (2,))
    model = nn.Sequential(_Projection(distribute_tensor(w, mesh, [Shard(0)])))
    _hook_on_first_module_raises(model, torch.randn(3, 4), UnknownLayoutError, "'0'")


@distributed(world_size=2)
def test_a_strided_dtensor_weight_split_makes_the_module_undescribed():
    """``_StridedShard(0)`` over tp: each rank's output columns are slices of every block, not
    one contiguous block. Before, the layer was read as colwise and the pieces were joined end
    to end (a permuted output stored as the whole); now hooks on it raise on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    mesh = init_device_mesh("cpu", (2,))
    strided = distribute_tensor(w, mesh, [_StridedShard(0, split_factor=2)])
    assert not torch.equal(strided.to_local(), w.chunk(2)[dist.get_rank()])  # really interleaved
    model = nn.Sequential(_Projection(strided, "weight"))
    _hook_on_first_module_raises(model, torch.randn(3, 4), UnknownLayoutError, "'0'")


class _StridedOutput(nn.Module):
    """Returns its input as a DTensor split over tp in interleaved blocks."""

    def __init__(self, mesh) -> None:
        super().__init__()
        self.mesh = mesh

    def forward(self, x):
        from torch.distributed.tensor import distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        return distribute_tensor(x, self.mesh, [_StridedShard(1, split_factor=2)])


@distributed(world_size=2)
def test_a_dtensor_activation_with_a_strided_placement_is_refused():
    """A DTensor activation whose placement is neither Shard, Partial nor Replicate was read as
    replicated on that axis (rank 0's interleaved columns stored as the whole); now it is a
    LayoutError on every rank, naming the module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flex_surgery.parallel.frameworks import LayoutError

    mesh = init_device_mesh("cpu", (2,))
    weight = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])  # makes the mesh tp
    model = nn.Sequential(_StridedOutput(mesh), _Projection(weight))
    _hook_on_first_module_raises(model, torch.randn(3, 8), LayoutError, "'0'.*placement")
