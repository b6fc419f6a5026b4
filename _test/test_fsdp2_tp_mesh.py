"""Second reading: FSDP2 x DTensor TP on a 2-D ``("dp", "tp")`` mesh, and DTensor TP styles the
equivalence matrix does not cover (sequence parallelism, ``PrepareModuleInput``,
``use_local_output=False`` under FSDP2, loss parallel), each compared with one process on the
whole batch with the same weights. Edits depend on every element's position, so a piece put
back in the wrong place (or an edit run on a piece instead of the whole) shows."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    H,
    V,
    actual_names,
    assert_grads_equal,
    clean,
    clean_keys,
    dtensor_plan,
    local_group,
    plain_grads,
    plain_net,
    seeded_linear,
)
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks import FlexModel, HookFunction

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
BATCH = 4
SEQ = 4

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


def position_edit(module, tensor, ctx, modules):
    """x2 plus a ramp over every element: an edit that depends on each element's position."""
    ramp = torch.linspace(0, 1, tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    return tensor * 2 + ramp.view(tensor.shape)


def _edit_kwargs(mode):
    if mode is None:
        return {}
    return {"editing_function": position_edit, "replicate_edit": mode == "replicated"}


def _run(model, x, mode, sites, param_sites=(), process_group=None, loss_fn=None,
         hint=None):
    stored: dict = {}
    flex = FlexModel(model, stored, process_group=process_group)
    names = actual_names(model)
    hint = hint or {}
    for name, kind in sites:
        getattr(flex, _REGISTER[kind])(HookFunction(names[name], expected_shape=hint.get(name),
                                                    **_edit_kwargs(mode)))
    for name in param_sites:
        flex.register_hook(HookFunction(names[name], **_edit_kwargs(mode)))
    out = flex(x)
    if loss_fn is None:
        loss = _local_value(out).pow(2).mean()
    else:
        loss = loss_fn(out)
    loss.backward()
    return clean_keys(stored), out, flex


def _local_value(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _dp_slice(x, dp_rank, dp):
    n = x.shape[0] // dp
    return x[dp_rank * n:(dp_rank + 1) * n]


def _dtensor_grads(model):
    return {clean(n): _local_value(p.grad).detach().clone() for n, p in model.named_parameters()}


def _compare_stored(stored, ref_stored, **tol):
    if dist.get_rank() != 0:
        assert stored == {}, sorted(stored)
        return
    assert stored.keys() == ref_stored.keys(), (sorted(stored), sorted(ref_stored))
    for key in ref_stored:
        assert len(stored[key]) == len(ref_stored[key]), key
        for a, b in zip(stored[key], ref_stored[key]):
            assert a.shape == b.shape, (key, a.shape, b.shape)
            torch.testing.assert_close(a, b, msg=lambda m, k=key: f"{k}: {m}", **tol)


_MESHES: dict[int, object] = {}  # id of the default group -> this rank's ("dp", "tp") mesh


def _mesh_2d():
    """The 2 x 2 ``("dp", "tp")`` mesh, made once per pool rank and reused: each mesh builds
    gloo groups that hold threads and sockets for the life of the process (see
    ``parallel_cases.local_group``), and a mesh per test body slowed every later test."""
    from torch.distributed.device_mesh import init_device_mesh

    world = id(dist.distributed_c10d._get_default_group())
    if world not in _MESHES:
        _MESHES[world] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return _MESHES[world]


def _fsdp2(model, mesh_dp, units):
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, mesh=mesh_dp)
    fully_shard(model, mesh=mesh_dp)
    return model


# -- 1. FSDP2 x TP, plain MLP stack: position-dependent edits at every hook kind ---------------
SITES = [
    ("blocks.0.up", "forward"),
    ("blocks.0.act", "forward"),
    ("blocks.0.down", "forward"),
    ("blocks.1.down", "forward_pre"),
    ("blocks.1.act", "full_backward"),
    ("blocks.1.up", "full_backward_pre"),
]
PARAM_SITES = ["blocks.1.up.weight", "blocks.1.down.weight", "blocks.0.up.bias"]


@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@pytest.mark.parametrize("local_output", [True, False])
@distributed(world_size=4)
def test_fsdp2_x_tp_position_edits_equal_one_process(mode, local_output):
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, mode, SITES, PARAM_SITES, process_group=local_group())
    ref_grads = plain_grads(ref)

    mesh = _mesh_2d()
    dp_rank = mesh.get_local_rank("dp")
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(local_output))
    _fsdp2(model, mesh["dp"], model.blocks)
    stored, out, flex = _run(model, _dp_slice(x, dp_rank, 2), mode, SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    torch.testing.assert_close(_local_value(out), _dp_slice(ref_out.detach(), dp_rank, 2),
                               **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


# -- 2. sequence parallelism (torchtitan's plan) --------------------------------------------------
class SPBlock(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.up, self.act, self.down = seeded_linear(H, 16, g), nn.GELU(), seeded_linear(16, H, g)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class SPNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V * 2, H)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(V * 2, H, generator=g))
        self.blocks = nn.ModuleList([SPBlock(g) for _ in range(2)])
        self.norm = nn.LayerNorm(H)
        self.head = seeded_linear(H, V, g)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def sp_plan():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {"emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(2):
        plan[f"blocks.{i}.norm"] = SequenceParallel()
        plan[f"blocks.{i}.up"] = ColwiseParallel(input_layouts=Shard(1))
        plan[f"blocks.{i}.down"] = RowwiseParallel(output_layouts=Shard(1))
    return plan


SP_SITES = [("emb", "forward"), ("blocks.0", "forward"), ("blocks.0.norm", "forward"),
            ("blocks.0.up", "forward"), ("blocks.1.up", "forward_pre"),
            ("blocks.1.down", "forward"), ("norm", "forward")]


SP_HINT = {"emb": (BATCH, SEQ, H), "blocks.0": (BATCH, SEQ, H), "blocks.1.down": (BATCH, SEQ, H)}


def _sp_body(site, mode, two_d, hinted=True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    ids = torch.randint(0, 2 * V, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    sites = [s for s in SP_SITES if s[0] == site]
    ref = SPNet()
    ref_stored, ref_out, _ = _run(ref, ids, mode, sites, process_group=local_group())
    ref_grads = plain_grads(ref)
    if two_d:
        mesh = _mesh_2d()
        dp_rank, tp_mesh = mesh.get_local_rank("dp"), mesh["tp"]
    else:
        tp_mesh, dp_rank = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), 0
    model = parallelize_module(SPNet(), tp_mesh, sp_plan())
    if two_d:
        _fsdp2(model, mesh["dp"], model.blocks)
    local = _dp_slice(ids, dp_rank, 2) if two_d else ids
    stored, out, _ = _run(model, local, mode, sites, hint=SP_HINT if hinted else None)
    want = _dp_slice(ref_out.detach(), dp_rank, 2) if two_d else ref_out.detach()
    return stored, ref_stored, _local_value(out), want, _dtensor_grads(model), ref_grads


@pytest.mark.parametrize("hinted", [True, False], ids=["hinted", "unhinted"])
@pytest.mark.parametrize("site", [s for s, _ in SP_SITES])
@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=2)
def test_sequence_parallel_tp_hooks(site, mode, hinted):
    """torchtitan's sequence-parallel plan: the row-wise layers and the embedding declare
    ``output_layouts=Shard(1)``, which describes their outputs (and the residual stream after
    them) without expected_shape."""
    stored, ref_stored, out, want, grads, ref_grads = _sp_body(site, mode, two_d=False,
                                                               hinted=hinted)
    torch.testing.assert_close(out, want, **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(grads, ref_grads, **TOL)


@pytest.mark.parametrize("hinted", [True, False], ids=["hinted", "unhinted"])
@pytest.mark.parametrize("site", [s for s, _ in SP_SITES])
@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=4)
def test_sequence_parallel_fsdp2_x_tp_hooks(site, mode, hinted):
    stored, ref_stored, out, want, grads, ref_grads = _sp_body(site, mode, two_d=True,
                                                               hinted=hinted)
    torch.testing.assert_close(out, want, **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(grads, ref_grads, **TOL)


# -- 3. whole parameters, export and surgery on the 2-D mesh --------------------------------------
SURGERY_PARAMS = ["emb.weight", "blocks.0.up.weight", "blocks.1.down.weight", "head.weight",
                  "blocks.0.norm.weight", "blocks.1.up.bias"]


def zero_row_5(t):
    delta = torch.zeros_like(t)
    delta[5] = -t[5]
    return delta


def _raw(model):
    out = {}
    for n, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[clean(n)] = local.detach().clone()
    return out


def _sp_model_2d(which):
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh_2d()
    if which == "sp":
        model = parallelize_module(SPNet(), mesh["tp"], sp_plan())
    else:
        model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(which == "local"))
    return _fsdp2(model, mesh["dp"], model.blocks), mesh.get_local_rank("dp")


@pytest.mark.parametrize("which", ["sp", "local", "dtensor"])
@distributed(world_size=4)
def test_fsdp2_x_tp_whole_parameters_export_and_surgery(which):
    from flex_surgery.export import full_weights
    from flex_surgery.surgery import SurgicalTheater

    torch.set_default_dtype(torch.float64)
    if which == "sp":
        ref = SPNet()
        x = torch.randint(0, 2 * V, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        x[:, 1] = 5  # every dp rank's batch uses the zeroed embedding row
        params = SURGERY_PARAMS
    else:
        ref = plain_net()
        x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
        params = ["blocks.0.up.weight", "blocks.1.down.weight", "head.weight",
                  "blocks.1.up.bias", "blocks.0.down.bias"]
    model, dp_rank = _sp_model_2d(which)
    local = _dp_slice(x, dp_rank, 2)
    want_params = {clean(n): p.detach() for n, p in ref.named_parameters()}
    flex = FlexModel(model, {})
    for name in want_params:
        got = flex.get_module_parameter(actual_names(model)[name])
        assert torch.equal(got, want_params[name]), name
    exported = full_weights(model)
    assert exported.keys() >= want_params.keys(), sorted(exported)
    for name, want in want_params.items():
        assert torch.equal(exported[name], want), name
    flex.restore()

    before = _raw(model)
    with torch.no_grad():
        base = _local_value(model(local))
        torch.testing.assert_close(base, _dp_slice(ref(x), dp_rank, 2), **TOL)
        for name in params:
            for kw in (dict(modification_fn=zero_row_5, full_parameter=True),
                       dict(modification_type="noise", noise_scale=0.5, seed=7)):
                with SurgicalTheater(ref, layers=name, params="all", **kw):
                    want = _dp_slice(ref(x), dp_rank, 2)
                with SurgicalTheater(model, layers=actual_names(model)[name], params="all",
                                     **kw):
                    got = _local_value(model(local))
                assert not torch.allclose(want, _dp_slice(ref(x), dp_rank, 2)), (name, kw)
                torch.testing.assert_close(got, want, **TOL,
                                           msg=lambda m, n=name, k=kw: f"{n} {k}: {m}")
                after = _raw(model)
                for key in before:
                    assert torch.equal(after[key], before[key]), (name, kw, key)
                torch.testing.assert_close(_local_value(model(local)), base, rtol=0, atol=0)


# -- 4. uneven last batches across dp ranks on the 2-D mesh ---------------------------------------
@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=4)
def test_fsdp2_x_tp_uneven_dp_batches(mode):
    """dp rank 0 holds 3 rows, dp rank 1 one. FSDP2 averages the two local-mean gradients, so
    the one-process loss is the average of the two slices' means (DDP's convention)."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))

    def ref_loss(y):
        return 0.5 * (y[:3].pow(2).mean() + y[3:].pow(2).mean())

    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, mode, SITES, PARAM_SITES, process_group=local_group(),
                                  loss_fn=ref_loss)
    ref_grads = plain_grads(ref)
    mesh = _mesh_2d()
    dp_rank = mesh.get_local_rank("dp")
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    _fsdp2(model, mesh["dp"], model.blocks)
    rows = slice(0, 3) if dp_rank == 0 else slice(3, None)
    stored, out, _ = _run(model, x[rows], mode, SITES, PARAM_SITES)
    torch.testing.assert_close(out, ref_out.detach()[rows], **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


# -- 5. loss parallel: the head's output stays a DTensor split over the vocabulary ----------------
def _loss_parallel_body(mode, two_d):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    torch.set_default_dtype(torch.float64)
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(2))
    sites = [("head", "forward"), ("blocks.1.down", "full_backward"), ("blocks.1", "forward")]

    ref = plain_net()
    ref_stored, ref_out, _ = _run(
        ref, x, mode, sites, ["head.weight"], process_group=local_group(),
        loss_fn=lambda y: torch.nn.functional.cross_entropy(y, target))
    ref_grads = plain_grads(ref)
    if two_d:
        mesh = _mesh_2d()
        tp_mesh, dp_rank = mesh["tp"], mesh.get_local_rank("dp")
    else:
        tp_mesh, dp_rank = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), 0
    plan = {**dtensor_plan(True),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    model = parallelize_module(plain_net(), tp_mesh, plan)
    dp = 2 if two_d else 1
    if two_d:
        _fsdp2(model, mesh["dp"], model.blocks)
    local_t = _dp_slice(target, dp_rank, dp)
    with loss_parallel():
        stored, out, _ = _run(
            model, _dp_slice(x, dp_rank, dp), mode, sites, ["head.weight"],
            loss_fn=lambda y: torch.nn.functional.cross_entropy(y, local_t))
    torch.testing.assert_close(out.full_tensor(), _dp_slice(ref_out.detach(), dp_rank, dp),
                               **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=4)
def test_loss_parallel_head_under_fsdp2_x_tp(mode):
    _loss_parallel_body(mode, two_d=True)


@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=2)
def test_loss_parallel_head_under_tp(mode):
    _loss_parallel_body(mode, two_d=False)


# -- 6. HSDP: torchtitan's ("dp_replicate", "dp_shard") is one dp axis; other names refused --
_HSDP: dict[int, object] = {}


def _hsdp_mesh():
    """The 2 x 2 ``("dp_replicate", "dp_shard")`` mesh, once per pool rank (see ``_mesh_2d``)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = id(dist.distributed_c10d._get_default_group())
    if world not in _HSDP:
        _HSDP[world] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate",
                                                                       "dp_shard"))
    return _HSDP[world]


@pytest.mark.parametrize("mode", [None, "leader", "replicated"])
@distributed(world_size=4)
def test_hsdp_hooks_equal_one_process(mode):
    """Each rank holds a quarter of the batch: dp rank = replicate rank * 2 + shard rank."""
    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, mode, SITES, PARAM_SITES, process_group=local_group())
    ref_grads = plain_grads(ref)
    mesh = _hsdp_mesh()
    dp_rank = mesh.get_local_rank("dp_replicate") * 2 + mesh.get_local_rank("dp_shard")
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    stored, out, flex = _run(model, _dp_slice(x, dp_rank, 4), mode, SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 4, "tp": 1, "pp": 1}
    torch.testing.assert_close(out, _dp_slice(ref_out.detach(), dp_rank, 4), **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


@distributed(world_size=4)
def test_hsdp_whole_parameters_and_surgery_equal_one_process():
    from flex_surgery.export import full_weights
    from flex_surgery.surgery import SurgicalTheater

    torch.set_default_dtype(torch.float64)
    ref = plain_net()
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    mesh = _hsdp_mesh()
    dp_rank = mesh.get_local_rank("dp_replicate") * 2 + mesh.get_local_rank("dp_shard")
    model = plain_net()
    model = _fsdp2(model, mesh, model.blocks)
    local = _dp_slice(x, dp_rank, 4)
    want_params = {clean(n): p.detach() for n, p in ref.named_parameters()}
    flex = FlexModel(model, {})
    for name in want_params:
        assert torch.equal(flex.get_module_parameter(actual_names(model)[name]),
                           want_params[name]), name
    exported = full_weights(model)
    for name, want in want_params.items():
        assert torch.equal(exported[name], want), name
    flex.restore()
    before = _raw(model)
    with torch.no_grad():
        for name in ["blocks.0.up.weight", "blocks.1.down.bias", "head.weight"]:
            for kw in (dict(modification_fn=zero_row_5, full_parameter=True),
                       dict(modification_type="noise", noise_scale=0.5, seed=7)):
                with SurgicalTheater(ref, layers=name, params="all", **kw):
                    want = _dp_slice(ref(x), dp_rank, 4)
                with SurgicalTheater(model, layers=actual_names(model)[name], params="all",
                                     **kw):
                    got = model(local)
                torch.testing.assert_close(got, want, **TOL,
                                           msg=lambda m, n=name, k=kw: f"{n} {k}: {m}")
                after = _raw(model)
                for key in before:
                    assert torch.equal(after[key], before[key]), (name, kw, key)


@distributed(world_size=8)
def test_hsdp_x_tp_on_torchtitans_mesh_equals_one_process():
    """torchtitan's ``("dp_replicate", "dp_shard", "tp")`` mesh, 2 x 2 x 2: TP inside, HSDP
    over the rest; position-dependent edits at every hook kind and the gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(BATCH, 3, H, generator=torch.Generator().manual_seed(1))
    ref = plain_net()
    ref_stored, ref_out, _ = _run(ref, x, "leader", SITES, PARAM_SITES,
                                  process_group=local_group())
    ref_grads = plain_grads(ref)
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_rank = mesh.get_local_rank("dp_replicate") * 2 + mesh.get_local_rank("dp_shard")
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    model = _fsdp2(model, mesh["dp_replicate", "dp_shard"], model.blocks)
    stored, out, flex = _run(model, _dp_slice(x, dp_rank, 4), "leader", SITES, PARAM_SITES)
    assert flex.runtime.mesh.sizes == {"dp": 4, "tp": 2, "pp": 1}
    torch.testing.assert_close(_local_value(out), _dp_slice(ref_out.detach(), dp_rank, 4),
                               **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    assert_grads_equal(_dtensor_grads(model), ref_grads, **TOL)


@distributed(world_size=4)
def test_hsdp_with_unknown_dim_names_is_refused_on_every_rank():
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicas", "shards"))
    model = _fsdp2(plain_net(), mesh, [])
    with pytest.raises(ValueError, match="not mapped"):
        FlexModel(model, {})


# -- 7. a parameter's mesh object can be an earlier model's equal mesh -------------------------
@distributed(world_size=4)
def test_tp_mesh_is_not_taken_for_an_earlier_dp_x_tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.mesh import MeshSizeError

    torch.set_default_dtype(torch.float64)
    # an earlier model on a ("dp", "tp") mesh, in the same process
    earlier = parallelize_module(plain_net(), _mesh_2d()["tp"], dtensor_plan(True))
    FlexModel(earlier, {}).restore()
    del earlier
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    ref_stored, _, _ = _run(plain_net(), x, None, [("head", "forward_pre")],
                            process_group=local_group())
    # every rank of a "rep" row feeds the same batch: tensor parallel only, replicated twice
    tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "tp"))["tp"]
    model = parallelize_module(plain_net(), tp_mesh, dtensor_plan(True))
    stored: dict = {}
    try:
        flex = FlexModel(model, stored)
    except (MeshSizeError, ValueError):
        return  # refused on every rank (what happens without the earlier mesh): fine
    flex.register_forward_pre_hook(HookFunction("head"))
    with torch.no_grad():
        flex(x)
    if dist.get_rank() == 0:
        got = stored["head"][0]
        assert got.shape == ref_stored["head"][0].shape, (got.shape, flex.runtime.mesh.sizes)
        torch.testing.assert_close(got, ref_stored["head"][0], **TOL)


def _forget_dtensor_specs():
    """Empty torch's sharding-propagation caches (Python and the C++ fast path's), so the next
    model's specs are computed anew (and then cached with its own mesh)."""
    from torch.distributed.tensor import DTensor

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()


@distributed(world_size=4)
def test_dp_x_tp_mesh_is_adopted_after_an_earlier_unnamed_replica_mesh():
    """The mirror case: the earlier model's TP mesh comes from a ``("rep", "tp")`` mesh, and
    this model's parameters are handed that mesh object; the ``("dp", "tp")`` mesh this model
    was parallelised on is still adopted (dp=2, the replicas' batches joined), and the
    hooks equal one process on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    _forget_dtensor_specs()
    rep_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "tp"))["tp"]
    earlier = parallelize_module(plain_net(), rep_tp, dtensor_plan(True))
    del earlier
    mesh = _mesh_2d()
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    handed = next(p for p in model.parameters()).device_mesh
    assert handed is rep_tp, "torch no longer hands out an equal earlier mesh: case not exercised"
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
    ref_stored, ref_out, _ = _run(plain_net(), x, "leader", [("head", "forward_pre")],
                                  process_group=local_group())
    dp_rank = mesh.get_local_rank("dp")
    stored, out, flex = _run(model, _dp_slice(x, dp_rank, 2), "leader", [("head", "forward_pre")])
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    torch.testing.assert_close(_local_value(out), _dp_slice(ref_out.detach(), dp_rank, 2), **TOL)
    _compare_stored(stored, ref_stored, **TOL)
    _forget_dtensor_specs()
