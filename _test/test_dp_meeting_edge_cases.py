"""Second reader: the site stamp in every hook call's first message under data parallelism on
gloo (DistributedRuntime._meeting / _met, AxisWalk.announce_site) and the end-of-backward
announcement (DistributedRuntime.watch_backward). Runs where every rank takes the same path
equal a one-process run (float64); runs where ranks reach different hooks raise
``HookSiteMismatchError`` on every rank."""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group, seeded_linear
from rank_pool import distributed
from test_branch_hooks_edge_cases import FF, Branchy, _fairscale_branchy
from torch import nn
from torch.utils import _pytree as pytree

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.site_tags import HookSiteMismatchError

TOL = dict(rtol=1e-9, atol=1e-12)


def _x(seed: int, rows: int = 4, seq: int = 3, skipper: int | None = None) -> torch.Tensor:
    """Every row takes the branch, except the two rows of ``skipper``."""
    x = torch.randn(rows, seq, H, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0] = 5.0
    if skipper is not None:
        x[2 * skipper:2 * skipper + 2, 0, 0] = -5.0
    return x


def _half(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // 2
    return x[rank * n:(rank + 1) * n]


def _double(module, tensor, ctx, modules):
    return tensor * 2


def _register(flex: FlexModel, hooks) -> None:
    for kind, hf in hooks():
        register = flex.register_hook if kind == "hook" else \
            getattr(flex, f"register_{kind}_hook")
        register(hf)


def _assert_stored(stored: dict, want: dict) -> None:
    assert sorted(stored) == sorted(want), (sorted(stored), sorted(want))
    for k in want:
        assert len(stored[k]) == len(want[k]), (k, len(stored[k]), len(want[k]))
        for a, b in zip(stored[k], want[k]):
            torch.testing.assert_close(a, b, **TOL)


def _assert_grads(model: nn.Module, want: dict, prefix: str = "") -> None:
    for n, p in model.named_parameters():
        w = want[n.removeprefix(prefix)]
        assert (p.grad is None) == (w is None), n
        if w is not None:
            torch.testing.assert_close(p.grad, w, **TOL)


def _grads(model: nn.Module) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# -- a stale _met: the same tensor at the same site twice ------------------------------------

class SideTwice(Branchy):
    """``side`` is called on the same tensor ``h`` once on every rank, and a second time where
    some row takes the branch (a forward-pre hook on it sees the very same tensor object)."""

    def forward(self, x):
        take = x[:, 0, 0] > 0
        h = self.first(x)
        y = self.side(h)
        if take.any():
            y = y + self.side(h)
        return self.down(torch.relu(self.up(y)))


def _twice_hooks():
    return [("forward_pre", HookFunction("side", editing_function=_double,
                                         expected_shape=(None, 3, H))),
            ("forward", HookFunction("up", expected_shape=(None, 3, FF)))]


def _twice_one_process(x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    stored = {}
    with FlexModel(SideTwice(), stored, process_group=local_group()) as flex, torch.no_grad():
        _register(flex, _twice_hooks)
        out = flex(x)
    return stored, out


@distributed(world_size=2, timeout_s=30)
def test_pre_hook_edit_on_a_module_called_twice_on_one_tensor_equals_one_process():
    """Every rank calls ``side`` twice on the same tensor (an edit with expected_shape at a
    forward-pre hook): the second call's ``_met`` is the first call's (retrieve_gathered
    leaves it), and every rank skips the same meeting: equal to one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, want_out = _twice_one_process(_x(1))
    stored = {}
    with FlexModel(SideTwice(), stored) as flex, torch.no_grad():
        _register(flex, _twice_hooks)
        out = flex(_half(_x(1), rank))
        out2 = flex(_half(_x(1), rank))
    torch.testing.assert_close(out, _half(want_out, rank), **TOL)
    torch.testing.assert_close(out2, _half(want_out, rank), **TOL)
    if rank == 0:
        for half in (0, 1):  # the two forwards' entries, each equal to one process
            _assert_stored({k: v[half * len(v) // 2:(half + 1) * len(v) // 2]
                            for k, v in stored.items()}, want)


@distributed(world_size=2, timeout_s=20)
def test_a_stale_met_skips_the_meeting_of_a_second_call_on_a_branch():
    """Rank 1 skips the second ``side(h)`` call. Expected: HookSiteMismatchError on both
    ranks, then a forward where both take it equals one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, want_out = _twice_one_process(_x(2))
    stored = {}
    with FlexModel(SideTwice(), stored) as flex, torch.no_grad():
        _register(flex, _twice_hooks)
        with pytest.raises(HookSiteMismatchError):
            flex(_half(_x(1, skipper=1), rank))
        stored.clear()
        out = flex(_half(_x(2), rank))
    torch.testing.assert_close(out, _half(want_out, rank), **TOL)
    if rank == 0:
        _assert_stored(stored, want)


def _first_pre_edit():
    return [("forward_pre", HookFunction("first", editing_function=_double,
                                         expected_shape=(None, 3, H)))]


@distributed(world_size=2, timeout_s=20)
def test_a_stale_met_depends_on_the_identity_of_the_callers_input():
    """A forward-pre edit with expected_shape sees the caller's input itself; forward 2 passes
    the same object on rank 0 and an equal copy on rank 1: the mark of forward 1's call is
    gone (it lives for one call, and for one pass), so both meet: equal to one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex, torch.no_grad():
        _register(flex, _first_pre_edit)
        want_out = flex(_x(1))
        flex(_x(1))
    stored = {}
    with FlexModel(Branchy(), stored) as flex, torch.no_grad():
        _register(flex, _first_pre_edit)
        x = _half(_x(1), rank)
        flex(x)
        out = flex(x if rank == 0 else x.clone())  # the same values, another object on rank 1
    torch.testing.assert_close(out, _half(want_out, rank), **TOL)
    if rank == 0:
        _assert_stored(stored, want)


@distributed(world_size=2, timeout_s=30)
def test_the_same_input_object_on_every_rank_twice_equals_one_process():
    """The same forward-pre edit; every rank passes its very input tensor again: every rank
    skips the same meeting (see above), equal to one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex, torch.no_grad():
        _register(flex, _first_pre_edit)
        want_out = flex(_x(1))
        flex(_x(1))
    stored = {}
    with FlexModel(Branchy(), stored) as flex, torch.no_grad():
        _register(flex, _first_pre_edit)
        x = _half(_x(1), rank)
        flex(x)
        out = flex(x)
    torch.testing.assert_close(out, _half(want_out, rank), **TOL)
    if rank == 0:
        _assert_stored(stored, want)


# -- runs that must equal one process: a generic three-way comparison ---------------------------

def _halves(out, rank: int):
    return pytree.tree_map(lambda t: _half(t, rank) if isinstance(t, torch.Tensor) and t.ndim
                           else t, out)


def _detached(out):
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)


def _one_process(model_fn, hooks, body) -> tuple[dict, list, nn.Module]:
    """One process on the whole batch (loss / 2, DDP's mean): the stored values and the
    outputs; and the model ``body`` ran in one process on this rank's rows (its gradients)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(model_fn(), want, process_group=local_group()) as flex:
        _register(flex, hooks)
        want_outs = body(flex, flex.module, lambda x: x, 0.5)
    mine = model_fn()
    with FlexModel(mine, {}, process_group=local_group()) as flex:
        _register(flex, hooks)
        body(flex, mine, lambda x: _half(x, rank), 1.0)
    return want, want_outs, mine


def _equal_run(model_fn, hooks, body, options: dict | None = None) -> None:
    """``body(flex, model, part, scale)`` runs some steps on ``part(x)`` (a loss times
    ``scale``) and returns its outputs. One process on the whole batch (loss / 2, DDP's mean)
    gives the stored values and the outputs; one process on this rank's rows the gradients
    (no DDP here: each rank keeps its own)."""
    rank = dist.get_rank()
    want, want_outs, mine = _one_process(model_fn, hooks, body)
    stored = {}
    model = model_fn()
    with FlexModel(model, stored, **(options or {})) as flex:
        _register(flex, hooks)
        outs = body(flex, model, lambda x: _half(x, rank), 1.0)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    _assert_grads(model, _grads(mine))
    _check_stored(stored, want, options or {}, rank)


def _trunk_backward_hooks():
    return [("forward", HookFunction("side")),
            ("full_backward", HookFunction("up")),
            ("full_backward_pre", HookFunction("first")),
            ("hook", HookFunction("down.weight"))]


def _accumulate(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2, 3)]
    (sum(o.pow(2).sum() for o in outs) * scale).backward()
    return outs


@distributed(world_size=2, timeout_s=30)
def test_three_forwards_then_one_backward_equal_one_process():
    """Gradient accumulation over three hooked forwards, then one backward through all of
    them: each forward's output queues an end-of-backward announcement (three, in one
    backward), the same on every rank."""
    _equal_run(Branchy, _trunk_backward_hooks, _accumulate)


def _retain(flex, model, part, scale):
    out = flex(part(_x(1)))
    loss = out.pow(2).sum() * scale
    loss.backward(retain_graph=True)
    loss.backward()
    return [out]


@distributed(world_size=2, timeout_s=30)
def test_retain_graph_double_backward_equals_one_process():
    """Two backwards through one forward (retain_graph): the output's gradient arrives twice,
    so the end of each backward is announced on every rank."""
    _equal_run(Branchy, _trunk_backward_hooks, _retain)


def _autograd_grad(flex, model, part, scale):
    out = flex(part(_x(1)))
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(out.pow(2).sum() * scale, params)
    for p, g in zip(params, grads):
        p.grad = g
    return [out]


@distributed(world_size=2, timeout_s=30)
def test_autograd_grad_equals_one_process():
    """``torch.autograd.grad`` instead of ``backward``: the callback is queued in its graph
    task the same way."""
    _equal_run(Branchy, _trunk_backward_hooks, _autograd_grad)


def _no_backward_then_backward(flex, model, part, scale):
    kept = flex(part(_x(1)))                        # backward hooks selected, never run
    with torch.no_grad():
        flex(part(_x(2)))                           # nothing watched
    out = flex(part(_x(3)))
    (out.pow(2).sum() * scale).backward()
    return [kept, out]


@distributed(world_size=2, timeout_s=30)
def test_backward_never_run_and_no_grad_forwards_then_a_backward_equal_one_process():
    """A grad forward whose backward never runs, a no_grad forward, then a forward and its
    backward: nothing is announced for the first two."""
    _equal_run(Branchy, _trunk_backward_hooks, _no_backward_then_backward)


class Checkpointed(Branchy):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        h = checkpoint(lambda t: torch.relu(self.up(t)), x, use_reentrant=self.reentrant)
        return self.down(h)


def _checkpoint_hooks():
    return [("forward", HookFunction("up", editing_function=_double)),
            ("full_backward", HookFunction("up")),
            ("full_backward_pre", HookFunction("side")),
            ("hook", HookFunction("first.weight"))]


def _step(flex, model, part, scale):
    out = flex(part(_x(1)))
    (out.pow(2).sum() * scale).backward()
    return [out]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_activation_checkpointing_with_backward_hooks_equals_one_process(reentrant):
    """``up`` checkpointed (its forward edit runs again in backward) with backward hooks inside
    and outside the checkpointed region."""
    _equal_run(lambda: Checkpointed(reentrant), _checkpoint_hooks, _step)


class TwoOutputs(Branchy):
    """Returns ``kind``: a tuple, a dict or an HF ModelOutput of (an auxiliary head on the
    input, the model's output). The auxiliary head comes first."""

    def __init__(self, kind: str = "tuple"):
        super().__init__()
        self.kind = kind
        self.aux = seeded_linear(H, H, torch.Generator().manual_seed(7))

    def forward(self, x):
        aux = self.aux(x)
        main = super().forward(x)
        if self.kind == "tuple":
            return aux, main
        if self.kind == "dict":
            return {"aux": aux, "main": main}
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=aux, hidden_states=(main,))


def _main(out):
    if isinstance(out, tuple):
        return out[1]
    return out.hidden_states[0] if hasattr(out, "hidden_states") else out["main"]


def _both_outputs_step(flex, model, part, scale):
    out = flex(part(_x(1)))
    ((_main(out).pow(2).sum() + pytree.tree_leaves(out)[0].pow(2).sum()) * scale).backward()
    return [out]


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
@distributed(world_size=2, timeout_s=30)
def test_structured_outputs_equal_one_process(kind):
    """A tuple, dict or HF ModelOutput output, a loss over all of it."""
    _equal_run(lambda: TwoOutputs(kind), _trunk_backward_hooks, _both_outputs_step)


def _main_only_step(flex, model, part, scale):
    out = flex(part(_x(1)))
    (_main(out).pow(2).sum() * scale).backward()
    return [out]


@distributed(world_size=2, timeout_s=30)
def test_backward_through_part_of_the_output_on_the_trunk_equals_one_process():
    """The loss uses the second output only (the first, watched, never gets a gradient): no
    rank announces the end, the same on every rank."""
    _equal_run(TwoOutputs, _trunk_backward_hooks, _main_only_step)


# -- runs that must refuse on every rank, then go on equal to one process ---------------------

def _outcome_everywhere(bad, flex, replica: int | None = None) -> list[str]:
    """Runs ``bad()``; a rank it does not raise on runs one more hooked forward (which meets a
    rank still waiting at a hook, so nothing hangs). Every rank's outcome, gathered over the
    world: ``"raised"`` (at ``bad``), ``"raised later"`` or ``"returned"``."""
    group = _side_group()  # made before anything can hang
    try:
        bad()
        mine = "returned"
    except HookSiteMismatchError:
        mine = "raised"
    if mine == "returned":
        try:
            with torch.no_grad():
                flex(_half(_x(99), dist.get_rank() if replica is None else replica))
        except HookSiteMismatchError:
            mine = "raised later"
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine, group=group)
    return outcomes


_SIDE_GROUPS: dict[int, dist.ProcessGroup] = {}


def _side_group() -> dist.ProcessGroup:
    """A group of the whole world that neither the model (DDP's default group) nor the
    FlexModel uses: a collective a refusal left pending there cannot pair with the test's."""
    world = id(dist.distributed_c10d._get_default_group())
    if world not in _SIDE_GROUPS:
        _SIDE_GROUPS[world] = dist.new_group(list(range(dist.get_world_size())))
    return _SIDE_GROUPS[world]


def _refused_then_equal(model_fn, hooks, bad, options: dict | None = None,
                        good=_step) -> None:
    """``bad(flex, model, rank)``: a step where ranks reach different hooks; it must raise on
    every rank. Then ``good`` on a fresh batch equals one process (values and gradients)."""
    rank = dist.get_rank()
    want, want_outs, mine = _one_process(model_fn, hooks, good)
    stored = {}
    model = model_fn()
    with FlexModel(model, stored, **(options or {})) as flex:
        _register(flex, hooks)
        outcomes = _outcome_everywhere(lambda: bad(flex, model, rank), flex)
        assert outcomes == ["raised"] * len(outcomes), outcomes
        model.zero_grad()
        stored.clear()
        outs = good(flex, model, lambda x: _half(x, rank), 1.0)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    _assert_grads(model, _grads(mine))
    _check_stored(stored, want, options or {}, rank)


def _check_stored(stored: dict, want: dict, options: dict, rank: int) -> None:
    if options.get("store_on") == "replica_leaders":
        # each replica's leader stores its own rows; what is not split over dp (a parameter's
        # gradient, a dp average) the stage leader alone
        _assert_stored(stored, {k: [_half(t, rank) if t.ndim == 3 else t for t in v]
                                for k, v in want.items() if rank == 0 or v[0].ndim == 3})
    elif rank == 0 or options.get("store_on") == "all":
        _assert_stored(stored, want)


def _branch_backward_hooks():
    return [("full_backward", HookFunction("side"))]


def _accumulate_across_the_branch(flex, model, rank):
    """Forward 1: rank 1 skips ``side``; forward 2: rank 0 skips it; one backward."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2, skipper=0), rank))]
    sum(o.pow(2).sum() for o in outs).backward()


@distributed(world_size=2, timeout_s=30)
def test_accumulated_forwards_whose_branch_hook_fires_on_different_ranks_raise():
    """Two forwards, one backward: side's backward hook fires for forward 1 on rank 0 and for
    forward 2 on rank 1. Each call is stamped with the pass of the forward that created its
    autograd node, so they do not meet as one tensor: both raise."""
    _refused_then_equal(Branchy, _branch_backward_hooks, _accumulate_across_the_branch)


def _part_of_the_output(flex, model, rank):
    _main(flex(_half(_x(1, skipper=1), rank))).pow(2).sum().backward()


@distributed(world_size=2, timeout_s=30)
def test_backward_through_part_of_the_output_with_a_branch_hook_raises():
    """The loss uses the second output only (the first, an auxiliary head, gets no gradient):
    every output is watched, so the end of the backward is announced and both raise."""
    _refused_then_equal(TwoOutputs, _branch_backward_hooks, _part_of_the_output,
                        good=_main_only_step)


def _whole_output(kind):
    def bad(flex, model, rank):
        out = flex(_half(_x(1, skipper=1), rank))
        sum(t.pow(2).sum() for t in pytree.tree_leaves(out)).backward()
    return bad


@pytest.mark.parametrize("kind", ["dict", "model_output"])
@distributed(world_size=2, timeout_s=30)
def test_structured_outputs_with_a_branch_backward_hook_raise(kind):
    """A dict / HF ModelOutput output, a loss over all of it; rank 1 skips side (the only
    backward hook): both raise at the backward, then equal one process."""
    _refused_then_equal(lambda: TwoOutputs(kind), _branch_backward_hooks, _whole_output(kind),
                        good=_both_outputs_step)


def _grad_of_branch(flex, model, rank):
    out = flex(_half(_x(1, skipper=1), rank))
    torch.autograd.grad(out.pow(2).sum(), [p for _, p in model.named_parameters()],
                        allow_unused=True)


@distributed(world_size=2, timeout_s=30)
def test_autograd_grad_with_a_branch_backward_hook_raises():
    _refused_then_equal(Branchy, _branch_backward_hooks, _grad_of_branch, good=_autograd_grad)


def _plain_branch_step(skipper: int):
    def bad(flex, model, rank):
        flex(_half(_x(1, skipper=skipper), rank)).pow(2).sum().backward()
    return bad


_BACKWARD_KINDS = {
    "reduce": lambda: [("full_backward_pre", HookFunction("side", reduce="mean_over_batch"))],
    "edit_shaped": lambda: [("full_backward_pre", HookFunction(
        "side", editing_function=_double, expected_shape=(None, 3, H)))],
    "replicate_shaped": lambda: [("full_backward_pre", HookFunction(
        "side", editing_function=_double, replicate_edit=True, expected_shape=(None, 3, H)))],
    "two_on_side": lambda: [
        ("full_backward_pre", HookFunction("side", expected_shape=(None, 3, H))),
        ("full_backward_pre", HookFunction("side", editing_function=_double))],
    "param_shaped": lambda: [("hook", HookFunction("side.weight", expected_shape=(H, H)))],
}


@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_skips", "other_skips"])
@pytest.mark.parametrize("kind", sorted(_BACKWARD_KINDS))
@distributed(world_size=2, timeout_s=30)
def test_the_last_backward_hook_on_a_branch_of_any_kind_raises(kind, skipper):
    """A reduce=, an edit with expected_shape (shape agreement first), a replicated one, two
    HookFunctions on side, a parameter hook with expected_shape: the only backward hooks,
    on the branch ``skipper`` skips: both raise, then equal one process."""
    _refused_then_equal(Branchy, _BACKWARD_KINDS[kind], _plain_branch_step(skipper))


@pytest.mark.parametrize("options", [dict(store_on="all"), dict(store_on="replica_leaders"),
                                     dict(overlap_retrieval=True)],
                         ids=["store_on_all", "replica_leaders", "overlap_retrieval"])
@distributed(world_size=2, timeout_s=30)
def test_a_branch_backward_hook_under_retrieval_options_raises(options):
    """The last backward hook on a branch under store_on / overlap_retrieval."""
    hooks = lambda: [("forward", HookFunction("up")),  # noqa: E731
                     ("full_backward", HookFunction("side"))]
    _refused_then_equal(Branchy, hooks, _plain_branch_step(1), options)


# -- every rank at the same hooks, the model's own branch differing: no refusal ----------------

class AuxOnTheBranch(Branchy):
    """Returns (an auxiliary scalar, the output): the auxiliary value is side's sum where some
    row takes the branch (it requires grad) and a constant zero elsewhere (it does not), as an
    MoE's auxiliary loss over the experts a rank used. The loss here is the output's only (the
    auxiliary value is logged). No hook on ``side``."""

    def forward(self, x):
        take = x[:, 0, 0] > 0
        h = self.first(x)
        aux = torch.zeros(())
        if take.any():
            s = self.side(h)
            aux = s.sum()
            h = torch.where(take[:, None, None], h + s, h)
        return aux, self.down(torch.relu(self.up(h)))


def _trunk_only_hooks():
    return [("full_backward", HookFunction("up")), ("hook", HookFunction("down.weight"))]


@distributed(world_size=2, timeout_s=30)
def test_a_first_output_that_requires_grad_on_some_ranks_only_is_no_mismatch():
    """The auxiliary output requires grad on rank 0 only; the loss uses the main output:
    both ranks announce the end of the backward from it, no mismatch."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    xs = [_x(1, skipper=1), _x(2, skipper=1)]
    want = {}
    with FlexModel(AuxOnTheBranch(), want, process_group=local_group()) as flex:
        _register(flex, _trunk_only_hooks)
        want_outs = []
        for x in xs:
            out = flex(x)[1]
            (out.pow(2).sum() / 2).backward()
            want_outs.append(out.detach())
    stored = {}
    with FlexModel(AuxOnTheBranch(), stored) as flex:
        _register(flex, _trunk_only_hooks)
        outs = []
        for x in xs:
            out = flex(_half(x, rank))[1]
            out.pow(2).sum().backward()
            outs.append(out.detach())
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, _half(b, rank), **TOL)
    if rank == 0:
        _assert_stored(stored, want)


@distributed(world_size=2, timeout_s=30)
def test_ddp_trunk_hooks_with_an_unhooked_branch_one_rank_skips_equal_one_process():
    """DDP; rank 1 skips ``side``, which has no hook; forward edits and backward hooks on the
    trunk, two steps, find_unused_parameters=True: equal one process (stored values, outputs,
    DDP's averaged gradients)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()

    def hooks(p=""):
        return lambda: [("forward", HookFunction(p + "up", editing_function=_double)),
                        ("forward_pre", HookFunction(p + "down", expected_shape=(None, 3, FF))),
                        ("full_backward_pre", HookFunction(p + "first")),
                        ("full_backward", HookFunction(p + "up")),
                        ("hook", HookFunction(p + "down.weight"))]

    xs = [_x(1, skipper=1), _x(2, skipper=1)]
    want, ref = {}, Branchy()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, hooks())
        want_outs = []
        for x in xs:
            out = flex(x)
            (out.pow(2).sum() / 2).backward()
            want_outs.append(out.detach())
    stored = {}
    model = DDP(Branchy(), find_unused_parameters=True)
    with FlexModel(model, stored) as flex:
        _register(flex, hooks("module."))
        outs = []
        for x in xs:
            out = flex(_half(x, rank))
            out.pow(2).sum().backward()
            outs.append(out.detach())
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, _half(b, rank), **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.get_parameter(n.removeprefix("module.")).grad,
                                   **TOL)
    if rank == 0:
        _assert_stored({k.removeprefix("module."): v for k, v in stored.items()}, want)


@distributed(world_size=2, timeout_s=30)
def test_uneven_and_empty_replica_with_backward_hooks_equals_one_process():
    """Rank 0 holds all 4 rows, rank 1 none (its output's gradient is empty, and arrives all
    the same; an empty batch takes no branch, so no hook on it): backward hooks, an edit and
    a parameter hook, two steps."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()

    def hooks():
        return [("forward", HookFunction("up", editing_function=_double)),
                ("full_backward_pre", HookFunction("first")),
                ("full_backward", HookFunction("up")),
                ("hook", HookFunction("first.weight"))]

    xs = [_x(1, seq=3), _x(2, seq=5)]
    want, ref = {}, Branchy()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, hooks)
        want_outs = []
        for x in xs:
            out = flex(x)
            (out.pow(2).sum() / 2).backward()
            want_outs.append(out.detach())
    stored, model = {}, Branchy()
    with FlexModel(model, stored) as flex:
        _register(flex, hooks)
        outs = []
        for x in xs:
            out = flex(x if rank == 0 else x[:0])
            out.pow(2).sum().backward()
            outs.append(out.detach())
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, b if rank == 0 else b[:0], **TOL)
    if rank == 0:
        _assert_stored(stored, want)


# -- DP x TP, FSDP, pipeline x DP ----------------------------------------------------------------

@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_replica_skips", "other_replica_skips"])
@distributed(world_size=4, timeout_s=40)
def test_dp_x_tp_the_last_backward_hook_on_a_branch_raises_then_equals_one_process(skipper):
    """fairscale TP=2 x DP=2 (``up`` column-, ``down`` row-parallel): side's full_backward
    hook is the only backward hook, on the branch replica ``skipper`` skips; ``up``'s output
    (tp-sharded) retrieved in forward. The end of the backward is announced over the stage of
    4: every rank raises; then a step where both replicas take it equals one process."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()
    hooks = lambda: [("forward", HookFunction("up")),  # noqa: E731
                     ("full_backward", HookFunction("side"))]
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex:
        _register(flex, hooks)
        want_out = flex(_x(2))
        (want_out.pow(2).sum() / 2).backward()
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2) as flex:
        _register(flex, hooks)
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=skipper), replica)).pow(2).sum().backward(),
            flex, replica)
        assert outcomes == ["raised"] * 4, outcomes
        model.zero_grad()
        stored.clear()
        out = flex(_half(_x(2), replica))
        out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), _half(want_out.detach(), replica), **TOL)
    if dist.get_rank() == 0:
        _assert_stored(stored, want)


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp_the_last_backward_hook_on_a_branch_raises_then_equals_one_process(kind):
    """FSDP1 / FSDP2 over both ranks; side's full_backward hook (the only backward hook),
    skipped by rank 1: both raise in the backward, one at side, the other before FSDP's
    gradient collective (FSDP1: inside the backward, before the unit's reduce-scatter; FSDP2:
    the end-of-backward announcement, before FSDP2's final callback reduce-scatters). FSDP2,
    after torch's recovery (reset_iter_state): the next step's outputs, stored values and
    whole gradients equal one process. FSDP1 has no recovery from an exception inside its
    backward: raising on every rank, not hanging, is what is checked."""
    from test_dp_announce_edge_cases import _fsdp, _full_grads

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, ref = {}, Branchy()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, lambda: [("forward", HookFunction("up")),
                                 ("full_backward", HookFunction("side"))])
        want_out = flex(_x(2))
        (want_out.pow(2).sum() / 2).backward()
    model = _fsdp(kind, Branchy())
    prefix = next(n[:-len("first")] for n, _ in model.named_modules() if n.endswith("first"))
    stored = {}
    with FlexModel(model, stored) as flex:
        _register(flex, lambda: [("forward", HookFunction(prefix + "up")),
                                 ("full_backward", HookFunction(prefix + "side"))])
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex)
        assert outcomes == ["raised"] * 2, outcomes
        if kind == "fsdp1":
            return
        model.zero_grad()
        model.reset_iter_state()
        stored.clear()
        out = flex(_half(_x(2), rank))
        out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), _half(want_out.detach(), rank), **TOL)
    for name, grad in _full_grads(kind, model).items():
        torch.testing.assert_close(grad, ref.get_parameter(name).grad, **TOL)
    if rank == 0:
        _assert_stored({k[len(prefix):]: v for k, v in stored.items()}, want)


def _pp_backward_hooks():
    return [("forward", HookFunction("first", editing_function=_double)),
            ("full_backward", HookFunction("side")),
            ("full_backward_pre", HookFunction("first")),
            ("full_backward", HookFunction("up")),
            ("hook", HookFunction("down.weight"))]


@distributed(world_size=4, timeout_s=40)
def test_pp_x_dp_backward_hooks_on_both_stages_equal_one_process():
    """PP=2 x DP=2 (ranks 0, 1 stage 0; 2, 3 stage 1), two micro-batches per step over a
    StageLink, backward hooks on both stages (each stage's backward through a forward whose
    output is sent on ends with its own announcement), two steps of different lengths."""
    from test_dp_announce_edge_cases import _Stage, check_pp_dp, pp_dp_steps

    from flex_surgery.hooks.groups import ALL
    from flex_surgery.parallel.pipeline import StageLink

    torch.set_default_dtype(torch.float64)
    steps = [(1, 3), (2, 5)]
    want, want_outs, ref = {}, [], Branchy()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, _pp_backward_hooks)
        for seed, seq in steps:  # the schedule's order: both forwards, then both backwards
            mbs = [flex(mb) for mb in _x(seed, rows=8, seq=seq).chunk(2)]
            for out in mbs:
                (out.pow(2).sum() / 2).backward()
                want_outs.append(out.detach())
    stage, replica = divmod(dist.get_rank(), 2)
    stored = {}
    flex = FlexModel(_Stage(Branchy(), stage), stored if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2, data_parallel_size=2)
    _register(flex, _pp_backward_hooks)
    link = StageLink(flex.runtime.mesh, timeout_s=30)
    outs = pp_dp_steps(flex, link, replica, [(seed, seq, ALL) for seed, seq in steps])
    check_pp_dp(flex, ref, outs, want_outs, replica)
    if dist.get_rank() == 0:
        _assert_stored(stored, want)



@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_skips", "other_skips"])
@distributed(world_size=2, timeout_s=30, spends_pool=True)  # a stray all-reduce
def test_ddp_find_unused_the_last_backward_hook_on_a_branch_raises(skipper):
    """DDP(find_unused_parameters=True), a forward edit on the trunk and side's full_backward
    hook (the only backward hook) on the branch ``skipper`` skips: both raise in the backward
    (DDP's all-reduce is asynchronous, its wait a callback queued after the announcement).
    DDP itself cannot go on after an exception in its backward (its reducer's next
    ``_rebuild_buckets`` fails an internal assert, with or without FlexModel), so the model
    is not run again here."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    # its own group: a bucket all-reduce that one rank launched before the refusal is left
    # pending there, not in the default group
    model = DDP(Branchy(), find_unused_parameters=True,
                process_group=dist.new_group([0, 1]))
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("forward", HookFunction("module.up", editing_function=_double)),
                                 ("full_backward", HookFunction("module.side"))])
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=skipper), rank)).pow(2).sum().backward(), flex)
        assert outcomes == ["raised"] * 2, outcomes


# -- forward: several HookFunctions on one module, expected_shape refusals ---------------------

def _three_on_side():
    return [("forward", HookFunction("side", editing_function=_double,
                                     expected_shape=(None, 3, H))),
            ("forward", HookFunction("side", expected_shape=(None, 3, H))),
            ("forward", HookFunction("side", reduce="mean_over_batch")),
            ("forward", HookFunction("up", expected_shape=(None, 3, FF)))]


def _nograd_step(flex, model, part, scale):
    with torch.no_grad():
        return [flex(part(_x(1))), flex(part(_x(2)))]


@distributed(world_size=2, timeout_s=30)
def test_three_hook_functions_on_one_module_equal_one_process():
    """An edit and a retrieval with expected_shape and a reduce= on ``side`` (the second sees
    the first's edited output, the same tensor for the last two), every rank taking it."""
    _equal_run(Branchy, _three_on_side, _nograd_step)


def _nograd_branch(flex, model, rank):
    with torch.no_grad():
        flex(_half(_x(1, skipper=1), rank))


@distributed(world_size=2, timeout_s=30)
def test_three_hook_functions_on_a_skipped_module_raise_then_equal_one_process():
    _refused_then_equal(Branchy, _three_on_side, _nograd_branch, good=_nograd_step)


@distributed(world_size=2, timeout_s=30)
def test_a_refused_expected_shape_leaves_no_stale_meeting():
    """``side``'s expected_shape is wrong for the first forward's length (seq 4, not 3): every
    rank raises LayoutError in the shape agreement (whole_shape set ``_met`` before it); the
    next forwards (seq 3; then rank 1 skipping side) must still meet: equal, then refused,
    then equal one process."""
    from flex_surgery.parallel.frameworks.base import LayoutError

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    hooks = lambda: [("forward_pre", HookFunction("side", editing_function=_double,  # noqa
                                                  expected_shape=(None, 3, H))),
                     ("forward", HookFunction("up", expected_shape=(None, 3, FF)))]
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex, torch.no_grad():
        _register(flex, hooks)
        want_out = flex(_x(2))
    stored = {}
    with FlexModel(Branchy(), stored) as flex, torch.no_grad():
        _register(flex, hooks)
        with pytest.raises(LayoutError):  # "cannot be a shard of expected_shape", everywhere
            flex(_half(_x(1, seq=4), rank))
        outcomes = _outcome_everywhere(lambda: flex(_half(_x(1, skipper=1), rank)), flex)
        assert outcomes == ["raised"] * 2, outcomes
        stored.clear()
        out = flex(_half(_x(2), rank))
    torch.testing.assert_close(out, _half(want_out, rank), **TOL)
    if rank == 0:
        _assert_stored(stored, want)


# -- DP x TP: retrieval options and edits over the stage of 4 --------------------------------

@pytest.mark.parametrize("options", [dict(store_on="all"), dict(store_on="replica_leaders"),
                                     dict(overlap_retrieval=True)],
                         ids=["store_on_all", "replica_leaders", "overlap_retrieval"])
@distributed(world_size=4, timeout_s=40)
def test_dp_x_tp_retrieval_options_with_a_skipped_branch_raise_then_equal(options):
    """fairscale TP=2 x DP=2: a replicated edit with expected_shape on ``side`` (replica 1
    skips it), an edit and a retrieval on the tp-sharded ``up``: every rank raises, then a
    forward where both replicas take ``side`` equals one process."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()
    hooks = lambda: [("forward", HookFunction("side", editing_function=_double,  # noqa
                                              replicate_edit=True,
                                              expected_shape=(None, 3, H))),
                     ("forward", HookFunction("up", editing_function=_double)),
                     ("forward", HookFunction("up"))]
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex, torch.no_grad():
        _register(flex, hooks)
        want_out = flex(_x(2))
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2,
                   **options) as flex, torch.no_grad():
        _register(flex, hooks)
        outcomes = _outcome_everywhere(lambda: flex(_half(_x(1, skipper=1), replica)), flex,
                                       replica)
        assert outcomes == ["raised"] * 4, outcomes
        stored.clear()
        out = flex(_half(_x(2), replica))
    torch.testing.assert_close(out, _half(want_out, replica), **TOL)
    if options.get("store_on") == "replica_leaders":
        if dist.get_rank() % 2 == 0:  # fairscale's order (dp, tp): tp rank 0 of each replica
            _check_stored(stored, want, options, replica)
    else:
        _check_stored(stored, want, options, dist.get_rank())




# -- reduce= where each storing rank reduces its own copy (run_everywhere) ---------------------

@distributed(world_size=2, timeout_s=20)
def test_store_on_all_reduce_on_the_trunk_meets_a_branch_hook():
    """store_on='all', a retrieval on ``side`` (rank 1 skips it) and a reduce= on ``up``:
    both ranks must raise, then the next forward equals one process."""
    hooks = lambda: [("forward", HookFunction("side")),  # noqa: E731
                     ("forward", HookFunction("up", reduce="mean_over_batch"))]
    _refused_then_equal(Branchy, hooks, _nograd_branch, dict(store_on="all"),
                        good=_nograd_step)



def _checkpointed_flex(reentrant: bool):
    def body(flex, model, part, scale):
        from torch.utils.checkpoint import checkpoint

        x = part(_x(1)).requires_grad_(reentrant)  # reentrant needs an input that does
        out = checkpoint(flex, x, use_reentrant=reentrant)
        (out.pow(2).sum() * scale).backward()
        return [out]
    return body


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_the_whole_flexmodel_checkpointed_equals_one_process(reentrant):
    """``checkpoint(flex, x)``: the whole hooked forward runs again inside the backward (no
    new pass, no announcement there); forward edits, retrievals and backward hooks."""
    hooks = lambda: [("forward", HookFunction("up", editing_function=_double)),  # noqa: E731
                     ("forward", HookFunction("side")),
                     ("full_backward", HookFunction("up")),
                     ("hook", HookFunction("first.weight"))]
    _equal_run(Branchy, hooks, _checkpointed_flex(reentrant))



def _rich_hooks(reduce: bool):
    def hooks():
        out = [("forward", HookFunction("first", expected_shape=(None, 3, H))),
               ("forward_pre", HookFunction("side", editing_function=_double,
                                            expected_shape=(None, 3, H))),
               ("forward", HookFunction("up", editing_function=_double, replicate_edit=True)),
               ("full_backward_pre", HookFunction("down", expected_shape=(None, 3, H))),
               ("full_backward", HookFunction("side", editing_function=_double)),
               ("hook", HookFunction("up.weight", expected_shape=(FF, H)))]
        if reduce:
            out.append(("forward", HookFunction("down", reduce="mean_over_batch")))
        return out
    return hooks


def _two_steps(flex, model, part, scale):
    outs = []
    for seed in (1, 2):
        out = flex(part(_x(seed)))
        (out.pow(2).sum() * scale).backward()
        outs.append(out)
    with torch.no_grad():
        outs.append(flex(part(_x(3))))
    return outs


@pytest.mark.parametrize("options", [{}, dict(store_on="all"), dict(store_on="replica_leaders"),
                                     dict(overlap_retrieval=True)],
                         ids=["rank0", "store_on_all", "replica_leaders", "overlap_retrieval"])
@distributed(world_size=2, timeout_s=30)
def test_every_rank_on_one_path_with_every_hook_kind_equals_one_process(options):
    """Every rank takes the same path: retrievals and edits with expected_shape (known
    sizes: a site announcement first), a replicated edit, a reduce=, backward hooks and a
    parameter hook with expected_shape, two grad steps and a no_grad one: no refusal, equal
    to one process."""
    reduce = options.get("store_on") != "replica_leaders"  # that one needs a store=
    _equal_run(Branchy, _rich_hooks(reduce), _two_steps, options)


def _fsdp1_with_first_a_unit() -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = Branchy()
    model.first = FSDP(model.first, use_orig_params=True, device_id=torch.device("cpu"))
    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))


@distributed(world_size=2, timeout_s=15)
def test_fsdp1_a_unit_reduced_after_a_branch_backward_hook_raises():
    """``first`` is an FSDP1 unit of its own: its gradient is reduce-scattered inside the
    backward, after side's backward hook (which rank 1 skips) and before the backward ends.
    Rank 1 announces that reduction before it runs, so rank 0, at side, and rank 1 both raise
    instead of waiting for each other (rank 0 for a header, rank 1 in the reduce-scatter).
    After a step where every rank takes the branch: FSDP1 hooks its units again in each
    forward, and so are they watched."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = _fsdp1_with_first_a_unit()
    prefix = next(n[:-len("side")] for n, _ in model.named_modules() if n.endswith("side"))
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction(prefix + "side"))])
        flex(_half(_x(2), rank)).pow(2).sum().backward()
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex)
    assert outcomes == ["raised"] * 2, outcomes


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_units_with_backward_hooks_on_every_rank_equal_one_process():
    """Every rank takes the branch: side's backward hook and each unit's announced reduction
    meet on every rank, twice (the reductions are watched again in each forward); the stored
    gradients and the whole parameter gradients equal one process."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, ref = {}, Branchy()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, lambda: [("full_backward", HookFunction("side"))])
        for seed in (1, 2):
            (flex(_x(seed)).pow(2).sum() / 2).backward()
    model = _fsdp1_with_first_a_unit()
    prefix = next(n[:-len("side")] for n, _ in model.named_modules() if n.endswith("side"))
    stored = {}
    with FlexModel(model, stored) as flex:
        _register(flex, lambda: [("full_backward", HookFunction(prefix + "side"))])
        for seed in (1, 2):
            flex(_half(_x(seed), rank)).pow(2).sum().backward()
    with FSDP.summon_full_params(model, with_grads=True):
        for n, p in model.named_parameters():
            name = n.replace("_fsdp_wrapped_module.", "")
            torch.testing.assert_close(p.grad, ref.get_parameter(name).grad, **TOL)
    if rank == 0:
        _assert_stored({k[len(prefix):]: v for k, v in stored.items()}, want)
