"""Second reading of 2062339 (DTensor sequence parallelism described): a torch ParallelStyle
that declares ``output_layouts=Shard(1)`` and no partial sum now describes its output as each
rank's ``torch.chunk`` of dim 1 (sizes exchanged), where such layers were refused before.

Every check compares a DTensor run with one process of the same weights and inputs (float64):
the values hooks store (rank 0), the output, and every parameter's whole gradient -- or accepts
a refusal (LayoutError / UnknownLayoutError) raised on every rank where nothing can tell the
split. Covered: a torchtitan-like model (SequenceParallel norms, PrepareModuleInput, q/k/v and
w1/w3 column-wise, wo and w2 ``RowwiseParallel(output_layouts=Shard(1))``, the embedding
``RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))``, the output column
layer replicated or loss-parallel) with a hook of every kind on every module, editing on the
leader or replicated, parameter-gradient hooks, FSDP2 x TP on a ``("dp", "tp")`` mesh;
``ColwiseParallel(output_layouts=Shard(1))`` (also on an Embedding); ``Shard(1)`` of a 2-D
``[tokens, h]`` output (the hidden dim) and of a seq-first ``[s, b, h]`` one (the batch);
sequences tp does not divide (one rank's piece empty); ``use_local_output=False``; tensors
derived from a sequence piece (views, slices, reductions, transposes, a concatenation), and
layouts spelled other than ``Shard(1)``.

Strict xfails pin silent wrong values (and one wrong refusal) found here; see each reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import local_group
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.frameworks.dtensor import is_dtensor
from flex_surgery.parallel.layout import LayoutError

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
H, HEADS, FF, V = 8, 2, 16, 11
KINDS = ("forward", "forward_pre", "full_backward", "full_backward_pre")
MODES = [None, "leader", "replicated"]

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook"}


def position_edit(module, t, ctx, modules):
    """x1.5 plus a ramp over every element: a piece put back in the wrong place shows."""
    if not t.is_floating_point():
        return t
    ramp = torch.linspace(0, 1, t.numel(), dtype=t.dtype, device=t.device)
    return t * 1.5 + ramp.view(t.shape)


def small_edit(module, t, ctx, modules):
    """A small position-dependent shift (for many editing hooks at once: they compound)."""
    if not t.is_floating_point():
        return t
    return t + 1e-3 * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)


def _full(t):
    return t.full_tensor() if is_dtensor(t) else t


def _lin(i, o, g, bias=True):
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g) * 0.1)
    return lin


def _tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))


_MESHES: dict[int, object] = {}


def _mesh_2d():
    """The 2 x 2 ``("dp", "tp")`` mesh, made once per pool rank (see test_fsdp2_tp_mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = id(dist.distributed_c10d._get_default_group())
    if world not in _MESHES:
        _MESHES[world] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return _MESHES[world]


def _run(model, x, hooks, loss="sum", params=(), edit=position_edit, **kw):
    """hooks: [(name, kind, mode)], mode None / "leader" / "replicated"; params: parameter
    names with a gradient hook (editing when ``edit`` is given). Returns (stored, whole
    output, whole parameter gradients)."""
    stored = {}
    x = x.clone().requires_grad_(x.is_floating_point())
    with FlexModel(model, stored, key_by_hook_kind=True, **kw) as flex:
        for name, kind, mode in hooks:
            getattr(flex, _REGISTER[kind])(HookFunction(
                name, editing_function=edit if mode else None,
                replicate_edit=mode == "replicated"))
        for name in params:
            flex.register_hook(HookFunction(name, editing_function=edit))
        out = flex(x)
        getattr(_full(out).pow(2), loss)().backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return stored, _full(out).detach(), grads


def _attempt(fn):
    """fn() or the LayoutError it raised, agreed on every rank (a refusal on some ranks only
    is a failure by itself)."""
    try:
        got, err = fn(), None
    except LayoutError as exc:  # UnknownLayoutError is one
        got, err = None, str(exc)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    assert all(e is None for e in errs) or all(e is not None for e in errs), errs
    return got, err


def _compare(want, got, what=""):
    if dist.get_rank() == 0:
        assert got[0].keys() == want[0].keys(), (what, sorted(got[0]), sorted(want[0]))
        for k, w in want[0].items():
            assert len(got[0][k]) == len(w), (what, k)
            for a, b in zip(got[0][k], w):
                assert a.shape == b.shape, (what, k, tuple(a.shape), tuple(b.shape))
                torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")
    else:
        assert got[0] == {}, sorted(got[0])
    torch.testing.assert_close(got[1], want[1], **TOL, msg=lambda m: f"{what} output: {m}")
    assert got[2].keys() == want[2].keys(), what
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], **TOL,
                                   msg=lambda m, n=n: f"{what} grad {n}: {m}")


def _agreed_compare(want, got, what=""):
    """:func:`_compare` on every rank, failing on every rank if it fails on one (a rank that
    went on to the next forward alone would wait for its peers until the pool's timeout)."""
    try:
        _compare(want, got, what)
        failure = None
    except AssertionError as exc:
        failure = f"rank {dist.get_rank()}: {exc}"
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failures = [f for f in failures if f is not None]
    assert not failures, "\n".join(failures)


def _equal_or_refused(want, fn, hooks, allow_refusal):
    got, err = _attempt(fn)
    if err is not None:
        assert allow_refusal, err
        assert any(f"'{name}'" in err for name, *_ in hooks), err
        return "refused"
    _agreed_compare(want, got, str(hooks))
    return "equal"


# == a torchtitan-like model ================================================================
class Attention(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (_lin(H, H, g, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        hd = H // HEADS
        q, k, v = (w(x).view(b, s, -1, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.w1, self.w3 = _lin(H, FF, g, bias=False), _lin(H, FF, g, bias=False)
        self.w2 = _lin(FF, H, g, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(H), nn.RMSNorm(H)
        with torch.no_grad():
            self.attention_norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
            self.ffn_norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
        self.attention, self.feed_forward = Attention(g), FeedForward(g)
        self.resid = DummyModule()  # a hook point on the (sequence-split) residual stream

    def forward(self, x):
        h = self.resid(x + self.attention(self.attention_norm(x)))
        return h + self.feed_forward(self.ffn_norm(h))


class Titan(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok_embeddings = nn.Embedding(V, H)
        with torch.no_grad():
            self.tok_embeddings.weight.copy_(torch.randn(V, H, generator=g))
        self.layers = nn.ModuleList([TitanBlock(g) for _ in range(2)])
        self.norm = nn.RMSNorm(H)
        self.output = _lin(H, V, g, bias=False)

    def forward(self, ids):
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def titan_plan(out="replicate"):
    """torchtitan's Llama plan (``apply_tp``), one-input attention."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(),
                                              output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1),
                                      output_layouts=Replicate() if out == "replicate"
                                      else Shard(-1),
                                      use_local_output=out == "replicate")}
    for i in range(2):
        p = f"layers.{i}."
        plan.update({
            p + "attention_norm": SequenceParallel(),
            p + "attention": PrepareModuleInput(input_layouts=(Shard(1),),
                                                desired_input_layouts=(Replicate(),)),
            p + "attention.wq": ColwiseParallel(), p + "attention.wk": ColwiseParallel(),
            p + "attention.wv": ColwiseParallel(),
            p + "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            p + "ffn_norm": SequenceParallel(),
            p + "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            p + "feed_forward.w1": ColwiseParallel(), p + "feed_forward.w3": ColwiseParallel(),
            p + "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    return plan


TITAN_MODULES = [n for n, _ in Titan().named_modules() if n and n != "layers"]


def _titan_ids(batch=2, seq=4):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def _titan_tp(out="replicate"):
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(Titan(), _tp_mesh(), titan_plan(out))


@pytest.mark.parametrize("kind", KINDS)
@distributed(world_size=2, timeout_s=90)
def test_titan_every_module_one_hook_at_a_time(kind):
    """A hook of one kind on each module of the torchtitan-like model in turn (no
    expected_shape): stored values, logits and parameter gradients equal one process. The
    embedding, wo and w2 outputs, the residual stream and the SequenceParallel norms' plain
    inputs are sequence pieces now described by the declared Shard(1).

    Each module is read alone, then edited alone on one path: the leader path and the
    replicated one alternate along the modules and swap from one hook kind to the next, so
    each path edits each module under two of the four kinds (every module under every kind and
    both paths at once is test_titan_every_hook_at_once_editing)."""
    torch.set_default_dtype(torch.float64)
    ids = _titan_ids()
    # One sharded model for every module: each FlexModel is closed (its hooks removed) and the
    # gradients cleared before the next one is built.
    model = _titan_tp()
    for i, name in enumerate(TITAN_MODULES):
        if name == "tok_embeddings" and kind == "full_backward":
            continue  # integer ids: no grad_input in one process either
        edit_mode = ("leader", "replicated")[(i + KINDS.index(kind)) % 2]
        for mode in (None, edit_mode):
            hooks = [(name, kind, mode)]
            want = _run(Titan(), ids, hooks, process_group=local_group())
            assert _equal_or_refused(want, lambda m=model, h=hooks: _run(m, ids, h), hooks,
                                     allow_refusal=False) == "equal"


@pytest.mark.parametrize("out", ["replicate", "loss_parallel"])
@pytest.mark.parametrize("mode", ["leader", "replicated"])
@distributed(world_size=2, timeout_s=60)
def test_titan_every_hook_at_once_editing(mode, out):
    """Forward, forward-pre, full-backward and full-backward-pre editing hooks on every module
    at once (small edits: they compound), with the output column layer replicated or
    loss-parallel (``Shard(-1)``, a DTensor)."""
    torch.set_default_dtype(torch.float64)
    ids = _titan_ids()
    hooks = [(n, k, mode) for n in TITAN_MODULES for k in KINDS
             if not (n == "tok_embeddings" and k == "full_backward")]
    want = _run(Titan(), ids, hooks, edit=small_edit, process_group=local_group())
    model = _titan_tp(out)
    got, err = _attempt(lambda: _run(model, ids, hooks, edit=small_edit))
    assert err is None, err
    _compare(want, got)


@pytest.mark.parametrize("edit", [False, True], ids=["read", "edit"])
@distributed(world_size=2, timeout_s=60)
def test_titan_parameter_gradient_hooks(edit):
    """A gradient hook on each parameter (sequence-parallel embedding and row layers, the
    SequenceParallel norms' replicated weights): the whole gradient stored, or edited once."""
    torch.set_default_dtype(torch.float64)
    ids = _titan_ids()
    for name, _ in Titan().named_parameters():
        kw = dict(params=[name], edit=position_edit if edit else None)
        want = _run(Titan(), ids, [], process_group=local_group(), **kw)
        model = _titan_tp()
        got, err = _attempt(lambda m=model, kw=kw: _run(m, ids, [], **kw))
        assert err is None, err
        _agreed_compare(want, got, name)


TITAN_2D_SITES = [("tok_embeddings", "forward"), ("layers.0", "forward_pre"),
                  ("layers.0.attention.wo", "forward"), ("layers.0.resid", "full_backward"),
                  ("layers.1.ffn_norm", "forward_pre"),
                  ("layers.1.feed_forward.w2", "full_backward_pre"), ("norm", "forward"),
                  ("output", "forward")]


@pytest.mark.parametrize("mode", MODES)
@distributed(world_size=4, timeout_s=90)
def test_titan_fsdp2_x_tp_batch_over_dp(mode):
    """FSDP2 x TP on a 2 x 2 ``("dp", "tp")`` mesh, the batch split over dp and each replica's
    sequence over tp: hooks on sequence pieces (the embedding, wo, the residual, w2's
    gradient, the final norm) join tp on dim 1, then dp on dim 0."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    ids = _titan_ids(batch=4)
    hooks = [(n, k, mode) for n, k in TITAN_2D_SITES]
    want = _run(Titan(), ids, hooks, loss="mean", process_group=local_group())
    mesh = _mesh_2d()
    dp = mesh.get_local_rank("dp")
    model = parallelize_module(Titan(), mesh["tp"], titan_plan())
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    got, err = _attempt(lambda: _run(model, ids[2 * dp:2 * dp + 2], hooks, loss="mean"))
    assert err is None, err
    _compare((want[0], want[1][2 * dp:2 * dp + 2], want[2]), got)


# == small models: other layers that declare Shard(1), and other dims it means ===============
class Mini(nn.Module):
    def __init__(self, variant):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(V, H)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(V, H, generator=g))
        self.inp = _lin(H, H, g)
        self.up, self.down = _lin(H, FF, g), _lin(FF, H, g)
        self.act = nn.GELU()
        self.head = _lin(H, H, g)
        self.point = DummyModule()
        self.variant = variant

    def forward(self, x):
        v = self.variant
        if v == "colseq":  # a column layer's output redistributed onto the sequence
            return x + self.down(self.act(self.up(x)))
        if v == "emb_col":
            return self.head(self.point(self.emb(x)))
        if v in ("tokens2d", "seqfirst"):
            return self.head(self.point(self.act(self.inp(x))))
        if v.startswith(("uneven", "row_")):  # the output stays split
            return self.point(self.down(self.act(self.up(x))))
        if v.startswith("col_"):
            return self.point(self.act(self.up(x)))
        if v == "dtensor_out":
            return self.head(self.point(self.down(self.act(self.up(x)))))
        if v in ("to_local", "full_tensor"):
            y = self.down(self.act(self.up(x)))
            if is_dtensor(y):
                y = y.to_local() if v == "to_local" else y.full_tensor()
            return self.point(y) * 1.0
        if v == "twice":  # one hook point on the same sequence piece before and after up took it
            y = self.inp(x)
            r1 = self.point(y)
            h = self.up(y)
            r2 = self.point(y)
            return self.head(r1 + r2 + self.down(self.act(h)))
        raise ValueError(v)


def mini_plan(variant):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    head = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if variant == "colseq":
        return {"up": ColwiseParallel(output_layouts=Shard(1)),
                "down": RowwiseParallel(input_layouts=Shard(1))}
    if variant == "emb_col":
        return {"emb": ColwiseParallel(output_layouts=Shard(1)), "head": head}
    if variant in ("tokens2d", "seqfirst"):
        return {"inp": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
                "head": head}
    if variant.startswith("uneven"):
        return {"up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=Shard(1))}
    if variant.startswith("row_"):
        dim = {"row_0": 0, "row_m2": -2, "row_m1": -1, "row_2": 2}[variant]
        return {"up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=Shard(dim))}
    if variant.startswith("col_"):
        return {"up": ColwiseParallel(output_layouts=Shard(-2 if variant == "col_m2" else 1))}
    if variant == "twice":
        return {"inp": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
                "up": ColwiseParallel(input_layouts=Shard(1)),
                "down": RowwiseParallel(output_layouts=Shard(1)), "head": head}
    return {"up": ColwiseParallel(),  # dtensor_out, to_local, full_tensor
            "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "head": head}


MINI_HOOKS = {"colseq": ["up", "act", "down"], "emb_col": ["emb", "point", "head"],
              "tokens2d": ["inp", "act", "point", "head"],
              "seqfirst": ["inp", "act", "point", "head"],
              "uneven": ["up", "down", "point"], "dtensor_out": ["down", "point", "head"]}
# the dim along which a variant's output stays split over tp (None: replicated)
OUT_SPLIT = {"uneven": 1, "row_0": 0, "row_m2": 1, "row_m1": 2, "row_2": 2, "col_m2": 1,
             "col_1": 1}


def _mini_x(variant, seq, batch=4):
    g = torch.Generator().manual_seed(1)
    if variant == "emb_col":
        return torch.randint(0, V, (2, seq), generator=g)
    if variant == "tokens2d":
        return torch.randn(seq, H, generator=g)
    if variant == "seqfirst":
        return torch.randn(seq, batch, H, generator=g)
    return torch.randn(2, seq, H, generator=g)


def _mini_check(variant, seq, hooks, allow_refusal):
    """One process vs tp=2 on ``Mini(variant)`` (output compared piece by piece where it
    stays split; the loss sums each rank's piece, so every gradient is the whole one's)."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = _mini_x(variant, seq)
    want = _run(Mini(variant), x, hooks, process_group=local_group())
    dim = OUT_SPLIT.get(variant)
    if dim is not None:
        pieces = want[1].chunk(2, dim)
        r = dist.get_rank()
        want = (want[0], pieces[r] if r < len(pieces) else want[1].narrow(dim, 0, 0), want[2])
    model = parallelize_module(Mini(variant), _tp_mesh(), mini_plan(variant))
    return _equal_or_refused(want, lambda: _run(model, x, hooks), hooks, allow_refusal)


@pytest.mark.parametrize("variant,seq", [
    ("colseq", 4), ("emb_col", 4), ("tokens2d", 6), ("seqfirst", 4), ("uneven", 5),
    ("uneven", 3), ("uneven", 1), ("dtensor_out", 4)],
    ids=["colwise_out_shard1", "embedding_colwise_out_shard1", "tokens_2d_hidden",
         "seq_first_batch", "uneven_5", "uneven_3", "uneven_1_empty_piece",
         "use_local_output_false"])
@pytest.mark.parametrize("mode", MODES)
@distributed(world_size=2, timeout_s=60)
def test_shard1_outputs_every_hook_kind(variant, seq, mode):
    """Each hook kind on each module in turn, equal to one process: ColwiseParallel(
    output_layouts=Shard(1)) (then RowwiseParallel(input_layouts=Shard(1))), on an Embedding
    too; Shard(1) of a 2-D [tokens, h] output (dim 1 is the hidden dim) and of a seq-first
    [s, b, h] one (the batch); sequences 5, 3 and 1 over 2 ranks (torch.chunk: 3+2, 2+1, 1+0:
    an empty piece); a DTensor output (use_local_output=False)."""
    for name in MINI_HOOKS[variant]:
        for kind in KINDS:
            if name == "emb" and kind == "full_backward":
                continue
            assert _mini_check(variant, seq, [(name, kind, mode)], False) == "equal"


@pytest.mark.parametrize("variant", ["to_local", "full_tensor", "row_0", "row_m2"])
@distributed(world_size=2, timeout_s=60)
def test_undescribed_outputs_are_refused(variant):
    """A plain tensor the model makes of a Shard(1) DTensor output (to_local: a piece;
    full_tensor: whole) has no declared split; RowwiseParallel(output_layouts=Shard(0)) stays
    undescribed (the batch); Shard(-2) (the sequence, spelled from the end) is caught by the
    leading-dims check. Refused on every rank, naming the module: every hook kind on the
    module after it, the output side of the layer itself."""
    sites = [("point", kind) for kind in KINDS]
    if variant.startswith("row_"):
        sites += [("down", "forward"), ("down", "full_backward_pre")]
    for name, kind in sites:
        assert _mini_check(variant, 4, [(name, kind, "leader")], True) == "refused", \
            (name, kind)


@pytest.mark.parametrize("variant", ["col_m2", "row_m1", "row_2"])
@distributed(world_size=2, timeout_s=60)
def test_output_layouts_spelled_other_than_shard1(variant):
    """ColwiseParallel(output_layouts=Shard(-2)) (the sequence spelled from the end),
    RowwiseParallel(output_layouts=Shard(-1) / Shard(2)) (a reduce-scatter onto the hidden
    dim): undescribed, so refused naming the layer, or equal to one process with a hint."""
    name = "up" if variant.startswith("col_") else "down"
    for kind in ("forward", "full_backward_pre"):
        _mini_check(variant, 4, [(name, kind, None)], allow_refusal=True)
        _mini_check(variant, 4, [("point", kind, None)], allow_refusal=True)


@pytest.mark.parametrize("kind", ["full_backward", "full_backward_pre"])
@distributed(world_size=2, timeout_s=60)
def test_same_sequence_piece_hooked_before_and_after_a_column_takes_it(kind):
    """The same sequence piece before and after a column layer took it: the two states
    differ only in whether the sizes are known or exchanged, the same layout."""
    assert _mini_check("twice", 4, [("point", kind, "leader")], False) == "equal"


@distributed(world_size=2, timeout_s=60)
def test_same_sequence_piece_hooked_twice_forward():
    for kind in ("forward", "forward_pre"):
        assert _mini_check("twice", 4, [("point", kind, "leader")], False) == "equal"


@pytest.mark.parametrize("variant", ["tokens2d", "seqfirst"])
@pytest.mark.parametrize("mode", MODES)
@distributed(world_size=4, timeout_s=90)
def test_fsdp2_x_tp_shard1_of_2d_and_seq_first_outputs(variant, mode):
    """FSDP2 x TP: [tokens, h] with tokens over dp and the hidden dim over tp (Shard(1));
    [s, b, h] with FlexModel(batch_dim=1), where Shard(1) splits each replica's batch over tp
    too (two rows per rank): the tp join then the dp join along the same dim give the whole
    batch in order."""
    got, err, want = _fsdp2_x_tp(variant, [(name, kind, mode) for name in MINI_HOOKS[variant]
                                           for kind in KINDS], batch=8)
    assert err is None, err
    _compare(want, got)


def _fsdp2_x_tp(variant, hooks, batch):
    """``Mini(variant)`` under FSDP2 x TP (2 x 2) against one process: (what the sharded run
    stored, its error, what one process stored for this replica's rows)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    bd = 1 if variant == "seqfirst" else 0
    x = _mini_x(variant, 8 if variant == "tokens2d" else 4, batch)
    n = x.shape[bd] // 2
    mesh = _mesh_2d()
    dp = mesh.get_local_rank("dp")
    want = _run(Mini(variant), x, hooks, loss="mean", batch_dim=bd,
                process_group=local_group())
    model = parallelize_module(Mini(variant), mesh["tp"], mini_plan(variant))
    fully_shard(model, mesh=mesh["dp"])
    got, err = _attempt(lambda: _run(model, x.narrow(bd, dp * n, n), hooks, loss="mean",
                                     batch_dim=bd))
    return got, err, (want[0], want[1].narrow(bd, dp * n, n), want[2])


@pytest.mark.parametrize("kind", KINDS)
@distributed(world_size=4, timeout_s=90)
def test_fsdp2_x_tp_one_row_per_rank(kind):
    """[s, b, h] with each replica's batch split over tp one row per rank: the GELU after the
    split layer returns a tensor of the piece's shape, which a statistic over the rows would
    have too -- refused on every rank, naming the module, on its output side and after it; the
    split layer's output as it made it (the GELU's input side: it says how it split it) and
    what the head makes whole are equal to one process."""
    output_side = kind in ("forward", "full_backward_pre")
    for name, refused in (("act", output_side), ("point", True), ("inp", False),
                          ("head", False)):
        got, err, want = _fsdp2_x_tp("seqfirst", [(name, kind, None)], batch=4)
        if refused:
            assert err is not None and f"'{name}'" in err and "cannot be told" in err, err
        else:
            assert err is None, err
            _compare(want, got)


@pytest.mark.parametrize("hint,ok", [((2, 4, H), True), ((2, None, H), True),
                                     ((None, None, None), True), ((2, 6, H), False)],
                         ids=["whole", "seq_open", "all_open", "wrong_seq"])
@distributed(world_size=2, timeout_s=60)
def test_expected_shape_on_a_sequence_output(hint, ok):
    """expected_shape on the Shard(1) output of a row layer: the whole shape, or dims left
    open (the declared split fills them), equal one process; a whole sequence no split can
    explain (6: pieces of 2) is an error on every rank."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = _mini_x("uneven", 4)
    stored = {}
    model = parallelize_module(Mini("uneven"), _tp_mesh(), mini_plan("uneven"))
    with torch.no_grad():
        want = Mini("uneven")(x)
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction("down", expected_shape=hint))
        _, err = _attempt(lambda: flex(x))
    if not ok:
        assert err is not None and "expected_shape" in err, err
        return
    assert err is None, err
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["down"][0], want, **TOL)


# == tensors computed from a sequence piece =================================================
class Derived(nn.Module):
    """inp (RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)) under tp)
    gives y, the sequence piece; ``point`` sees a tensor computed from it; head
    (ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())) ends. Each variant
    computes the same output as one process."""

    def __init__(self, variant):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp, self.head = _lin(H, H, g), _lin(H, H, g)
        self.mk, self.mv = _lin(H, H, g), _lin(H, H, g)
        self.up, self.down = _lin(H, 2 * H, g), _lin(2 * H, H, g)
        self.point = DummyModule()
        self.variant = variant

    def _mesh(self):
        return self.inp.weight.device_mesh if is_dtensor(self.inp.weight) else None

    def forward(self, x, mem=None):
        v, y = self.variant, self.inp(x)
        b, s, _ = y.shape
        if v == "view_heads":
            y = self.point(y.view(b, s, HEADS, H // HEADS)).reshape(b, s, H)
        elif v == "flatten":
            y = self.point(y.reshape(-1, H)).view(b, s, H)
        elif v == "transpose":  # [b, h, s]: the same shape as [b, s, h] when s == h
            y = self.point(y.transpose(1, 2)).transpose(1, 2) * 1.0
        elif v == "last_token":
            y = y + 0 * self.point(y[:, -1]).sum()
        elif v == "cat_hidden":  # beside the matching piece of the (replicated) input
            r = x.chunk(2, 1)[dist.get_rank()] if self._mesh() is not None else x
            c = self.point(torch.cat([y, r], -1))
            y = c[..., :H] + c[..., H:]
        elif v in ("sum_seq", "first_token"):  # a statistic over the sequence, made whole
            from torch.distributed.nn.functional import all_reduce

            p = y.sum(1, keepdim=True) if v == "sum_seq" else y[:, :1]
            p = self.point(p)
            if self._mesh() is not None:  # the ranks' shares summed (backward: summed too)
                if v == "first_token":
                    p = p * (dist.get_rank() == 0)
                p = all_reduce(p)
            y = y + p
        elif v == "memory":  # cross-attention on a replicated memory
            m = self.point(mem)
            y = y + torch.softmax(y @ self.mk(m).transpose(1, 2), -1) @ self.mv(m)
        elif v == "plain_memory":  # no sequence parallelism: memory after a column layer
            h = F.gelu(self.up(y))
            m = self.point(mem)  # after up, before down
            y = y + self.down(h) + self.mk(m)
        elif v == "encoded_memory":  # a module's replicated output, hooked after up
            e = self.mv(mem)
            h = F.gelu(self.up(y))
            m = self.point(e)
            y = y + self.down(h) + self.mk(m)
        else:
            raise ValueError(v)
        return self.head(y)


def derived_plan(variant):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if variant in ("plain_memory", "encoded_memory"):
        return {"up": ColwiseParallel(), "down": RowwiseParallel()}
    return {"inp": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}


def _derived_check(variant, seq, kinds=("forward", "full_backward"), mem_len=None):
    """Hooks on ``point`` (no expected_shape): equal to one process, or refused on every
    rank; returns the outcomes."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, seq, H, generator=torch.Generator().manual_seed(1))
    mem = torch.randn(2, mem_len or 1, H, generator=torch.Generator().manual_seed(2))
    outcomes = []
    for kind in kinds:
        hooks = [("point", kind, None)]

        def run(model, kind=kind, **kw):
            stored = {}
            xx = x.clone().requires_grad_(True)
            with FlexModel(model, stored, key_by_hook_kind=True, **kw) as flex:
                getattr(flex, _REGISTER[kind])(HookFunction("point"))
                out = flex(xx, mem)
                out.pow(2).sum().backward()
            if variant not in ("plain_memory", "encoded_memory") and "process_group" not in kw:
                # a plain (replicated) parameter under sequence parallelism gets each rank's
                # share of its gradient (torchtitan's DTensor norms are summed by DTensor)
                for p in model.parameters():
                    if p.grad is not None and not is_dtensor(p.grad):
                        dist.all_reduce(p.grad)
            grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()
                     if p.grad is not None}
            return stored, out.detach(), grads

        want = run(Derived(variant), process_group=local_group())
        model = parallelize_module(Derived(variant), _tp_mesh(), derived_plan(variant))
        outcomes.append(_equal_or_refused(want, lambda m=model: run(m), hooks, True))
    return outcomes


@pytest.mark.parametrize("variant,seq", [
    ("view_heads", 4), ("flatten", 4), ("transpose", 8), ("last_token", 4),
    ("cat_hidden", 4), ("sum_seq", 4), ("first_token", 4)])
@distributed(world_size=2, timeout_s=60)
def test_tensors_of_another_shape_than_the_piece_are_refused(variant, seq):
    """Heads split out of a sequence piece, the piece flattened to [tokens, h], transposed to
    [b, h, s/tp], its last token [b, h], concatenated on the hidden dim, a sum over its
    sequence or its first token [b, 1, h]: another shape than the piece, refused on every rank
    (sequence parallelism: nothing says how such a tensor is split)."""
    assert _derived_check(variant, seq) == ["refused", "refused"]


@distributed(world_size=2, timeout_s=60)
def test_transposed_sequence_piece_of_the_pieces_shape():
    """y.transpose(1, 2) of the sequence piece [2, 8, 8] (s/tp == h): the piece's shape, a
    permuted view: refused (which dim is split cannot be told), never joined on dim 1."""
    _derived_check("transpose", 16)


@pytest.mark.parametrize("variant", ["sum_seq", "first_token"])
@distributed(world_size=2, timeout_s=60)
def test_sequence_statistic_when_each_rank_holds_one_token(variant):
    """One token per rank (S=2, tp=2): a statistic over the sequence piece kept as [b, 1, h]
    -- ``y.sum(1, keepdim=True)`` (a partial sum the model then all-reduces), ``y[:, :1]``
    (the first token, a view with the piece's every geometry) -- has the piece's shape, so
    it cannot be told from the piece: refused on every rank, forward and backward, never the
    ranks' values joined as (2, 2, 8)."""
    assert _derived_check(variant, 2) == ["refused", "refused"]


@pytest.mark.parametrize("variant", ["sum_seq", "first_token"])
@distributed(world_size=2, timeout_s=60)
def test_sequence_statistic_when_one_rank_holds_one_token(variant):
    """S=3 over tp=2 (2 tokens, 1 token): the statistic on the rank with one token has its
    piece's shape, on the other it does not. That rank's refusal reaches the first one in the
    exchange of sizes: refused on every rank (no rank left waiting in a gather). Forward only:
    the model's own head (a DTensor all-gather of uneven pieces) fails on gloo."""
    assert _derived_check(variant, 3, kinds=("forward",)) == ["refused"]


@pytest.mark.parametrize("variant", ["sum_seq", "first_token"])
@distributed(world_size=2, timeout_s=60)
def test_open_expected_shape_on_a_one_token_statistic(variant):
    """expected_shape (None, None, None) leaves the sequence dim to the split that produced
    the tensor; with one token per rank a statistic of the piece's shape cannot be told from
    the piece there either: refused on every rank in the agreement on the whole shape, never
    a whole shape of (2, 2, 8) for the one-process (2, 1, 8)."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, 2, H, generator=torch.Generator().manual_seed(1))
    mem = torch.randn(2, 1, H, generator=torch.Generator().manual_seed(2))
    model = parallelize_module(Derived(variant), _tp_mesh(), derived_plan(variant))
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction("point", expected_shape=(None, None, None)))
        _, err = _attempt(lambda: flex(x, mem))
    assert err is not None and "'point'" in err and "cannot be told" in err, err
    assert not stored


@pytest.mark.parametrize("variant", ["memory", "plain_memory"],
                         ids=["sequence_parallel", "no_sequence_parallelism"])
@distributed(world_size=2, timeout_s=60)
def test_replicated_tensor_of_the_pieces_shape_after_a_tp_layer(variant):
    """A replicated model input of the piece's shape, hooked after a TP layer: described by
    what the forward started from (replicated), not by that layer's split."""
    _derived_check(variant, 4, kinds=("forward",), mem_len=2 if variant == "memory" else 4)


@pytest.mark.parametrize("kind", ["forward", "full_backward"])
@distributed(world_size=2, timeout_s=60)
def test_a_modules_replicated_output_hooked_after_a_tp_layer_equals_one_process(kind):
    """An encoder's output (a replicated Linear on the memory, computed before ``up``) of the
    shape of ``up``'s hidden piece, hooked after ``up``: described by what it was when it was
    made (replicated), so equal to one process, neither joined as a piece nor refused."""
    assert _derived_check("encoded_memory", 4, kinds=(kind,), mem_len=4) == ["equal"]
