"""Second reader of the DP site meetings in backward (commits 4004bda, d14032f and their
follow-ups): the pass a backward hook call is stamped with (DistributedRuntime._pass_of_call,
start_pass), the end-of-backward announcement from every output (watch_backward), FSDP1's
gradient-reduction announcements (_watch_reductions / _announce_reduction), the wrapped
module's end-of-forward hook registered first (hooks.wrapper.hooked_passes, prepend=True) and
run_agreeing re-raising HookSiteMismatchError at once.

Runs where every rank takes the same path equal a one-process run of the same weights and
inputs (float64: stored values, outputs, whole gradients); runs where data-parallel ranks reach
different hooks must raise ``HookSiteMismatchError`` on every rank, not hang, not join rows of
different calls. What does not hold is pinned as strict xfails, the hangs with short timeouts.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group, seeded_linear
from rank_pool import distributed
from test_branch_hooks_edge_cases import Branchy
from test_dp_meeting_edge_cases import (
    TOL,
    _accumulate,
    _assert_stored,
    _detached,
    _equal_run,
    _half,
    _halves,
    _outcome_everywhere,
    _refused_then_equal,
    _register,
    _x,
)
from torch import nn

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction

_WRAPPED = "_fsdp_wrapped_module"


# -- FSDP helpers: a one-process run of the same weights against FSDP1 / FSDP2 -----------------

def _fsdp1(module: nn.Module, **kw) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(module, use_orig_params=True, device_id=torch.device("cpu"), **kw)


def _wrap(kind: str, model: nn.Module, units: tuple[str, ...], **fsdp1) -> nn.Module:
    """``model`` with each child in ``units`` an FSDP unit of its own, under an FSDP root
    (``fsdp1``: FSDP1's options)."""
    if kind == "fsdp1":
        for name in units:
            setattr(model, name, _fsdp1(getattr(model, name), **fsdp1))
        return _fsdp1(model, **fsdp1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for name in units:
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _plain(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != _WRAPPED)


def _namer(model: nn.Module):
    """The wrapped model's name of a one-process module or parameter name (a module that is
    an FSDP1 unit: its inner module, which the hooks see; named after the wrapper)."""
    names = {_plain(n): n for n, _ in model.named_modules()}  # the inner module last
    names.update({_plain(n): n for n, _ in model.named_parameters()})
    return lambda plain: names[plain]


def _full_grads(kind: str, model: nn.Module) -> dict:
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            return {_plain(n): None if p.grad is None else p.grad.clone()
                    for n, p in model.named_parameters()}
    return {n: None if p.grad is None else p.grad.full_tensor()
            for n, p in model.named_parameters()}


def _fsdp_equal(kind: str, model_fn, units: tuple[str, ...], hooks, body) -> None:
    """``hooks(name)`` -> [(kind, HookFunction)] with module names passed through ``name``;
    ``body(flex, model, part, scale)`` as in test_dp_meeting_edge_cases._equal_run. One process
    on the whole batch (loss / 2: FSDP's average) against FSDP over both ranks: outputs, the
    stored values (rank 0) and the whole gradients."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, ref = {}, model_fn()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, lambda: hooks(lambda n: n))
        want_outs = body(flex, ref, lambda x: x, 0.5)
    model = _wrap(kind, model_fn(), units)
    name = _namer(model)
    stored = {}
    with FlexModel(model, stored) as flex:
        _register(flex, lambda: hooks(name))
        outs = body(flex, model, lambda x: _half(x, rank), 1.0)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    for n, grad in _full_grads(kind, model).items():
        w = ref.get_parameter(n).grad
        assert (grad is None) == (w is None), n
        if w is not None:
            torch.testing.assert_close(grad, w, **TOL)
    if rank == 0:
        _assert_stored({_plain(k): v for k, v in stored.items()}, want)


def _every_kind(name):
    return [("forward", HookFunction(name("up"))),
            ("full_backward", HookFunction(name("side"))),
            ("full_backward_pre", HookFunction(name("first"))),
            ("hook", HookFunction(name("down.weight")))]


def _steps(flex, model, part, scale):
    outs = []
    for seed in (1, 2):
        out = flex(part(_x(seed)))
        (out.pow(2).sum() * scale).backward()
        outs.append(out)
    return outs


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp_every_linear_a_unit_backward_hooks_on_every_rank_equal_one_process(kind):
    """Every Linear an FSDP unit of its own under a root (FSDP1: five FlatParameters, each
    reduction announced; FSDP2: per-unit collectives inside the backward), a forward
    retrieval, backward hooks on side and first and a parameter hook, every rank taking the
    branch, two steps: no spurious mismatch, equal to one process."""
    _fsdp_equal(kind, Branchy, ("first", "side", "up", "down"), _every_kind, _steps)


def _no_sync_then_sync(flex, model, part, scale):
    """Two accumulated forwards and one backward under FSDP1's no_sync (one process: plain),
    then a synced step."""
    import contextlib

    quiet = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
    with quiet:
        outs = [flex(part(_x(seed))) for seed in (1, 2)]
        (sum(o.pow(2).sum() for o in outs) * scale).backward()
    out = flex(part(_x(3)))
    (out.pow(2).sum() * scale).backward()
    return [*outs, out]


def _branch_and_trunk(name):
    return [("forward", HookFunction(name("side"))),
            ("full_backward", HookFunction(name("side"))),
            ("full_backward", HookFunction(name("up")))]


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_no_sync_accumulated_forwards_then_a_synced_step_equal_one_process():
    """FSDP1 (``first`` a unit): two forwards and one backward under no_sync (the reductions
    are announced though FSDP1 skips them, the same on every rank), then a synced step, hooks
    on the branch every rank takes and on the trunk: equal to one process."""
    _fsdp_equal("fsdp1", Branchy, ("first",), _branch_and_trunk, _no_sync_then_sync)


class Checkpointed(Branchy):
    """``up`` and the ReLU recomputed in backward (non-reentrant)."""

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        h = checkpoint(lambda t: torch.relu(self.up(t)), x, use_reentrant=False)
        return self.down(h)


def _checkpoint_hooks(name):
    return [("forward", HookFunction(name("up"))),
            ("full_backward", HookFunction(name("up"))),
            ("full_backward", HookFunction(name("side"))),
            ("full_backward_pre", HookFunction(name("first")))]


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp_non_reentrant_checkpoint_with_backward_hooks_equals_one_process(kind):
    """FSDP1 / FSDP2 with ``down`` a unit and ``up`` recomputed in backward (its forward hook
    fires again there, stamped with its own forward's pass): equal to one process."""
    _fsdp_equal(kind, Checkpointed, ("down",), _checkpoint_hooks, _steps)


@distributed(world_size=2, timeout_s=30)
def test_two_flexmodels_in_sequence_on_one_fsdp1_model():
    """A FlexModel with backward hooks on an FSDP1 model (``first`` a unit) is closed but kept
    referenced; a plain step of the model, then a second FlexModel on it: the closed one
    announces nothing more (its pre-hooks on the AccumulateGrad nodes are gone or silent),
    the second's step stores what the first's did, and a branch hook rank 1 skips raises on
    both ranks."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = _wrap("fsdp1", Branchy(), ("first",))
    name = _namer(model)

    def hooks():
        return [("full_backward", HookFunction(name("side")))]

    stored1, stored2 = {}, {}
    flex1 = FlexModel(model, stored1)
    _register(flex1, hooks)
    flex1(_half(_x(1), rank)).pow(2).sum().backward()
    flex1.close()
    stale = []
    flex1.runtime.walk.announce_site = stale.append
    model(_half(_x(2), rank)).pow(2).sum().backward()
    with FlexModel(model, stored2) as flex2:
        _register(flex2, hooks)
        flex2(_half(_x(1), rank)).pow(2).sum().backward()
        outcomes = _outcome_everywhere(
            lambda: flex2(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex2)
    assert outcomes == ["raised"] * 2, outcomes
    assert stale == [], stale
    if rank == 0:
        _assert_stored({k: v[:1] for k, v in stored2.items()}, stored1)


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_autograd_grad_of_the_input_with_backward_hooks_equals_one_process():
    """``torch.autograd.grad(loss, [x])`` (a saliency map) on FSDP1 with ``first`` a unit: no
    AccumulateGrad runs, so nothing is reduced or announced as a reduction, the same on every
    rank; the backward hooks and the input's gradient equal one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()

    def hooks(name):
        return [("full_backward", HookFunction(name("side"))),
                ("full_backward_pre", HookFunction(name("up")))]

    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex:
        _register(flex, lambda: hooks(lambda n: n))
        x = _x(1).requires_grad_()
        want_grad, = torch.autograd.grad(flex(x).pow(2).sum() / 2, [x])
    model = _wrap("fsdp1", Branchy(), ("first",))
    name = _namer(model)
    stored = {}
    with FlexModel(model, stored) as flex:
        _register(flex, lambda: hooks(name))
        x = _half(_x(1), rank).requires_grad_()
        grad, = torch.autograd.grad(flex(x).pow(2).sum(), [x])
    torch.testing.assert_close(grad / 2, _half(want_grad, rank), **TOL)  # this rank's loss
    if rank == 0:
        _assert_stored({_plain(k): v for k, v in stored.items()}, want)


# -- accumulated forwards: the pass of each backward hook call ---------------------------------

def _branch_backward_hooks():
    return [("full_backward", HookFunction("side"))]


def _three_forwards_branch_on_both_ends(flex, model, rank):
    """Forward 1: rank 1 skips side; forward 2: both take it; forward 3: rank 0 skips it."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2), rank)),
            flex(_half(_x(3, skipper=0), rank))]
    sum(o.pow(2).sum() for o in outs).backward()


@distributed(world_size=2, timeout_s=30)
def test_three_accumulated_forwards_whose_branch_hook_fires_on_different_ranks_raise():
    _refused_then_equal(Branchy, _branch_backward_hooks, _three_forwards_branch_on_both_ends)


def _later_loss_first(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2)]
    for out in reversed(outs):  # the second forward's backward, then the first's
        (out.pow(2).sum() * scale).backward()
    return outs


def _trunk_and_branch_hooks():
    return [("forward", HookFunction("side")),
            ("full_backward", HookFunction("side")),
            ("full_backward_pre", HookFunction("first")),
            ("hook", HookFunction("down.weight"))]


@distributed(world_size=2, timeout_s=30)
def test_two_forwards_then_their_backwards_one_at_a_time_equal_one_process():
    """Two hooked forwards, then the backward of the second, then of the first (each a graph
    task of its own, announcing its end): equal to one process."""
    _equal_run(Branchy, _trunk_and_branch_hooks, _later_loss_first)


def _only_the_second_backward(flex, model, rank):
    flex(_half(_x(1), rank))  # both take side; never backpropagated
    flex(_half(_x(2, skipper=1), rank)).pow(2).sum().backward()


@distributed(world_size=2, timeout_s=30)
def test_backward_through_the_second_of_two_forwards_with_a_branch_hook_raises():
    _refused_then_equal(Branchy, _branch_backward_hooks, _only_the_second_backward)


def _param_hooks():
    return [("hook", HookFunction("side.weight")),
            ("hook", HookFunction("down.weight")),
            ("full_backward", HookFunction("side"))]


@distributed(world_size=2, timeout_s=30)
def test_parameter_hooks_under_three_accumulated_forwards_equal_one_process():
    """Parameter hooks (one call per backward, on AccumulateGrad: stamped with the last pass
    on every rank) and side's backward hook (one call per forward) over three accumulated
    forwards: equal to one process."""
    _equal_run(Branchy, _param_hooks, _accumulate)


# -- run_agreeing: a mismatch inside an agreement -----------------------------------------------

@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_skips", "other_skips"])
@distributed(world_size=2, timeout_s=30)
def test_store_on_all_reduce_at_a_branch_backward_hook_raises(skipper):
    """store_on='all' with a reduce= on side's backward hook (every rank runs the storing
    function in an agreement): the rank that skipped side announces the end of its backward,
    the other meets it inside the agreement; both raise at once, then equal one process."""
    hooks = lambda: [("forward", HookFunction("up")),  # noqa: E731
                     ("full_backward", HookFunction("side", reduce="mean_over_batch"))]

    def bad(flex, model, rank):
        flex(_half(_x(1, skipper=skipper), rank)).pow(2).sum().backward()

    _refused_then_equal(Branchy, hooks, bad, dict(store_on="all"))


# -- the model's own forward hooks on the wrapped module (prepend=True) ---------------------------

class ScaledByItsHook(Branchy):
    """The model's own forward hook on itself scales its output (as a wrapper casting the
    output would)."""

    def __init__(self):
        super().__init__()
        self.register_forward_hook(lambda m, a, out: out * 1.5)


@distributed(world_size=2, timeout_s=30)
def test_a_models_own_root_forward_hook_with_backward_hooks_equals_one_process():
    _equal_run(ScaledByItsHook, _trunk_and_branch_hooks, _steps)


class AuxFromItsHook(Branchy):
    """The model's own forward hook on itself returns (output, an auxiliary loss on the hidden
    state after the branch, which its forward kept), as a model adding a regulariser to what
    it returns."""

    def __init__(self):
        super().__init__()
        self.register_forward_hook(lambda m, a, out: (out, m.hidden.pow(2).mean()))

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        self.hidden = x
        return self.down(torch.relu(self.up(x)))


@distributed(world_size=2, timeout_s=15)
def test_an_output_added_by_the_models_own_root_hook_announces_the_end_of_backward():
    """The model's own forward hook on the root adds the auxiliary loss the loss alone uses:
    the output as the module's hooks leave it is watched too, so both ranks raise at the
    backward (rank 1 skipped the branch hook)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    with FlexModel(AuxFromItsHook(), {}) as flex:
        _register(flex, _branch_backward_hooks)
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank))[1].backward(), flex)
    assert outcomes == ["raised"] * 2, outcomes


# -- reentrant activation checkpointing around the branch ---------------------------------------

class AroundTheBranch(Branchy):
    """side (the branch) and up recomputed in backward by an activation checkpoint; reentrant:
    their backward hooks run in a nested backward, on autograd nodes made there."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        take = x[:, 0, 0] > 0

        def region(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return torch.relu(self.up(t))

        return self.down(checkpoint(region, self.first(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_checkpoint_around_the_branch_accumulated_forwards_equal_one_process(reentrant):
    """Every rank takes the branch: the hooks in the recomputation over three accumulated
    forwards are stamped alike on every rank: equal to one process."""
    hooks = lambda: [("full_backward", HookFunction("side")),  # noqa: E731
                     ("full_backward", HookFunction("up")),
                     ("forward", HookFunction("side"))]
    _equal_run(lambda: AroundTheBranch(reentrant), hooks, _accumulate)


def _accumulate_across_the_branch(flex, model, rank):
    """Forward 1: rank 1 skips side; forward 2: rank 0 skips it; one backward."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2, skipper=0), rank))]
    sum(o.pow(2).sum() for o in outs).backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@distributed(world_size=2, timeout_s=20)
def test_checkpoint_around_the_branch_accumulated_forwards_on_different_ranks_raise(reentrant):
    """Two accumulated forwards, side's backward hook firing for forward 1 on rank 0 and for
    forward 2 on rank 1, inside the checkpointed region: both ranks raise, then equal one
    process."""
    _refused_then_equal(lambda: AroundTheBranch(reentrant), _branch_backward_hooks,
                        _accumulate_across_the_branch)


# -- FSDP1: a frozen unit ------------------------------------------------------------------------

class FrozenUp(Branchy):
    def __init__(self):
        super().__init__()
        self.up.requires_grad_(False)


def _frozen_hooks(name):
    return [("full_backward", HookFunction(name("side"))),
            ("forward", HookFunction(name("up")))]


@distributed(world_size=2, timeout_s=20)
def test_fsdp1_a_frozen_unit_with_backward_hooks_equals_one_process():
    """``up`` frozen and an FSDP1 unit of its own (FSDP1 reshards it from a multi-grad hook,
    there is no gradient to reduce): backward hooks on every rank, equal to one process."""
    _fsdp_equal("fsdp1", FrozenUp, ("up",), _frozen_hooks, _steps)


# -- FSDP collectives inside the backward other than FSDP1's reduce-scatter ---------------------

class TwoUnitsBefore(Branchy):
    """``pre`` and ``first`` run before the branch (each an FSDP unit below): in backward,
    after side, FSDP all-gathers them again (resharded after forward)."""

    def __init__(self):
        super().__init__()
        self.pre = seeded_linear(H, H, torch.Generator().manual_seed(11))

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(self.pre(x))
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2", "fsdp1_one_unit_no_prefetch"])
@distributed(world_size=2, timeout_s=8)
def test_fsdp_units_regathered_after_a_branch_backward_hook_raise(kind):
    """Rank 1 skips side (the only backward hook); the units before it are all-gathered again
    in backward after side's hook. fsdp1_one_unit_no_prefetch: only ``first`` a unit (as in
    test_dp_meeting_edge_cases' FSDP1 test) but ``backward_prefetch=None``: its all-gather
    runs in its own pre-backward hook, after side's."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    if kind == "fsdp1_one_unit_no_prefetch":
        model = _wrap("fsdp1", Branchy(), ("first",), backward_prefetch=None)
    else:
        model = _wrap(kind, TwoUnitsBefore(), ("pre", "first"))
    name = _namer(model)
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction(name("side")))])
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex)
    assert outcomes == ["raised"] * 2, outcomes
