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
