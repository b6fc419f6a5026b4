"""Under data parallelism on the CPU every hook call's first message is a header to the stage
leader, whatever path the hook's tensor then takes: a retrieval with known sizes
(``expected_shape``), the shape agreement of ``expected_shape``, ``store_on="all"`` /
``"replica_leaders"``, ``overlap_retrieval``, layouts that are walked axis by axis. So a
data-parallel rank at a hook on a branch the others skip meets theirs at another hook in the
same exchange, and every rank raises ``HookSiteMismatchError`` -- before, two such hooks
waited in different collectives until the process group's timeout. After the refusal the same
FlexModel goes on, equal to one process (float64).
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group
from rank_pool import distributed
from test_branch_hooks_edge_cases import (
    FF,
    Branchy,
    _batch,
    _fairscale_branchy,
    _one_process,
    _rows,
)

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.site_tags import HookSiteMismatchError

TOL = dict(rtol=1e-9, atol=1e-12)

_SHAPES = {"side": (None, 3, H), "up": (None, 3, FF)}


def _double(module, tensor, ctx, modules):
    return tensor * 2


def _options(kind: str, name: str) -> dict:
    """A hook of ``kind`` at ``name``: a retrieval, an edit on the leader, a replicated edit,
    each with or without ``expected_shape`` (``_shaped`` suffix)."""
    base, shaped = kind.removesuffix("_shaped"), kind.endswith("_shaped")
    options = {"plain": {}, "edit": dict(editing_function=_double),
               "replicate": dict(editing_function=_double, replicate_edit=True)}[base]
    return dict(options, expected_shape=_SHAPES[name]) if shaped else dict(options)


def _hooks(side: str, up: str):
    return lambda: [("forward", HookFunction("side", **_options(side, "side"))),
                    ("forward", HookFunction("up", **_options(up, "up")))]


def _raise_then_equal(hooks, options: dict | None = None) -> None:
    """Rank 1 skips ``side`` (both ranks raise), then both take it (equal to one process)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    options = options or {}
    with torch.no_grad():
        want = _one_process(_batch(2, True), hooks)
        want_out = Branchy()(_batch(2, True))
    stored = {}
    with FlexModel(Branchy(), stored, **options) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.no_grad():
            with pytest.raises(HookSiteMismatchError) as refused:
                flex(_rows(_batch(1, False), rank))
            stored.clear()
            out = flex(_rows(_batch(2, True), rank))
    if rank == 0:
        assert "'side'" in str(refused.value), str(refused.value)
    edited = [hf for _, hf in hooks() if hf.editing_function is not None]
    if not edited:
        torch.testing.assert_close(out, _rows(want_out, rank), **TOL)
    keeps = options.get("store_on") in ("all", "replica_leaders") or rank == 0
    if keeps and options.get("store_on") != "replica_leaders":
        assert stored.keys() == want.keys(), sorted(stored)
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


# -- expected_shape on one side only: its agreement was an all-gather over the stage ---------

@pytest.mark.parametrize("side,up", [("plain_shaped", "plain"), ("plain", "plain_shaped"),
                                     ("edit_shaped", "plain"), ("plain", "edit_shaped"),
                                     ("replicate_shaped", "edit"),
                                     ("plain_shaped", "edit_shaped")])
@distributed(world_size=2, timeout_s=30)
def test_expected_shape_on_one_site_meets_the_other_site(side, up):
    """A hook with ``expected_shape`` (shape agreement, then a gather of known sizes) at one
    site, one without (a header with its shape to the leader) at the other: both raise."""
    _raise_then_equal(_hooks(side, up))


# -- FlexModel options whose retrieval was a collective over dp ------------------------------

@pytest.mark.parametrize("options", [dict(store_on="all"), dict(store_on="replica_leaders"),
                                     dict(overlap_retrieval=True)],
                         ids=["store_on_all", "replica_leaders", "overlap_retrieval"])
@pytest.mark.parametrize("side,up", [("plain", "edit"), ("edit", "plain"),
                                     ("replicate", "plain")])
@distributed(world_size=2, timeout_s=30)
def test_retrieval_options_meet_an_edit_at_the_other_site(options, side, up):
    """A retrieval under ``store_on="all"`` (an all-gather of sizes, then of the pieces),
    ``"replica_leaders"`` (an all-gather of sizes over dp) or ``overlap_retrieval`` (an
    all-gather of sizes, then an asynchronous gather) at one site, an edit (a header to the
    leader) at the other: both raise."""
    _raise_then_equal(_hooks(side, up), options)


# -- DP x TP: the same, over the stage of 4 ranks ---------------------------------------------

@pytest.mark.parametrize("side,up", [("plain", "plain_shaped"), ("edit_shaped", "plain"),
                                     ("plain", "replicate_shaped")])
@distributed(world_size=4, timeout_s=40)
def test_dp_x_tp_expected_shape_on_one_site_meets_the_other_site(side, up):
    """fairscale TP=2 x DP=2 (``up`` column-parallel): replica 1 skips ``side``; every rank
    raises, then the next forward equals one process."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()
    hooks = _hooks(side, up)
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.no_grad():
            want_out = flex(_batch(2, True))
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.no_grad():
            with pytest.raises(HookSiteMismatchError):
                flex(_rows(_batch(1, False), replica))
            stored.clear()
            out = flex(_rows(_batch(2, True), replica))
    torch.testing.assert_close(out, _rows(want_out, replica), **TOL)
    if dist.get_rank() == 0:
        assert stored.keys() == want.keys(), sorted(stored)
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


# -- the last backward hook on a branch: the others announce the end of their backward -------

_BACKWARD_ONLY = {
    "full_backward_pre": lambda: [("full_backward_pre", HookFunction("side"))],
    "full_backward": lambda: [("full_backward", HookFunction("side"))],
    "parameter": lambda: [("hook", HookFunction("side.weight"))],
    "edit": lambda: [("full_backward_pre", HookFunction("side", editing_function=_double))],
    "with_forward_hooks": lambda: [("forward", HookFunction("up")),
                                   ("full_backward", HookFunction("side"))],
}


@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_skips", "other_skips"])
@pytest.mark.parametrize("kind", sorted(_BACKWARD_ONLY))
@distributed(world_size=2, timeout_s=30)
def test_the_last_backward_hook_on_a_branch_meets_the_end_of_the_others_backward(kind, skipper):
    """A backward hook at ``side`` only, which ``skipper`` skips: no later backward hook fires
    on it, so before it went on (into the next step, or DDP's all-reduce) while the other
    waited in the hook's gather. Every rank announces the end of its backward (an autograd
    callback queued when the wrapped module's output gets its gradient), so both raise. Then
    a step where both take the branch equals one process: values and gradients."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    hooks = _BACKWARD_ONLY[kind]
    want, _ = _one_process_backward(hooks, _batch(2, True), 2)  # DDP's mean of the losses
    _, want_grads = _one_process_backward(hooks, _rows(_batch(2, True), rank), 1)
    model = Branchy()
    stored = {}
    with FlexModel(model, stored) as flex:
        _register_all(flex, hooks)
        x = _batch(1, True)
        x[2 * skipper:2 * skipper + 2, 0, 0] = -5.0
        with pytest.raises(HookSiteMismatchError) as refused:
            flex(_rows(x, rank)).pow(2).sum().backward()
        model.zero_grad()
        stored.clear()
        flex(_rows(_batch(2, True), rank)).pow(2).sum().backward()
    assert "end of the backward" in str(refused.value), str(refused.value)
    for n, p in model.named_parameters():  # no DDP: the gradient of this rank's rows
        torch.testing.assert_close(p.grad, want_grads[n], **TOL)
    if rank == 0:
        assert stored.keys() == want.keys(), sorted(stored)
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


def _register_all(flex: FlexModel, hooks) -> None:
    for kind, hf in hooks():
        register = flex.register_hook if kind == "hook" else \
            getattr(flex, f"register_{kind}_hook")
        register(hf)


def _one_process_backward(hooks, x: torch.Tensor, replicas: int):
    """What one process stores and its gradients, for the loss over ``replicas``."""
    stored = {}
    model = Branchy()
    with FlexModel(model, stored, process_group=local_group()) as flex:
        _register_all(flex, hooks)
        (flex(x).pow(2).sum() / replicas).backward()
    return stored, {n: p.grad for n, p in model.named_parameters()}
