"""Layouts that follow the data, beyond test_layout_provenance.py; every test compares with one
process of the same weights (``process_group=local_group()``) or expects a refusal on every rank.

TP: the residual taken by a column layer with ``gather_output=True`` (its declared input, not
the time-rule state at its entry, describes what it took); a module handed the column output
inside a list; a forward-pre edit or a backward hook on the column layer (the tensor is matched
as the layer is entered, before they replace it); hook points between q, k and v; a row layer's
parallel input; activation checkpointing; one hook point called before and after the column.
DP: a mask argument beside a one-row input is no batch; MHA's attention weights are batch-first;
an RNN's ``h_0`` and a batch-first module in a ``batch_dim=1`` model are refused. Pinned: a view
of the residual, and DTensor TP (the layer's input pre-hook makes a DTensor of it), where the
rule of time still decides.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, column_like, local_group, row_like, seeded_linear
from rank_pool import distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.frameworks.registry import UnknownLayoutError

TOL = dict(rtol=1e-9, atol=1e-12)

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook"}


def _zero_first(module, t, ctx, mods):
    out = t.clone()
    out[..., :4] = 0
    return out


# -- TP models: fairscale column/row layers with the weights of a plain model ---------------
class TPBlock(nn.Module):
    """Holds every layer a variant may use; ``variant`` picks the forward.

    up: column H -> 2H (local width H with tp=2, the residual's width), down: row 2H -> H,
    gate: column H -> 2H with gather_output=True (replicated), q/k/v: column H -> 2H."""

    def __init__(self, layers, variant):
        super().__init__()
        for k, v in layers.items():
            setattr(self, k, v)
        self.act, self.norm = nn.GELU(), nn.LayerNorm(H)
        self.point, self.point2 = DummyModule(), DummyModule()
        self.mix = Mix()
        self.variant = variant

    def forward(self, x):
        v = self.variant
        if v == "gather_on_residual":
            h = self.act(self.up(self.norm(x)))  # up takes norm(x): sharded, width H
            g = self.gate(x)                     # gather_output=True: replicated [.., 2H]
            r = self.point(x)                    # the residual: replicated
            return r + self.down(h) + g[..., :H]
        if v == "side":  # test_layout_provenance's SideBlock without the norm
            h = self.act(self.up(x))
            r = self.point(x)
            return r + self.down(h)
        if v == "view":  # a view of the residual, not the residual itself
            h = self.act(self.up(x))
            r = self.point(x.view(x.shape))
            return r + self.down(h)
        if v == "reshape":  # the residual reshaped (same memory, another shape)
            h = self.act(self.up(x))
            r = self.point(x.reshape(-1, H)).view(x.shape)
            return r + self.down(h)
        if v == "cross":  # cross-attention: q takes x, k and v another tensor, then x
            m = self.norm(x)
            q, k, vv = self.q(x), self.k(m), self.v(m)
            p = self.point(x)
            return p + self.down(self.act(q * k + vv))
        if v == "twice_called":  # one column layer called on x, then on another tensor
            h = self.up(x) + self.up(x * 0.5)
            r = self.point(x)
            return r + self.down(self.act(h))
        if v == "qkv":  # q/k/v on the same x, hook points between and after them
            q = self.q(x)
            p = self.point(x)
            k = self.k(x)
            vv = self.v(x)
            p2 = self.point2(x)
            a = self.act(q * k + vv)
            return p + p2 + self.down(a)
        if v == "list_arg":  # a module taking the residual, and the column output in a list
            h = self.act(self.up(x))
            m = self.mix(x, [h])
            return x + self.down(m)
        if v == "ckpt":  # the column layer under activation checkpointing
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(lambda t: self.act(self.up(t)), x, use_reentrant=False)
            r = self.point(x)
            return r + self.down(h)
        if v == "twice":  # one hook point on the residual before and after the column layer
            x = self.point(x)
            h = self.act(self.up(x))
            r = self.point(x)
            return r + self.down(h)
        if v == "row_point":  # a hook point right before the row layer, on its parallel input
            h = self.act(self.up(x))
            h = self.point(h)
            return x + self.down(h)
        raise ValueError(v)


class Mix(nn.Module):
    def forward(self, x, hs):
        return torch.tanh(hs[0])


def _plain_layers():
    g = torch.Generator().manual_seed(0)
    return {n: seeded_linear(i, o, g) for n, (i, o) in
            dict(up=(H, 2 * H), down=(2 * H, H), gate=(H, 2 * H), q=(H, 2 * H),
                 k=(H, 2 * H), v=(H, 2 * H)).items()}


def _fairscale_layers(plain):
    return {name: row_like(lin) if name == "down" else
            column_like(lin, gather_output=name == "gate") for name, lin in plain.items()}


def _run_tp(model, x, hooks, **kw):
    """hooks: [(name, kind, edit)]; returns (stored, output, x.grad)."""
    stored = {}
    x = x.clone().requires_grad_(True)
    with FlexModel(model, stored, **kw) as flex:
        for name, kind, edit in hooks:
            getattr(flex, _REGISTER[kind])(HookFunction(
                name, editing_function=_zero_first if edit else None))
        out = flex(x)
        out.pow(2).sum().backward()
    return stored, out.detach(), x.grad


def _compare_tp(variant, hooks, framework="fairscale"):
    """Run ``variant`` with ``hooks`` in one process and under fairscale (or DTensor) tp=2;
    compare."""
    torch.set_default_dtype(torch.float64)
    if framework == "fairscale":
        from fairscale.nn.model_parallel import initialize as fs

        fs.initialize_model_parallel(2)
        model = TPBlock(_fairscale_layers(_plain_layers()), variant)
    else:
        model = _dtensor_block(_plain_layers(), variant)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    want = _run_tp(TPBlock(_plain_layers(), variant), x, hooks, process_group=local_group())
    got = _run_tp(model, x, hooks, tensor_parallel_size=2)
    if dist.get_rank() == 0:
        for name, _kind, _ in hooks:
            keys = [k for k in want[0] if k.startswith(name + ".") or k == name]
            for k in keys:
                w, g = want[0][k], got[0].get(k)
                assert g is not None and len(g) == len(w), (k, g)
                for a, b in zip(g, w):
                    assert a.shape == b.shape, (k, tuple(a.shape), tuple(b.shape))
                    torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(got[1], want[1], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)


# == FINDINGS ================================================================================
@distributed(world_size=2)
def test_residual_taken_by_a_gather_output_column_is_replicated():
    """``up(norm(x))`` then ``gate(x)`` (column, gather_output=True) then ``point(x)``: before
    a31c8ea ``point`` took gate's (replicated) output state; now ``_through`` walks from gate to
    gate.before, which is the rule of time at gate's entry (up's sharded state, width H), so the
    residual is read as sharded."""
    _compare_tp("gather_on_residual", [("point", "forward", False)])


@distributed(world_size=2)
def test_residual_taken_by_gather_output_column_edit():
    _compare_tp("gather_on_residual", [("point", "forward", True)])


@distributed(world_size=2)
def test_forward_pre_edit_on_the_column_layer_keeps_the_look_through():
    """A forward_pre edit on ``up`` hands ``up`` a new tensor: ``_tp_layer_ran`` records that
    one as consumed, so ``point(x)`` (the original x) gets up's split again."""
    _compare_tp("side", [("up", "forward_pre", True), ("point", "forward", False)])


@pytest.mark.parametrize("kind", ["full_backward", "full_backward_pre"])
@distributed(world_size=2)
def test_backward_hook_on_the_column_layer_keeps_the_look_through(kind):
    """A backward hook on ``up`` makes torch wrap its inputs (BackwardHook.setup_input_hook)
    before its forward hooks see ``args``: ``consumed`` is the wrapper, not x."""
    _compare_tp("side", [("up", kind, False), ("point", "forward", False)])


@pytest.mark.parametrize("variant", ["cross", "twice_called"])
@pytest.mark.parametrize("framework", ["fairscale", "dtensor"])
@distributed(world_size=2)
def test_residual_taken_by_an_earlier_column_layer(framework, variant):
    """Every TP layer's input in the forward is looked through, not only the last one's:
    cross-attention ``q(x)``, ``k(m)``, ``v(m)``, then ``point(x)``; and ``up(x)``, then
    ``up(x * 0.5)``, then ``point(x)``. Only the last layer's input was, so ``x`` got the
    column split (stored [2, 3, 16] for [2, 3, 8])."""
    _compare_tp(variant, [("point", "forward", True)], framework)


@pytest.mark.parametrize("framework", ["fairscale", "dtensor"])
@distributed(world_size=2)
def test_reshape_of_the_residual_after_a_column_layer(framework):
    """``point(x.reshape(-1, H))``: [6, H], whose last dim is up's local width; the rule of
    time gave up's split ([6, 16] stored for [6, 8]). All of x's memory in another shape: of
    a replicated x, replicated."""
    _compare_tp("reshape", [("point", "forward", True)], framework)


@pytest.mark.parametrize("framework", ["fairscale", "dtensor"])
@distributed(world_size=2)
def test_view_of_the_residual_after_a_column_layer(framework):
    """``point(x.view(x.shape))``: not the same object, and the rule of time gave up's split
    (stored [2, 3, 16] for [2, 3, 8]); an alias with the same shape, strides and start holds the
    same values, so the look-through takes it as x."""
    _compare_tp("view", [("point", "forward", True)], framework)


@distributed(world_size=2)
def test_a_module_taking_the_column_output_in_a_list():
    """``mix(x, [h])`` with h = act(up(x)): ``_tensors`` looks one level deep, so ``mix`` is
    seen taking x only; took = up.before (replicated) while its output is tanh(h), sharded.
    Before a31c8ea the rule of time gave up's split (right)."""
    _compare_tp("list_arg", [("mix", "forward", False)])


# == COVERAGE (pass) =========================================================================
@pytest.mark.parametrize("kind", list(_REGISTER))
@distributed(world_size=2)
def test_hook_points_between_q_k_v_columns(kind):
    _compare_tp("qkv", [("point", kind, True), ("point2", kind, False)])


@pytest.mark.parametrize("kind", list(_REGISTER))
@distributed(world_size=2)
def test_hook_point_on_a_row_layers_parallel_input(kind):
    _compare_tp("row_point", [("point", kind, True)])


@pytest.mark.parametrize("kind", list(_REGISTER))
@distributed(world_size=2)
def test_activation_checkpointing_around_the_column_layer(kind):
    _compare_tp("ckpt", [("point", kind, True), ("act", kind, False)])


@pytest.mark.parametrize("kind", list(_REGISTER))
@distributed(world_size=2)
def test_one_hook_point_on_the_residual_before_and_after_the_column(kind):
    _compare_tp("twice", [("point", kind, True)])


def _dtensor_block(plain_layers, variant):
    """``TPBlock`` under DTensor TP (HF's styles: local outputs): up, q, k, v colwise, gate
    colwise with a replicated output (fairscale's gather_output), down rowwise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2,))
    plan = {n: ColwiseParallel() for n in ("up", "q", "k", "v")}
    plan.update(gate=ColwiseParallel(output_layouts=Replicate()), down=RowwiseParallel())
    return parallelize_module(TPBlock(plain_layers, variant), mesh, plan)


@pytest.mark.parametrize("variant,hooks", [
    ("side", [("point", "forward", False)]),
    ("side", [("up", "full_backward", False), ("point", "forward", True)]),
    ("gather_on_residual", [("point", "forward", True)]),
    ("qkv", [("point", "forward", True), ("point2", "forward_pre", False)]),
    ("twice", [("point", "forward", True)]),
    ("row_point", [("point", "forward", True)]),
], ids=["side", "side_backward_hook", "gather_on_residual", "qkv", "twice", "row_point"])
@distributed(world_size=2)
def test_dtensor_tp_hook_points_on_the_residual(variant, hooks):
    """Hook points on the residual under DTensor TP: the column layer's input hook
    (``parallelize_module``'s, registered before the runtime's) makes a DTensor of x, so the
    layer's forward hooks never saw x, and the residual's hook point was given the column
    layer's split when the widths match ([2, 3, 16] stored for [2, 3, 8]). The tracker now
    records a DTensor layer's argument before every other pre-hook and reads how the layer
    took it from the DTensor it received (a DTensor's shape is the whole one)."""
    _compare_tp(variant, hooks, framework="dtensor")


# -- DP models ---------------------------------------------------------------------------------
def _dp_run(model, args, name, kind="forward", unpack_idx=0, backward=False, **kw):
    stored = {}
    with FlexModel(model, stored, **kw) as flex:
        getattr(flex, _REGISTER[kind])(HookFunction(name, unpack_idx=unpack_idx))
        if backward:
            out = flex(*args)
            (out[0] if isinstance(out, tuple) else out).pow(2).mean().backward()
        else:
            with torch.no_grad():
                flex(*args)
    return stored.get(name)


def _dp_compare(make, full_args, mine_args, name, kind="forward", unpack_idx=0,
                backward=False, batch_dim=0):

    torch.set_default_dtype(torch.float64)
    want = _dp_run(make(), full_args, name, kind, unpack_idx, backward,
                   process_group=local_group(), batch_dim=batch_dim)
    got = _dp_run(DDP(make()), mine_args, "module." + name, kind, unpack_idx, backward,
                  batch_dim=batch_dim)
    if dist.get_rank() == 0:
        assert got is not None and len(got) == len(want)
        assert got[0].shape == want[0].shape, (tuple(got[0].shape), tuple(want[0].shape))
        torch.testing.assert_close(got[0], want[0], **TOL)


class MaskNet(nn.Module):
    """``forward(x [b, s, H], mask [s, s])``: a causal mask passed as an argument."""

    def __init__(self):
        super().__init__()
        self.lin = seeded_linear(H, H, torch.Generator().manual_seed(0))

    def forward(self, x, mask):
        return torch.matmul(mask, self.lin(x))


@distributed(world_size=2)
def test_a_mask_argument_is_not_the_input_rows():
    """One row per replica (global batch 2): ``_root_rows`` now takes the most rows among the
    2-D+ arguments, so the [s, s] mask gives rows=s=3 and every [1, s, H] activation is refused
    as 'a table broadcast over the batch'. Before a31c8ea (rows off the first argument) it was
    gathered as one process has it."""
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.tril(torch.ones(3, 3, dtype=torch.float64))
    r = dist.get_rank()
    _dp_compare(MaskNet, (x, mask), (x[r:r + 1], mask), "lin")


class MHANet(nn.Module):
    """torch's seq-first MultiheadAttention in a batch-first model; returns its weights too."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.attn = nn.MultiheadAttention(H, 2, batch_first=False)
        with torch.no_grad():
            for p in self.attn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):  # [b, s, H]
        h = x.transpose(0, 1)
        a, w = self.attn(h, h, h, need_weights=True)
        return a.transpose(0, 1), w


@distributed(world_size=2)
def test_mha_attention_weights_are_batch_first():
    """nn.MultiheadAttention's averaged attention weights are [b, L, S] whatever batch_first
    says: gathered along dim 0 as one process has them, not refused with the module's
    [s, b, e] tensors."""
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = dist.get_rank()
    _dp_compare(MHANet, (x,), (x[2 * r:2 * r + 2],), "attn", unpack_idx=1)


class GRUNet(nn.Module):
    """A batch-first GRU given an initial state h0 [layers, b, H] computed from the input."""

    def __init__(self, batch_first=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.batch_first = batch_first
        self.init = seeded_linear(H, H, g)
        self.gru = nn.GRU(H, H, num_layers=2, batch_first=batch_first)
        with torch.no_grad():
            for p in self.gru.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):  # [b, s, H]
        h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0).repeat(2, 1, 1)  # [2, b, H]
        xs = x if self.batch_first else x.transpose(0, 1)
        out, hn = self.gru(xs, h0)
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("kind", ["forward_pre", "full_backward"])
@distributed(world_size=2)
def test_rnn_h0_input_is_refused(kind):
    """An RNN's h_0 input (and its gradient) is [layers, b, H] like h_n: it was joined along
    dim 0 = layers ([4, 2, H] for [2, 4, H]); refused on every rank."""
    from flex_surgery.parallel.frameworks.registry import UnknownLayoutError

    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = dist.get_rank()
    torch.set_default_dtype(torch.float64)  # the models are built in it
    with pytest.raises(UnknownLayoutError, match="hidden state"):
        _dp_run(DDP(GRUNet()), (x[2 * r:2 * r + 2],), "module.gru", kind=kind, unpack_idx=1,
                backward=kind == "full_backward")


class SeqModelBatchFirstLSTM(nn.Module):
    """A [seq, batch, H] model (FlexModel batch_dim=1) with a batch_first=True LSTM inside."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.rnn = nn.LSTM(H, H, batch_first=True)
        with torch.no_grad():
            for p in self.rnn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):  # [s, b, H]
        return self.rnn(x.transpose(0, 1))[0].transpose(0, 1)


@distributed(world_size=2)
def test_a_batch_first_module_inside_a_batch_dim_1_model_is_refused():
    """The mirror of the seq-first refusal: with batch_dim=1, a batch_first=True LSTM's
    [b, s, H] output was joined along dim 1 (its sequence): [2, 6, H] for [4, 3, H]."""
    from flex_surgery.parallel.frameworks.registry import UnknownLayoutError

    x = torch.randn(3, 4, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = dist.get_rank()
    torch.set_default_dtype(torch.float64)  # the models are built in it
    with pytest.raises(UnknownLayoutError, match="batch_first=True"):
        _dp_run(DDP(SeqModelBatchFirstLSTM()), (x[:, 2 * r:2 * r + 2],), "module.rnn",
                batch_dim=1)


# -- DP, more ------------------------------------------------------------------------
@distributed(world_size=2)
def test_gru_seq_first_output_and_decoder_memory_refused():

    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, 3, H, dtype=torch.float64)
    with pytest.raises(UnknownLayoutError, match="batch_first=False"):
        _dp_run(DDP(GRUNet(batch_first=False)), (x,), "module.gru")

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(H, 2, 16, dropout=0.0)

        def forward(self, x):
            t = x.transpose(0, 1)
            return self.dec(t, t * 2).transpose(0, 1)

    with pytest.raises(UnknownLayoutError, match="batch_first=False"):
        _dp_run(DDP(Dec()), (x,), "module.dec", kind="forward_pre", unpack_idx=1)
    with pytest.raises(UnknownLayoutError, match="batch_first=False"):
        _dp_run(DDP(Dec()), (x,), "module.dec.linear1")


@distributed(world_size=2)
def test_mask_argument_with_two_rows_per_replica():
    """The mask argument is harmless when each replica has more than one row."""
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.tril(torch.ones(3, 3, dtype=torch.float64))
    r = dist.get_rank()
    _dp_compare(MaskNet, (x, mask), (x[2 * r:2 * r + 2], mask), "lin")
