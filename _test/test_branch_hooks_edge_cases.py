"""Hooks on a branch some data-parallel ranks skip, beyond test_branch_hooks.py: the last hooked
module (its gather met by its own in the next forward), forward-pre and backward hooks, sites
of different dtypes, modules assigned after the FlexModel was built, FSDP1's names,
``store_on`` / ``overlap_retrieval`` / replica leaders, a module called a different number of
times, DP x TP; and, pinned, the pairs of gathers that are different collectives (hangs).
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, column_like, local_group, row_like, seeded_linear
from rank_pool import distributed
from test_branch_hooks import BranchyNet
from torch import nn

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.site_tags import HookSiteMismatchError

TOL = dict(rtol=1e-9, atol=1e-12)
FF = 8


Branchy = BranchyNet  # ``side`` runs only when some row's first feature is positive


def _batch(seed: int, rank1_takes: bool) -> torch.Tensor:
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0] = 5.0
    if not rank1_takes:
        x[2:, 0, 0] = -5.0
    return x


def _rows(x, r):
    return x[2 * r:2 * r + 2]


def _one_process(x, hooks):
    stored = {}
    with FlexModel(Branchy(), stored, process_group=local_group()) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        out = flex(x)
        if torch.is_grad_enabled():  # the mean of the two replicas' losses (DDP's convention)
            (out.pow(2).sum() / 2).backward()
    return stored


# -- the last hooked module on a branch: the next forward's gather meets it -----------------

@distributed(world_size=2, timeout_s=30)
def test_the_last_hooked_module_on_a_branch_meets_its_own_next_forward():
    """Only ``side`` is hooked. Pass 1: rank 1 skips it, so rank 1's forward returns with no
    collective while rank 0 waits in side's gather. Pass 2 (both take it): rank 1's side gather
    is the same site in the next hooked forward; without the forward in the stamp it completed
    rank 0's pass-1 gather, and rank 0 stored its pass-1 rows joined with rank 1's pass-2 rows.
    Now an error (or, never, the one-process value of pass 1)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    x1, x2 = _batch(1, rank1_takes=False), _batch(2, rank1_takes=True)
    want = _one_process(x1, lambda: [("forward", HookFunction("side"))])
    stored = {}
    with torch.no_grad():
        flex = FlexModel(Branchy(), stored)
        flex.register_forward_hook(HookFunction("side"))
        try:
            flex(_rows(x1, rank))        # rank 0 waits in side's gather; rank 1 returns
            if rank == 1:
                flex(_rows(x2, 1))       # rank 1's next side gather answers rank 0's
            got = stored.get("side")
        except HookSiteMismatchError:
            got = "raised"
    if rank == 0 and got != "raised":
        with torch.no_grad():
            mixed = torch.cat([Branchy().side(Branchy().first(_rows(x1, 0))),
                               Branchy().side(Branchy().first(_rows(x2, 1)))])
        assert len(got) == 1 and not torch.allclose(got[0], mixed), \
            "rank 0 stored its pass-1 rows joined with rank 1's pass-2 rows, silently"
        torch.testing.assert_close(got, want["side"], **TOL)


def _batch_skipped_by(seed: int, skipper: int) -> torch.Tensor:
    x = _batch(seed, rank1_takes=True)
    x[2 * skipper:2 * skipper + 2, 0, 0] = -5.0
    return x


@distributed(world_size=4, timeout_s=30)
def test_dp_x_tp_the_last_hook_on_a_branch_meets_the_end_of_the_others_forward():
    """fairscale TP=2 x DP=2, replica 1 skips ``side``, the last hook: the end of the forward
    is announced over the whole stage, so every rank raises (DDP alone, with every hook kind:
    test_dp_announce_edge_cases)."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()
    want = _one_process(_batch(2, True), lambda: [("forward", HookFunction("side"))])
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2) as flex:
        flex.register_forward_hook(HookFunction("side"))
        with torch.no_grad():
            with pytest.raises(HookSiteMismatchError):
                flex(_rows(_batch(1, False), replica))
            stored.clear()
            flex(_rows(_batch(2, True), replica))
    if dist.get_rank() == 0:
        torch.testing.assert_close(stored["side"], want["side"], **TOL)


# -- probes of the claimed coverage --------------------------------------------------------

def _pre_hooks():
    return [("forward_pre", HookFunction("side")), ("forward_pre", HookFunction("up"))]


def _backward_hooks():
    return [("full_backward_pre", HookFunction("first")),
            ("full_backward_pre", HookFunction("side")),
            ("full_backward_pre", HookFunction("up"))]


def _reduce_side_hooks():
    return [("forward", HookFunction("side", reduce="mean_over_batch")),
            ("forward", HookFunction("up"))]


def _reduce_up_hooks():
    return [("forward", HookFunction("side")),
            ("forward", HookFunction("up", reduce="mean_over_batch"))]


HOOKS = {"pre": _pre_hooks, "backward": _backward_hooks, "reduce_side": _reduce_side_hooks,
         "reduce_up": _reduce_up_hooks}


def _raise_then_equal(which: str) -> None:
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    hooks = HOOKS[which]
    backward = which == "backward"
    want = _one_process(_batch(2, True), hooks)
    stored = {}
    with FlexModel(Branchy(), stored) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.set_grad_enabled(backward), pytest.raises(HookSiteMismatchError) as refused:
            out = flex(_rows(_batch(1, False), rank))
            if backward:
                out.pow(2).sum().backward()
        if rank == 0:
            assert "side'" in str(refused.value), str(refused.value)
        stored.clear()
        with torch.set_grad_enabled(backward):
            out = flex(_rows(_batch(2, True), rank))
            if backward:
                out.pow(2).sum().backward()
    if rank == 0:
        assert stored.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


@distributed(world_size=2, timeout_s=30)
def test_forward_pre_hook_on_skipped_branch_raises():
    """forward-pre hooks (role input)."""
    _raise_then_equal("pre")


@distributed(world_size=2, timeout_s=30)
def test_backward_hook_on_skipped_branch_raises():
    """full_backward hooks (role grad_input, rows=None)."""
    _raise_then_equal("backward")


class _Half(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).float()


class BranchyMixed(Branchy):
    """``up``'s output is float32 (its shape is side's: [rows, 3, 8]); side's is float64."""

    def __init__(self):
        super().__init__()
        self.up = _Half(self.up)

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        return self.down(torch.relu(self.up(x)).double())


@pytest.mark.parametrize("taker", [0, 1], ids=["leader_at_float64_side",
                                                "leader_at_float32_up"])
@distributed(world_size=2, timeout_s=15)
def test_sites_with_different_dtypes(taker):
    """The two sites' tensors have one shape but different dtypes (side float64, up float32).
    Expected: HookSiteMismatchError on both ranks, then the model goes on.
    taker=0: the leader (rank 0) is at side; rank 1's float32 piece (192 bytes) is announced.
    taker=1: the leader is at up and rank 1 sends a float64 piece (384 bytes); received into a
    float32 buffer sized from the announced shape (192 bytes), gloo's 'op.preamble.length <=
    op.nbytes' check aborted rank 0's process. The header carries the element size, and a
    leader that raises receives what was announced as bytes."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    x = _batch(1, True)
    x[2 * (1 - taker):2 * (1 - taker) + 2, 0, 0] = -5.0  # the other rank skips side
    stored = {}
    with FlexModel(BranchyMixed(), stored) as flex:
        flex.register_forward_hook(HookFunction("side"))
        flex.register_forward_hook(HookFunction("up"))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError):
            flex(_rows(x, rank))
        with torch.no_grad():
            flex(_rows(_batch(2, True), rank))


def test_layout_of_a_site_without_module_under_dp():
    """LayoutInference.layout takes ``module: nn.Module | None`` (HookSite.module defaults to
    None): a dp-split activation of a site without module is ShardSpec('dp', 0)."""
    from flex_surgery.parallel.layout import LayoutInference, ShardSpec

    mesh = ParallelMesh({"dp": None, "tp": None, "pp": None}, {"dp": 2, "tp": 1, "pp": 1},
                        {"dp": 0, "tp": 0, "pp": 0})
    layouts = LayoutInference(mesh, batch_dim=0)
    got = layouts.layout(torch.zeros(4, 3), None, "output")
    assert got.spec_for("dp") == ShardSpec("dp", 0)


@distributed(world_size=2, timeout_s=20)
def test_modules_assigned_after_flexmodel_have_their_own_tags():
    """Hooks may name modules assigned after FlexModel was built (ModelNames rebuilds its
    table). Tags made from names the layout tracker recorded at watch() were '' for every
    module it never saw, so rank 0's side gather met rank 1's up gather with no error. Tags
    are the hook's own name: the error comes at side's call, naming 'side' and 'up', and
    nothing is stored for it."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = Branchy()
    stored = {}
    with FlexModel(model, stored) as flex:
        g = torch.Generator().manual_seed(0)
        seeded_linear(H, H, g)  # first
        model.side, model.up = seeded_linear(H, H, g), seeded_linear(H, FF, g)  # same weights
        for name in ("side", "up", "down"):
            flex.register_forward_hook(HookFunction(name))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError) as refused:
            flex(_rows(_batch(1, False), rank))
        message = str(refused.value)
    if rank == 0:
        assert "side" not in stored, (
            f"rank 0 kept side's rows joined with rank 1's up rows: {stored['side'][0].shape}; "
            f"error: {message}")
        assert "'side'" in message and "'up'" in message, message


class Renamed(nn.Module):
    """Branchy with module names used by no other test (the rank pool's processes keep every
    tag they made, so a name another test made would be named from memory)."""

    def __init__(self, side: str, up: str):
        super().__init__()
        b = Branchy()
        self.first, self.down = b.first, b.down
        self._side, self._up = side, up
        setattr(self, side, b.side)
        setattr(self, up, b.up)

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + getattr(self, self._side)(x), x)
        return self.down(torch.relu(getattr(self, self._up)(x)))


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_expected_shape_error_names_the_other_hook():
    """FSDP1 (root-wrapped), both hooks with expected_shape (the agreement path). Rank 1 never
    reached side's hook, and names it all the same: every rank made every registered site's
    tag at registration."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    model = FSDP(Renamed("fsdpprobe_side", "fsdpprobe_up"), use_orig_params=True,
                 device_id=torch.device("cpu"))
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction("fsdpprobe_side", expected_shape=(None, 3, H)))
        flex.register_forward_hook(HookFunction("fsdpprobe_up", expected_shape=(None, 3, FF)))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError) as refused:
            flex(_rows(_batch(1, False), rank))
        with torch.no_grad():  # the model goes on
            flex(_rows(_batch(2, True), rank))
    message = str(refused.value)
    assert "tag" not in message.replace("tag of", ""), f"rank {rank}: {message}"
    assert "fsdpprobe_side" in message and "fsdpprobe_up" in message, f"rank {rank}: {message}"


@distributed(world_size=2, timeout_s=30)
def test_fsdp1_retrieval_names_both_hooks_and_goes_on():
    """FSDP1 retrieval (collect_pieces' headers): every rank
    raises, the leader's error names both hooks; then all ranks taking the branch equal one
    process."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(Renamed("fsdpret_side", "fsdpret_up"), want,
                   process_group=local_group()) as flex:
        flex.register_forward_hook(HookFunction("fsdpret_side"))
        flex.register_forward_hook(HookFunction("fsdpret_up"))
        with torch.no_grad():
            flex(_batch(2, True))
    model = FSDP(Renamed("fsdpret_side", "fsdpret_up"), use_orig_params=True,
                 device_id=torch.device("cpu"))
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction("fsdpret_side"))
        flex.register_forward_hook(HookFunction("fsdpret_up"))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError) as refused:
            flex(_rows(_batch(1, False), rank))
        stored.clear()
        with torch.no_grad():
            flex(_rows(_batch(2, True), rank))
    if rank == 0:
        message = str(refused.value)
        assert "fsdpret_side" in message and "fsdpret_up" in message, message
        assert stored.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


def _options_run(options: dict) -> None:
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    hooks = lambda: [("forward", HookFunction("side")), ("forward", HookFunction("up"))]  # noqa
    want = _one_process_nograd(_batch(2, True), hooks)
    stored = {}
    with FlexModel(Branchy(), stored, **options) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.no_grad(), pytest.raises(HookSiteMismatchError):
            flex(_rows(_batch(1, False), rank))
        stored.clear()
        with torch.no_grad():
            flex(_rows(_batch(2, True), rank))
    if options.get("store_on") == "all" or rank == 0:
        assert stored.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


def _one_process_nograd(x, hooks):
    stored = {}
    with FlexModel(Branchy(), stored, process_group=local_group()) as flex:
        for kind, hf in hooks():
            getattr(flex, f"register_{kind}_hook")(hf)
        with torch.no_grad():
            flex(x)
    return stored


@pytest.mark.parametrize("options", [dict(store_on="all"), dict(overlap_retrieval=True)],
                         ids=["store_on_all", "overlap_retrieval"])
@distributed(world_size=2, timeout_s=30)
def test_dp_options_raise_then_equal(options):
    """store_on='all' (AxisWalk.to_all) and overlap_retrieval
    (exchange_sizes before start_gather) raise on both ranks, then equal one process."""
    _options_run(options)


@distributed(world_size=2, timeout_s=30)
def test_replica_leaders_raises():
    """store_on='replica_leaders' (exchange over dp, gather over
    tp only)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    stored = {}
    with FlexModel(Branchy(), stored, store_on="replica_leaders") as flex:
        flex.register_forward_hook(HookFunction("side"))
        flex.register_forward_hook(HookFunction("up"))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError):
            flex(_rows(_batch(1, False), rank))


class Twice(Branchy):
    """``side`` runs once on every rank, and a second time where some row takes the branch."""

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.side(self.first(x))
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        return self.down(torch.relu(self.up(x)))


@distributed(world_size=2, timeout_s=30)
def test_module_called_a_different_number_of_times():
    """side called twice on rank 0, once on rank 1: the second
    call meets up's gather and raises on both ranks; then (both twice) equal to one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    with FlexModel(Twice(), want, process_group=local_group()) as flex:
        flex.register_forward_hook(HookFunction("side"))
        flex.register_forward_hook(HookFunction("up"))
        with torch.no_grad():
            flex(_batch(2, True))
    stored = {}
    with FlexModel(Twice(), stored) as flex:
        flex.register_forward_hook(HookFunction("side"))
        flex.register_forward_hook(HookFunction("up"))
        with torch.no_grad(), pytest.raises(HookSiteMismatchError):
            flex(_rows(_batch(1, False), rank))
        stored.clear()
        with torch.no_grad():
            flex(_rows(_batch(2, True), rank))
    if rank == 0:
        assert stored.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


def _fairscale_branchy():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    plain = Branchy()
    plain.up, plain.down = column_like(plain.up), row_like(plain.down)
    return plain, fs.get_data_parallel_rank()


@pytest.mark.parametrize("mode", ["backward", "store_on_all", "edit_backward"])
@distributed(world_size=4, timeout_s=40)
def test_dp_x_tp_backward_and_store_on_all(mode):
    """fairscale TP=2 x DP=2; replica 1 skips side. Backward-pre
    hooks (grad_output, tp-sharded up and replicated side/first), store_on='all', and leader
    edits with a backward through them: every rank raises; then equal to one process."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()
    edit = dict(editing_function=lambda m, t, c, ms: t * 2) if mode == "edit_backward" else {}
    kind = "full_backward_pre" if mode == "backward" else "forward"

    def hooks():
        return [(kind, HookFunction(n, **edit)) for n in ("first", "side", "up")]

    backward = mode != "store_on_all"
    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex:
        for k, hf in hooks():
            getattr(flex, f"register_{k}_hook")(hf)
        with torch.set_grad_enabled(backward):
            out = flex(_batch(2, True))
            want_out = out.detach()
            if backward:
                (out.pow(2).sum() / 2).backward()
    options = dict(store_on="all") if mode == "store_on_all" else {}
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2,
                   **options) as flex:
        for k, hf in hooks():
            getattr(flex, f"register_{k}_hook")(hf)
        with torch.set_grad_enabled(backward), pytest.raises(HookSiteMismatchError):
            out = flex(_rows(_batch(1, False), replica))
            if backward:
                out.pow(2).sum().backward()
        stored.clear()
        with torch.set_grad_enabled(backward):
            out = flex(_rows(_batch(2, True), replica))
            if backward:
                out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), _rows(want_out, replica), **TOL)
    if mode == "store_on_all" or dist.get_rank() == 0:
        assert stored.keys() == want.keys(), sorted(stored)
        for k in want:
            torch.testing.assert_close(stored[k], want[k], **TOL)


# -- hooks of different kinds at the two sites: every first message is the same kind ----------

_KINDS = {
    "plain": {},
    "reduce": dict(reduce="mean_over_batch"),
    "edit": dict(editing_function=lambda m, t, c, ms: t * 2),
    "replicate": dict(editing_function=lambda m, t, c, ms: t * 2, replicate_edit=True),
}


@pytest.mark.parametrize("side,up", [("reduce", "plain"), ("plain", "reduce"),
                                     ("edit", "plain"), ("plain", "edit"),
                                     ("edit", "reduce"), ("replicate", "plain"),
                                     ("plain", "replicate")])
@distributed(world_size=2, timeout_s=20)
def test_hooks_of_different_kinds_on_branch_and_trunk_raise(side, up):
    """``side`` (skipped by rank 1) and ``up`` (run by both) with hooks of different kinds: a
    retrieval sends its piece to the leader point to point, an edit or a ``reduce=`` gathers
    its own way; each first announces its shape to the leader the same way
    (``AxisWalk.announced_sizes`` / ``collect_pieces``), so rank 0 at ``side`` and rank 1 at
    ``up`` raise together instead of waiting in different collectives (they hung)."""
    HOOKS[(side, up)] = lambda: [("forward", HookFunction("side", **_KINDS[side])),
                                 ("forward", HookFunction("up", **_KINDS[up]))]
    _raise_then_equal((side, up))


@pytest.mark.parametrize("side,up", [("edit", "plain"), ("plain", "reduce")])
@distributed(world_size=4, timeout_s=30)
def test_dp_x_tp_hooks_of_different_kinds_on_branch_and_trunk_raise(side, up):
    """The same under fairscale TP=2 x DP=2, where ``up`` is tp-sharded: the announcement and
    the retrieval go over the whole stage (4 ranks), the edit's gather over tp then dp."""
    torch.set_default_dtype(torch.float64)
    model, replica = _fairscale_branchy()

    def hooks():
        return [HookFunction("side", **_KINDS[side]), HookFunction("up", **_KINDS[up])]

    want = {}
    with FlexModel(Branchy(), want, process_group=local_group()) as flex:
        for hf in hooks():
            flex.register_forward_hook(hf)
        with torch.no_grad():
            want_out = flex(_batch(2, True))
    stored = {}
    with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2) as flex:
        for hf in hooks():
            flex.register_forward_hook(hf)
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
