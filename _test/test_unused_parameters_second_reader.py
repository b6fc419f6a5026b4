"""Second reading of the gradient hooks on parameters that DDP's
``find_unused_parameters=True`` leaves unused on some data-parallel ranks
(``flex_surgery/parallel/unused_parameters.py``, wired in ``DistributedRuntime``).

What every hook stores and the gradients equal one process over the whole batch
(``BranchNet`` of ``test_grad_accumulation``, whose ``side`` runs only on rows whose first
feature is positive). The second part pins cases this reading found wrong at first (a
deferral outliving its forward or ending with the first of two backwards, zeros stored for a
backward that reached no gradient, the refused edit leaving DDP unfinished, a reentrant
checkpoint hiding the branch, a hook registered between forward and backward). Every rank runs
the same collectives before anything is compared, so a failing assert leaves no rank waiting.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from parallel_cases import actual_names, clean, clean_keys, local_group
from rank_pool import distributed
from test_grad_accumulation import TOL, BranchNet, _batches, _shard, squash
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.nn.parallel import DistributedDataParallel as DDP

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction

SIDE = "side.weight"
UP = "blocks.1.up.weight"


def _branch_batches(takers_per_step, world):
    """Micro-batches of ``2 * world`` rows (2 per rank); the ranks in each step's ``takers``
    take ``BranchNet``'s branch, the others do not."""
    xs = _batches(len(takers_per_step), batch=2 * world)
    for x, takers in zip(xs, takers_per_step, strict=True):
        for rank in range(world):
            x[2 * rank:2 * rank + 2, 0, 0] = 5.0 if rank in takers else -5.0
    return xs


def _flex(model, stored, params=(SIDE, UP), edit=None, process_group=None, **options):
    flex = FlexModel(model, stored, process_group=process_group, key_by_hook_kind=True,
                     **options)
    names = actual_names(model)
    hfs = [HookFunction(names[p], editing_function=edit) for p in params]
    for hf in hfs:
        flex.register_hook(hf)
    return flex, hfs


def _loss(out):
    return out.pow(2).mean()


def _grads(model):
    """The gradients a backward gave (none for parameters it never reached)."""
    return {clean(n): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _plain_step(flex, hfs, x, i):
    _loss(flex(x)).backward()


def _take(stored):
    got = clean_keys(stored)
    stored.clear()
    return got


def _one_process(xs, step=None, **kwargs):
    """What one process over the whole batch stores at each step, and its gradients."""
    model = BranchNet()
    stored = {}
    flex, hfs = _flex(model, stored, process_group=local_group(), **kwargs)
    per_step = []
    for i, x in enumerate(xs):
        (step or _plain_step)(flex, hfs, x, i)
        per_step.append(_take(stored))
    flex.close()
    return per_step, _grads(model)


def _sharded(xs, contexts=None, step=None, model=None, **kwargs):
    """The same steps on each rank's rows under DDP(find_unused_parameters=True)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(BranchNet(), find_unused_parameters=True) if model is None else model
    stored = {}
    flex, hfs = _flex(model, stored, **kwargs)
    per_step = []
    contexts = contexts or [contextlib.nullcontext] * len(xs)
    for i, (x, ctx) in enumerate(zip(xs, contexts, strict=True)):
        with ctx():
            (step or _plain_step)(flex, hfs, _shard(x, rank, world), i)
        per_step.append(_take(stored))
    grads = _grads(model)
    flex.close()
    return per_step, grads


def _compare(got, got_grads, want, want_grads, storing=(0,)):
    """After every collective: ranks in ``storing`` hold what one process stores, the others
    nothing; gradients equal everywhere."""
    if dist.get_rank() in storing:
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.keys() == w.keys(), (i, sorted(g), sorted(w))
            for k in w:
                assert len(g[k]) == len(w[k]), (i, k, len(g[k]), len(w[k]))
                for a, b in zip(g[k], w[k], strict=True):
                    torch.testing.assert_close(a, b, **TOL,
                                               msg=lambda m, i=i, k=k: f"step {i} {k}: {m}")
    else:
        assert all(s == {} for s in got), got
    if want_grads is not None:
        assert got_grads.keys() == want_grads.keys()
        for k in want_grads:
            torch.testing.assert_close(got_grads[k], want_grads[k], **TOL,
                                       msg=lambda m, k=k: f"grad {k}: {m}")


BOTH = sorted([f"{SIDE}:grad", f"{UP}:grad"])


def _keys(steps):
    return [sorted(s) for s in steps]


# == pinned: stores what one process stores ==================================================

@distributed(world_size=4, timeout_s=20)
def test_four_ranks_one_three_none_then_one_taker():
    """DP=4: the branch taken by 1 rank, by 3, by none (no hook fires anywhere, nothing is
    deferred), then by 1 again (the deferred set of an earlier step does not linger)."""
    xs = _branch_batches([(0,), (1, 2, 3), (), (2,)], world=4)
    want, want_grads = _one_process(xs)
    assert _keys(want) == [BOTH, BOTH, [f"{UP}:grad"], BOTH], _keys(want)
    _compare(*_sharded(xs), want, want_grads)


def _grouped_step(flex, hfs, x, i):
    """Step 0: the branch's hook is in a group not chosen; step 1: every hook; step 2: the
    branch's hook only."""
    if i == 0:
        flex.update_hook_groups(hfs[0], "side")
        flex.update_hook_groups(hfs[1], "main")
    _loss(flex(x, groups=["main", "all", "side"][i])).backward()


@distributed(world_size=2, timeout_s=20)
def test_branch_hook_in_a_group_not_chosen():
    """A mixed branch while the branch's hook is not chosen (another gradient hook is): the
    deferred hook runs disabled at the backward's end and stores nothing, as one process; it
    stores when chosen, with the others or alone."""
    xs = _branch_batches([(0,), (1,), (0,)], world=2)
    want, want_grads = _one_process(xs, step=_grouped_step)
    assert _keys(want) == [[f"{UP}:grad"], BOTH, [f"{SIDE}:grad"]], _keys(want)
    _compare(*_sharded(xs, step=_grouped_step), want, want_grads)


def _main_only_step(flex, hfs, x, i):
    if i == 0:
        flex.update_hook_groups(hfs[1], "main")
    _loss(flex(x, groups="main")).backward()


@distributed(world_size=2, timeout_s=20)
def test_editing_branch_hook_in_a_group_not_chosen_is_not_refused():
    """Editing hooks on the branch's parameter (not chosen) and on one every rank uses
    (chosen), mixed branch: nothing is refused, the chosen edit applies, the gradients and
    what is stored equal one process's."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs, step=_main_only_step, edit=squash)
    assert _keys(want) == [[f"{UP}:grad"]] * 2, _keys(want)
    _compare(*_sharded(xs, step=_main_only_step, edit=squash), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_two_hook_functions_on_the_branch_parameter():
    """Two retrieving HookFunctions on the branch's parameter: both deferred (two keys), both
    store the one-process value, once each per step."""
    xs = _branch_batches([(0,), (0, 1), (1,)], world=2)
    params = (SIDE, UP, SIDE)
    want, want_grads = _one_process(xs, params=params)
    assert [len(s[f"{SIDE}:grad"]) for s in want] == [2, 2, 2]
    _compare(*_sharded(xs, params=params), want, want_grads)


def _remove_before_backward(flex, hfs, x, i):
    out = flex(x)
    if i == 0:
        flex.remove_hook_function(hfs[0])
    _loss(out).backward()


@distributed(world_size=2, timeout_s=20)
def test_branch_hook_removed_between_forward_and_backward():
    """The deferred hook removed after the forward (``_Handle.remove`` -> ``forget``): it
    stores nothing in that backward or later, as in one process; the other hook is kept."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs, step=_remove_before_backward)
    assert _keys(want) == [[f"{UP}:grad"]] * 2, _keys(want)
    _compare(*_sharded(xs, step=_remove_before_backward), want, want_grads)


def _no_grad_forwards(flex, hfs, x, i):
    if i == 0:
        with torch.no_grad():
            flex(x)
        return
    out = flex(x)
    with torch.no_grad():  # an evaluation forward between forward and backward
        flex(x.flip(0))
    _loss(out).backward()


@distributed(world_size=2, timeout_s=20)
def test_no_grad_forwards_around_a_mixed_step():
    """A no-grad forward (mixed branch: agrees on nothing), then a step with another no-grad
    forward between its forward and backward: stores what one process stores."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs, step=_no_grad_forwards)
    assert _keys(want) == [[], BOTH], _keys(want)
    _compare(*_sharded(xs, step=_no_grad_forwards), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_store_on_all_and_overlap_retrieval():
    """``store_on="all"``: every rank stores the deferred hook's one-process value; with
    ``overlap_retrieval=True`` the deferred retrieval has landed when the backward returns."""
    xs = _branch_batches([(1,), (0, 1), (0,)], world=2)
    want, want_grads = _one_process(xs)
    _compare(*_sharded(xs, store_on="all"), want, want_grads, storing=(0, 1))
    _compare(*_sharded(xs, overlap_retrieval=True), want, want_grads)


def _checkpointed_side(reentrant):
    model = BranchNet()
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    model.side = checkpoint_wrapper(model.side, checkpoint_impl=impl)
    return model


@distributed(world_size=2, timeout_s=20)
def test_non_reentrant_checkpoint_around_the_branch():
    """The branch under a non-reentrant activation checkpoint (recomputed in the same graph
    task, its parameter visible to the walk): stores what one process stores."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs)
    model = DDP(_checkpointed_side(False), find_unused_parameters=True)
    _compare(*_sharded(xs, model=model), want, want_grads)


# == found wrong by this reading, fixed ==========================================================

def _forward_only_first(flex, hfs, x, i):
    out = flex(x)
    if i > 0:  # step 0: a forward whose loss is not backpropagated (skipped on NaN, eval)
        _loss(out).backward()


@distributed(world_size=2, timeout_s=20)
def test_forward_without_backward_then_a_step_without_the_branch():
    """A hooked forward with grad enabled and no backward, where only rank 0 took the branch,
    then a step where no rank does: its deferral died with its graph, so the step stores
    nothing for the branch, as one process does (not zeros)."""
    xs = _branch_batches([(0,), ()], world=2)
    want, want_grads = _one_process(xs, step=_forward_only_first)
    assert _keys(want) == [[], [f"{UP}:grad"]], _keys(want)
    _compare(*_sharded(xs, step=_forward_only_first), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_forward_without_backward_then_an_edit_every_rank_may_make():
    """After a forward without backward in which only rank 0 took the branch, a step where every
    rank takes it edits the branch's gradient as one process does (no stale deferral refuses
    it)."""
    xs = _branch_batches([(0,), (0, 1)], world=2)
    want, want_grads = _one_process(xs, step=_forward_only_first, edit=squash)
    assert _keys(want) == [[], BOTH], _keys(want)
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, _ = _flex(model, stored, edit=squash)
    flex(_shard(xs[0], rank, 2))
    err = None
    try:  # every rank refuses alike
        _loss(flex(_shard(xs[1], rank, 2))).backward()
    except RuntimeError as e:
        err = repr(e)
    got = [{}, _take(stored)]
    grads = _grads(model)
    flex.close()
    assert err is None, err
    _compare(got, grads, want, want_grads)


def _backward_to_up_only(flex, hfs, x, i):
    up = next(p for n, p in flex.module.named_parameters() if clean(n) == UP)
    _loss(flex(x)).backward(inputs=[up])


@distributed(world_size=2, timeout_s=20)
def test_no_sync_backward_not_reaching_the_branch():
    """A backward that reaches the branch's parameter on no rank (``backward(inputs=...)``) runs
    no deferred hook, as one process runs none (the ranks agree that no gradient came)."""
    xs = _branch_batches([(0,)], world=2)
    want, _ = _one_process(xs, step=_backward_to_up_only)
    assert _keys(want) == [[f"{UP}:grad"]], _keys(want)
    model = DDP(BranchNet(), find_unused_parameters=True)
    got, _ = _sharded(xs, step=_backward_to_up_only, model=model, contexts=[model.no_sync])
    _compare(got, None, want, None)


def _two_backwards(flex, hfs, x, i):
    out = flex(x)
    _loss(out).backward(retain_graph=True)
    (3 * _loss(out)).backward()  # a mean: DDP's average over the ranks is one process's


@distributed(world_size=2, timeout_s=20)
def test_no_sync_two_backwards_through_one_forward():
    """Two backwards through one forward (``retain_graph=True``): the forward's deferral holds in
    both, and each stores what one process stores."""
    xs = _branch_batches([(0,)], world=2)
    want, _ = _one_process(xs, step=_two_backwards)
    assert [len(s[f"{SIDE}:grad"]) for s in want] == [2]
    model = DDP(BranchNet(), find_unused_parameters=True)
    got, _ = _sharded(xs, step=_two_backwards, model=model, contexts=[model.no_sync])
    _compare(got, None, want, None)


@distributed(world_size=2, timeout_s=20)
def test_refused_edit_then_a_normal_step():
    """The refused edit is raised after DDP's own end of backward, so the DDP stays usable: with
    the editing hook removed, the next step stores what one process stores."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs[1:])
    rank = dist.get_rank()
    model = DDP(BranchNet(), find_unused_parameters=True)
    stored = {}
    flex, hfs = _flex(model, stored, edit=squash)
    refused = None
    try:
        _loss(flex(_shard(xs[0], rank, 2))).backward()
    except RuntimeError as e:
        refused = str(e)
    for hf in hfs:
        flex.remove_hook_function(hf)
    stored.clear()
    model.zero_grad(set_to_none=True)
    names = actual_names(model)
    for name in (SIDE, UP):
        flex.register_hook(HookFunction(names[name]))
    err = None
    try:  # every rank raises here alike (DDP's state is the same on every rank)
        _loss(flex(_shard(xs[1], rank, 2))).backward()
    except RuntimeError as e:
        err = repr(e)
    got = _take(stored)
    grads = _grads(model)
    flex.close()
    assert refused and "retrieved there but not edited" in refused, refused
    assert err is None, err
    _compare([got], grads, want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_no_sync_reentrant_checkpoint_around_the_branch():
    """The branch under a reentrant activation checkpoint (under no_sync; synced DDP refuses
    reentrant checkpointing with find_unused_parameters itself): the walk cannot see the
    region's parameters, so the retrieving hooks are deferred; the gradient kept in the
    checkpoint's nested backward is the one stored, as in one process."""
    xs = _branch_batches([(0,)], world=2)
    want, _ = _one_process(xs)
    model = DDP(_checkpointed_side(True), find_unused_parameters=True)
    got, _ = _sharded(xs, model=model, contexts=[model.no_sync])
    _compare(got, None, want, None)


def _register_after_forward(flex, hfs, x, i):
    out = flex(x)
    if i == 0:
        flex.register_hook(HookFunction(actual_names(flex.module)[SIDE]))
    _loss(out).backward()


@distributed(world_size=2, timeout_s=20)
def test_branch_hook_registered_between_forward_and_backward():
    """A gradient hook on the branch's parameter registered between a forward and its backward
    is deferred too (the agreement covers every parameter of the DDP)."""
    xs = _branch_batches([(0,), (1,)], world=2)
    want, want_grads = _one_process(xs, step=_register_after_forward, params=(UP,))
    assert _keys(want) == [BOTH, BOTH], _keys(want)
    _compare(*_sharded(xs, step=_register_after_forward, params=(UP,)), want, want_grads)
