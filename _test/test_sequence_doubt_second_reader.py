"""Second reading of 76f48cd (sequence splits: one token per rank doubted, settled together).

Scratch version: exploration.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import local_group
from rank_pool import distributed
from test_dtensor_sequence_output_edge_cases import (
    _REGISTER,
    H,
    TOL,
    _agreed_compare,
    _attempt,
    _equal_or_refused,
    _lin,
    _tp_mesh,
    position_edit,
)
from torch import nn

from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.frameworks.dtensor import is_dtensor


def _all_reduce(t):
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


class Two(nn.Module):
    """A hook point taking two tensors: returns ``a + b`` (b broadcast over the sequence)."""

    def forward(self, a, b):
        return a + b


class Seq(nn.Module):
    """inp: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)) -> y, the
    sequence piece; ``variant`` hooks a tensor made of it; head:
    ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()). Under tp the model
    makes whole what one process computes whole (the same output as one process)."""

    def __init__(self, variant, k=1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp, self.head = _lin(H, H, g), _lin(H, H, g)
        self.up, self.down = _lin(H, 2 * H, g), _lin(2 * H, H, g)
        self.point, self.two = DummyModule(), Two()
        self.variant, self.k = variant, k

    def _tp(self):
        return is_dtensor(self.inp.weight)

    def _first(self, p):
        """p: this rank's y[:, :k]; the first k tokens of the whole sequence on every rank
        (rank 0 holds them: its piece has at least k tokens here)."""
        if self._tp():
            p = _all_reduce(p * (dist.get_rank() == 0))
        return p

    def forward(self, x):
        v, y = self.variant, self.inp(x)
        if v == "first_k":  # the first k tokens, hooked
            p = self._first(self.point(y[:, :self.k]))
            return self.head(y + p.sum(1, keepdim=True))
        if v == "stat_then_piece":  # point called twice: a statistic, then the piece itself
            p = self.point(y.sum(1, keepdim=True))
            if self._tp():
                p = _all_reduce(p)
            return self.head(self.point(y) + p)
        if v == "pair":  # two(y, statistic): the statistic is the module's second input
            p = y.sum(1, keepdim=True)
            if self._tp():
                p = _all_reduce(p)
            return self.head(self.two(y, p))
        if v == "taken_then_first":  # up takes y (a column layer: all-gathers the sequence),
            h = self.up(y)           # then the first token of y is hooked
            p = self._first(self.point(y[:, :self.k]))
            return self.head(y + p + self.down(torch.relu(h)))
        if v == "piece":  # the piece itself
            return self.head(self.point(y))
        raise ValueError(v)


def seq_plan(variant):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"inp": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    if variant == "taken_then_first":
        plan.update(up=ColwiseParallel(input_layouts=Shard(1)),
                    down=RowwiseParallel(output_layouts=Shard(1)))
    return plan


def _seq_run(model, x, hooks, **kw):
    """hooks: [(name, kind, HookFunction kwargs)]. Returns (stored, output, whole grads)."""
    stored = {}
    xx = x.clone().requires_grad_(True)
    backward = any(k.startswith("full") for _, k, _ in hooks)
    with FlexModel(model, stored, key_by_hook_kind=True, **kw) as flex:
        for name, kind, hkw in hooks:
            getattr(flex, _REGISTER[kind])(HookFunction(name, **hkw))
        out = flex(xx)
        if backward:
            out.pow(2).sum().backward()
    grads = {}
    if backward:
        if "process_group" not in kw:
            for p in model.parameters():
                if p.grad is not None and not is_dtensor(p.grad):
                    dist.all_reduce(p.grad)
        grads = {n: (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad).detach().clone()
                 for n, p in model.named_parameters() if p.grad is not None}
    return stored, out.detach(), grads


def _seq_check(variant, seq, hooks, k=1, **kw):
    """One process vs tp=2: "equal" or "refused" (on every rank; a refusal on some ranks
    only, or a value that differs, fails)."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, seq, H, generator=torch.Generator().manual_seed(1))
    want = _seq_run(Seq(variant, k), x, hooks, process_group=local_group())
    model = parallelize_module(Seq(variant, k), _tp_mesh(), seq_plan(variant))
    return _equal_or_refused(want, lambda: _seq_run(model, x, hooks, **kw), hooks, True)


@pytest.mark.parametrize("seq,k", [(3, 2), (4, 2), (2, 1), (3, 1)])
@distributed(world_size=2, timeout_s=30)
def test_first_k(seq, k):
    print(_seq_check("first_k", seq, [("point", "forward", {})], k=k))


@pytest.mark.parametrize("kind", ["full_backward", "full_backward_pre", "forward"])
@distributed(world_size=2, timeout_s=30)
def test_stat_then_piece(kind):
    print(_seq_check("stat_then_piece", 2, [("point", kind, {})]))


@pytest.mark.parametrize("kind", ["full_backward", "forward_pre"])
@distributed(world_size=2, timeout_s=30)
def test_pair(kind):
    print(_seq_check("pair", 2, [("two", kind, dict(unpack_idx=1,
                                                    expected_shape=(None, None, None)))]))


@pytest.mark.parametrize("seq", [3])
@distributed(world_size=2, timeout_s=20)
def test_taken_then_first(seq):
    print(_seq_check("taken_then_first", seq, [("point", "forward", {})]))
