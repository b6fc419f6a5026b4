"""Fifth reading of the gradient hooks on parameters that DDP's ``find_unused_parameters=True``
leaves unused on some data-parallel ranks (``flex_surgery/parallel/unused_parameters.py``),
after the agreement was made to follow every hooked forward under grad.

``BranchNet`` (``side`` runs only on rows whose first feature is positive) and the helpers of
the earlier readings; every case is compared with one process over the whole batch, and every
rank runs the same collectives before anything is compared. Passing: forward hooks only
(retrieval, a trunk edit; DP=2 and DP=4), a forward hook on the branch raising
HookSiteMismatchError on every rank and the next steps right, a container of a
find_unused_parameters DDP and a plain DDP, ``static_graph=True`` with find_unused_parameters,
deferred hooks inside a SurgicalTheater, ``store_on="replica_leaders"`` with a DiskStore, PP=2 x
DP=2 with a DDP per stage; and what this reading found wrong at first, fixed:
``static_graph=True`` alone (now covered), a forward with no hook chosen summed with a hooked
one (was HookSiteMismatchError), and the first hook registered after a forward with none (was a
hang; last).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    actual_names,
    assert_stored_equal,
    clean_keys,
    local_group,
    plain_net,
)
from rank_pool import distributed
from test_grad_accumulation import TOL, BranchNet, _shard, squash
from test_store_distributed import _done_with, _shared_dir
from test_unused_parameters_second_reader import (
    SIDE,
    UP,
    _branch_batches,
    _compare,
    _grads,
    _keys,
    _loss,
    _take,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.store import DiskStore
from flex_surgery.surgery import SurgicalTheater

BOTH = sorted([f"{SIDE}:grad", f"{UP}:grad"])


def _find_unused(model):
    return DDP(model, find_unused_parameters=True)


def _plain(flex, x, i):
    _loss(flex(x)).backward()


def _both(xs, register, step=_plain, model_fn=BranchNet, wrap=_find_unused, sync=True,
          **options):
    """``step(flex, x, i)`` over ``xs`` in one process over the whole batch, then on each rank's
    rows with the model wrapped by ``wrap`` (under ``no_sync`` unless ``sync``); hooks put on by
    ``register(flex, names)``. Per run: what each step stored, the gradients, the error (repr)
    that ended the steps or ``None``, and the unused-parameter state left behind."""
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = []
    for group, model, mine in ((local_group(), model_fn(), xs),
                               (None, wrap(model_fn()), [_shard(x, rank, world) for x in xs])):
        stored, err, steps = {}, None, []
        flex = FlexModel(model, stored, process_group=group, key_by_hook_kind=True, **options)
        register(flex, actual_names(model))
        try:
            for i, x in enumerate(mine):
                quiet = not sync and isinstance(model, DDP)
                with model.no_sync() if quiet else contextlib.nullcontext():
                    step(flex, x, i)
                steps.append(_take(stored))
        except Exception as e:  # noqa: BLE001 -- compared after every rank is done
            err = repr(e)
            steps.append(_take(stored))
        unused = getattr(flex.runtime, "_unused", None)
        left = None if unused is None else (len(unused._by_pass), dict(unused._kept),
                                            set(unused._active))
        runs.append((steps, _grads(model), err, left))
        flex.close()
    return runs


def _same(runs, storing=(0,), grads=True):
    (want, want_grads, want_err, _), (got, got_grads, err, _) = runs
    assert want_err is None and err is None, (want_err, err)
    _compare(got, got_grads if grads else None, want, want_grads if grads else None, storing)
    return want


# == (1) forward hooks only ====================================================================

def _forward_hooks(edit):
    def register(flex, names):
        flex.register_forward_hook(HookFunction(names["blocks.0"]))
        flex.register_forward_hook(HookFunction(
            names["blocks.1.up"], editing_function=squash if edit else None))
        flex.register_forward_pre_hook(HookFunction(names["head"]))
    return register


@pytest.mark.parametrize("edit", [False, True], ids=["retrieve", "edit"])
@distributed(world_size=2, timeout_s=20)
def test_forward_hooks_only_under_find_unused_equal_one_process(edit):
    """Only forward hooks (retrievals, and a nonlinear edit on the trunk), the branch taken by
    rank 0, rank 1, both, neither: the agreement after each forward defers nothing that has a
    hook, its end-of-backward watch runs nothing, and stores and gradients equal one process;
    no deferral state is left behind beyond the remembered forwards."""
    xs = _branch_batches([(0,), (1,), (0, 1), ()], world=2)
    runs = _both(xs, _forward_hooks(edit))
    want = _same(runs)
    assert _keys(want) == [["blocks.0", "blocks.1.up", "head:input"]] * 4, _keys(want)
    by_pass, kept, active = runs[1][3]
    assert (by_pass, kept, active) == (2, {}, set()), runs[1][3]  # the two mixed forwards


@distributed(world_size=4, timeout_s=20)
def test_forward_hooks_only_on_four_ranks():
    """The same on DP=4: the branch taken by one rank, by three, by none."""
    xs = _branch_batches([(0,), (1, 2, 3), ()], world=4)
    runs = _both(xs, _forward_hooks(True))
    assert _keys(_same(runs)) == [["blocks.0", "blocks.1.up", "head:input"]] * 3
    assert runs[1][3] == (2, {}, set()), runs[1][3]


def _branch_forward_hook(trunk_after):
    def register(flex, names):
        side = HookFunction(names["side"])
        flex.register_forward_hook(side)
        flex.update_hook_groups(side, "branch")
        if trunk_after:
            flex.register_forward_hook(HookFunction(names["blocks.1"]))
        flex.register_hook(HookFunction(names[UP]))
    return register


def _branch_then_trunk(flex, x, i):
    """Step 0 with every hook (rank 1 skips ``side``'s), later steps without the branch's
    (gradients counted from step 1)."""
    if i == 0:
        try:
            _loss(flex(x)).backward()
        except Exception as e:  # noqa: BLE001 -- every rank raises alike
            flex.output_dict.setdefault("error", []).append(repr(e))
        return
    if i == 1:
        flex.module.zero_grad(set_to_none=True)
    _loss(flex(x, groups="branch", complement=True)).backward()


def _own_group_ddp(model):
    # its own group: the error leaves one rank's reducer prepared for a backward
    return DDP(model, find_unused_parameters=True, process_group=dist.new_group([0, 1]))


@pytest.mark.parametrize("trunk_after", [True, False], ids=["trunk_hook_after", "last_hook"])
@distributed(world_size=2, timeout_s=20)
def test_forward_hook_on_the_branch_raises_on_every_rank_then_steps_equal_one_process(
        trunk_after):
    """A forward hook on ``side`` (rank 0 takes it), with a trunk hook after it or as the last
    hook (rank 1 then raises at the end of its forward, after DDP's): every rank raises
    HookSiteMismatchError in the forward (no agreement made); the following mixed steps
    without that hook store one process's values, gradients equal."""
    xs = _branch_batches([(0,), (1,), (0,)], world=2)
    (want, want_grads, want_err, _), (got, grads, err, left) = _both(
        xs, _branch_forward_hook(trunk_after), step=_branch_then_trunk, wrap=_own_group_ddp)
    assert want_err is None and err is None, (want_err, err)
    e = got[0].pop("error")
    assert len(e) == 1 and "HookSiteMismatchError" in e[0] and "side" in e[0], e
    assert got[0] == {}, got[0]
    _compare(got[1:], grads, want[1:], want_grads)
    assert left[1:] == ({}, set()), left


# == (2) a container holding two DDPs ===========================================================

class Pair(nn.Module):
    """``a`` (a BranchNet) and ``b`` (a plain net every rank runs whole), outputs summed."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


def _pair_model():
    return Pair(BranchNet(), plain_net(seed=3))


def _two_ddps(pair):
    # each DDP its own group: their reducers' bucket all-reduces do not interleave
    a = DDP(pair.a, find_unused_parameters=True, process_group=dist.new_group([0, 1]))
    b = DDP(pair.b, process_group=dist.new_group([0, 1]))
    return Pair(a, b)


def _pair_hooks(flex, names):
    names = {k.replace(".module.", "."): v for k, v in names.items()}
    for p in (f"a.{SIDE}", f"a.{UP}", "b.blocks.1.up.weight", "b.blocks.0.down.bias"):
        flex.register_hook(HookFunction(names[p]))
    flex.register_forward_hook(HookFunction(names["b.blocks.0"]))
    flex.register_full_backward_hook(HookFunction(names["a.blocks.1"]))


def _unwrapped(steps):
    return [{k.replace(".module.", "."): v for k, v in s.items()} for s in steps]


@distributed(world_size=2, timeout_s=20)
def test_container_of_a_find_unused_ddp_and_a_plain_ddp():
    """FlexModel over a container of ``DDP(BranchNet, find_unused_parameters=True)`` and a plain
    ``DDP`` every rank runs whole: gradient hooks on both (the first's branch deferred, the
    second's not), a forward and a module backward hook, the branch's takers changing: one
    process's values and gradients."""
    xs = _branch_batches([(0,), (1,), (0, 1), ()], world=2)
    (want, want_grads, want_err, _), (got, grads, err, left) = _both(
        xs, _pair_hooks, model_fn=_pair_model, wrap=_two_ddps)
    assert want_err is None and err is None, (want_err, err)
    got, grads = _unwrapped(got), _unwrapped([grads])[0]
    assert [len(s) for s in want] == [6, 6, 6, 5], _keys(want)
    _compare(got, grads, want, want_grads)
    assert left[1:] == ({}, set()), left


# == (3) static_graph ===========================================================================

def _static(find_unused):
    def wrap(model):
        return DDP(model, static_graph=True, find_unused_parameters=find_unused,
                   process_group=dist.new_group([0, 1]))
    return wrap


def _grad_hooks(flex, names):
    for p in (SIDE, UP):
        flex.register_hook(HookFunction(names[p]))
    flex.register_forward_hook(HookFunction(names["blocks.1"]))


@distributed(world_size=2, timeout_s=20)
def test_static_graph_with_find_unused_parameters():
    """``DDP(static_graph=True, find_unused_parameters=True)``, rank 0 taking the branch in every
    step (a static graph's unused parameters may not change): the branch's hook is deferred in
    every step (also in the first, where DDP delays its reduction to the end of the backward)
    and stores one process's values; gradients equal."""
    xs = _branch_batches([(0,), (0,), (0,)], world=2)
    runs = _both(xs, _grad_hooks, wrap=_static(True))
    assert _keys(_same(runs)) == [sorted([*BOTH, "blocks.1"])] * 3
    assert runs[1][3] == (3, {}, set()), runs[1][3]


@distributed(world_size=2, timeout_s=20)
def test_static_graph_without_find_unused_parameters():
    """DDP(static_graph=True) without find_unused_parameters also allows a parameter some
    ranks never use: its gradient hook is deferred the same way and stores what one process
    stores."""
    xs = _branch_batches([(0,), (0,)], world=2)
    plain = _both(xs, lambda flex, names: None, wrap=_static(False))
    hooked = _both(xs, _grad_hooks, wrap=_static(False))
    _same(plain)  # DDP alone: one process's gradients
    _same(hooked)


# == (4) SurgicalTheater ========================================================================

def _in_theater(flex, x, i):
    """Step 0 inside a theater scaling the branch and the trunk's ``up`` (its gradients put
    back on exit); the other steps outside."""
    theater = SurgicalTheater(flex.module, layers=["side", "blocks.1.up"],
                              modification_type="scale", factor=0.5) if i == 0 else \
        contextlib.nullcontext()
    side = next(p for n, p in flex.module.named_parameters() if n.endswith(SIDE))
    before = side.detach().clone()
    with theater:
        if i == 0:
            torch.testing.assert_close(side.detach(), before * 0.5, rtol=0, atol=0)
        _loss(flex(x)).backward()
    assert torch.equal(side.detach(), before)
    if i == 0:
        assert all(p.grad is None for p in flex.module.parameters())


@distributed(world_size=2, timeout_s=20)
def test_deferred_hooks_inside_a_surgical_theater():
    """A mixed step inside a SurgicalTheater (weights scaled, gradients guarded) stores the
    modified model's one-process values; the next mixed steps, after the weights and gradients
    are put back, store one process's values and give its gradients."""
    xs = _branch_batches([(0,), (1,), (0,)], world=2)
    want = _same(_both(xs, _grad_hooks, step=_in_theater))
    assert _keys(want) == [sorted([*BOTH, "blocks.1"])] * 3


# == (5) store_on="replica_leaders" ==============================================================

def _read_all(directory):
    reader = DiskStore(directory)
    return {n: [reader.read(n, s) for s in reader.steps(n)] for n in reader.names()}


@distributed(world_size=2, timeout_s=20)
def test_store_on_replica_leaders_with_a_disk_store():
    """``store_on="replica_leaders"`` (a DiskStore: each replica leader writes its rows of the
    forward hook's tensor) beside the deferred gradient hook (stored once): what the directory
    holds equals one process's values."""
    xs = _branch_batches([(0,), (1,), (0, 1)], world=2)
    rank = dist.get_rank()
    ref, want = BranchNet(), {}
    flex = FlexModel(ref, want, process_group=local_group(), key_by_hook_kind=True)
    _grad_hooks(flex, actual_names(ref))
    for i, x in enumerate(xs):
        _plain(flex, x, i)
    flex.close()
    directory = _shared_dir()
    model = _find_unused(BranchNet())
    err = None
    with DiskStore(directory) as store:
        flex = FlexModel(model, None, store=store, store_on="replica_leaders",
                         key_by_hook_kind=True)
        _grad_hooks(flex, actual_names(model))
        try:
            for i, x in enumerate(xs):
                _plain(flex, _shard(x, rank, 2), i)
        except Exception as e:  # noqa: BLE001 -- compared after every rank is done
            err = repr(e)
        flex.close()
    dist.barrier()
    got = clean_keys(_read_all(directory))
    _done_with(directory)
    assert err is None, err
    assert_stored_equal(got, clean_keys(want), **TOL)


# == (6) pipeline x data parallel ===============================================================

class BranchStage(nn.Module):
    """Stage 0 of ``BranchNet``: block 0 and the branch; stage 1: block 1 and the head (names
    as in the whole model)."""

    def __init__(self, net, stage):
        super().__init__()
        self.stage = stage
        self.blocks = nn.ModuleDict({str(stage): net.blocks[stage]})
        if stage == 0:
            self.side = net.side
        else:
            self.head = net.head

    def forward(self, x):
        if self.stage == 1:
            return self.head(self.blocks["1"](x))
        take = x[:, 0, 0] > 0
        h = self.blocks["0"](x)
        if take.any():
            h = torch.where(take[:, None, None], h + self.side(h), h)
        return h


def _pp_hooks(flex, prefix=""):
    for p in (SIDE, UP):
        flex.register_hook(HookFunction(prefix + p))
    flex.register_forward_hook(HookFunction(prefix + "blocks.0"))


@distributed(world_size=4, timeout_s=30)
def test_pipeline_x_data_parallel_ddp_per_stage():
    """PP=2 x DP=2 (ranks 0, 1 stage 0; 2, 3 stage 1), each stage a
    ``DDP(find_unused_parameters=True)`` over its replicas, the branch on stage 0 taken by
    replica 0, 1, both, hand-split steps over a StageLink: what rank 0 collects and the
    stages' gradients equal one process."""
    from flex_surgery.parallel.pipeline import StageLink

    xs = _branch_batches([(0,), (1,), (0, 1)], world=2)
    ref, want = BranchNet(), {}
    flex = FlexModel(ref, want, process_group=local_group(), key_by_hook_kind=True)
    _pp_hooks(flex)
    for i, x in enumerate(xs):
        _plain(flex, x, i)
    flex.close()
    want_grads = _grads(ref)
    rank = dist.get_rank()
    stage, replica = divmod(rank, 2)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    model = DDP(BranchStage(BranchNet(), stage), find_unused_parameters=True,
                process_group=groups[stage])
    stored = {}
    flex = FlexModel(model, stored if rank == 0 else None, pipeline_parallel_size=2,
                     data_parallel_size=2, key_by_hook_kind=True)
    _pp_hooks(flex, "module.")
    link = StageLink(flex.runtime.mesh, timeout_s=20)
    err = None
    try:
        for x in xs:
            with link.step():
                h = _shard(x, replica, 2) if stage == 0 else \
                    link.recv_forward(requires_grad=True)
                y = flex(h)
                if stage == 0:
                    link.send_forward(y)
                    y.backward(link.recv_backward())
                else:
                    _loss(y).backward()
                    link.send_backward(h.grad)
            flex.sync_pipeline_outputs(link)
    except Exception as e:  # noqa: BLE001 -- compared after every rank is done
        err = repr(e)
    grads = _grads(model)
    flex.close()
    link.close()
    assert err is None, err
    mine = ("blocks.0.", "side.") if stage == 0 else ("blocks.1.", "head.")
    assert sorted(grads) == sorted(k for k in want_grads if k.startswith(mine)), sorted(grads)
    for k, g in grads.items():
        torch.testing.assert_close(g, want_grads[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    if rank == 0:
        assert sorted(stored) == sorted(f"module.{k}" for k in want), sorted(stored)
        assert_stored_equal(clean_keys(stored), clean_keys(want), **TOL)


# == found wrong ================================================================================

def _unhooked_then_hooked(flex, x, i):
    """Forward A with no hook chosen (``complement=True``), forward B with every hook; one
    backward through both (B's selection holds for it)."""
    a = flex(x[:, :3], groups="all", complement=True)
    b = flex(x[:, 3:])
    (_loss(a) + _loss(b)).backward()


def _pair_of(takers_a, takers_b):
    return torch.cat(_branch_batches([takers_a, takers_b], world=2), dim=1)


@distributed(world_size=2, timeout_s=20)
def test_forward_without_a_hook_chosen_summed_with_a_hooked_forward():
    """A forward with no hook chosen (rank 0 takes the branch), its loss summed with a hooked
    forward's: the agreement follows every forward, hooked or not, so the branch's hook is
    deferred and stores what one process stores."""
    runs = _both([_pair_of((0,), ())], _grad_hooks, step=_unhooked_then_hooked, sync=False)
    assert _keys(_same(runs, grads=False)) == [sorted([*BOTH, "blocks.1"])]


def _first_hook_after_forward(flex, x, i):
    out = flex(x)
    flex.register_hook(HookFunction(actual_names(flex.module)[SIDE]))
    _loss(out).backward()


# -- hangs last: a hang costs its timeout and a fresh pool --------------------------------------

@distributed(world_size=2, timeout_s=6)
def test_first_hook_registered_after_a_forward_with_no_hook_hangs():
    """The first hook of a FlexModel, on the branch's parameter, registered between a forward
    that had none and its backward: the agreement after that forward defers it (it hung)."""
    (x,) = _branch_batches([(0,)], world=2)
    runs = _both([x], lambda flex, names: None, step=_first_hook_after_forward,
                 wrap=_own_group_ddp)
    assert _keys(_same(runs)) == [[f"{SIDE}:grad"]]
