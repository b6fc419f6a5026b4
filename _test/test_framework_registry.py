"""The framework registry: its protocol, and "unknown means error".

Protocol: every framework answers "not mine" for plain modules; asking the registry never
imports a framework library; each framework owns its layers, says how their activations and
parameters are split, and adopts its groups; a Megatron parameter it cannot map (interleaved
partitions) is refused.

Unknown means error, each case at TP=2 with Megatron-core's groups: a module whose parameters
differ across the TP ranks but that no framework owns, a TP activation that a module reshapes,
and a sequence-parallel activation that nothing declares. Hooks on them (and on what follows),
the full parameter, surgery with ``full_parameter`` and export's whole weights raise an error
that names the module and says how to declare the layout, on every rank, and leave nothing
modified; with the declared ``expected_shape`` the hooks equal one process. Before the registry
each of these stored or returned rank 0's piece as if it were the whole tensor.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron_cases import FF, B, H, S, megatron_mlp, megatron_parallel, plain_mlp, token_ids
from rank_pool import distributed
from torch import nn

from flex_surgery.export import full_weights
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel import frameworks
from flex_surgery.parallel.layout import LayoutError, LayoutInference
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.surgery import SurgicalTheater

TOL = dict(rtol=1e-6, atol=1e-6)


# -- the protocol --------------------------------------------------------------------------------
def test_plain_modules_belong_to_no_framework():
    lin = nn.Linear(3, 4)
    assert frameworks.owner(lin) is None
    assert all(not f.owns(lin) for f in frameworks.FRAMEWORKS)
    assert frameworks.wrapper_kind(lin) is None
    assert frameworks.batch_dim(lin) == 0
    assert not frameworks.sequence_parallel(lin)
    assert not frameworks.substitutes_parameters(lin)
    tied = nn.Linear(3, 4, bias=False)
    tied.weight = lin.weight
    views = frameworks.parameter_views(nn.Sequential(lin, tied))  # tied: once, with its alias
    assert [(v.name, v.aliases, v.kind) for v in views] == [
        ("0.weight", ("1.weight",), "plain"), ("0.bias", (), "plain")]
    assert torch.equal(views[0].gather(), lin.weight)


def test_asking_the_registry_imports_no_framework_library():
    code = ("import sys; from torch import nn; from flex_surgery.parallel import frameworks as f; "
            "m = nn.Sequential(nn.Linear(2, 2)); f.parameter_views(m); f.owner(m[0]); "
            "f.adopt_groups(m); f.sequence_parallel(m); "
            "print(sorted(n for n in ('fairscale', 'megatron') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_megatron_interleaved_partitions_are_refused_where_joined_end_to_end():
    """``partition_stride > 1`` interleaves partitions: callers that join the ranks' pieces end
    to end (gradient layouts, the lens) get an error rather than a wrong block. Parameter views
    map the blocks themselves (``test_megatron_gated_mlp.py``)."""
    import megatron.core.tensor_parallel  # noqa: F401  (loads the framework's classes)

    lin = nn.Linear(4, 4)
    lin.weight.tensor_model_parallel, lin.weight.partition_dim = True, 0
    lin.weight.partition_stride = 2
    assert frameworks.owner(lin) is frameworks.MEGATRON
    with pytest.raises(frameworks.MegatronLayoutError, match="partition_stride=2"):
        frameworks.tp_partition_dim(lin, lin.weight)
    mesh = SimpleNamespace(tp_size=2, dp_size=1, pp_size=1, rank=lambda axis: 0,
                           size=lambda axis: 2 if axis == "tp" else 1)
    with pytest.raises(frameworks.MegatronLayoutError, match="partition_stride=2"):
        LayoutInference(mesh, 1).layout(lin.weight, lin, "param_grad", parameter=lin.weight)
    # one family of layout errors: ``except LayoutError`` catches it, as it catches the others
    with pytest.raises(frameworks.LayoutError, match="partition_stride=2"):
        frameworks.tp_partition_dim(lin, lin.weight)
    with pytest.raises(NotImplementedError, match="partition_stride=2"):
        frameworks.tp_partition_dim(lin, lin.weight)
    lin.weight.partition_stride = 0
    with pytest.raises(frameworks.MegatronLayoutError, match="positive integer"):
        frameworks.tp_partition_dim(lin, lin.weight)
    lin.weight.partition_stride = 1
    assert frameworks.tp_partition_dim(lin, lin.weight) == 0
    assert frameworks.tp_partition_dim(lin, lin.bias) is None


def _grouped_mlp_stand_in() -> nn.Module:
    """A Megatron ``GroupedMLP`` as far as its parameters go (building a real one needs the
    ``grouped_gemm`` package): ``weight1`` split along dim 1, whose columns hold every local
    expert's part one after the other."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    module = GroupedMLP.__new__(GroupedMLP)
    nn.Module.__init__(module)
    module.weight1 = nn.Parameter(torch.randn(4, 8))
    module.weight1.tensor_model_parallel, module.weight1.partition_dim = True, 1
    module.weight1.partition_stride, module.weight1.allreduce = 1, True
    return module


@distributed(world_size=2)
def test_megatron_grouped_mlp_weights_are_refused_under_tp():
    """Under TP its weights are not the ranks' pieces joined end to end (each rank holds its
    part of every expert), and nothing on them says so: refused for views (whole parameters,
    surgery, export) and gradient layouts rather than joined wrongly."""
    module = _grouped_mlp_stand_in()
    with megatron_parallel(2):
        with pytest.raises(frameworks.MegatronLayoutError, match="GroupedMLP"):
            frameworks.parameter_views(module)
        with pytest.raises(frameworks.MegatronLayoutError, match="GroupedMLP"):
            frameworks.tp_partition_dim(module, module.weight1)


@distributed(world_size=2)
def test_each_framework_answers_for_its_layers():
    with megatron_parallel(2):
        model = megatron_mlp()
        mesh = ParallelMesh.adopt(model)
        assert mesh.source == "megatron" and mesh.tp_size == 2
        up, down, embed = model.up, model.down, model.embed
        assert {frameworks.owner(m) for m in (up, down, embed)} == {frameworks.MEGATRON}
        assert frameworks.owner(model.act) is None
        col, row = frameworks.tp_layer(up, mesh), frameworks.tp_layer(down, mesh)
        assert col.input is None and col.output.dim == frameworks.HIDDEN
        assert col.output.full == FF and col.exact
        assert row.input.full == FF and row.output is None
        assert frameworks.batch_dim(model) == 1
        views = {v.name: v for v in frameworks.parameter_views(model)}
        assert {n: (v.kind, v.partition_dim) for n, v in views.items()} == {
            "embed.weight": ("megatron", 0), "up.weight": ("megatron", 0),
            "up.bias": ("megatron", 0), "down.weight": ("megatron", 1),
            "down.bias": ("plain", None)}
        assert views["up.weight"].full_shape == (FF, H)
        assert views["up.weight"].region.offsets == (FF // 2 * dist.get_rank(), 0)
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel import layers as fs

    fs_init.initialize_model_parallel(2)
    col = fs.ColumnParallelLinear(H, FF, gather_output=False)
    mesh = ParallelMesh.adopt(col)
    assert mesh.source == "fairscale"
    assert frameworks.owner(col) is frameworks.FAIRSCALE
    assert frameworks.tp_layer(col, mesh).output.full == FF
    assert frameworks.parameter_views(col)[0].kind == "fairscale"


# -- unknown means error -------------------------------------------------------------------------
def _first(out):
    return out[0] if isinstance(out, tuple) else out


class HandSplitLinear(nn.Linear):
    """This rank's rows of a column-parallel linear, cut by hand: no framework knows it."""

    def forward(self, x):
        return super().forward(x), None


def _hand_split(plain: nn.Linear) -> HandSplitLinear:
    tp, r = dist.get_world_size(), dist.get_rank()
    n = plain.out_features // tp
    lin = HandSplitLinear(plain.in_features, n)
    with torch.no_grad():
        lin.weight.copy_(plain.weight[r * n:(r + 1) * n])
        lin.bias.copy_(plain.bias[r * n:(r + 1) * n])
    return lin


def _megatron_tagged(plain: nn.Linear) -> HandSplitLinear:
    """This rank's rows of ``plain``, tagged the way Megatron tags the split parameters of
    layers it has no class for here (Transformer-Engine linears, MoE ``GroupedMLP``): the
    parameters say how they are split, nothing says how the activations are."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    lin = _hand_split(plain)
    for p in (lin.weight, lin.bias):
        set_tensor_model_parallel_attributes(p, True, 0, 1)
    return lin


class SplitHeads(nn.Module):
    """``[s, b, n]`` -> ``[s, b, heads, n / heads]``: a reshape of a TP-sharded activation."""

    def forward(self, x):
        return x.unflatten(-1, (-1, 8))


class ScatterSequence(nn.Module):
    """Megatron's functional scatter onto the sequence dim (identity for the unsharded twin):
    what comes out is sequence-sharded, but no module's attributes say so."""

    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded

    def forward(self, x):
        if not self.sharded:
            return x
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        return scatter_to_sequence_parallel_region(x)


class Pipeline(nn.Module):
    """``embed -> [scatter] -> up -> act -> [heads -> merge] -> down``, for both twins."""

    def __init__(self, mlp: nn.Module, heads: bool = False, scatter: nn.Module | None = None):
        super().__init__()
        self.embed, self.up, self.act, self.down = mlp.embed, mlp.up, mlp.act, mlp.down
        self.scatter = scatter if scatter is not None else nn.Identity()
        self.heads = SplitHeads() if heads else nn.Identity()

    def forward(self, ids):
        x = self.scatter(self.embed(ids.transpose(0, 1)))
        h = self.heads(self.act(_first(self.up(x))))
        return _first(self.down(h.flatten(2) if h.dim() == 4 else h))


def _stored(model: nn.Module, name: str, expected_shape=None) -> torch.Tensor | None:
    stored: dict = {}
    flex = FlexModel(model, stored)
    try:
        flex.register_forward_hook(HookFunction(name, expected_shape=expected_shape))
        flex(token_ids())
        return stored[name][0] if stored else None
    finally:
        flex.restore()


def _raises_everywhere(fn, module_name: str) -> None:
    """``fn`` fails on every rank, with a message that names the module and the remedy (the
    ranks that could not tell say so; the others learn it from them)."""
    with pytest.raises(LayoutError) as info:
        fn()
    if isinstance(info.value, frameworks.UnknownLayoutError):
        assert module_name in str(info.value) and "expected_shape" in str(info.value)


def _check_hooks(model, twin, unknown: list[str], declared: dict[str, tuple]):
    for name in unknown:
        _raises_everywhere(lambda n=name: _stored(model, n), name)
    for name, shape in declared.items():
        got, want = _stored(model, name, shape), _stored(twin, name)
        if dist.get_rank() == 0:
            assert got.shape == want.shape == shape
            torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=2)
def test_a_split_module_no_framework_owns_is_an_error():
    """A hand-split column linear: hooks on it and after it, its full parameter, surgery with
    ``full_parameter`` and export raise (before: rank 0's half stored / returned as whole)."""
    with megatron_parallel(2):
        plain = plain_mlp()
        mlp = megatron_mlp(plain)
        mlp.up = _hand_split(plain.up)
        model, twin = Pipeline(mlp), Pipeline(plain_mlp())
        with torch.no_grad():
            assert list(frameworks.split_unknown_modules(
                model, frameworks.tensor_parallel_group())) == ["up"]
        _check_hooks(model, twin, unknown=["up", "act"],
                     declared={"up": (S, B, FF), "act": (S, B, FF)})
        flex = FlexModel(model, {})
        try:
            with pytest.raises(frameworks.UnknownLayoutError, match="'up.weight'.*expected_shape"):
                flex.get_module_parameter("up.weight")
            assert torch.equal(flex.get_module_parameter("down.weight"), plain.down.weight)
        finally:
            flex.restore()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(frameworks.UnknownLayoutError, match="'up.weight'"):
            with SurgicalTheater(model, layers="up.weight", full_parameter=True,
                                 modification_fn=lambda w: torch.zeros_like(w)):
                pass
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n  # nothing left modified
        with pytest.raises(frameworks.UnknownLayoutError, match="'up.weight'"):
            full_weights(model)


@distributed(world_size=2)
def test_a_reshaped_tp_activation_is_an_error_unless_declared():
    """The column output reshaped into heads: its last dim is no longer the column's shard
    (before: stored as replicated -- rank 0's heads only)."""
    with megatron_parallel(2):
        model = Pipeline(megatron_mlp(), heads=True)
        twin = Pipeline(plain_mlp(), heads=True)
        _check_hooks(model, twin, unknown=["heads"], declared={"heads": (S, B, FF // 8, 8)})


class Energy(nn.Module):
    """A scalar of its input: under TP, of this rank's shard only (a partial sum)."""

    def forward(self, x):
        return x.pow(2).sum()


class ScalarAfterShard(Pipeline):
    """``Pipeline`` with a scalar computed from the column output on the side."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__(mlp)
        self.energy = Energy()

    def forward(self, ids):
        h = self.act(_first(self.up(self.embed(ids.transpose(0, 1)))))
        self.energy(h)
        return _first(self.down(h))


@distributed(world_size=2)
def test_a_scalar_of_a_tp_shard_is_an_error():
    """A scalar computed from a column-parallel output holds one rank's share (before: stored
    as replicated -- rank 0's partial sum as the whole)."""
    with megatron_parallel(2):
        _check_hooks(ScalarAfterShard(megatron_mlp()), ScalarAfterShard(plain_mlp()),
                     unknown=["energy"], declared={})


@distributed(world_size=2)
def test_an_undeclared_sequence_parallel_activation_is_an_error():
    """A functional scatter onto the sequence dim in a sequence-parallel model: the tensor's
    shape is not the replicated one before it, and nothing says how it is split (before:
    rank 0's half of the sequence stored as the whole)."""
    with megatron_parallel(2):
        plain = plain_mlp()
        sp, replicated_embedding = megatron_mlp(plain, True), megatron_mlp(plain, False)
        sp.embed = replicated_embedding.embed
        model = Pipeline(sp, scatter=ScatterSequence(True))
        twin = Pipeline(plain_mlp(), scatter=ScatterSequence(False))
        _check_hooks(model, twin, unknown=["scatter"], declared={"scatter": (S, B, H)})
        # what the TP layers declare needs no hint: the row output is sequence-sharded
        got, want = _stored(model, "down"), _stored(twin, "down")
        if dist.get_rank() == 0:
            torch.testing.assert_close(got, want, **TOL)


@distributed(world_size=4)
def test_megatron_pipeline_groups_are_adopted_in_its_rank_order():
    """TP=2 x PP=2: Megatron orders ranks (pp, dp, tp); the stage group (which Megatron does
    not have) holds one stage's ranks."""
    from megatron.core import parallel_state

    with megatron_parallel(2, pipeline_parallel=2):
        mesh = ParallelMesh.adopt(None)
        rank = dist.get_rank()
        assert mesh.source == "megatron"
        assert mesh.sizes == {"dp": 1, "tp": 2, "pp": 2}
        assert mesh.stage == parallel_state.get_pipeline_model_parallel_rank() == rank // 2
        assert dist.get_process_group_ranks(mesh.group("tp")) == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert dist.get_process_group_ranks(mesh.group("pp")) == [rank % 2, rank % 2 + 2]
        assert dist.get_process_group_ranks(mesh.stage_group) == \
            dist.get_process_group_ranks(mesh.group("tp"))
        for group in mesh.created_groups():
            dist.destroy_process_group(group)


@distributed(world_size=2)
def test_a_split_module_megatron_does_not_describe_is_an_error():
    """A column shard whose parameters carry Megatron's split attributes but whose class no
    layer description covers: Megatron owns it, yet hooks on it and after it raise (before:
    the previous layer's layout, replicated -- rank 0's half stored as the whole) unless
    declared; its parameters' split is known, so whole parameters are right."""
    with megatron_parallel(2):
        plain = plain_mlp()
        mlp = megatron_mlp(plain)
        mlp.up = _megatron_tagged(plain.up)
        model, twin = Pipeline(mlp), Pipeline(plain_mlp())
        assert frameworks.owner(mlp.up) is frameworks.MEGATRON
        assert frameworks.tp_layer(mlp.up, ParallelMesh.adopt(model)) is None
        _check_hooks(model, twin, unknown=["up", "act"],
                     declared={"up": (S, B, FF), "act": (S, B, FF)})
        flex = FlexModel(model, {})
        try:
            assert torch.equal(flex.get_module_parameter("up.weight"), plain.up.weight)
            assert torch.equal(flex.get_module_parameter("up.bias"), plain.up.bias)
        finally:
            flex.restore()


@distributed(world_size=2)
def test_a_gradient_hook_on_interleaved_megatron_partitions_is_an_error():
    """``partition_stride > 1``: the hook on the parameter's gradient raises (before: the
    interleaved blocks joined end to end as if split in one block per rank)."""
    with megatron_parallel(2):
        model = megatron_mlp()
        model.up.weight.partition_stride = 2
        flex = FlexModel(model, {})
        try:
            with pytest.raises(frameworks.MegatronLayoutError, match="partition_stride=2"):
                flex.register_hook(HookFunction("up.weight"))
                flex(token_ids()).sum().backward()
        finally:
            flex.restore()


@distributed(world_size=2)
def test_a_parameter_of_a_split_module_is_an_error_even_where_ranks_agree():
    """A hand-cut column shard with a zero bias: the biases are equal on both ranks, but each
    is this rank's piece of a longer one. The verdict is the module's: its bias raises like
    its weight (before: the local ``(FF / tp,)`` piece returned as the whole bias)."""
    with megatron_parallel(2):
        plain = plain_mlp()
        with torch.no_grad():
            plain.up.bias.zero_()
        mlp = megatron_mlp(plain)
        mlp.up = _hand_split(plain.up)
        model = Pipeline(mlp)
        tp = frameworks.tensor_parallel_group()
        with torch.no_grad():
            assert list(frameworks.split_unknown_modules(model, tp)) == ["up"]
            assert frameworks.differs_across([mlp.up.bias], tp) == [False]
        for name in ("up.bias", "up.weight"):
            with pytest.raises(frameworks.UnknownLayoutError, match=f"'{name}'.*expected_shape"):
                frameworks.full_parameter(model, name, model.get_parameter(name), mlp.up, tp)
        assert torch.equal(frameworks.full_parameter(model, "down.bias", mlp.down.bias,
                                                     mlp.down, tp), plain.down.bias)
        flex = FlexModel(model, {})
        try:
            with pytest.raises(frameworks.UnknownLayoutError, match="'up.bias'"):
                flex.get_module_parameter("up.bias")
        finally:
            flex.restore()
        before = mlp.up.bias.detach().clone()
        with pytest.raises(frameworks.UnknownLayoutError, match="'up.bias'"):
            with SurgicalTheater(model, layers="up.bias", full_parameter=True,
                                 modification_fn=lambda b: b + 1):
                pass
        assert torch.equal(mlp.up.bias, before)


class FullyShardedDataParallel(nn.Module):
    """Stands for a sharding wrapper no framework module describes (Megatron's own FSDP, a
    DeepSpeed engine): by its name alone it says it shards."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@distributed(world_size=2)
def test_an_unknown_sharding_wrapper_or_zero3_parameter_is_an_error():
    """An FSDP-like wrapper no framework owns, or a parameter carrying DeepSpeed ZeRO-3's
    placeholders: FlexModel refuses to build (every rank alike, no collective needed) and whole
    parameters are refused, instead of treating local pieces as whole; nothing is left bound."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    wrapped = FullyShardedDataParallel(net)
    with pytest.raises(frameworks.UnknownLayoutError, match="sharding wrapper no framework"):
        FlexModel(wrapped, {}, data_parallel_size=2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wrapped.modules())

    net[0].weight.ds_id = 7  # what ZeRO-3 leaves on a partitioned parameter
    try:
        with pytest.raises(frameworks.UnknownLayoutError, match="ZeRO-3"):
            FlexModel(net, {}, data_parallel_size=2)
        with pytest.raises(frameworks.UnknownLayoutError, match="whether 0.weight is whole"):
            frameworks.parameter_view("0.weight", net[0], "weight", net[0].weight)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    finally:
        del net[0].weight.ds_id
    flex = FlexModel(net, {}, data_parallel_size=2)  # the same model, unmarked, is fine
    flex.close()


@distributed(world_size=2)
def test_megatron_expert_parallelism_is_refused_on_every_rank():
    """ep = 2: each rank's ``local_experts.N`` are other experts under the same names, which
    would be gathered (or edited) as one; refused when FlexModel adopts the groups."""
    with megatron_parallel(1, expert_parallel=2):
        with pytest.raises(frameworks.MegatronLayoutError, match="expert parallelism"):
            FlexModel(Pipeline(megatron_mlp()), {})
