"""Shared pieces of the pipeline tests: the tiny MLP stack of ``parallel_cases`` cut into two
stages that keep the module names of the whole model, a hand-split pipeline step over a
:class:`~flex_surgery.parallel.pipeline.StageLink`, and the one-process reference (the whole
model run micro-batch by micro-batch with the same hooks)."""

from __future__ import annotations

import torch
from parallel_cases import PARAM_SITES, SITES, H, local_group, plain_net, times_two
from torch import nn

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs

# parallel_cases' sites live in blocks 0 (stage 0) and 1 (stage 1); add backward and
# parameter-gradient hooks on stage 0, so both stages run every hook kind.
STAGE_SITES = SITES + [("blocks.0.down", "full_backward_pre"), ("blocks.0.act", "full_backward")]
STAGE_PARAM_SITES = PARAM_SITES + ["blocks.0.up.weight", "head.bias"]

_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook"}


class StageModule(nn.Module):
    """Some blocks of a ``parallel_cases.Net`` (and its head on the last stage) under the names
    they have in the whole model, so a hook is named the same on every layout."""

    def __init__(self, net: nn.Module, block_ids: list[int], head: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): net.blocks[i] for i in block_ids})
        self.head = net.head if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return self.head(x) if self.head is not None else x


class BlockStage(nn.Module):
    """The blocks ``ids`` of a whole model's ``blocks``, run in order under the names they have
    in the whole model (``blocks.<i>``): one hand-split pipeline stage."""

    def __init__(self, blocks: nn.ModuleList, ids: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in ids})

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x


def two_stages(net: nn.Module, stage: int) -> StageModule:
    """Stage 0: block 0; stage 1: block 1 and the head."""
    return StageModule(net, [0], False) if stage == 0 else StageModule(net, [1], True)


def loss_fn(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).pow(2).mean()


def inputs(batch: int, n_micro: int, seed: int = 1):
    """``batch`` rows split into ``n_micro`` micro-batches, and targets for them (float64)."""
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, H, generator=g)
    target = torch.randn(batch, 3, 6, generator=g)
    return x, target, list(x.chunk(n_micro)), list(target.chunk(n_micro))


def register_sites(flex: FlexModel, edit: bool, group: str | None = None,
                   editing_function=times_two) -> list[str]:
    """Hooks at every site that exists in ``flex``'s module; returns the output keys."""
    names = {n for n, _ in flex.module.named_modules()}
    params = {n for n, _ in flex.module.named_parameters()}
    fn = editing_function if edit else None
    keys = []
    for name, kind in STAGE_SITES:
        if name in names:
            hf = HookFunction(name, editing_function=fn)
            getattr(flex, _REGISTER[kind])(hf)
            keys.append(hf.output_key)
            if group is not None:
                flex.update_hook_groups(hf, group)
    for name in STAGE_PARAM_SITES:
        if name in params:
            hf = HookFunction(name, editing_function=fn)
            flex.register_hook(hf)
            keys.append(hf.output_key)
            if group is not None:
                flex.update_hook_groups(hf, group)
    return keys


def reference(x_mbs, t_mbs, edit: bool, editing_function=times_two):
    """One process, whole model, micro-batch by micro-batch: (stored, outputs, grads).

    Stored under per-kind keys (``key_by_hook_kind``): a schedule runs all forwards before the
    backwards, so hooks of several kinds on one module would interleave differently in a
    shared list.

    Per micro-batch the loss is ``loss_fn(out, target)``; the parameter gradients are divided
    by the number of micro-batches at the end, as ``torch.distributed.pipelining`` schedules
    do (``scale_grads``), so hooks see the unscaled per-micro-batch gradients.
    """
    model = plain_net()
    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, process_group=local_group(), key_by_hook_kind=True)
    register_sites(flex, edit, editing_function=editing_function)
    outs = []
    for x, t in zip(x_mbs, t_mbs):
        out = flex(x)
        loss_fn(out, t).backward()
        outs.append(out.detach())
    grads = {n: p.grad / len(x_mbs) for n, p in model.named_parameters()}
    flex.restore()
    return stored, torch.cat(outs), grads


def hand_split_step(flex: FlexModel, link, x_mbs, t_mbs, groups="all"):
    """All forwards, then all backwards (GPipe order), stages exchanging activations and
    input gradients over ``link``; returns the last stage's outputs (``None`` elsewhere)."""
    inputs_, outputs = [], []
    with link.step():
        for x in x_mbs:
            h = x if link.is_first else link.recv_forward(requires_grad=True)
            y = flex(h, groups=groups)
            if not link.is_last:
                link.send_forward(y)
            inputs_.append(h)
            outputs.append(y)
        for h, y, t in zip(inputs_, outputs, t_mbs):
            if link.is_last:
                loss_fn(y, t).backward()
            else:
                y.backward(link.recv_backward())
            if not link.is_first:
                link.send_backward(h.grad)
        for p in flex.module.parameters():
            p.grad /= len(x_mbs)
    return torch.cat([y.detach() for y in outputs]) if link.is_last else None


def assert_stored_equal(got: dict, want: dict, keys=None, **tol) -> None:
    want = want if keys is None else {k: want[k] for k in keys}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
        assert len(got[key]) == len(want[key]), (key, len(got[key]), len(want[key]))
        for a, b in zip(got[key], want[key]):
            assert a.shape == b.shape, (key, a.shape, b.shape)
            torch.testing.assert_close(a, b, msg=lambda m, k=key: f"{k}: {m}", **tol)
