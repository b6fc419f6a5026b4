"""Mesh adoption (``flex_surgery/parallel/mesh.py``): HSDP on torchtitan's
``("dp_replicate", "dp_shard")`` dims adopted as one dp axis, and DTensor parameters' meshes read
from the hooks ``distribute_module`` installed. Every numeric check compares with one process on
the whole batch, in float64.

Meshes are made once per pool rank and reused (gloo groups live as long as the process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    H,
    actual_names,
    assert_grads_equal,
    clean_keys,
    dtensor_plan,
    llama_tp_plan,
    local_group,
    plain_grads,
    plain_net,
)
from rank_pool import distributed
from test_fsdp2_tp_mesh import (
    PARAM_SITES,
    SITES,
    TOL,
    _compare_stored,
    _dp_slice,
    _dtensor_grads,
    _edit_kwargs,
    _fsdp2,
    _hsdp_mesh,
    _local_value,
    _mesh_2d,
    _run,
)
from torch import nn

from flex_surgery.hooks import FlexModel, HookFunction

_CACHE: dict[tuple[int, str], object] = {}  # (id of the default group, what) -> this rank's


def _cached(what, make):
    key = (id(dist.distributed_c10d._get_default_group()), what)
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _hsdp_dp_rank(mesh):
    """The dp rank docs/layouts/fsdp.md promises: replicate rank x shard size + shard rank."""
    return mesh.get_local_rank("dp_replicate") * mesh.size(1) + mesh.get_local_rank("dp_shard")


# -- 1. HSDP: uneven batches over the 4 dp ranks, every hook kind, three edit modes -------------
BOUNDS = (0, 3, 6, 9, 11)  # dp ranks 0..2 hold 3 rows, dp rank 3 two


def _uneven_ref_loss(y):
    """FSDP2 averages the 4 local-mean gradients: the one-process loss is the mean of means."""
    return sum(y[a:b].pow(2).mean() for a, b in zip(BOUNDS, BOUNDS[1:])) / 4


@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=4)
def test_hsdp_uneven_dp_batches_every_hook_kind(mode):
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BOUNDS[-1], 3, H, generator=torch.Generator().manual_seed(3))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, mode, SITES, PARAM_SITES, process_group=local_group(),
                                  loss_fn=_uneven_ref_loss)
    ref_grads = plain_grads(ref)
    mesh = _hsdp_mesh()
    d = _hsdp_dp_rank(mesh)
    rows = slice(BOUNDS[d], BOUNDS[d + 1])
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    stored, out, flex = _run(model, x[rows], mode, SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 4, "tp": 1, "pp": 1}
    assert flex.runtime.mesh.rank("dp") == d
    torch.testing.assert_close(out, ref_out.detach()[rows], **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


# -- 2. HSDP with store_on="all" and overlap_retrieval, uneven batches ---------------------------
RETRIEVE = [("blocks.0.up", "forward"), ("blocks.0.act", "forward"), ("blocks.1", "forward"),
            ("blocks.1.down", "forward_pre"), ("blocks.1.act", "full_backward"),
            ("blocks.1.up", "full_backward_pre")]
_REG = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
        "full_backward": "register_full_backward_hook",
        "full_backward_pre": "register_full_backward_pre_hook"}


def _retrieve_run(model, x, loss_fn, mode=None, **kwargs):
    stored: dict = {}
    flex = FlexModel(model, stored, **kwargs)
    names = actual_names(model)
    for name, kind in RETRIEVE:
        getattr(flex, _REG[kind])(HookFunction(names[name], **_edit_kwargs(mode)))
    out = flex(x)
    loss_fn(out).backward()
    return clean_keys(stored), out, flex


@pytest.mark.parametrize("option", ["store_on_all", "overlap", "overlap_edit"])
@distributed(world_size=4)
def test_hsdp_store_on_all_and_overlap_retrieval(option):
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BOUNDS[-1], 3, H, generator=torch.Generator().manual_seed(4))
    mode = "leader" if option == "overlap_edit" else None
    ref = plain_net()
    ref_stored, ref_out, _ = _retrieve_run(ref, x, _uneven_ref_loss, mode,
                                           process_group=local_group())
    mesh = _hsdp_mesh()
    d = _hsdp_dp_rank(mesh)
    rows = slice(BOUNDS[d], BOUNDS[d + 1])
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    kwargs = dict(store_on="all") if option == "store_on_all" else \
        dict(overlap_retrieval=True)
    stored, out, flex = _retrieve_run(model, x[rows], lambda y: y.pow(2).mean(), mode, **kwargs)
    torch.testing.assert_close(out, ref_out.detach()[rows], **TOL)
    if option == "store_on_all":  # every rank holds every whole value
        assert stored.keys() == ref_stored.keys(), (sorted(stored), sorted(ref_stored))
        for key in ref_stored:
            assert len(stored[key]) == len(ref_stored[key]), key
            for a, b in zip(stored[key], ref_stored[key]):
                torch.testing.assert_close(a, b, **TOL)
    else:
        _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), plain_grads(ref), **TOL)


@distributed(world_size=4)
def test_hsdp_replica_leaders_disk_store_reads_back_one_process_rows():
    """``store_on="replica_leaders"``: every HSDP rank is its replica's leader (tp = 1) and
    writes its own rows; the store reads them back in the one-process batch order."""
    import shutil
    import tempfile

    from flex_surgery.store import DiskStore

    torch.set_default_dtype(torch.float64)
    x = torch.randn(BOUNDS[-1], 3, H, generator=torch.Generator().manual_seed(8))
    ref_stored, _, _ = _retrieve_run(plain_net(), x, _uneven_ref_loss,
                                     process_group=local_group())
    box = [tempfile.mkdtemp(prefix="flex_hsdp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    mesh = _hsdp_mesh()
    d = _hsdp_dp_rank(mesh)
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    store = DiskStore(box[0])
    flex = FlexModel(model, None, store=store, store_on="replica_leaders")
    names = actual_names(model)
    for name, kind in RETRIEVE:
        getattr(flex, _REG[kind])(HookFunction(names[name]))
    flex(x[BOUNDS[d]:BOUNDS[d + 1]]).pow(2).mean().backward()
    flex.close()
    store.close()
    dist.barrier()
    try:
        if dist.get_rank() == 0:
            reader = DiskStore(box[0])
            assert {e["writer"] for e in reader.index()} == {0, 1, 2, 3}
            for name, _ in RETRIEVE:
                torch.testing.assert_close(reader.read(names[name], 0), ref_stored[name][0],
                                           **TOL, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(box[0], ignore_errors=True)


@distributed(world_size=4)
def test_hsdp_with_a_contradicting_data_parallel_size_is_refused_on_every_rank():
    from flex_surgery.parallel.mesh import MeshSizeError

    model = _fsdp2(plain_net(), _hsdp_mesh(), [])
    with pytest.raises(MeshSizeError, match="dp size 2"):
        FlexModel(model, {}, data_parallel_size=2)


# -- 3. HSDP dims that are not in torchtitan's row-major order ----------------------------------
def _permuted_hsdp_mesh():
    """``("dp_replicate", "dp_shard")`` over the ranks ``[[0, 2], [1, 3]]``: replicas are the
    even / odd global ranks (as when replicas are spread over hosts)."""
    from torch.distributed.device_mesh import DeviceMesh

    return _cached("permuted_hsdp", lambda: DeviceMesh(
        "cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("dp_replicate", "dp_shard")))


@distributed(world_size=4)
def test_hsdp_on_a_permuted_device_mesh_is_refused_on_every_rank():
    """HSDP on a DeviceMesh over [[0, 2], [1, 3]]: its flattened dp group numbers the ranks by
    global rank (0, 1, 2, 3), not replicate x 2 + shard (0, 2, 1, 3), so a batch split by the
    mesh's coordinates would be joined with its 2nd and 3rd quarters swapped: refused, on
    every rank, before anything runs."""
    from flex_surgery.parallel.mesh import MeshSizeError

    mesh = _permuted_hsdp_mesh()
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    with pytest.raises(MeshSizeError, match="not in increasing order"):
        FlexModel(model, {})


@distributed(world_size=4)
def test_hsdp_dims_in_reverse_order_are_refused_on_every_rank():
    """``("dp_shard", "dp_replicate")``: which dim is the slower part of the dp rank is
    ambiguous: every rank raises a MeshSizeError naming the dims."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = _cached("reversed_hsdp", lambda: init_device_mesh(
        "cpu", (2, 2), mesh_dim_names=("dp_shard", "dp_replicate")))
    model = _fsdp2(plain_net(), mesh, [])
    from flex_surgery.parallel.mesh import MeshSizeError

    with pytest.raises(MeshSizeError, match="dp_replicate"):
        FlexModel(model, {})


@distributed(world_size=4)
def test_hsdp_x_tp_with_tp_as_the_slowest_dim_equals_one_process():
    """``("tp", "dp_replicate", "dp_shard")`` of sizes (2, 1, 2): tp over ranks {0, 2} and
    {1, 3}, dp over {0, 1} and {2, 3}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    mesh = _cached("tp_outer", lambda: init_device_mesh(
        "cpu", (2, 1, 2), mesh_dim_names=("tp", "dp_replicate", "dp_shard")))
    x = torch.randn(BOUNDS[-1] - 3, 3, H, generator=torch.Generator().manual_seed(6))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, "leader", SITES, PARAM_SITES,
                                  process_group=local_group())
    ref_grads = plain_grads(ref)
    d = mesh.get_local_rank("dp_shard")
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    model = _fsdp2(model, mesh["dp_replicate", "dp_shard"], model.blocks)
    stored, out, flex = _run(model, _dp_slice(x, d, 2), "leader", SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    assert flex.runtime.mesh.rank("dp") == d
    torch.testing.assert_close(_local_value(out), _dp_slice(ref_out.detach(), d, 2), **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


@distributed(world_size=4)
def test_hsdp_on_torchtitans_flattened_dp_shard_cp_equals_one_process():
    """torchtitan shards over ``dp_shard_cp`` (``dp_shard`` x ``cp`` flattened; cp = 1 here) and
    fully_shards on ``mesh["dp_replicate", "dp_shard_cp"]``: the root's HSDP dims are adopted."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_default_dtype(torch.float64)

    def make():
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
        mesh["dp_shard"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    mesh = _cached("titan_flat", make)
    x = torch.randn(8, 3, H, generator=torch.Generator().manual_seed(9))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, "leader", SITES, PARAM_SITES,
                                  process_group=local_group())
    d = mesh["dp"].get_local_rank()
    assert d == _hsdp_dp_rank(mesh)
    model = plain_net()
    model = _fsdp2(model, mesh["dp_replicate", "dp_shard_cp"], model.blocks)
    stored, out, flex = _run(model, _dp_slice(x, d, 4), "leader", SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 4, "tp": 1, "pp": 1}
    torch.testing.assert_close(out, _dp_slice(ref_out.detach(), d, 4), **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), plain_grads(ref), **TOL)


@distributed(world_size=4)
def test_hsdp_sliced_from_a_mesh_with_a_cp_dim_is_refused_on_every_rank():
    """A root ``("dp_replicate", "dp_shard", "cp")`` of sizes (2, 1, 2): "cp" is no axis of
    ours, so the parameters' own 2-rank HSDP mesh is read, and refused for covering 2 of 4."""
    from torch.distributed.device_mesh import init_device_mesh

    from flex_surgery.parallel.mesh import MeshSizeError

    mesh = _cached("with_cp", lambda: init_device_mesh(
        "cpu", (2, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "cp")))
    model = _fsdp2(plain_net(), mesh["dp_replicate", "dp_shard"], [])
    with pytest.raises(MeshSizeError, match="covers 2 of 4"):
        FlexModel(model, {})


# -- 4. several FlexModels / meshes of one shape in one process: one flattened group -----------
@distributed(world_size=4)
def test_flexmodels_on_equal_hsdp_meshes_share_one_flattened_group():
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_default_dtype(torch.float64)
    pg_map = dist.distributed_c10d._world.pg_map
    x = torch.randn(8, 3, H, generator=torch.Generator().manual_seed(7))
    ref_stored, _, _ = _run(plain_net(), x, None, [("blocks.1", "forward")],
                            process_group=local_group())
    first = _hsdp_mesh()
    second = _cached("second_hsdp", lambda: init_device_mesh(
        "cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard")))
    assert second is not first
    dp_groups, counts = [], []
    for mesh in (first, second, first, second):
        model = plain_net()
        model = _fsdp2(model, mesh, model.blocks)
        with FlexModel(model, stored := {}) as flex:
            flex.register_forward_hook(HookFunction("blocks.1"))
            with torch.no_grad():
                flex(_dp_slice(x, _hsdp_dp_rank(mesh), 4))
            dp_groups.append(flex.runtime.mesh.group("dp"))
        counts.append(len(pg_map))
        _compare_stored(clean_keys(stored), ref_stored, **TOL)
    assert all(g is dp_groups[0] for g in dp_groups), "the dims were flattened again"
    assert len(set(counts)) == 1, counts  # no group made by the later FlexModels
    assert dist.get_process_group_ranks(dp_groups[0]) == [0, 1, 2, 3]


# -- 5. DTensor parameters distributed by hand (no module hooks) after an earlier model ---------
class _HandColwise(nn.Module):
    """A column-wise linear whose parameters were ``distribute_tensor``-ed by hand."""

    def __init__(self, lin, mesh):
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        self.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        self.bias = nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Shard(0)]))

    def forward(self, x):
        from torch.distributed.tensor import DTensor, Replicate

        xd = DTensor.from_local(x, self.weight.device_mesh, [Replicate()], run_check=False)
        return nn.functional.linear(xd, self.weight, self.bias).full_tensor()


class _HandNet(nn.Module):
    def __init__(self, mesh):
        super().__init__()
        self.pre = nn.Identity()
        self.head = _HandColwise(plain_net().head, mesh)

    def forward(self, x):
        return self.head(self.pre(x))


def _rep_tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return _cached("rep_tp", lambda: init_device_mesh("cpu", (2, 2),
                                                        mesh_dim_names=("rep", "tp")))


@distributed(world_size=4)
def test_hand_distributed_parameters_after_an_earlier_dp_x_tp_model():
    from flex_surgery.parallel.mesh import MeshSizeError

    torch.set_default_dtype(torch.float64)
    _HandNet(_mesh_2d()["tp"])  # the earlier model, in the same process
    model = _HandNet(_rep_tp_mesh()["tp"])
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    stored: dict = {}
    try:
        flex = FlexModel(model, stored)
    except (MeshSizeError, ValueError):
        return  # refused on every rank, as without the earlier model: fine
    flex.register_forward_hook(HookFunction("pre"))
    with torch.no_grad():
        out = flex(x)
    torch.testing.assert_close(out, plain_net().head(x), **TOL)
    if dist.get_rank() == 0:
        assert stored["pre"][0].shape == x.shape, (stored["pre"][0].shape,
                                                   flex.runtime.mesh.sizes)


# -- 6. distribute_module hooks on an ancestor of the parameters' module ------------------------
class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = plain_net().head

    def forward(self, x):
        return self.lin(x)


class _OuterNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Identity()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.pre(x))


def _replicated_on(mesh):
    """``distribute_module`` on ``inner`` (parameters of its child replicated over ``mesh``,
    hooks on ``inner`` only): the input made a replicated DTensor, the output local again."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    model = _OuterNet()
    distribute_module(
        model.inner, mesh,
        input_fn=lambda mod, inputs, m: tuple(
            DTensor.from_local(t, m, [Replicate()], run_check=False) for t in inputs),
        output_fn=lambda mod, out, m: out.to_local())
    return model


@distributed(world_size=4)
def test_distribute_module_hooks_on_an_ancestor_after_an_earlier_dp_x_tp_model():
    from flex_surgery.parallel.mesh import MeshSizeError

    torch.set_default_dtype(torch.float64)
    _replicated_on(_mesh_2d()["tp"])  # the earlier model
    model = _replicated_on(_rep_tp_mesh()["tp"])
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    stored: dict = {}
    try:
        flex = FlexModel(model, stored)
    except (MeshSizeError, ValueError):
        return  # refused on every rank (as without the earlier model): fine
    flex.register_forward_hook(HookFunction("pre"))
    with torch.no_grad():
        out = flex(x)
    torch.testing.assert_close(out, plain_net().head(x), **TOL)
    if dist.get_rank() == 0:
        assert stored["pre"][0].shape == x.shape, (stored["pre"][0].shape,
                                                   flex.runtime.mesh.sizes)


@distributed(world_size=4)
def test_parallelized_model_cast_after_an_earlier_dp_x_tp_model_is_not_joined():
    """``parallelize_module`` then ``.double()`` (every parameter made again by an op, so handed
    the earlier equal mesh) on a ``("rep", "tp")`` tp slice: the hooks still name the right
    mesh -- refused, or tp only with the one-process values."""
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.mesh import MeshSizeError

    earlier = parallelize_module(plain_net(), _mesh_2d()["tp"], dtensor_plan(True)).double()
    del earlier
    model = parallelize_module(plain_net(), _rep_tp_mesh()["tp"], dtensor_plan(True)).double()
    x = torch.randn(8, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stored: dict = {}
    try:
        flex = FlexModel(model, stored)
    except (MeshSizeError, ValueError):
        return
    flex.register_forward_pre_hook(HookFunction("head"))
    with torch.no_grad():
        flex(x)
    if dist.get_rank() == 0:
        assert stored["head"][0].shape == x.shape, flex.runtime.mesh.sizes


# -- 7. a tiny HF Llama, TP plan + HSDP on ("dp_replicate", "dp_shard", "tp") ---------------
@distributed(world_size=4)
def test_hf_llama_tp_plan_on_hsdp_x_tp_mesh_equals_one_process():
    """(dp_replicate, dp_shard, tp) = (2, 1, 2): q/k/v/gate/up column-wise, o/down row-wise
    inside, HSDP over the replicas (torchtitan's sequence-parallel plan does not run on HF's
    Llama: its rotary embedding is computed from the sequence-sharded hidden states); a layer's
    output, a column-wise projection, the final norm and the logits against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.models.tiny import tiny_hf_model

    mesh = _cached("hsdp_tp_212", lambda: init_device_mesh(
        "cpu", (2, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp")))
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    sites = ["model.layers.0", "model.layers.1.mlp.up_proj", "model.norm", "lm_head"]

    def hooked(model, x, **kw):
        stored: dict = {}
        flex = FlexModel(model, stored, **kw)
        for s in sites:
            flex.register_forward_hook(HookFunction(actual_names(model)[s]))
        with torch.no_grad():
            out = flex(input_ids=x, use_cache=False).logits
        return clean_keys(stored), out, flex

    ref = tiny_hf_model("llama", seed=0, dtype=torch.float64)
    layers = ref.config.num_hidden_layers
    ref_stored, ref_out, _ = hooked(ref, ids, process_group=local_group())
    d = mesh.get_local_rank("dp_replicate")
    model = tiny_hf_model("llama", seed=0, dtype=torch.float64)
    model = parallelize_module(model, mesh["tp"], llama_tp_plan(layers))
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    stored, out, flex = hooked(model, _dp_slice(ids, d, 2))
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    torch.testing.assert_close(_local_value(out), _dp_slice(ref_out, d, 2), **TOL)
    _compare_stored(stored, ref_stored, **TOL)


