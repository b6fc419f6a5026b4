"""Second reading of three changes:

* e36ddb3 -- ``LayerMask._agreed_recompute_draw``: a hard-concrete layer recomputed inside the
  backward (activation checkpointing) agrees on its gate draw over the circuit's group;
* fed1f87 -- ``frameworks.ddp.JoinRefusal`` / ``DistributedRuntime.start_pass``: hooked
  forwards of a DDP model under ``Join`` are refused on every rank, the ranks that joined told
  through Join's count and DDP's wrapped post-hook;
* 9cc7da0 -- ``DistributedRuntime._numbering`` / ``watch_recomputation`` (``entered``) /
  ``_outer_recompute`` / ``_recompute_starts``: backward hook calls stamped with the forward
  that made their autograd node, for nested reentrant checkpoints and backwards on another
  thread.

Plain tests pin behaviour checked and found right (values compared with one process). Strict
xfails are bugs found: each reason says what is wrong, where, and what is right. Tests that
may hang (a bug leaves a rank waiting in a collective) come last, with short timeouts, and
spend their rank pool.
"""

from __future__ import annotations

import contextlib
import gc
import re
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import H, actual_names, local_group, plain_net
from rank_pool import destroy_fairscale_model_parallel, distributed
from test_branch_hooks_edge_cases import Branchy
from test_dp_meeting_edge_cases import (
    TOL,
    _assert_grads,
    _assert_stored,
    _detached,
    _grads,
    _half,
    _halves,
    _one_process,
    _outcome_everywhere,
    _register,
    _x,
)
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

JOIN_ERROR = "under torch.distributed.algorithms.join.Join"


# == e36ddb3: hard-concrete recomputes agree on their draw ======================================

def _hc_config() -> CircuitConfig:
    return CircuitConfig(mask_method="hard_concrete",
                         mask_hparams=dict(mask_init_percentage=0.51, mask_unit="weight",
                                           mask_bias=True),
                         target_layers=["blocks.0.up", "blocks.1.up", "blocks.1.down", "head"],
                         l0_lambda=2e-2, seed=3)


class _Regions(nn.Module):
    """``plain_net(0)``'s blocks, each run under ``how``: ``none``; ``reentrant`` /
    ``non_reentrant`` (the block a checkpoint region); ``deep`` (three reentrant checkpoints,
    one inside the other, the block's ``up`` in the innermost); ``siblings`` (a reentrant
    region holding two sibling reentrant checkpoints, ``up`` in one, ``down`` in the other).
    The regions are closures over the block."""

    def __init__(self, how: str) -> None:
        super().__init__()
        net = plain_net(0)
        self.blocks, self.head, self.how = net.blocks, net.head, how

    def _block(self, b, x):
        how = self.how
        if how == "none":
            return b(x)
        if how in ("reentrant", "non_reentrant"):
            return checkpoint(b, x, use_reentrant=how == "reentrant")
        if how == "deep":
            def c3(t):
                return b.down(b.act(b.up(t)))

            def c2(t):
                return checkpoint(c3, t * 1.0, use_reentrant=True)

            def c1(t):
                return t + checkpoint(c2, t, use_reentrant=True)

            return checkpoint(c1, x, use_reentrant=True)

        def region(t):
            h = checkpoint(lambda u: b.act(b.up(u)), t, use_reentrant=True)
            return t + checkpoint(b.down, h, use_reentrant=True)

        return checkpoint(region, x, use_reentrant=True)

    def forward(self, x):
        for b in self.blocks:
            x = self._block(b, x)
        return self.head(x)


def _hc_grads(how: str, group, seeds=(7, 8), extra_forward: bool = False) -> list:
    """Two micro-batches (torch seeded per micro-batch), one backward: the masks' gradients."""
    circuit = CircuitModel(_hc_config(), _Regions(how), process_group=group)
    # an input that requires grad: a reentrant region's output needs one to require grad
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    if extra_forward:  # a training forward without backward on this rank: one more draw
        circuit(x)
    loss = 0
    for seed in seeds:
        torch.manual_seed(seed)
        loss = loss + F.mse_loss(circuit(x), y)
    loss.backward()
    return [p.grad.clone() for p in circuit.mask_logits.values()]


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "deep", "siblings"])
@distributed(world_size=2, timeout_s=30)
def test_hard_concrete_recompute_over_the_world_equals_one_process(how):
    """A model with no parallel layout on two ranks (the circuit's group is the world, one
    agreement per recompute and masked parameter), blocks checkpointed reentrantly, not, three
    deep or as sibling regions inside a region: the masks' gradients equal one process without
    checkpointing, exactly."""
    want = _hc_grads("none", local_group())
    got = _hc_grads(how, None)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@distributed(world_size=2, timeout_s=30)
def test_hard_concrete_ranks_finding_different_draws_raise_on_every_rank():
    """Rank 0 runs one more training forward first (its draws are one ahead): the first
    recompute finds a draw one higher on rank 0 than on rank 1; both raise, naming the range
    and their own draw; a collective then meets on both."""
    rank = dist.get_rank()
    with pytest.raises(ValueError, match="they found draws") as err:
        _hc_grads("non_reentrant", None, extra_forward=rank == 0)
    found = re.search(r"they found draws (\d+) to (\d+), this rank (\d+)", str(err.value))
    assert found is not None, str(err.value)
    low, high, mine = map(int, found.groups())
    assert high == low + 1 and mine == (high if rank == 0 else low), str(err.value)
    met = torch.ones(1)
    dist.all_reduce(met)
    assert met.item() == 2


@distributed(world_size=4, timeout_s=40)
def test_hard_concrete_agreement_stays_inside_each_replicas_circuit():
    """fairscale TP=2 on 4 ranks, one circuit per replica (its tensor-parallel group). Replica
    0 seeds its two micro-batches alike (its generators cannot tell their recomputes apart),
    replica 1 does not: replica 0's ranks both raise, replica 1's train and equal the
    one-process circuit on the same seeds -- the agreement does not reach the other
    replica."""
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import fairscale_net
    from test_circuits_distributed import _checkpointed

    rank = dist.get_rank()
    replica = rank // 2
    seeds = (7, 7) if replica == 0 else (7, 8)
    one = local_group()  # (collective: made on every rank, used on replica 1's)
    config = _hc_config()
    config.target_layers = ["blocks.0.up", "blocks.1.up"]
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))

    def step(model, group):
        circuit = CircuitModel(config, model, process_group=group)
        loss = 0
        for seed in seeds:
            torch.manual_seed(seed)
            loss = loss + F.mse_loss(circuit(x), y)
        loss.backward()
        return circuit

    fs.initialize_model_parallel(2)
    try:
        if replica == 0:
            with pytest.raises(ValueError, match="does not match a recent training forward"):
                step(_checkpointed(fairscale_net(plain_net(0))),
                     fs.get_model_parallel_group())
        else:
            par = step(_checkpointed(fairscale_net(plain_net(0))),
                       fs.get_model_parallel_group())
            ref = step(plain_net(0), one)
            tp = fs.get_model_parallel_rank()
            for name in config.target_layers:
                whole = ref._layers[name].params["weight"].logits.grad
                n = whole.shape[0] // 2
                torch.testing.assert_close(par._layers[name].params["weight"].logits.grad,
                                           whole[tp * n:(tp + 1) * n])
    finally:
        destroy_fairscale_model_parallel()
    met = torch.ones(1)
    dist.all_reduce(met)
    assert met.item() == 4


# == 9cc7da0: the pass of a reentrant recomputation =============================================

class _Deep(Branchy):
    """side (the branch) and up in the innermost of three nested reentrant checkpoints."""

    def forward(self, x):
        take = x[:, 0, 0] > 0

        def c3(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return torch.relu(self.up(t))

        def c2(t):
            return checkpoint(c3, t * 1.0, use_reentrant=True)

        def c1(t):
            return checkpoint(c2, torch.tanh(t), use_reentrant=True)

        return self.down(checkpoint(c1, self.first(x), use_reentrant=True))


class _Siblings(Branchy):
    """A reentrant region holding two sibling reentrant checkpoints: side (the branch) in the
    first, up in the second."""

    def forward(self, x):
        take = x[:, 0, 0] > 0

        def branch(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return t

        def region(t):
            t = checkpoint(branch, torch.tanh(t), use_reentrant=True)
            return checkpoint(lambda u: torch.relu(self.up(u)), t, use_reentrant=True)

        return self.down(checkpoint(region, self.first(x), use_reentrant=True))


class _Mixed(Branchy):
    """A checkpoint inside a checkpoint of the other kind (``outer`` reentrant or not, the
    inner one the opposite): side (the branch) and up in the inner region."""

    outer_reentrant = True

    def forward(self, x):
        take = x[:, 0, 0] > 0
        inner_reentrant = not self.outer_reentrant

        def inner(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return torch.relu(self.up(t))

        def outer(t):
            return checkpoint(inner, torch.tanh(t), use_reentrant=inner_reentrant)

        return self.down(checkpoint(outer, self.first(x), use_reentrant=self.outer_reentrant))


class _MixedOuterNonReentrant(_Mixed):
    outer_reentrant = False


class _KeptAside(Branchy):
    """side (the branch) and up in a reentrant region whose output is also kept aside
    (``self.kept``), for a loss that does not reach the model's output."""

    def __init__(self):
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def forward(self, x):
        take = x[:, 0, 0] > 0

        def region(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return torch.relu(self.up(t))

        h = checkpoint(region, self.first(x), use_reentrant=True)
        self.kept.append(h)
        return self.down(h)


def _backward_hooks():
    return [("full_backward", HookFunction("side")),
            ("full_backward", HookFunction("up")),
            ("full_backward_pre", HookFunction("first")),
            ("forward", HookFunction("side")),
            ("hook", HookFunction("first.weight"))]


def _three_forwards(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2, 3)]
    (sum(o.pow(2).sum() for o in outs) * scale).backward()
    return outs


def _equal(model_fn, hooks, body) -> None:
    """``body`` in one process on the whole batch (stored values, outputs) and on this rank's
    rows (gradients), against two data-parallel ranks."""
    rank = dist.get_rank()
    want, want_outs, mine = _one_process(model_fn, hooks, body)
    stored, model = {}, model_fn()
    with FlexModel(model, stored) as flex:
        _register(flex, hooks)
        outs = body(flex, model, lambda x: _half(x, rank), 1.0)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    _assert_grads(model, _grads(mine))
    if rank == 0:
        assert stored
        _assert_stored(stored, want)


@pytest.mark.parametrize("model_fn", [_Deep, _Siblings, _Mixed, _MixedOuterNonReentrant],
                         ids=["three_deep", "siblings", "reentrant_around_non_reentrant",
                              "non_reentrant_around_reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_deep_and_sibling_reentrant_checkpoints_accumulated_forwards_equal_one_process(
        model_fn):
    """Every rank takes the branch; three forwards, one backward; hooks in the innermost
    region (three reentrant deep, a sibling region, or an inner region of the other kind than
    the outer one), before it and on a parameter: equal to one process."""
    _equal(model_fn, _backward_hooks, _three_forwards)


def _across(flex, model, rank):
    """Forward 1: rank 1 skips side; forward 2: rank 0 skips it; one backward through the
    outputs."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2, skipper=0), rank))]
    sum(o.pow(2).sum() for o in outs).backward()


@pytest.mark.parametrize("model_fn", [_Deep, _Siblings, _Mixed, _MixedOuterNonReentrant],
                         ids=["three_deep", "siblings", "reentrant_around_non_reentrant",
                              "non_reentrant_around_reentrant"])
@distributed(world_size=2, timeout_s=20)
def test_deep_and_sibling_checkpoints_branch_of_different_forwards_on_different_ranks_raise(
        model_fn):
    """side's backward hook fires for forward 1 on rank 0 and for forward 2 on rank 1: both
    raise (not joined as one call)."""
    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)
    with FlexModel(model_fn(), {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        outcomes = _outcome_everywhere(lambda: _across(flex, flex.module, rank), flex)
    assert outcomes == ["raised"] * 2, outcomes


def _kept_aside_across(flex, model, rank):
    """As _across, but the loss is of the regions' outputs kept aside (it never reaches the
    model's output, whose end of backward is watched)."""
    flex(_half(_x(1, skipper=1), rank))
    flex(_half(_x(2, skipper=0), rank))
    sum(h.pow(2).sum() for h in model.kept[-2:]).backward()


@distributed(world_size=2, timeout_s=20)
def test_kept_aside_loss_branch_of_different_forwards_on_different_ranks_raise():
    """The control for the strict xfail below: with no earlier backward through the outputs,
    a loss of tensors kept aside in forward (reentrant region) whose branch hook fires for
    different forwards on the two ranks raises on both."""
    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)
    model = _KeptAside()
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        outcomes = _outcome_everywhere(lambda: _kept_aside_across(flex, model, rank), flex)
    assert outcomes == ["raised"] * 2, outcomes


@distributed(world_size=2, timeout_s=20)
def test_kept_aside_loss_after_a_backward_through_the_outputs_branch_on_different_ranks_raise():
    """A first step whose backward goes through the outputs (every rank takes the branch; the
    reentrant region recomputed), then the kept-aside step of the control: both must raise."""
    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)
    model = _KeptAside()
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        flex(_half(_x(3), rank)).pow(2).sum().backward()
        outcomes = _outcome_everywhere(lambda: _kept_aside_across(flex, model, rank), flex)
    assert outcomes == ["raised"] * 2, outcomes


def _on_a_fresh_thread(run, idents: list[int]) -> None:
    """``run()`` on a new thread (its exception re-raised here); the thread's ident appended
    to ``idents`` first."""
    errors = []

    def body():
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 (re-raised on the calling thread)
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    idents.append(worker.ident)
    if errors:
        raise errors[0]


def _fresh_thread_attempt(rank: int) -> tuple[list[str], bool]:
    """The two steps of the test below on a new FlexModel: every rank's outcome of step 2,
    and whether both backwards' threads had one ident on this rank."""
    from test_dp_meeting_second_reader import AroundTheBranch

    model = AroundTheBranch(True)
    idents = []

    def backward(outs):
        _on_a_fresh_thread(lambda: sum(o.pow(2).sum() for o in outs).backward(), idents)

    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        backward([flex(_half(_x(10 + i), rank)) for i in range(2)])
        outcomes = _outcome_everywhere(
            lambda: backward([flex(_half(_x(1, skipper=1), rank)),
                              flex(_half(_x(2, skipper=0), rank))]), flex)
    return outcomes, len(idents) == 2 and idents[0] == idents[1]


@distributed(world_size=2, timeout_s=30)
def test_backwards_on_successive_fresh_threads_branch_on_different_ranks_raise():
    """Step 1: two forwards (every rank takes the branch), one backward on a new thread.
    Step 2: forward 3 (rank 1 skips side) and forward 4 (rank 0 skips it), one backward on
    another new thread: both ranks must raise. Decided on an attempt where the second
    thread got the first one's ident on both ranks (what CPython usually does here)."""
    from test_dp_meeting_edge_cases import _side_group

    torch.set_default_dtype(torch.float64)
    for _ in range(5):
        outcomes, same = _fresh_thread_attempt(dist.get_rank())
        reused = [None] * 2
        dist.all_gather_object(reused, same, group=_side_group())
        if all(reused):
            assert outcomes == ["raised"] * 2, outcomes
            return
    raise AssertionError("no attempt reused the thread ident on both ranks: undecided")


class _KeptAsidePlain(Branchy):
    """Branchy (no checkpoint) whose ``up`` output is also kept aside (``self.kept``)."""

    def __init__(self):
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        h = torch.relu(self.up(x))
        self.kept.append(h)
        return self.down(h)


def _kept_aside_plain_across(flex, model, rank, thread: bool):
    flex(_half(_x(1, skipper=1), rank))
    flex(_half(_x(2, skipper=0), rank))

    def backward():
        sum(h.pow(2).sum() for h in model.kept[-2:]).backward()

    if thread:
        _on_a_fresh_thread(backward, [])
    else:
        backward()


def _kept_aside_plain_outcomes(thread: bool) -> list[str]:
    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)
    model = _KeptAsidePlain()
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        return _outcome_everywhere(
            lambda: _kept_aside_plain_across(flex, model, rank, thread), flex)


@distributed(world_size=2, timeout_s=20)
def test_kept_aside_loss_without_checkpoint_branch_on_different_ranks_raise():
    """The control of the strict xfail below: no checkpoint, a loss of tensors kept aside in
    forward, the backward on the calling thread: side's calls of forward 1 (rank 0) and 2
    (rank 1) raise on both ranks."""
    outcomes = _kept_aside_plain_outcomes(thread=False)
    assert outcomes == ["raised"] * 2, outcomes


@distributed(world_size=2, timeout_s=20)
def test_kept_aside_loss_backward_on_another_thread_branch_on_different_ranks_raise():
    outcomes = _kept_aside_plain_outcomes(thread=True)
    assert outcomes == ["raised"] * 2, outcomes


# == fed1f87: hooked forwards refused under Join ===============================================

def _ddp(seed: int = 0) -> DDP:
    torch.manual_seed(0)
    return DDP(plain_net(seed))


def _hooked(model: nn.Module, stored: dict | None = None) -> FlexModel:
    flex = FlexModel(model, {} if stored is None else stored)
    flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0.up"]))
    return flex


def _batches(counts) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, H, generator=gen) for _ in range(max(counts))]
    return xs[:counts[dist.get_rank()]]


def _meets() -> None:
    met = torch.ones(1)
    dist.all_reduce(met)
    assert met.item() == dist.get_world_size()


@distributed(world_size=2, timeout_s=20)
def test_join_throw_on_early_termination_with_a_rank_without_batches_raises_the_refusal():
    """Join(throw_on_early_termination=True): rank 1 has no batch, rank 0 one hooked forward:
    the refusal is raised on both (rank 1 meets it in Join's count and the wrapped post-hook,
    before any early-termination notice); then the model closes clean and a collective
    meets."""
    model = _ddp()
    flex = _hooked(model)
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([model], throw_on_early_termination=True):
            for x in _batches((1, 0)):
                flex(x).sum().backward()
    flex.close()
    assert "join_hook" not in vars(model)
    _meets()


@distributed(world_size=2, timeout_s=20)
def test_join_rank_joined_in_a_later_round_gets_the_refusal():
    """Rank 1 has one batch, rank 0 three: its first two run with no hook selected (Join's
    shadowing by rank 1's main hooks), the third is hooked and refused; rank 1, joined rounds
    ago, raises the same error."""
    model = _ddp()
    flex = FlexModel(model, {})
    flex.create_hook_group("probe", actual_names(model)["blocks.0.up"], hook_type="forward")
    mine = _batches((3, 1))
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([model]):
            for i, x in enumerate(mine):
                flex(x, groups="probe", complement=i < 2).sum().backward()
    flex.close()
    _meets()


@pytest.mark.parametrize("zero_first", [False, True], ids=["ddp_first", "zero_first"])
@distributed(world_size=2, timeout_s=20)
def test_join_with_ddp_and_zero_redundancy_optimizer_refuses_on_every_rank(zero_first):
    """Join([ddp, ZeroRedundancyOptimizer]) in either order (ZeRO's post-hook does no
    collective): a rank without batches raises the refusal too."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _ddp()
    flex = _hooked(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    joinables = [opt, model] if zero_first else [model, opt]
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join(joinables):
            for x in _batches((1, 0)):
                flex(x).sum().backward()
                opt.step()
    flex.close()
    _meets()


@distributed(world_size=2, timeout_s=20)
def test_flexmodel_closed_inside_join_trains_as_ddp_alone():
    """Uneven batches under Join, no hooked forward, the FlexModel closed inside the block on
    every rank (Join captured the wrapped join hook at its construction, so its extra
    all-reduce still runs on every rank at exit): the parameters equal DDP under Join without
    FlexModel, and nothing of the runtime is left on the DDP."""
    mine = _batches((3, 1))

    def train(flexed: bool) -> list[torch.Tensor]:
        model = _ddp()
        flex = FlexModel(model, {}) if flexed else None
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Join([model]):
            if flex is not None:
                flex.close()
                assert "join_hook" not in vars(model)
            for x in mine:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(train(True), train(False), strict=True):
        assert torch.equal(got, want)


class _TwoDDPs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _ddp(0), _ddp(1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _Around(nn.Module):
    """A container around a DDP (a second FlexModel may wrap it while one wraps the DDP)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("how", ["close", "exception", "dropped"])
@distributed(world_size=2, timeout_s=20)
def test_every_ddp_loses_the_join_wrapper_when_the_flexmodel_ends(how):
    """A model holding two DDPs: both get the wrapper while the FlexModel lives, and neither
    keeps it after close(), a with block left on an exception, or a FlexModel dropped without
    close (its finalizer)."""
    model = _TwoDDPs()
    flex = FlexModel(model, {})
    assert "join_hook" in vars(model.a) and "join_hook" in vars(model.b)
    if how == "close":
        flex.close()
    elif how == "exception":
        with contextlib.suppress(KeyError), flex:
            raise KeyError("left on an exception")
    else:
        del flex
        gc.collect()
    assert "join_hook" not in vars(model.a) and "join_hook" not in vars(model.b)
    _meets()


def _named(model: nn.Module, suffix: str) -> str:
    return next(n for n, _ in model.named_modules() if n.endswith(suffix))


@pytest.mark.parametrize("order", ["ab", "ba"])
@distributed(world_size=2, timeout_s=20)
def test_join_over_two_wrapped_ddps_refuses_on_every_rank(order):
    """One FlexModel over a model of two DDPs, both given to Join in either order: the rank
    without batches reads the refusal in the first joinable's wrapped post-hook and raises;
    both DDPs lose the wrapper at close."""
    model = _TwoDDPs()
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction(_named(model, "a.module.blocks.0.up")))
    joinables = [model.a, model.b] if order == "ab" else [model.b, model.a]
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join(joinables):
            for x in _batches((1, 0)):
                flex(x).sum().backward()
    flex.close()
    assert "join_hook" not in vars(model.a) and "join_hook" not in vars(model.b)
    _meets()


@distributed(world_size=2, timeout_s=20)
def test_second_flexmodel_refuses_under_join_while_the_first_lives():
    """The control of the strict xfail at the end: a FlexModel on the DDP and one on a
    container of it, both alive; the second's hooked forward under Join with a rank out of
    batches raises on every rank (the first one's shadow carries it)."""
    model = _ddp()
    first = FlexModel(model, {})
    around = _Around(model)
    second = FlexModel(around, {})
    second.register_forward_hook(HookFunction(_named(around, "blocks.0.up")))
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([model]):
            for x in _batches((1, 0)):
                second(x).sum().backward()
    second.close()
    first.close()
    assert "join_hook" not in vars(model)
    _meets()


# -- may hang: short timeouts, last ------------------------------------------------------------

@distributed(world_size=2, timeout_s=8)
def test_flexmodel_built_inside_join_refuses_on_every_rank():
    """A Join built before the FlexModel holds DDP's own join hook, which the runtime's shadow
    cannot reach: the FlexModel is refused at construction, on every rank alike."""
    model = _ddp()
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([model]):
            _hooked(model)
            for x in _batches((1, 0)):
                model(x).sum().backward()
    assert "join_hook" not in vars(model)
    _meets()


@distributed(world_size=2, timeout_s=8)
def test_second_flexmodel_keeps_the_join_refusal_after_the_first_closes():
    model = _ddp()
    first = FlexModel(model, {})
    around = _Around(model)
    second = FlexModel(around, {})
    second.register_forward_hook(HookFunction(_named(around, "blocks.0.up")))
    first.close()
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([model]):
            for x in _batches((1, 0)):
                second(x).sum().backward()
    second.close()
    _meets()


@distributed(world_size=2, timeout_s=8)
def test_join_with_another_ddp_first_refuses_on_every_rank():
    """Join([other_ddp, flexed_ddp]): DDP's post-hook syncs the final model (an all-reduce and
    broadcasts), so the refusal read in the flexed DDP's post-hook would meet the other DDP's
    collectives instead (on gloo: an abort, elsewhere a hang). The Join is refused as it is
    built, on every rank, before any batch; both DDPs stay usable and unjoined."""
    flexed, other = _ddp(0), _ddp(1)
    flex = _hooked(flexed)
    with pytest.raises(RuntimeError, match="List the FlexModel's DDP first"):
        with Join([other, flexed]):
            for x in _batches((1, 0)):
                (flex(x).sum() + other(x).sum()).backward()
    assert not getattr(getattr(flexed, "_join_config", None), "enable", False)
    for x in _batches((1, 1)):  # the refusal left the FlexModel usable
        flex(x).sum().backward()
    assert flex.output_dict or dist.get_rank() != 0
    flex.close()
    _meets()


@distributed(world_size=2, timeout_s=20)
def test_join_with_the_flexed_ddp_first_and_another_ddp_after_refuses_on_every_rank():
    """The order the refusal allows: the flexed DDP first, another DDP after it. A hooked
    forward with a rank out of batches raises the refusal on every rank (the rank without
    batches reads it in the flexed DDP's post-hook, before the other DDP's)."""
    flexed, other = _ddp(0), _ddp(1)
    flex = _hooked(flexed)
    with pytest.raises(RuntimeError, match=JOIN_ERROR):
        with Join([flexed, other]):
            for x in _batches((1, 0)):
                (flex(x).sum() + other(x).sum()).backward()
    flex.close()
    _meets()


@distributed(world_size=2, timeout_s=20)
def test_join_with_zero_listed_first_is_built():
    """ZeroRedundancyOptimizer does no collective in its post-hook: listed before the flexed
    DDP, the Join is built, and training under it runs to the end. (Even batches: with
    ZeroRedundancyOptimizer first, its notice of each iteration comes in ``step()``, after
    DDP's collectives, which torch's Join cannot shadow -- list the model first for uneven
    inputs, as torch's own example does.)"""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    flexed = _ddp(0)
    flex = FlexModel(flexed, {})
    zero = ZeroRedundancyOptimizer(flexed.parameters(), optimizer_class=torch.optim.SGD,
                                   lr=0.1)
    with Join([zero, flexed]):
        for x in _batches((2, 2)):
            flexed(x).sum().backward()
            zero.step()
    flex.close()
    _meets()
