"""Third reading of the gradient hooks on parameters that DDP's ``find_unused_parameters=True``
leaves unused on some data-parallel ranks (``flex_surgery/parallel/unused_parameters.py``).

``BranchNet`` (``side`` runs only on rows whose first feature is positive) and the helpers of
the second reading; cases it does not cover: mixed hooks on 4 ranks and under DP x TP, a
container around the DDP, ``keep="last"`` without per-kind keys, both graphs of two forwards
alive, a loss that raises, closing between forward and backward, many steps (no state left
behind), then the cases this reading found wrong at first and that are fixed (a kept graph
deferring later steps, deferrals depending on each rank's garbage collector, the first
parameter hook registered between forward and backward, a hang where a branch's module hook
meets the deferred hooks). Every rank runs the same collectives before anything is compared,
so a failing assert leaves no rank waiting; the case that hung is last.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from parallel_cases import actual_names, clean_keys, column_like, local_group, row_like
from rank_pool import distributed
from test_grad_accumulation import TOL, BranchNet, _shard, squash
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

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.layout import fairscale_param_dim

BOTH = sorted([f"{SIDE}:grad", f"{UP}:grad"])


def _retrieve_side_edit_up(flex, hfs, x, i):
    """Step 0: the editing hook on ``up`` (every rank uses it) is added beside the retrieving
    one on the branch's parameter; every step runs both."""
    if i == 0:
        flex.remove_hook_function(hfs[1])
        flex.register_hook(HookFunction(actual_names(flex.module)[UP], editing_function=squash))
    _loss(flex(x)).backward()


@distributed(world_size=4, timeout_s=20)
def test_four_ranks_retrieve_on_the_branch_edit_on_the_trunk():
    """DP=4, in one step a deferred retrieval (the branch, taken by 2, 3, 1 ranks) and an edit
    in the backward of a parameter every rank uses: the edit is applied (not refused), and
    what is stored and the gradients equal one process's."""
    xs = _branch_batches([(0, 2), (1, 2, 3), (3,)], world=4)
    want, want_grads = _one_process(xs, step=_retrieve_side_edit_up)
    assert _keys(want) == [BOTH] * 3, _keys(want)
    _compare(*_sharded(xs, step=_retrieve_side_edit_up), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_keep_last_without_per_kind_keys():
    """``keep="last"``, ``key_by_hook_kind=False``: the deferred hook stores its one-process
    value under the parameter's name, replacing the previous step's."""
    xs = _branch_batches([(0,), (1,), (0, 1)], world=2)
    rank = dist.get_rank()
    results = []
    for group, model, mine in ((local_group(), BranchNet(), xs),
                               (None, DDP(BranchNet(), find_unused_parameters=True),
                                [_shard(x, rank, 2) for x in xs])):
        stored = {}
        flex = FlexModel(model, stored, process_group=group, keep="last")
        names = actual_names(model)
        for p in (SIDE, UP):
            flex.register_hook(HookFunction(names[p]))
        steps = []
        for x in mine:
            _loss(flex(x)).backward()
            steps.append({k: v.clone() for k, v in clean_keys(stored).items()})
        results.append((steps, _grads(model)))
        flex.close()
    (want, want_grads), (got, grads) = results
    assert [sorted(s) for s in want] == [sorted([SIDE, UP])] * 3
    if rank == 0:
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for k in w:
                torch.testing.assert_close(g[k], w[k], **TOL)
    else:
        assert all(s == {} for s in got)
    for k in want_grads:
        torch.testing.assert_close(grads[k], want_grads[k], **TOL)


class _Outer(nn.Module):
    """A container around the (DDP) model, with a parameter of its own every rank uses."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.full((6,), 1.5))

    def forward(self, x):
        return self.inner(x) * self.scale


def _unwrapped(stored):
    return {k.replace("inner.module.", "inner."): v for k, v in stored.items()}


@distributed(world_size=2, timeout_s=20)
def test_container_around_the_ddp():
    """FlexModel over a module that holds the DDP (found among its submodules), with a hook on
    the container's own parameter too: the branch's hook is deferred and stores one
    process's value."""
    xs = _branch_batches([(0,), (1,)], world=2)
    rank = dist.get_rank()
    params = ("inner.side.weight", "inner.blocks.1.up.weight", "scale")
    results = []
    for group, inner, mine in ((local_group(), BranchNet(), xs),
                               (None, DDP(BranchNet(), find_unused_parameters=True),
                                [_shard(x, rank, 2) for x in xs])):
        model = _Outer(inner)
        stored = {}
        flex = FlexModel(model, stored, process_group=group, key_by_hook_kind=True)
        names = {k.replace("inner.module.", "inner."): v for k, v in actual_names(model).items()}
        for p in params:
            flex.register_hook(HookFunction(names[p]))
        steps = []
        for x in mine:
            _loss(flex(x)).backward()
            steps.append(_unwrapped(_take(stored)))
        grads = {k.replace("inner.module.", "inner."): p.grad.clone()  # DDP's own: reduced
                 for k, p in model.named_parameters() if k != "scale"}
        flex.close()
        results.append((steps, grads))
    (want, want_grads), (got, grads) = results
    assert [sorted(s) for s in want] == [sorted(f"{p}:grad" for p in params)] * 2
    _compare(got, grads, want, want_grads)


def _ab_step(flex, hfs, xs, i):
    """Two forwards whose graphs are both alive; the backward through the second, then the
    first."""
    a, b = flex(xs[0]), flex(xs[1])
    _loss(b).backward()
    _loss(a).backward()


@distributed(world_size=2, timeout_s=20)
def test_backward_through_the_second_of_two_live_forwards_then_the_first():
    """Forward A (rank 0 takes the branch), forward B (no rank does), backward through B only
    while A's graph lives (its deferral is live), then through A: B's backward stores nothing
    for the branch (no rank's gradient came), A's stores one process's value."""
    xs = _branch_batches([(0,), ()], world=2)
    rank = dist.get_rank()
    want, _ = _one_process([xs], step=_ab_step)
    assert len(want[0][f"{SIDE}:grad"]) == 1 and len(want[0][f"{UP}:grad"]) == 2
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, hfs = _flex(model, stored)
    with model.no_sync():  # DDP reduces one forward per backward; the hooks gather anyway
        _ab_step(flex, hfs, [_shard(x, rank, 2) for x in xs], 0)
    got = [_take(stored)]
    flex.close()
    _compare(got, None, want, None)


def _raising_loss_step(flex, hfs, x, i):
    """Step 0: the user's loss raises on every rank after the forward (caught, not kept); then
    normal steps with editing hooks on the branch and on the trunk."""
    def attempt():
        out = flex(x)
        if i == 0:
            raise ValueError("a loss that failed")
        _loss(out).backward()

    try:
        attempt()
    except ValueError:
        pass


@distributed(world_size=2, timeout_s=20)
def test_loss_raising_between_forward_and_backward_then_edits():
    """The loss of a mixed forward raises (the exception dropped): that forward's deferral
    dies with its graph, so the next step, where every rank takes the branch, edits the
    branch's gradient as one process does."""
    xs = _branch_batches([(0,), (0, 1)], world=2)
    want, want_grads = _one_process(xs, step=_raising_loss_step, edit=squash)
    assert _keys(want) == [[], BOTH], _keys(want)
    _compare(*_sharded(xs, step=_raising_loss_step, edit=squash), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_close_between_forward_and_backward():
    """``close()`` after a mixed forward: the backward runs no hook and no collective of the
    closed runtime, on every rank, and the model's gradients are DDP's."""
    (x,) = _branch_batches([(0,)], world=2)
    rank = dist.get_rank()
    ref = BranchNet()
    _loss(ref(x)).backward()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored)
    out = flex(_shard(x, rank, 2))
    flex.close()
    _loss(out).backward()
    assert stored == {}
    want = _grads(ref)
    got = _grads(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL)


@distributed(world_size=2, timeout_s=20)
def test_many_steps_leave_no_state_behind():
    """Twelve steps whose branch takers cycle: each equals one process, and afterwards the
    runtime remembers the deferrals of the six mixed forwards only (bounded by
    _PASSES_REMEMBERED), no kept gradient and nothing active; the hooks are the two
    registered."""
    takers = [(0,), (1,), (0, 1), ()] * 3
    xs = _branch_batches(takers, world=2)
    want, want_grads = _one_process(xs)
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored)
    got = []
    for x in xs:
        _loss(flex(_shard(x, rank, 2))).backward()
        got.append(_take(stored))
    unused = flex.runtime._unused
    # the forwards whose branch some ranks took (6 of 12) are remembered, boundedly
    state = (len(unused._by_pass), dict(unused._kept), set(unused._active),
             len(unused._hooks))
    grads = _grads(model)
    flex.close()
    assert state == (6, {}, set(), 2), state
    _compare(got, grads, want, want_grads)


def _tp_branch_net():
    plain = BranchNet()
    net = BranchNet()
    for b, p in zip(net.blocks, plain.blocks, strict=True):
        b.up, b.down = column_like(p.up), row_like(p.down)
    net.head = column_like(plain.head, gather_output=True)
    return net


@distributed(world_size=4, timeout_s=30)
def test_dp_x_tp_branch_and_sharded_trunk_hooks():
    """DP=2 x TP=2 (fairscale): the branch's parameter (replicated over tp) taken by one
    data-parallel replica then the other, beside a hook on a column-sharded trunk parameter:
    each stores the whole one-process gradient, and the gradients match."""
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.collectives import all_gather

    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs)
    fs.initialize_model_parallel(2)
    dp = fs.get_data_parallel_rank()
    net = _tp_branch_net()
    model = DDP(net, process_group=fs.get_data_parallel_group(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored, tensor_parallel_size=2, data_parallel_size=2)
    got = []
    for x in xs:
        _loss(flex(_shard(x, dp, 2))).backward()
        got.append(_take(stored))
    flex.close()
    grads = {}
    for mod_name, mod in net.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            d = fairscale_param_dim(mod, p)
            g = p.grad.detach()
            grads[f"{mod_name}.{p_name}"] = g if d is None else \
                all_gather(g, d, fs.get_model_parallel_group())
    _compare(got, grads, want, want_grads)


@distributed(world_size=2, timeout_s=20, spends_pool=True)  # a stray all-reduce
def test_find_unused_parameters_off_raises_site_mismatch_on_every_rank():
    """``find_unused_parameters=False`` with a branch rank 1 skips: nothing is deferred, and the
    branch's hook (rank 0) meets rank 1's end of backward: ``HookSiteMismatchError`` naming
    both on every rank, not a hang."""
    (x,) = _branch_batches([(0,)], world=2)
    group = dist.new_group([0, 1])  # DDP's own: the error mid-backward leaves it unfinished
    model = DDP(BranchNet(), process_group=group)
    flex, _ = _flex(model, {})
    err = None
    try:
        _loss(flex(_shard(x, dist.get_rank(), 2))).backward()
    except Exception as e:  # noqa: BLE001 -- every rank raises alike
        err = repr(e)
    flex.close()
    assert err is not None and "HookSiteMismatchError" in err, err
    assert "side.weight" in err and "end of the backward" in err, err


@distributed(world_size=2, timeout_s=20)
def test_kept_graph_of_an_earlier_forward_only_delays_retrievals():
    """A kept loss of a mixed step (its deferral lives on) while later steps, whose branch every
    rank, one rank or no rank takes, retrieve, and edit a parameter every rank uses: each
    stores what one process stores (the stale deferral delays, changes nothing)."""
    xs = _branch_batches([(0,), (0, 1), (1,), ()], world=2)

    def step(flex, hfs, x, i):
        if i == 0:
            flex.remove_hook_function(hfs[1])
            flex.register_hook(HookFunction(actual_names(flex.module)[UP],
                                            editing_function=squash))
        loss = _loss(flex(x))
        loss.backward()
        if i == 0:
            flex.save_ctx.kept = loss

    want, want_grads = _one_process(xs, step=step)
    assert _keys(want) == [BOTH, BOTH, BOTH, [f"{UP}:grad"]], _keys(want)
    _compare(*_sharded(xs, step=step), want, want_grads)


# == found wrong by this reading, fixed ==========================================================

def _kept_graph_step(keep):
    """Step 0: retrieving hooks, and the step's loss (``"loss"``: a loss list for logging) or
    its exception (``"exception"``: an error list, the frame with the output) is kept, so its
    graph lives on; step 1: editing hooks instead."""
    def step(flex, hfs, x, i):
        if i == 1:
            for hf in hfs:
                flex.remove_hook_function(hf)
            names = actual_names(flex.module)
            for p in (SIDE, UP):
                flex.register_hook(HookFunction(names[p], editing_function=squash))
        kept = flex.save_ctx.__dict__.setdefault("kept", [])

        def attempt():
            out = flex(x)
            if i == 0 and keep == "exception":
                raise ValueError("the loss failed")
            loss = _loss(out)
            loss.backward()
            if i == 0:
                kept.append(loss)

        try:
            attempt()
        except ValueError as e:
            kept.append(e)
    return step


@pytest.mark.parametrize("keep", ["loss", "exception"])
@distributed(world_size=2, timeout_s=20)
def test_kept_graph_of_an_earlier_forward_refuses_a_later_edit(keep):
    """A kept graph of an earlier forward whose branch only rank 0 took (a loss list for
    logging, a kept exception) does not defer a later step's hooks: an edit every rank may make
    there is made, as in one process (a backward defers only for the forwards it reaches)."""
    xs = _branch_batches([(0,), (0, 1)], world=2)
    step = _kept_graph_step(keep)
    want, want_grads = _one_process(xs, step=step)
    assert _keys(want) == ([BOTH, BOTH] if keep == "loss" else [[], BOTH]), _keys(want)
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, hfs = _flex(model, stored)
    got, err = [], None
    for i, x in enumerate(xs):
        try:  # every rank refuses alike
            step(flex, hfs, _shard(x, rank, 2), i)
        except RuntimeError as e:
            err = str(e)
        got.append(_take(stored))
    grads = _grads(model)
    flex.close()
    assert err is None, err
    _compare(got, grads, want, want_grads)


def _cyclic_keep(flex, x):
    """A forward whose output ends in a reference cycle (an exception kept in the frame it
    references), freed only by the cyclic garbage collector."""
    out = flex(x)
    try:
        raise ValueError("the loss failed")
    except ValueError as e:
        error = e  # frame -> error -> traceback -> frame
    assert error is not None and out is not None


@distributed(world_size=2, timeout_s=20)
def test_deferral_does_not_depend_on_each_ranks_garbage_collector():
    """The deferrals remembered are the same on every rank whenever each rank's garbage
    collector frees an old graph (here rank 0's runs, rank 1's not): they are kept by forward,
    not by the lifetime of objects in the graph."""
    (x,) = _branch_batches([(0,)], world=2)
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored)
    gc.disable()
    try:
        _cyclic_keep(flex, _shard(x, rank, 2))
        if rank == 0:
            gc.collect()  # this rank's collector happens to run now, the other's later
        flags = [None, None]
        dist.all_gather_object(flags, sorted(flex.runtime._unused._by_pass))
    finally:
        gc.enable()
    gc.collect()
    flex.close()
    # the next backward would hang where these differ: not run
    assert flags[0] == flags[1], flags


def _own_ddp(group):
    return DDP(BranchNet(), find_unused_parameters=True, process_group=group)


def _late_hook_step(flex, x):
    out = flex(x)
    flex.register_hook(HookFunction(actual_names(flex.module)[SIDE]))
    _loss(out).backward()


@distributed(world_size=2, timeout_s=20)
def test_first_parameter_hook_registered_between_forward_and_backward():
    """Only a module backward hook (on a block every rank runs) at forward time; the branch's
    parameter hook registered after the forward."""
    (x,) = _branch_batches([(0,)], world=2)
    rank = dist.get_rank()
    group = dist.new_group([0, 1])  # DDP's own: an error mid-backward leaves it unfinished
    results = []
    for pg, model, mine in ((local_group(), BranchNet(), x),
                            (None, _own_ddp(group), _shard(x, rank, 2))):
        stored, err = {}, None
        flex = FlexModel(model, stored, process_group=pg, key_by_hook_kind=True)
        flex.register_full_backward_hook(HookFunction(actual_names(model)["blocks.1"]))
        try:
            _late_hook_step(flex, mine)
        except Exception as e:  # noqa: BLE001 -- every rank raises alike
            err = repr(e)
        results.append((clean_keys(stored), err))
        flex.close()
    (want, _), (got, err) = results
    assert sorted(want) == ["blocks.1:grad_input", f"{SIDE}:grad"], sorted(want)
    assert err is None, err
    if rank == 0:
        for k in want:
            torch.testing.assert_close(got[k][0], want[k][0], **TOL)


@distributed(world_size=2, timeout_s=6, spends_pool=True)  # a stray all-reduce
def test_branch_module_backward_hook_with_deferred_parameter_hook_raises_not_hangs():
    """A module backward hook on the branch (fires on rank 0 only) beside the branch's deferred
    parameter hook: the end of the backward is announced before the deferred hooks' collectives,
    so every rank raises HookSiteMismatchError instead of waiting."""
    (x,) = _branch_batches([(0,)], world=2)
    rank = dist.get_rank()
    group = dist.new_group([0, 1])  # DDP's own: an error mid-backward leaves it unfinished
    model = _own_ddp(group)
    flex = FlexModel(model, {}, key_by_hook_kind=True)
    names = actual_names(model)
    flex.register_full_backward_hook(HookFunction(names["side"]))
    flex.register_hook(HookFunction(names[SIDE]))
    err = None
    try:
        _loss(flex(_shard(x, rank, 2))).backward()
    except Exception as e:  # noqa: BLE001 -- every rank raises alike
        err = repr(e)
    flex.close()
    assert err is not None and "HookSiteMismatchError" in err, err
