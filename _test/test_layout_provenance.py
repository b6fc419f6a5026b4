"""Where a tensor comes from, and which of its dims is the batch: cases the rules of time and of
``batch_dim`` got wrong without a word, each compared with one process or refused on every rank.

- TP: a module that runs between a column layer and its row layer on a tensor that did not come
  out of the column layer (a hook point on the residual, ``r = self.point(x)`` after
  ``h = up(x)``) was given the column layer's split when the widths matched: rank 0 stored the
  two ranks' copies joined ([2, 3, 16] for [2, 3, 8]) and an edit reached rank 0's half only.
- DP: torch's own seq-first tensors (``nn.MultiheadAttention`` / ``nn.LSTM`` built with
  ``batch_first=False``, an RNN's ``h_n``) were joined along dim 0, gluing the replicas'
  sequences; they are refused.
- DP: the input's rows were read off the first tensor argument, so ``flex(position_ids=pos,
  input_ids=ids)`` took the ``[1, s]`` positions as the batch and a rotary table broadcast
  over the batch was stored as one row per replica.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, column_like, local_group, row_like, seeded_linear
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.parallel.frameworks.registry import UnknownLayoutError

TOL = dict(rtol=1e-9, atol=1e-12)


def _zero_first_features(module, t, ctx, mods):
    out = t.clone()
    out[..., :4] = 0
    return out


class SideBlock(nn.Module):
    """``point(x) + norm(x) + down(act(up(x)))``, with ``point`` (a DummyModule) and ``norm``
    run on the residual after the column layer ``up``; ``up``'s local width equals ``H``."""

    def __init__(self, up, down):
        super().__init__()
        self.up, self.act, self.down = up, nn.GELU(), down
        self.point, self.norm = DummyModule(), nn.LayerNorm(H)

    def forward(self, x):
        h = self.act(self.up(x))
        r = self.point(x)
        return r + self.norm(x) + self.down(h)


def _side_plain():
    g = torch.Generator().manual_seed(0)
    return SideBlock(seeded_linear(H, 2 * H, g), seeded_linear(2 * H, H, g))


def _side_fairscale(plain):
    return SideBlock(column_like(plain.up), row_like(plain.down))


_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook"}


def _run_side(model, x, name, kind, **kw):
    stored = {}
    x = x.clone().requires_grad_(True)
    with FlexModel(model, stored, **kw) as flex:
        getattr(flex, _REGISTER[kind])(HookFunction(name, editing_function=_zero_first_features))
        out = flex(x)
        out.pow(2).sum().backward()
    return stored.get(name), out.detach(), x.grad


@pytest.mark.parametrize("name", ["point", "norm", "act"])
@distributed(world_size=2)
def test_a_module_on_the_residual_between_column_and_row_layers_under_tp(name):
    """Forward, forward-pre and backward hooks that edit, on the residual's hook point, on a
    norm of the residual, and (the rule of time, still right) on the column layer's output:
    stored values, outputs and input gradients equal one process."""
    from fairscale.nn.model_parallel import initialize as fs

    torch.set_default_dtype(torch.float64)
    fs.initialize_model_parallel(2)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    for kind in _REGISTER:
        want = _run_side(_side_plain(), x, name, kind, process_group=local_group())
        got = _run_side(_side_fairscale(_side_plain()), x, name, kind, tensor_parallel_size=2)
        torch.testing.assert_close(got[1], want[1], **TOL)
        torch.testing.assert_close(got[2], want[2], **TOL)
        if dist.get_rank() == 0:
            assert len(got[0]) == len(want[0]) == 1, (name, kind)
            assert got[0][0].shape == want[0][0].shape, (name, kind, got[0][0].shape)
            torch.testing.assert_close(got[0][0], want[0][0], **TOL)


class SeqFirstNet(nn.Module):
    """A batch-first model with torch's seq-first attention and an LSTM inside."""

    def __init__(self, batch_first: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.batch_first = batch_first
        self.inp = seeded_linear(H, H, g)
        self.attn = nn.MultiheadAttention(H, 2, batch_first=batch_first)
        self.rnn = nn.LSTM(H, H, num_layers=2, batch_first=True)
        with torch.no_grad():
            for p in (*self.attn.parameters(), *self.rnn.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):  # x: [b, s, H]
        h = self.inp(x)
        h = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.attn(h, h, h, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.rnn(a)[0]


def _run_seq(model, x, name, unpack_idx=0, **kw):
    stored = {}
    with FlexModel(model, stored, **kw) as flex:
        flex.register_forward_hook(HookFunction(name, unpack_idx=unpack_idx))
        with torch.no_grad():
            out = flex(x)
    return stored.get(name), out


@distributed(world_size=2)
def test_torch_seq_first_tensors_are_refused_under_ddp_and_batch_first_ones_gathered():
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1))
    r = dist.get_rank()
    mine = x[2 * r:2 * r + 2]
    refused = [("attn", 0, False, "batch_first=False"), ("rnn", 1, True, "hidden state")]
    for name, idx, batch_first, match in refused:
        with pytest.raises(UnknownLayoutError, match=match):
            _run_seq(DDP(SeqFirstNet(batch_first)), mine, "module." + name, idx)
    for name in ("attn", "rnn"):  # batch-first: gathered as one process has them
        want, _ = _run_seq(SeqFirstNet(True), x, name, process_group=local_group())
        got, _ = _run_seq(DDP(SeqFirstNet(True)), mine, "module." + name)
        if r == 0:
            torch.testing.assert_close(got[0], want[0], **TOL)
    # a seq-first model says so: batch_dim=1 joins the attention's [s, b, e] on dim 1
    want, _ = _run_seq(SeqFirstNet(False), x, "attn", process_group=local_group())
    got, _ = _run_seq(DDP(SeqFirstNet(False)), mine, "module.attn", batch_dim=1)
    if r == 0:
        torch.testing.assert_close(got[0], want[0], **TOL)


def _run_rotary(model, ids, prefix="", positions_first=True, **kw):
    stored = {}
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    kwargs = dict(position_ids=pos, input_ids=ids) if positions_first else \
        dict(input_ids=ids, position_ids=pos)
    with FlexModel(model, stored, **kw) as flex:
        flex.register_forward_hook(HookFunction(prefix + "model.rotary_emb"))
        with torch.no_grad():
            flex(**kwargs)
    return stored.get(prefix + "model.rotary_emb")


@pytest.mark.parametrize("positions_first", [True, False])
@distributed(world_size=2)
def test_a_rotary_table_is_refused_whichever_keyword_comes_first(positions_first):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.models import example_inputs, tiny_hf_model

    ids = example_inputs("llama", batch=4, seq=5)["input_ids"]
    r = dist.get_rank()
    with pytest.raises(LayoutError, match="broadcast over the batch|cannot form one tensor"):
        _run_rotary(DDP(tiny_hf_model("llama")), ids[2 * r:2 * r + 2], "module.",
                    positions_first)
