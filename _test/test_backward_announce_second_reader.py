"""Second reading of the announcements inside the backward: the forward pre-hook that maps a
reentrant checkpoint's recomputation to its pass (``DistributedRuntime.watch_recomputation``),
the hooked views FSDP1 units hand on so that their all-gathers in the backward are announced,
the announcement of an FSDP unit's all-gather in a recomputed forward
(``DistributedRuntime._watch_unshards``), and the doubt of a sequence split settled after the
data-parallel meeting (``DistributedRuntime.layout_of``).

Every check compares with one process of the same weights and inputs (float64: outputs, stored
values, whole gradients) or asserts a ``HookSiteMismatchError`` on every rank. Pinned as
working: FSDP1 units returning tuples, dicts, HF ModelOutputs, the same tensor twice, tensors
that need no grad; in-place ops on an FSDP1 unit's outputs (the root's too) in a forward with
grad enabled; nested FSDP1 units (``use_orig_params`` True and False); two forwards and one
backward through FSDP1; an FSDP1 unit inside a checkpointed region, reentrant or not (its
all-gather in the recomputed forward announced); DDP with checkpoints and accumulated
forwards; nested checkpoints whose branch every rank takes; a closed or abandoned FlexModel
leaving no hook behind; a doubted sequence split on a branch one replica skips (FSDP2 x TP);
a parameter gradient hook or FSDP1's gradient reduction after a recomputed branch with a
removed or unselected hook on it (an ``AccumulateGrad`` node is stamped with the last pass on
every rank).

Also pinned: nested reentrant checkpoints, whose inner checkpoint's node is made before the
outer recomputation's first hooked module notes its forward (the inner region belongs to the
outer one's forward), and a backward run on another thread than the forwards (as the autograd
engine does for CUDA tensors), whose recomputed nodes are numbered on that thread.
"""

import contextlib
import threading

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group, seeded_linear
from rank_pool import distributed
from test_branch_hooks_edge_cases import FF, Branchy
from test_dp_meeting_edge_cases import (
    TOL,
    _assert_grads,
    _assert_stored,
    _detached,
    _equal_run,
    _grads,
    _half,
    _halves,
    _outcome_everywhere,
    _refused_then_equal,
    _register,
    _side_group,
    _x,
)
from test_dp_meeting_second_reader import (
    AroundTheBranch,
    _fsdp1,
    _full_grads,
    _namer,
    _plain,
)
from test_dtensor_sequence_output_edge_cases import _lin, _mesh_2d
from torch import nn

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.parallel.site_tags import HookSiteMismatchError

# -- helpers ---------------------------------------------------------------------------------


def _flat_grads(model: nn.Module) -> dict:
    """Every parameter's whole gradient from each FSDP1 unit's FlatParameter (what
    ``summon_full_params(with_grads=True)`` refuses under ``use_orig_params=False``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for prefix, unit in model.named_modules():
        if not isinstance(unit, FSDP) or unit._handle is None:
            continue
        flat = unit._handle.flat_param
        pieces = [torch.empty_like(flat.grad) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, flat.grad)
        whole = torch.cat(pieces)[:flat._unpadded_unsharded_size.numel()]
        for fqn, shape, chunk in zip(flat._fqns, flat._shapes, whole.split(flat._numels)):
            out[_plain(f"{prefix}.{fqn}" if prefix else fqn)] = chunk.view(shape)
    return out


def _fsdp1_equal(model_fn, wrap, hooks, body, orig_params: bool = True) -> None:
    """One process on the whole batch (loss / 2) against ``wrap(model_fn())`` (FSDP1) over
    both ranks: outputs, stored values (rank 0) and every parameter's whole gradient.
    ``hooks(name)`` -> [(kind, HookFunction)]; ``body(flex, model, part, scale)``."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, ref = {}, model_fn()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, lambda: hooks(lambda n: n))
        want_outs = body(flex, ref, lambda x: x, 0.5)
    model = wrap(model_fn())
    name = _namer(model)
    stored = {}
    with FlexModel(model, stored) as flex:
        _register(flex, lambda: hooks(name))
        outs = body(flex, model, lambda x: _half(x, rank), 1.0)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    whole = _full_grads("fsdp1", model) if orig_params else _flat_grads(model)
    assert sorted(whole) == sorted(n for n, _ in ref.named_parameters()), sorted(whole)
    for n, grad in whole.items():
        w = ref.get_parameter(n).grad
        assert (grad is None) == (w is None), n
        if w is not None:
            torch.testing.assert_close(grad, w, **TOL)
    if rank == 0:
        _assert_stored({_plain(k): v for k, v in stored.items()}, want)


def _steps(flex, model, part, scale):
    outs = []
    for seed in (1, 2):
        out = flex(part(_x(seed)))
        (out.pow(2).sum() * scale).backward()
        outs.append(out)
    return outs


def _two_forwards_one_backward(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2)]
    (sum(o.pow(2).sum() for o in outs) * scale).backward()
    return outs


def _wrap_up(model):
    """``up`` an FSDP1 unit under an FSDP1 root."""
    model.up = _fsdp1(model.up)
    return _fsdp1(model)


def _wrap_nested(orig_params: bool):
    """``first``, ``up`` and ``up.lin`` FSDP1 units (``up.lin`` inside ``up``) under a root."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(model):
        kw = dict(use_orig_params=orig_params, device_id=torch.device("cpu"))
        model.up.lin = FSDP(model.up.lin, **kw)
        model.up = FSDP(model.up, **kw)
        model.first = FSDP(model.first, **kw)
        return FSDP(model, **kw)
    return wrap


# == the hooked views of an FSDP1 unit's outputs ================================================

class InPlaceAfterUnit(Branchy):
    """The model scales ``up``'s output (an FSDP1 unit below) in place."""

    def forward(self, x):
        h = self.up(self.first(x))
        h.mul_(2.0)
        return self.down(torch.relu(h))


class Plain(Branchy):
    def forward(self, x):
        return self.down(torch.relu(self.up(self.first(x))))


def _in_place_forward(where: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A forward with grad enabled and no backward (an evaluation that forgot no_grad);
    ``root_setitem``: a mask written into the model's output (``logits[..., pad] = -inf``)."""
    out = model(x)
    if where == "root_setitem":
        out[:, :, 0] = 0.0
    return out.detach()


def _in_place_case(where: str):
    return InPlaceAfterUnit if where == "unit" else Plain


def _in_place_one_process(where: str, seeds=(1, 2)) -> list:
    return [_in_place_forward(where, _in_place_case(where)(), _x(seed)) for seed in seeds]


@pytest.mark.parametrize("where", ["unit", "root_setitem"])
@distributed(world_size=2, timeout_s=20)
def test_raw_fsdp1_in_place_on_unit_outputs_forward_only_equals_one_process(where):
    """The baseline: plain FSDP1 (no FlexModel) runs these forwards (``up`` a unit, the
    in-place op on its output or on the root's) and equals one process. (A backward through
    such an in-place op fails in FSDP1 itself: not compared here.)"""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = _in_place_one_process(where)
    model = _wrap_up(_in_place_case(where)())
    for seed, w in zip((1, 2), want):
        torch.testing.assert_close(_in_place_forward(where, model, _half(_x(seed), rank)),
                                   _half(w, rank), **TOL)


@pytest.mark.parametrize("where", ["unit", "root_setitem"])
@distributed(world_size=2, timeout_s=20)
def test_fsdp1_in_place_on_unit_outputs_with_a_forward_hook_equals_one_process(where):
    """The same forwards through a FlexModel with one forward hook (``down``), no backward
    hook: the outputs and the stored value equal one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(_in_place_case(where)(), want, process_group=local_group()) as flex:
        flex.register_forward_hook(HookFunction("down"))
        want_outs = [_in_place_forward(where, flex, _x(seed)) for seed in (1, 2)]
    model = _wrap_up(_in_place_case(where)())
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction(_namer(model)("down")))
        outs = [_in_place_forward(where, flex, _half(_x(seed), rank)) for seed in (1, 2)]
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, _half(b, rank), **TOL)
    if rank == 0:
        _assert_stored({_plain(k): v for k, v in stored.items()}, want)


def _hook_counts(model: nn.Module) -> list:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("how", ["close", "exception"])
@distributed(world_size=2, timeout_s=20)
def test_closed_or_abandoned_flexmodel_leaves_no_hook_on_fsdp1_units(how):
    """A FlexModel with backward hooks (so watch_recomputation's pre-hooks too) on an FSDP1
    model, closed at the end of its block or abandoned on an exception: every module's hook
    dicts are as before, and the raw model's in-place forward (no view of FlexModel's left)
    equals one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = _in_place_one_process("unit")
    model = _wrap_up(InPlaceAfterUnit())
    before = _hook_counts(model)
    name = _namer(model)
    with contextlib.suppress(KeyError):
        with FlexModel(model, {}) as flex:
            _register(flex, lambda: [("full_backward", HookFunction(name("side"))),
                                     ("full_backward_pre", HookFunction(name("up"))),
                                     ("forward", HookFunction(name("down")))])
            with torch.no_grad():
                flex(_half(_x(3), rank))
            if how == "exception":
                raise KeyError("left on an exception")
    assert _hook_counts(model) == before
    for seed, w in zip((1, 2), want):
        torch.testing.assert_close(_in_place_forward("unit", model, _half(_x(seed), rank)),
                                   _half(w, rank), **TOL)


class Structured(nn.Module):
    """Returns ``kind``: a tuple / dict / HF ModelOutput of a tensor needing grad, one that
    does not and an integer count; or the same tensor twice."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = seeded_linear(H, FF, torch.Generator().manual_seed(5))

    def forward(self, x):
        h = self.lin(x)
        frozen = h.detach() * 0 + 1
        count = (x[..., 0] > 0).sum(-1)
        if self.kind == "tuple":
            return h, frozen, count
        if self.kind == "dict":
            return {"h": h, "frozen": frozen, "count": count}
        if self.kind == "same_twice":
            return h, h
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=h, hidden_states=(frozen, h), attentions=None)


class StructuredUnit(Branchy):
    """Branchy whose ``up`` (an FSDP1 unit below) returns a structure (see Structured)."""

    def __init__(self, kind: str):
        super().__init__()
        self.up = Structured(kind)

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        out = self.up(x)
        if isinstance(out, tuple) and len(out) == 2:
            h = out[0] + 2 * out[1]
        elif isinstance(out, tuple):
            h = out[0] * out[1] + out[2][:, None, None]
        elif hasattr(out, "last_hidden_state"):
            h = out.last_hidden_state * out.hidden_states[0] + out.hidden_states[1]
        else:
            h = out["h"] * out["frozen"] + out["count"][:, None, None]
        return self.down(torch.relu(h))


def _structured_hooks(name):
    return [("forward", HookFunction(name("up.lin"))),
            ("full_backward", HookFunction(name("side"))),
            ("full_backward", HookFunction(name("up.lin"))),
            ("full_backward_pre", HookFunction(name("first")))]


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output", "same_twice"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp1_unit_with_structured_outputs_equals_one_process(kind):
    """``up`` an FSDP1 unit returning a tuple / dict / ModelOutput (with a tensor needing no
    grad and an integer one) or the same tensor twice; backward hooks every rank reaches, two
    steps: equal to one process."""
    def wrap(model):
        model.up = _fsdp1(model.up)
        return _fsdp1(model)

    _fsdp1_equal(lambda: StructuredUnit(kind), wrap, _structured_hooks, _steps)


@pytest.mark.parametrize("orig_params", [True, False], ids=["orig_params", "flat_params"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp1_nested_units_equal_one_process(orig_params):
    """``up.lin`` a unit inside the unit ``up``, ``first`` a unit, under a root; with
    ``use_orig_params`` True and False: equal to one process (gradients from the
    FlatParameters where FSDP1 cannot summon them)."""
    _fsdp1_equal(lambda: StructuredUnit("tuple"), _wrap_nested(orig_params),
                 _structured_hooks, _steps, orig_params=orig_params)


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_nested_units_two_forwards_one_backward_equal_one_process():
    """Two forwards, then one backward through both (each unit call hands on its own
    hooked views: announced once per call, the same on every rank): equal to one
    process."""
    _fsdp1_equal(lambda: StructuredUnit("tuple"), _wrap_nested(True), _structured_hooks,
                 _two_forwards_one_backward)


@distributed(world_size=2, timeout_s=10)
def test_fsdp1_nested_units_a_branch_backward_hook_raises():
    """Rank 1 skips side (the only backward hook); the nested units before it are gathered
    again in backward: both raise."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = _wrap_nested(True)(StructuredUnit("tuple"))
    name = _namer(model)
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction(name("side")))])
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex)
    assert outcomes == ["raised"] * 2, outcomes


class UnitInRegion(Branchy):
    """``up`` (an FSDP1 unit below) inside a checkpointed region; the branch ``side`` after
    ``down``, so its backward hook fires before the region's backward."""

    reentrant = True

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        take = x[:, 0, 0] > 0
        h = checkpoint(lambda t: torch.relu(self.up(t)), self.first(x),
                       use_reentrant=self.reentrant)
        y = self.down(h)
        if take.any():
            y = torch.where(take[:, None, None], y + self.side(y), y)
        return y


class UnitInRegionNonReentrant(UnitInRegion):
    reentrant = False


def _unit_in_region(reentrant: bool):
    return UnitInRegion if reentrant else UnitInRegionNonReentrant


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp1_unit_in_a_checkpointed_region_equals_one_process(reentrant):
    """Every rank takes the branch: equal to one process."""
    hooks = lambda name: [("full_backward", HookFunction(name("side"))),  # noqa: E731
                          ("full_backward_pre", HookFunction(name("first")))]
    _fsdp1_equal(_unit_in_region(reentrant), _wrap_up, hooks, _steps)


@pytest.mark.parametrize("reentrant", [
    pytest.param(True, id="reentrant"),
    pytest.param(False, id="non_reentrant")])
@distributed(world_size=2, timeout_s=8)
def test_fsdp1_unit_in_a_checkpointed_region_a_branch_backward_hook_raises(reentrant):
    """Rank 1 skips side (the only backward hook, after the region): both raise."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = _wrap_up(_unit_in_region(reentrant)())
    name = _namer(model)
    with FlexModel(model, {}) as flex:
        _register(flex, lambda: [("full_backward", HookFunction(name("side")))])
        outcomes = _outcome_everywhere(
            lambda: flex(_half(_x(1, skipper=1), rank)).pow(2).sum().backward(), flex)
    assert outcomes == ["raised"] * 2, outcomes


# == 0e0fc0a: the pass of a forward recomputed in the backward =================================

class BranchInRegion(AroundTheBranch):
    """side on a branch inside a checkpointed region (up too); first before it."""

    def __init__(self):
        super().__init__(True)


class BranchInRegionNonReentrant(BranchInRegion):
    def __init__(self):
        AroundTheBranch.__init__(self, False)


def _branch_in_region(reentrant: bool):
    return BranchInRegion if reentrant else BranchInRegionNonReentrant


def _skipped_side(how: str, flex: FlexModel, side: str) -> None:
    """``side`` has a full-backward hook that does not fire: ``removed`` (registered, then
    removed) or ``unselected_group`` (in a group this step does not select); ``none``: never
    had one."""
    if how == "removed":
        hf = HookFunction(side)
        flex.register_full_backward_hook(hf)
        flex.remove_hook_function(hf)
    elif how == "unselected_group":
        flex.create_hook_group("diagnostics", side, hook_type="full_backward")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("how", [
    "none", "removed", "unselected_group"])
@distributed(world_size=2, timeout_s=20)
def test_parameter_hook_after_a_recomputed_branch_no_hook_fires_on_equals_one_process(
        how, reentrant):
    """Rank 1's rows never take the branch (side, in the checkpointed region, runs on rank 0
    only), and no hook fires on side; two forwards, one backward; a gradient hook on
    ``first.weight`` (selected by group ``grads``): equal to one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    cls = _branch_in_region(reentrant)

    def body(flex, model, part, scale):
        outs = [flex(part(_x(seed, skipper=1)), groups="grads") for seed in (1, 2)]
        (sum(o.pow(2).sum() for o in outs) * scale).backward()
        return outs

    def run(model, stored, part, scale, process_group=None, skipped="none"):
        with FlexModel(model, stored, process_group=process_group) as flex:
            _skipped_side(skipped, flex, "side")
            flex.create_hook_group("grads", "first.weight", hook_type="tensor")
            return body(flex, model, part, scale)

    want, ref = {}, cls()
    want_outs = run(ref, want, lambda x: x, 0.5, local_group())
    mine = cls()  # this rank's rows in one process: the gradients (no DDP: each keeps its own)
    run(mine, {}, lambda x: _half(x, rank), 1.0, local_group())
    stored, model = {}, cls()
    outs = run(model, stored, lambda x: _half(x, rank), 1.0, skipped=how)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    _assert_grads(model, _grads(mine))
    if rank == 0:
        _assert_stored(stored, want)


@pytest.mark.parametrize("how", [
    "none", "removed"])
@distributed(world_size=2, timeout_s=20)
def test_fsdp1_reduction_after_a_recomputed_branch_no_hook_fires_on_equals_one_process(how):
    """FSDP1 (one root unit), non-reentrant checkpoint, side on rank 0's rows only with no
    hook firing on it, a backward hook on ``down`` (outside the region), two forwards and one
    backward: the root's gradient reduction is announced after the recomputation: equal to
    one process."""
    def body(flex, model, part, scale):
        if how == "removed" and not isinstance(model, BranchInRegion):  # the FSDP1 run
            _skipped_side(how, flex, _namer(model)("side"))
        outs = [flex(part(_x(seed, skipper=1))) for seed in (1, 2)]
        (sum(o.pow(2).sum() for o in outs) * scale).backward()
        return outs

    _fsdp1_equal(BranchInRegionNonReentrant, _fsdp1,
                 lambda name: [("full_backward", HookFunction(name("down")))], body)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_ddp_checkpoint_accumulated_forwards_every_rank_takes_the_branch_equals_one_process(
        reentrant):
    """DDP (static_graph for the reentrant checkpoint), forward 1 under no_sync, forward 2
    synced, one backward; hooks inside the region (side's backward and forward, up's
    backward) and a parameter gradient hook: equal to one process, no false mismatch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    cls = _branch_in_region(reentrant)

    def hooks(p=""):
        return lambda: [("full_backward", HookFunction(p + "side")),
                        ("full_backward", HookFunction(p + "up")),
                        ("forward", HookFunction(p + "side")),
                        ("hook", HookFunction(p + "first.weight"))]

    def body(flex, part, scale, no_sync):
        outs = []
        for seed, ctx in ((1, no_sync), (2, contextlib.nullcontext)):
            with ctx():
                outs.append(flex(part(_x(seed))))
        (sum(o.pow(2).sum() for o in outs) * scale).backward()
        return outs

    want, ref = {}, cls()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _register(flex, hooks())
        want_outs = body(flex, lambda x: x, 0.5, contextlib.nullcontext)
    stored = {}
    model = DDP(cls(), static_graph=reentrant)
    with FlexModel(model, stored) as flex:
        _register(flex, hooks("module."))
        outs = body(flex, lambda x: _half(x, rank), 1.0, model.no_sync)
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(_detached(a), _halves(_detached(b), rank), **TOL)
    _assert_grads(model.module, _grads(ref))
    if rank == 0:
        assert stored, "nothing stored"
        _assert_stored({k.removeprefix("module."): v for k, v in stored.items()}, want)


class NestedCheckpoints(Branchy):
    """A checkpoint inside a checkpoint: side (the branch) and up in the inner region."""

    reentrant = True

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        take = x[:, 0, 0] > 0

        def inner(t):
            if take.any():
                t = torch.where(take[:, None, None], t + self.side(t), t)
            return torch.relu(self.up(t))

        def outer(t):
            return checkpoint(inner, torch.tanh(t), use_reentrant=self.reentrant)

        return self.down(checkpoint(outer, self.first(x), use_reentrant=self.reentrant))


class NestedNonReentrant(NestedCheckpoints):
    reentrant = False


def _nested(reentrant: bool):
    return NestedCheckpoints if reentrant else NestedNonReentrant


def _three_forwards_one_backward(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2, 3)]
    (sum(o.pow(2).sum() for o in outs) * scale).backward()
    return outs


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@distributed(world_size=2, timeout_s=30)
def test_nested_checkpoints_accumulated_forwards_equal_one_process(reentrant):
    """Every rank takes the branch; three forwards, one backward; hooks in the inner region,
    before it and on a parameter: equal to one process."""
    hooks = lambda: [("full_backward", HookFunction("side")),  # noqa: E731
                     ("full_backward", HookFunction("up")),
                     ("full_backward_pre", HookFunction("first")),
                     ("forward", HookFunction("side")),
                     ("hook", HookFunction("first.weight"))]
    _equal_run(_nested(reentrant), hooks, _three_forwards_one_backward)


def _across_the_branch(flex, model, rank):
    """Forward 1: rank 1 skips side; forward 2: rank 0 skips it; one backward."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2, skipper=0), rank))]
    sum(o.pow(2).sum() for o in outs).backward()


@pytest.mark.parametrize("reentrant", [
    pytest.param(True, id="reentrant"),
    pytest.param(False, id="non_reentrant")])
@distributed(world_size=2, timeout_s=15)
def test_nested_checkpoints_branch_hook_of_different_forwards_on_different_ranks_raise(
        reentrant):
    """side's backward hook fires for forward 1 on rank 0 and for forward 2 on rank 1 (one
    backward): both raise, then a step equals one process."""
    _refused_then_equal(_nested(reentrant), lambda: [("full_backward", HookFunction("side"))],
                        _across_the_branch)


def _on_a_thread(run):
    """``run()`` on another thread (as the autograd engine runs a CUDA backward); its
    exception re-raised here."""
    errors, result = [], []

    def body():
        try:
            result.append(run())
        except BaseException as exc:  # noqa: BLE001 (re-raised on the calling thread)
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]


def _across_the_branch_on_a_thread(flex, model, rank):
    """As _across_the_branch, the backward run on another thread than the forwards."""
    outs = [flex(_half(_x(1, skipper=1), rank)), flex(_half(_x(2, skipper=0), rank))]
    _on_a_thread(lambda: sum(o.pow(2).sum() for o in outs).backward())


@distributed(world_size=2, timeout_s=15)
def test_reentrant_checkpoint_backward_on_another_thread_branch_on_different_ranks_raise():
    _refused_then_equal(BranchInRegion, lambda: [("full_backward", HookFunction("side"))],
                        _across_the_branch_on_a_thread)



def _three_forwards_backward_on_a_thread(flex, model, part, scale):
    outs = [flex(part(_x(seed))) for seed in (1, 2, 3)]
    _on_a_thread(lambda: (sum(o.pow(2).sum() for o in outs) * scale).backward())
    return outs


@pytest.mark.parametrize("model_fn", [BranchInRegion, NestedCheckpoints],
                         ids=["region", "nested"])
@distributed(world_size=2, timeout_s=30)
def test_reentrant_backward_on_another_thread_accumulated_forwards_equal_one_process(
        model_fn):
    """Every rank takes the branch; three forwards, one backward on another thread: the
    recomputed regions' hooks (numbered on that thread) equal one process."""
    hooks = lambda: [("full_backward", HookFunction("side")),  # noqa: E731
                     ("full_backward", HookFunction("up")),
                     ("full_backward_pre", HookFunction("first")),
                     ("forward", HookFunction("side")),
                     ("hook", HookFunction("first.weight"))]
    _equal_run(model_fn, hooks, _three_forwards_backward_on_a_thread)


@distributed(world_size=2, timeout_s=15)
def test_nested_checkpoints_backward_on_another_thread_branch_on_different_ranks_raise():
    _refused_then_equal(NestedCheckpoints, lambda: [("full_backward", HookFunction("side"))],
                        _across_the_branch_on_a_thread)

# == 1a02744: a doubted sequence split met over dp before its agreement =======================

class BranchSeq(nn.Module):
    """``inp`` (row-parallel below, its output split over the sequence) and, when some row
    takes the branch, ``point`` on a tensor computed from the piece (a Doubt to settle)."""

    def __init__(self):
        super().__init__()
        self.inp = _lin(H, H, torch.Generator().manual_seed(0))
        self.point = DummyModule()

    def forward(self, x):
        y = self.inp(x)
        if (x[:, 0, 0] > 0).any():
            y = y + self.point(torch.tanh(y) * 1.5)
        return y


def _seq_x(seed: int, take: bool) -> torch.Tensor:
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0] = 5.0 if take else -5.0
    return x


@pytest.mark.parametrize("kind", ["forward", "full_backward"])
@distributed(world_size=4, timeout_s=20)
def test_fsdp2_x_tp_doubted_hook_one_replica_skips_raises_then_equal_one_process(kind):
    """FSDP2 x TP (2 x 2), a 3-token sequence (2 + 1 tokens: a Doubt); replica 1 skips
    ``point``: every rank of both replicas raises (the dp meeting in layout_of comes before
    agree_on_doubt's all-gather); then a step where both take it equals one process."""
    from test_sequence_doubt_second_reader import seq_plan
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    group = _side_group()
    mesh = _mesh_2d()
    dp = mesh.get_local_rank("dp")
    register = {"forward": "register_forward_hook",
                "full_backward": "register_full_backward_hook"}[kind]
    xs = [_seq_x(1, True), _seq_x(2, True)]
    want = {}
    with FlexModel(BranchSeq(), want, process_group=local_group()) as flex:
        getattr(flex, register)(HookFunction("point"))
        (flex(torch.cat(xs)).pow(2).sum() / 2).backward()
    model = parallelize_module(BranchSeq(), mesh["tp"], seq_plan())
    fully_shard(model, mesh=mesh["dp"])
    stored = {}
    with FlexModel(model, stored) as flex:
        getattr(flex, register)(HookFunction("point"))
        try:
            flex(_seq_x(3, dp == 0)).pow(2).sum().backward()
            mine = "returned"
        except HookSiteMismatchError:
            mine = "raised"
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, mine, group=group)
        assert outcomes == ["raised"] * 4, outcomes
        model.reset_iter_state()  # FSDP2 after an exception in its backward
        stored.clear()
        flex(xs[dp]).pow(2).sum().backward()
    if dist.get_rank() == 0:
        _assert_stored(stored, want)
