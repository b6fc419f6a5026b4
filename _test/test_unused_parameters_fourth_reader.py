"""Fourth reading of the gradient hooks on parameters that DDP's ``find_unused_parameters=True``
leaves unused on some data-parallel ranks (``flex_surgery/parallel/unused_parameters.py``).

``BranchNet`` (``side`` runs only on rows whose first feature is positive) and the helpers of
the earlier readings; each case is compared with one process over the whole batch. Passing:
``torch.autograd.grad`` instead of ``.backward()``, a double backward (``create_graph``),
``expected_shape`` and ``reduce=`` on the deferred hook, calls of the wrapped module after
``select_hook_groups``, the documented limitation (summed losses of two forwards) raising on
every rank and leaving nothing behind, more than 1024 forwards without backward, no_sync
accumulation on 4 ranks, an auxiliary output of the branch, a non-reentrant checkpoint around
the whole call; and what this reading found wrong at first, fixed (dataclass outputs, a
gradient hook enabled after a forward without backward hooks, the None gradient of a parameter
reached only through an output the loss does not use). The strict xfail left: a reentrant
checkpoint around the whole call. Every rank runs the same collectives before anything is
compared; the case that hung is last.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
from parallel_cases import actual_names, local_group
from rank_pool import distributed
from test_grad_accumulation import BranchNet, _shard
from test_unused_parameters_second_reader import (
    SIDE,
    UP,
    _branch_batches,
    _compare,
    _flex,
    _grads,
    _keys,
    _loss,
    _one_process,
    _sharded,
    _take,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel import unused_parameters

BOTH = sorted([f"{SIDE}:grad", f"{UP}:grad"])


def _hook(param, prefix="", **options):
    """A maker of a gradient HookFunction on ``param`` (plain name) of the model it is given."""
    return lambda names: HookFunction(names[prefix + param], **options)


_BOTH_HOOKS = (_hook(SIDE), _hook(UP))


def _run(step, xs, hooks=_BOTH_HOOKS, sync=True, model_fn=BranchNet,
         forward_hooks=(), **options):
    """``step(flex, hfs, x, i)`` over ``xs``: in one process over the whole batch, then on each
    rank's rows under ``DDP(find_unused_parameters=True)`` (under ``no_sync`` unless ``sync``).
    Per run: (what each step stored, what each step returned), the gradients, the error (repr)
    that ended the steps, or ``None``. Errors are caught so that every rank goes on alike."""
    rank = dist.get_rank()
    runs = []
    for group, model, mine in ((local_group(), model_fn(), xs),
                               (None, DDP(model_fn(), find_unused_parameters=True),
                                [_shard(x, rank, 2) for x in xs])):
        stored, err = {}, None
        flex = FlexModel(model, stored, process_group=group, key_by_hook_kind=True, **options)
        names = actual_names(model)
        for name in forward_hooks:
            flex.register_forward_hook(HookFunction(names[name]))
        hfs = [make(names) for make in hooks]
        for hf in hfs:
            flex.register_hook(hf)
        steps = []
        try:
            for i, x in enumerate(mine):
                quiet = not sync and isinstance(model, DDP)
                with model.no_sync() if quiet else contextlib.nullcontext():
                    returned = step(flex, hfs, x, i)
                steps.append((_take(stored), returned))
        except Exception as e:  # noqa: BLE001 -- compared after every rank is done
            err = repr(e)
            steps.append((_take(stored), None))
        grads = _grads(model)
        flex.close()
        runs.append(([s for s, _ in steps], [r for _, r in steps], grads, err))
    return runs


def _same(runs, storing=(0,), grads=True):
    """Neither run raised; the sharded one stores what one process stores (and the same
    gradients)."""
    (want, _, want_grads, want_err), (got, _, got_grads, err) = runs
    assert want_err is None and err is None, (want_err, err)
    _compare(got, got_grads if grads else None, want, want_grads if grads else None, storing)
    return want


def _plain(flex, hfs, x, i):
    _loss(flex(x)).backward()


def _hooked_params(flex):
    return [p for n, p in flex.module.named_parameters() if n.endswith((SIDE, UP))]


# == passing ======================================================================================

def _autograd_grad(flex, hfs, x, i):
    grads = torch.autograd.grad(_loss(flex(x)), _hooked_params(flex), allow_unused=True)
    return [None if g is None else g.clone() for g in grads]


@distributed(world_size=2, timeout_s=20)
def test_autograd_grad_instead_of_backward():
    """``torch.autograd.grad`` over the two hooked parameters (no_sync: DDP's reducer needs
    ``.backward()``): the deferred hook stores one process's value, and the gradients returned
    are each rank's own, untouched by the deferral."""
    xs = _branch_batches([(0,), (1,), (0, 1), ()], world=2)
    runs = _run(_autograd_grad, xs, sync=False)
    want = _same(runs, grads=False)
    assert _keys(want) == [BOTH] * 3 + [[f"{UP}:grad"]], _keys(want)
    rank = dist.get_rank()
    for x, got in zip(xs, runs[1][1], strict=True):
        ref = BranchNet()  # this rank's rows alone, no hooks
        expect = torch.autograd.grad(_loss(ref(_shard(x, rank, 2))),
                                     [ref.blocks[1].up.weight, ref.side.weight],
                                     allow_unused=True)
        # named_parameters order: blocks.1.up before side
        for g, e in zip(got, expect, strict=True):
            assert (g is None) == (e is None)
            if e is not None:
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def _double_backward(flex, hfs, x, i):
    """A penalty linear in the first gradient (so DDP's average equals one process's): the
    hooks fire in the ``create_graph`` grad and again in the backward through it."""
    params = _hooked_params(flex)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(p.shape, generator=g) for p in params]
    loss = _loss(flex(x))
    first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    penalty = sum((d * w).sum() for d, w in zip(first, weights, strict=True) if d is not None)
    (loss + penalty).backward()


@distributed(world_size=2, timeout_s=20)
def test_double_backward_with_create_graph():
    """``autograd.grad(create_graph=True)`` then ``.backward()`` through the gradient (synced
    DDP): two calls per hook and step, each one process's value; gradients equal."""
    xs = _branch_batches([(0,), (1,), (0, 1)], world=2)
    want = _same(_run(_double_backward, xs))
    assert [{k: len(v) for k, v in s.items()} for s in want] == \
        [{f"{SIDE}:grad": 2, f"{UP}:grad": 2}] * 3


@distributed(world_size=2, timeout_s=20)
def test_expected_shape_on_the_deferred_hook():
    """A right ``expected_shape`` (agreed at the deferred call) stores one process's value; a
    wrong one raises ``ShapeMismatchError`` on every rank (at the end of the backward) with
    nothing stored for it, as one process raises at its hook."""
    xs = _branch_batches([(0,), (1,)], world=2)
    _same(_run(_plain, xs, hooks=(_hook(SIDE, expected_shape=(8, None)), _hook(UP))))
    runs = _run(_plain, xs, hooks=(_hook(SIDE, expected_shape=(8, 9)), _hook(UP)), sync=False)
    (want, _, _, want_err), (got, _, _, err) = runs
    for e in (want_err, err):
        assert e is not None and "ShapeMismatchError" in e and "(8, 9)" in e, e
    # the hook on ``up`` ran before the error in both (its gradient comes first)
    _compare(got, None, want, None)
    assert _keys(want) == [[f"{UP}:grad"]], _keys(want)


@distributed(world_size=2, timeout_s=20)
def test_reduce_callable_on_the_deferred_hook():
    """``reduce=`` (a callable) on the deferred hook, storing on rank 0 and on every rank: the
    reduction of one process's gradient is stored."""
    xs = _branch_batches([(0,), (1,), ()], world=2)
    hooks = (_hook(SIDE, reduce=lambda t: t.sum(0)), _hook(UP))
    want = _same(_run(_plain, xs, hooks=hooks))
    assert want[0][f"{SIDE}:grad"][0].shape == (8,)
    _same(_run(_plain, xs, hooks=hooks, store_on="all"), storing=(0, 1))


def _direct_call(flex, hfs, x, i):
    """Step 0 through ``flex(x)`` with the branch's hook alone, later steps call the wrapped
    module itself after ``select_hook_groups``."""
    if i == 0:
        flex.update_hook_groups(hfs[0], "side")
        _loss(flex(x, groups="side")).backward()
        return
    flex.select_hook_groups("all")
    _loss(flex.module(x)).backward()


@distributed(world_size=2, timeout_s=20)
def test_wrapped_module_called_directly_after_select_hook_groups():
    """Calls of the wrapped module itself (what a schedule does) agree and defer as
    ``flex(x)`` does."""
    xs = _branch_batches([(0,), (1,), (0,)], world=2)
    want = _same(_run(_direct_call, xs))
    assert _keys(want) == [[f"{SIDE}:grad"], BOTH, BOTH], _keys(want)


def _pair(takers_a, takers_b):
    """The inputs of two forwards in one tensor (along the sequence dim, so that each rank's
    rows hold its rows of both): the ranks in ``takers_a`` take the branch in the first."""
    return torch.cat(_branch_batches([takers_a, takers_b], world=2), dim=1)


def _two_forwards(flex, hfs, x, i):
    (_loss(flex(x[:, :3])) + _loss(flex(x[:, 3:]))).backward()


@distributed(world_size=2, timeout_s=20)
def test_summed_losses_all_then_some_equals_one_process():
    """Summed losses of two forwards, the branch taken by every rank in the first and by rank 0
    in the second: the second's outputs are reached first on every rank, so the hook is
    deferred everywhere and stores one process's value (no_sync: DDP reduces one forward per
    backward)."""
    runs = _run(_two_forwards, [_pair((0, 1), (0,))], sync=False)
    assert _keys(_same(runs, grads=False)) == [BOTH]


@distributed(world_size=2, timeout_s=20)
def test_documented_limitation_raises_on_every_rank_then_a_step_is_right():
    """The limitation of the module docstring: summed losses of two forwards, the branch taken
    by rank 0 in the first and by every rank in the second. Rank 1 reaches the branch's
    gradient before the first forward's outputs: every rank raises HookSiteMismatchError (no
    hang, nothing stored for the branch); the next (synced) mixed step stores one process's
    value and equal gradients."""
    pair = _pair((0,), (0, 1))
    (nxt,) = _branch_batches([(1,)], world=2)
    want, want_grads = _one_process([nxt])
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, hfs = _flex(model, stored)
    err = None
    try:
        with model.no_sync():
            _two_forwards(flex, hfs, _shard(pair, rank, 2), 0)
    except Exception as e:  # noqa: BLE001 -- every rank raises alike
        err = repr(e)
    first = _take(stored)
    model.zero_grad(set_to_none=True)
    _loss(flex(_shard(nxt, rank, 2))).backward()
    got = [_take(stored)]
    unused = flex.runtime._unused
    left = (dict(unused._kept), set(unused._active))
    grads = _grads(model)
    flex.close()
    assert err is not None and "HookSiteMismatchError" in err and "side.weight" in err, err
    assert f"{SIDE}:grad" not in first, sorted(first)
    assert left == ({}, set()), left
    _compare(got, grads, want, want_grads)


@distributed(world_size=2, timeout_s=30)
def test_more_than_1024_forwards_without_backward_stay_bounded():
    """1030 mixed forwards whose graphs are dropped without a backward: the deferrals kept stay
    at ``_PASSES_REMEMBERED`` (1024), nothing is kept or active, and a backward through the
    latest forward stores one process's value."""
    (x,) = _branch_batches([(0,)], world=2)
    want, _ = _one_process([x])
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored)
    mine = _shard(x, dist.get_rank(), 2)
    for _ in range(unused_parameters._PASSES_REMEMBERED + 6):
        out = flex(mine)
    unused = flex.runtime._unused
    state = (len(unused._by_pass), unused._kept, unused._active)
    _loss(out).backward()
    got = [_take(stored)]
    flex.close()
    assert unused_parameters._PASSES_REMEMBERED == 1024
    assert state == (1024, {}, frozenset()), state[0]
    _compare(got, None, want, None)


@distributed(world_size=4, timeout_s=20)
def test_no_sync_accumulation_on_four_ranks_ending_without_takers():
    """DP=4, micro-batches accumulated under no_sync whose branch takers change (ranks 0 and 1,
    rank 3), a synced step where no rank takes it (DDP reduces the accumulated gradients of
    ranks that used it earlier), then one more synced step (rank 2): every step stores what
    one process stores, gradients equal."""
    xs = _branch_batches([(0, 1), (3,), (), (2,)], world=4)
    want, want_grads = _one_process(xs)
    assert _keys(want) == [BOTH, BOTH, [f"{UP}:grad"], BOTH], _keys(want)
    model = DDP(BranchNet(), find_unused_parameters=True)
    contexts = [model.no_sync, model.no_sync, contextlib.nullcontext, contextlib.nullcontext]
    _compare(*_sharded(xs, contexts=contexts, model=model), want, want_grads)


class AuxNet(BranchNet):
    """(head output, an auxiliary loss of the branch): the auxiliary output needs no grad on a
    rank whose rows skip the branch (a head on a branch)."""

    def forward(self, x):
        take = x[:, 0, 0] > 0
        h = self.blocks[0](x)
        aux = x.new_zeros(())
        if take.any():
            s = self.side(h)
            aux = s[take].pow(2).sum() / x.shape[0]
            h = torch.where(take[:, None, None], h + s, h)
        return self.head(self.blocks[1](h)), aux


class SideAuxNet(BranchNet):
    """(head output, auxiliary output): the branch feeds only the auxiliary output; on a rank
    whose rows skip it, the auxiliary output comes from block 0 alone (times zero)."""

    def forward(self, x):
        take = x[:, 0, 0] > 0
        h = self.blocks[0](x)
        aux = h.sum() * 0.0
        if take.any():
            aux = self.side(h[take]).pow(2).sum() / x.shape[0]
        return self.head(self.blocks[1](h)), aux


def _out_plus_aux(flex, hfs, x, i):
    out, aux = flex(x)
    (_loss(out) + aux).backward()


def _aux_only(flex, hfs, x, i):
    flex(x)[1].backward()


@distributed(world_size=2, timeout_s=20)
def test_tuple_outputs_auxiliary_output_of_the_branch():
    """A tuple output whose second tensor requires grad only where the branch ran, summed into
    the loss; then a backward through the auxiliary output alone (the only one the branch
    feeds): both store one process's values, gradients equal."""
    xs = _branch_batches([(0,), (1,), (0, 1), ()], world=2)
    want = _same(_run(_out_plus_aux, xs, model_fn=AuxNet))
    assert _keys(want) == [BOTH] * 3 + [[f"{UP}:grad"]], _keys(want)
    want = _same(_run(_aux_only, xs, hooks=(_hook(SIDE),), model_fn=SideAuxNet))
    assert _keys(want) == [[f"{SIDE}:grad"]] * 3 + [[]], _keys(want)


def _checkpointed_call(reentrant):
    def step(flex, hfs, x, i):
        x = x.clone().requires_grad_(True)
        _loss(checkpoint(flex, x, use_reentrant=reentrant)).backward()
    return step


@distributed(world_size=2, timeout_s=20)
def test_non_reentrant_checkpoint_around_the_whole_call():
    """``checkpoint(flex, x, use_reentrant=False)`` (the forward runs under grad, the
    recomputation in the same graph task): one process's values (no_sync)."""
    xs = _branch_batches([(0,), (1,)], world=2)
    assert _keys(_same(_run(_checkpointed_call(False), xs, sync=False), grads=False)) == \
        [BOTH] * 2


# == found wrong ==================================================================================

@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class DataclassNet(nn.Module):
    """``BranchNet`` returning a dataclass, which DDP's own walk (``_find_tensors``) reads."""

    def __init__(self):
        super().__init__()
        self.net = BranchNet()

    def forward(self, x):
        return Output(self.net(x))


def _dataclass_step(flex, hfs, x, i):
    _loss(flex(x).logits).backward()


@distributed(world_size=2, timeout_s=20)
def test_dataclass_output():
    """A model returning a dataclass: its fields' tensors are walked and watched, as DDP finds
    them (pytree takes a dataclass as one leaf)."""
    xs = _branch_batches([(0,), (1,)], world=2)
    hooks = (_hook(SIDE, "net."), _hook(UP, "net."))
    want = _same(_run(_dataclass_step, xs, hooks=hooks, model_fn=DataclassNet, sync=False),
                 grads=False)
    assert _keys(want) == [[f"net.{k}" for k in BOTH]] * 2


def _late_step(flex, hfs, x, i):
    """Step 0: the branch's gradient hook registered between forward and backward."""
    out = flex(x)
    if i == 0:
        flex.register_hook(HookFunction(actual_names(flex.module)[SIDE]))
    _loss(out).backward()


def _unselected_then_selected(flex, hfs, x, i):
    """Forward A with only a forward hook's group chosen, forward B with every hook; one
    backward through both (the selection of B holds for it)."""
    if i == 0:
        fwd = next(hf for hf in flex.hook_functions if hf.hook_type == "forward")
        flex.update_hook_groups(fwd, "fwd")
    a = flex(x[:, :3], groups="fwd")
    b = flex(x[:, 3:])
    (_loss(a) + _loss(b)).backward()


@pytest.mark.parametrize("case", ["registered_late", "chosen_in_a_later_forward"])
@distributed(world_size=2, timeout_s=20)
def test_gradient_hook_enabled_after_a_forward_without_backward_hooks(case):
    """A gradient hook enabled for the backward but not at its forward (registered after a
    forward with only forward hooks, or chosen by a later forward whose loss is summed in): the
    agreement is made after every hooked forward, so it is deferred."""
    if case == "registered_late":
        xs = _branch_batches([(0,), (1,)], world=2)
        runs = _run(_late_step, xs, hooks=(), forward_hooks=("blocks.1",), sync=False)
        assert _keys(_same(runs, grads=False)) == [["blocks.1", f"{SIDE}:grad"]] * 2
    else:
        runs = _run(_unselected_then_selected, [_pair((0,), ())], forward_hooks=("blocks.1",),
                    sync=False)
        assert _keys(_same(runs, grads=False)) == [["blocks.1", *BOTH]]


@pytest.mark.xfail(strict=True, reason=(
    "checkpoint(flex, x, use_reentrant=True): the forward runs under no_grad, so "
    "agree_parameter_use makes no agreement (distributed_runtime.py:428), and the "
    "recomputation inside the backward is no hooked pass (wrapper.py:123, graph task != -1): "
    "nothing is deferred, the branch's hook runs on rank 0 alone: HookSiteMismatchError. Right: "
    "agree on the recomputed forward (every rank recomputes at the same point) and store one "
    "process's value"))
@distributed(world_size=2, timeout_s=20)
def test_reentrant_checkpoint_around_the_whole_call():
    xs = _branch_batches([(0,), (1,)], world=2)
    _same(_run(_checkpointed_call(True), xs, sync=False), grads=False)


def _out_only(flex, hfs, x, i):
    _loss(flex(x)[0]).backward()


@distributed(world_size=2, timeout_s=20)
def test_parameter_reached_only_through_an_output_the_loss_does_not_use():
    """A parameter every rank uses, reached only through an output the loss does not use: DDP
    gives that output no gradient and torch calls the hook with None; nothing is stored, as in
    one process."""
    xs = _branch_batches([(0, 1)], world=2)  # every rank takes the branch: not deferred
    want = _same(_run(_out_only, xs, model_fn=SideAuxNet, sync=False), grads=False)
    assert _keys(want) == [[f"{UP}:grad"]], _keys(want)


@distributed(world_size=2, timeout_s=6)
def test_deferred_parameter_reached_only_through_an_output_the_loss_does_not_use():
    """The same with the branch taken by rank 0 only (deferred): the None gradient keeps
    nothing, and nothing is stored, as in one process. (Last: it hung, rank 0 raising, rank 1
    waiting at the end of the backward.)"""
    xs = _branch_batches([(0,)], world=2)
    want = _same(_run(_out_only, xs, model_fn=SideAuxNet, sync=False), grads=False)
    assert _keys(want) == [[f"{UP}:grad"]], _keys(want)
