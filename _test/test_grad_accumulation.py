"""Gradient-side hooks under data parallelism with real training patterns, against one process."""

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    Block,
    H,
    Net,
    actual_names,
    clean,
    clean_keys,
    local_group,
    plain_net,
    seeded_linear,
)
from rank_pool import distributed
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.algorithms.join import Join
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel as DDP

# imported here, before the rank pools fork, so that no rank imports them in a body
from flex_surgery import pure_edit
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.surgery import SurgicalTheater

TOL = dict(rtol=1e-9, atol=1e-12)
SITES = [("blocks.1.act", "register_full_backward_hook"),
         ("blocks.1", "register_full_backward_pre_hook")]
PARAM_SITES = ["blocks.1.up.weight", "blocks.0.down.bias"]


def squash(module, tensor, ctx, modules):
    """A nonlinear edit: a linear one (x2) cannot tell a misplaced scale from a right one."""
    return torch.tanh(tensor * 30.0)


def _squash_copy(module, tensor, ctx, modules):
    return squash(module, tensor, ctx, modules)


def _batches(n_micro, batch=4):
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, H, generator=g) for _ in range(n_micro)]


def _shard(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _hooked(model, edit=None, process_group=None, sites=SITES, param_sites=PARAM_SITES):
    stored = {}
    flex = FlexModel(model, stored, process_group=process_group, key_by_hook_kind=True)
    names = actual_names(model)
    for name, method in sites:
        getattr(flex, method)(HookFunction(names[name], editing_function=edit))
    for name in param_sites:
        flex.register_hook(HookFunction(names[name], editing_function=edit))
    return flex, stored


def _steps(flex, stored, xs, contexts):
    """One forward/backward per micro-batch; what the hooks stored at each."""
    per_step = []
    for x, ctx in zip(xs, contexts):
        with ctx():
            flex(x).pow(2).mean().backward()
        per_step.append(clean_keys(stored))
        stored.clear()
    return per_step


def _plain_grads(model):
    return {clean(n): p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference(xs, edit=None, model=None, **sites):
    model = plain_net() if model is None else model
    flex, stored = _hooked(model, edit, local_group(), **sites)
    per_step = _steps(flex, stored, xs, [contextlib.nullcontext] * len(xs))
    flex.close()
    n_sites = len(sites.get("sites", SITES)) + len(sites.get("param_sites", PARAM_SITES))
    for step in per_step:  # every hook fired once per step: nothing to compare is no test
        assert len(step) == n_sites and all(len(v) == 1 for v in step.values()), step.keys()
    return per_step, _plain_grads(model)


def _run(model, xs, contexts, edit=None, full_grads=_plain_grads, **sites):
    """The sharded run: every collective is done before anything is compared, so a rank whose
    comparison fails cannot leave the others waiting."""
    flex, stored = _hooked(model, edit, **sites)
    rank, world = dist.get_rank(), dist.get_world_size()
    got = _steps(flex, stored, [_shard(x, rank, world) for x in xs], contexts)
    grads = full_grads(model)
    flex.close()
    return got, grads


def _compare(got, got_grads, want, want_grads):
    if dist.get_rank() == 0:
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.keys() == w.keys(), (i, sorted(g), sorted(w))
            for k in w:
                assert len(g[k]) == len(w[k]), (i, k, len(g[k]), len(w[k]))
                for a, b in zip(g[k], w[k]):
                    torch.testing.assert_close(a, b, **TOL,
                                               msg=lambda m, i=i, k=k: f"step {i} {k}: {m}")
    else:
        assert all(s == {} for s in got)
    assert got_grads.keys() == want_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], **TOL,
                                   msg=lambda m, k=k: f"grad {k}: {m}")


def _dtensor_grads(model):
    return {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()}


def _fsdp1_grads(model):
    with FSDP.summon_full_params(model, writeback=False, with_grads=True):
        return _plain_grads(model)


def _fsdp1(model, **kwargs):
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                device_id=torch.device("cpu"), **kwargs)


def _fsdp2(model):
    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


# -- 1, 2: accumulation ---------------------------------------------------------------------

@distributed(world_size=2)
def test_accumulation_ddp_fsdp1_fsdp2_equal_one_process():
    """Micro-steps without gradient sync, then a synced one: every hook stores, at every
    micro-step, what one process stores for that micro-batch (activation gradients x 1/dp,
    parameter gradients the dp average of this micro-step's local gradients), with and without a
    nonlinear edit; the accumulated gradients equal one process's."""
    xs = _batches(2)
    for edit in (None, squash):
        want, want_grads = _reference(xs, edit)
        for ddp_edit in ((edit,) if edit is None else (edit, pure_edit(_squash_copy))):
            ddp = DDP(plain_net())  # the leader path and replicate_edit (every rank edits)
            got = _run(ddp, xs, [ddp.no_sync, contextlib.nullcontext], ddp_edit)
            _compare(*got, want, want_grads)

        fsdp1 = _fsdp1(plain_net())
        got = _run(fsdp1, xs, [fsdp1.no_sync, contextlib.nullcontext], edit,
                   full_grads=_fsdp1_grads)
        _compare(*got, want, want_grads)

        fsdp2 = _fsdp2(plain_net())

        @contextlib.contextmanager
        def sync_off(model=fsdp2):
            model.set_requires_gradient_sync(False)
            yield
            model.set_requires_gradient_sync(True)

        got = _run(fsdp2, xs, [sync_off, contextlib.nullcontext], edit,
                   full_grads=_dtensor_grads)
        _compare(*got, want, want_grads)


def _center_rows(p):
    """Needs the whole row: asks for the full parameter."""
    return -p.mean(dim=-1, keepdim=True).expand_as(p).clone()


THEATERS = [dict(modification_type="noise", noise_scale=0.05, seed=11),
            dict(modification_fn=_center_rows, full_parameter=True)]


@distributed(world_size=4)
def test_fsdp1_hybrid_shard_accumulation_hooks_and_theater():
    """HYBRID_SHARD over 2 shards x 2 replicas: hooks under ``no_sync`` then a synced step, and
    gradient hooks run inside a SurgicalTheater, equal one process on the whole batch."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    xs = _batches(2, batch=8)
    want, want_grads = _reference(xs, squash)
    model = _fsdp1(plain_net(), device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD)
    got = _run(model, xs, [model.no_sync, contextlib.nullcontext], squash,
               full_grads=_fsdp1_grads)
    _compare(*got, want, want_grads)
    for mod in THEATERS:
        ref = plain_net()
        with SurgicalTheater(ref, **mod):
            want, want_grads = _reference(xs[:1], model=ref)
        model.zero_grad(set_to_none=True)
        with SurgicalTheater(model, **mod):
            got_steps, _ = _run(model, xs[:1], [contextlib.nullcontext],
                                full_grads=lambda m: {})
        _compare(got_steps, {}, want, {})


def identity(module, tensor, ctx, modules):
    return tensor


@distributed(world_size=2)
def test_ddp_and_fsdp1_given_a_one_dim_device_mesh_keep_each_ranks_batch():
    """``DDP(model, device_mesh=mesh)`` and ``FSDP(model, device_mesh=mesh)`` over a 1-D mesh
    (torch's documented alternative to ``process_group``): hooks and an identity edit."""
    rank = dist.get_rank()
    (x,) = _batches(1)
    ref = plain_net()
    ref_flex, ref_stored = _hooked(ref, process_group=local_group())
    ref_flex.register_forward_hook(HookFunction("blocks.0", editing_function=identity))
    want_out = ref_flex(x)
    want_out.pow(2).mean().backward()
    want, want_grads = clean_keys(ref_stored), _plain_grads(ref)
    ref_flex.close()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    results = []
    for model, full_grads in ((DDP(plain_net(), device_mesh=mesh), _plain_grads),
                              (_fsdp1(plain_net(), device_mesh=mesh), _fsdp1_grads)):
        flex, stored = _hooked(model)
        flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0"],
                                                editing_function=identity))
        out = flex(_shard(x, rank, 2))
        out.pow(2).mean().backward()
        results.append((flex.runtime.mesh.sizes, out.detach(), [clean_keys(stored)],
                        full_grads(model)))
        flex.close()
    for sizes, out, got, grads in results:
        # rank 1's output is rank 0's: the 'tp' leader's edited copy stood for both ranks
        torch.testing.assert_close(out, _shard(want_out.detach(), rank, 2), **TOL)
        assert sizes == {"dp": 2, "tp": 1, "pp": 1}, sizes
        _compare(got, grads, [want], want_grads)


# -- 3: DDP options ---------------------------------------------------------------------------

class BranchNet(Net):
    """``side`` runs on the rows whose first feature is positive, and not at all when there is
    none (rank 1's half of the batch below): a parameter some ranks do not use."""
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        super().__init__([Block(seeded_linear(H, 16, g), seeded_linear(16, H, g))
                          for _ in range(2)], seeded_linear(H, 6, g))
        self.side = seeded_linear(H, H, g)

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.blocks[0](x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        x = self.blocks[1](x)
        return self.head(x)


@distributed(world_size=2)
def test_ddp_find_unused_parameters_and_static_graph_off_the_branch():
    xs = _batches(2)
    want, want_grads = _reference(xs, squash)
    for options in (dict(static_graph=True), dict(find_unused_parameters=True)):
        got = _run(DDP(plain_net(), **options), xs, [contextlib.nullcontext] * 2, squash)
        _compare(*got, want, want_grads)


# -- 4: activation checkpointing --------------------------------------------------------------

def _checkpointed(model, reentrant):
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    # reentrant checkpointing gives no gradient to a block whose input needs none (block 0)
    blocks = model.blocks[1:] if reentrant else model.blocks
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda m: any(m is b for b in blocks))
    return model


@distributed(world_size=2)
def test_activation_checkpointing_under_ddp_fsdp1_fsdp2():
    """Hooks inside checkpointed blocks fire once per backward (not again in the recomputed
    forward) and store and edit what one process without checkpointing does."""
    xs = _batches(2)
    want, want_grads = _reference(xs, squash)
    both = [contextlib.nullcontext] * 2
    for reentrant in (False, True):
        ddp = DDP(_checkpointed(plain_net(), reentrant), static_graph=reentrant)
        _compare(*_run(ddp, xs, both, squash), want, want_grads)
    fsdp1 = _fsdp1(_checkpointed(plain_net(), False))  # with no_sync accumulation
    _compare(*_run(fsdp1, xs, [fsdp1.no_sync, contextlib.nullcontext], squash,
                   full_grads=_fsdp1_grads), want, want_grads)
    for reentrant in (False, True):
        fsdp2 = _fsdp2(_checkpointed(plain_net(), reentrant))
        _compare(*_run(fsdp2, xs, both, squash, full_grads=_dtensor_grads), want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_ddp_join_with_hooks_is_refused_on_every_rank():
    """Under Join (uneven inputs: rank 0 two micro-batches, rank 1 one) a rank that has joined
    takes no part in the hooks' gathers over dp, so rank 0's second step would wait for it
    forever: the first hooked forward raises on every rank instead, before DDP's forward. Join
    leaves DDP's setting on after its block, so that DDP stays refused; a DDP never given to
    Join is hooked as before and equals one process."""
    xs = _batches(2)
    rank = dist.get_rank()
    want, _ = _reference(xs[:1])
    mine = [_shard(x, rank, 2) for x in (xs if rank == 0 else xs[:1])]
    model = DDP(plain_net())
    flex, stored = _hooked(model)
    with pytest.raises(RuntimeError, match="under torch.distributed.algorithms.join.Join"):
        with Join([model]):
            for x in mine:
                flex(x).pow(2).mean().backward()
    assert not stored
    with pytest.raises(RuntimeError, match="never given to Join"):
        flex(mine[0])
    flex.close()
    other = DDP(plain_net())
    flex, stored = _hooked(other)
    flex(mine[0]).pow(2).mean().backward()
    flex.close()
    _compare([clean_keys(stored)], {}, want, {})


# -- hangs last: each one costs its timeout and a fresh pool ---------------------------------

@distributed(world_size=2, timeout_s=20)
def test_ddp_find_unused_parameters_hook_on_the_branch():
    """One process gets the branch's parameter gradient from the rows that take it; DDP's
    average of (rank 0's, rank 1's zero) is the same number: the hook should store it."""
    (x,) = _batches(1)
    x[:2, 0, 0] = 5.0   # rank 0's rows take the branch
    x[2:, 0, 0] = -5.0  # rank 1's rows do not
    sites = dict(sites=[], param_sites=["side.weight"])
    want, want_grads = _reference([x], model=BranchNet(), **sites)
    assert want[0]["side.weight:grad"]
    got = _run(DDP(BranchNet(), find_unused_parameters=True), [x], [contextlib.nullcontext],
               **sites)
    _compare(*got, want, want_grads)


def _branch_batches(takers_per_step):
    """Micro-batches of 4 rows (2 per rank) where the ranks in each step's ``takers`` take
    ``BranchNet``'s branch and the others do not."""
    xs = _batches(len(takers_per_step))
    for x, takers in zip(xs, takers_per_step, strict=True):
        for rank in (0, 1):
            x[2 * rank:2 * rank + 2, 0, 0] = 5.0 if rank in takers else -5.0
    return xs


@pytest.mark.parametrize("accumulate", [False, True], ids=["synced", "no_sync"])
@distributed(world_size=2, timeout_s=20)
def test_ddp_find_unused_parameters_branch_users_change_from_step_to_step(accumulate):
    """The branch's users change from step to step (rank 0, rank 1, both), beside gradient
    hooks on parameters every rank uses and module backward hooks: each step stores what one
    process stores, and the gradients match, with or without no_sync accumulation."""
    xs = _branch_batches([(0,), (1,), (0, 1)])
    sites = dict(sites=SITES, param_sites=["side.weight", *PARAM_SITES])
    want, want_grads = _reference(xs, model=BranchNet(), **sites)
    model = DDP(BranchNet(), find_unused_parameters=True)
    contexts = [model.no_sync, model.no_sync, contextlib.nullcontext] if accumulate else \
        [contextlib.nullcontext] * 3
    got = _run(model, xs, contexts, **sites)
    _compare(*got, want, want_grads)


@distributed(world_size=2, timeout_s=20)
def test_ddp_find_unused_parameters_edit_on_the_branch_is_refused_on_every_rank():
    """An editing gradient hook on a parameter only some ranks used: its gradient is known
    at the end of the backward, after autograd accumulated it, so the edit is refused there,
    on every rank, and the ranks still meet afterwards. Like any backward in which a hook
    raised, it leaves no gradient (the one asked for was not made)."""
    (x,) = _branch_batches([(0,)])
    model = DDP(BranchNet(), find_unused_parameters=True)
    flex, stored = _hooked(model, squash, sites=[], param_sites=["side.weight"])
    with pytest.raises(RuntimeError, match="retrieved there but not edited"):
        flex(_shard(x, dist.get_rank(), 2)).pow(2).mean().backward()
    assert stored == {}
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    flex.close()
    met = torch.ones(1)
    dist.all_reduce(met)
    assert met.item() == 2


@distributed(world_size=2, timeout_s=20)
def test_ddp_find_unused_parameters_two_forwards_one_backward():
    """Losses of two forwards summed into one backward (under no_sync: DDP reduces one
    forward per backward): rank 0 takes the branch in the first, rank 1 in the second. Each
    forward alone defers the branch's hook; it runs once, at the end of the one backward, with
    the gradient of both forwards, as in one process."""
    xs = _branch_batches([(0,), (1,)])
    sites = dict(sites=[], param_sites=["side.weight", "blocks.1.up.weight"])

    def both(flex, stored, xs):
        (flex(xs[0]).pow(2).mean() + flex(xs[1]).pow(2).mean()).backward()
        return clean_keys(stored)

    ref = BranchNet()
    flex, stored = _hooked(ref, None, local_group(), **sites)
    want = both(flex, stored, xs)
    flex.close()
    assert sorted(want) == ["blocks.1.up.weight:grad", "side.weight:grad"], sorted(want)
    model = DDP(BranchNet(), find_unused_parameters=True)
    flex, stored = _hooked(model, **sites)
    rank = dist.get_rank()
    with model.no_sync():  # DDP reduces one forward per backward; the hooks gather anyway
        got = both(flex, stored, [_shard(x, rank, 2) for x in xs])
    flex.close()
    _compare([got], {}, [want], {})
