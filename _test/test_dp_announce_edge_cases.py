"""Second reader: the announcement of every hook's shape (and of the end of every hooked forward)
to the stage leader under data parallelism on the CPU (piece_transfer.announce_pieces,
DistributedRuntime.end_of_hooked_forward). Runs that must keep working equal a one-process run
of the same weights and inputs (float64); branch mismatches must raise on every rank."""

import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, local_group
from rank_pool import distributed
from test_branch_hooks import BranchyNet
from test_lens_circuits_sharded_edge_cases import OddLM
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# imported here, before the rank pools fork
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.lens import LogitLens
from flex_surgery.parallel.failures import RemoteEditError
from flex_surgery.parallel.site_tags import HookSiteMismatchError
from flex_surgery.store import DiskStore

TOL = dict(rtol=1e-9, atol=1e-12)


def _x(seed: int, rows: int = 4, seq: int = 3, take: bool = True) -> torch.Tensor:
    x = torch.randn(rows, seq, H, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0] = 5.0 if take else -5.0
    return x


def _half(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // 2
    return x[rank * n:(rank + 1) * n]


def _triple(module, tensor, ctx, modules):
    return tensor * 3


def _hooks(p: str = ""):
    """(kind, HookFunction, group): a retrieval, a leader edit, a replicated edit, a reduce=
    and a hook on the branch (fires only where some row takes it)."""
    return [
        ("forward", HookFunction(p + "first"), "a"),
        ("forward", HookFunction(p + "up", editing_function=_triple), "a"),
        ("forward_pre", HookFunction(p + "down", editing_function=_triple,
                                     replicate_edit=True), "b"),
        ("forward", HookFunction(p + "down", reduce="mean_over_batch"), "b"),
        ("forward", HookFunction(p + "side"), "c"),
    ]


def _build(flex: FlexModel, prefix: str = "") -> None:
    for kind, hf, group in _hooks(prefix):
        getattr(flex, f"register_{kind}_hook")(hf)
        flex.update_hook_groups(hf, group)


# (inputs seed, seq len, branch taken by every row?, groups, grad?)
STEPS = [
    (1, 3, True, ["a"], True),
    (2, 5, False, ["c"], False),        # hooks selected, none fires (nobody takes side)
    (3, 2, True, ["a", "b", "c"], True),
    (4, 4, False, ["a"], False),
    (5, 1, True, "all", True),
    (6, 6, True, ["c"], True),          # only the branch's hook, taken by every row
]


def _loop(flex: FlexModel, model: nn.Module, rank: int | None, stored: dict) -> list:
    outs = []
    for seed, seq, take, groups, grad in STEPS:
        x = _x(seed, seq=seq, take=take)
        x = x if rank is None else _half(x, rank)
        with torch.set_grad_enabled(grad):
            out = flex(x, groups=groups)
            if grad:
                (out.pow(2).sum() / (2 if rank is None else 1)).backward()
        outs.append(out.detach())
        # a forward without any hook between the hooked ones
        with torch.no_grad():
            flex(x, groups="all", complement=True)
    return outs


def _reference_loop():
    torch.set_default_dtype(torch.float64)
    model = BranchyNet()
    stored = {}
    with FlexModel(model, stored, process_group=local_group()) as flex:
        _build(flex)
        outs = _loop(flex, model, None, stored)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return stored, outs, grads


def _compare(stored, want, outs, want_outs, rank, grads=None, want_grads=None, keys=None):
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, _half(b, rank), **TOL)
    if grads is not None:
        for n, g in want_grads.items():
            torch.testing.assert_close(grads[n], g, **TOL)
    if rank == 0 or keys == "all":
        assert sorted(stored) == sorted(want), (sorted(stored), sorted(want))
        for k in want:
            assert len(stored[k]) == len(want[k]), (k, len(stored[k]), len(want[k]))
            for a, b in zip(stored[k], want[k]):
                torch.testing.assert_close(a, b, **TOL)


# -- runs that worked before the end-of-forward announcement ------------------------------------

@pytest.mark.parametrize("options", [{}, dict(store_on="all"), dict(overlap_retrieval=True),
                                     dict(store_on="all", overlap_retrieval=True)],
                         ids=["rank0", "store_on_all", "overlap", "all_overlap"])
@distributed(world_size=2, timeout_s=30)
def test_ddp_generate_like_loop_groups_changing_lengths_equal_one_process(options):
    """DDP; six hooked forwards of changing sequence lengths, each followed by a forward with
    no hook selected; groups selected on some forwards and not others, one forward whose
    selected hook never fires, grad and no_grad, backward after some: equal one process."""
    want, want_outs, want_grads = _reference_loop()
    rank = dist.get_rank()
    model = DDP(BranchyNet())
    stored = {}
    with FlexModel(model, stored, **options) as flex:
        _build(flex, "module.")
        outs = _loop(flex, model, rank, stored)
    got = {k.removeprefix("module."): v for k, v in stored.items()}
    grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
    keys = "all" if options.get("store_on") == "all" else None
    _compare(got, want, outs, want_outs, rank, grads, want_grads, keys=keys)


@pytest.mark.parametrize("r0", [4, 0, 3, 1])
@distributed(world_size=2, timeout_s=30)
def test_uneven_and_empty_replicas_every_hook_kind_equal_one_process(r0):
    """Rank 0 holds ``r0`` of 4 rows, rank 1 the rest (one of them none; the leader too):
    retrieval, leader edit, replicated edit, reduce= and the end-of-forward announcement,
    with DDP's backward."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want, want_outs, want_grads = {}, [], None
    ref = BranchyNet()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _build(flex)
        for seed, seq in ((1, 3), (2, 5)):
            out = flex(_x(seed, seq=seq, take=False))
            (out.pow(2).sum() / 2).backward()
            want_outs.append(out.detach())
    want_grads = {n: p.grad for n, p in ref.named_parameters()}
    model = DDP(BranchyNet(), find_unused_parameters=True)  # nobody takes ``side``
    stored = {}
    with FlexModel(model, stored) as flex:
        _build(flex, "module.")
        for i, (seed, seq) in enumerate(((1, 3), (2, 5))):
            x = _x(seed, seq=seq, take=False)
            rows = slice(0, r0) if rank == 0 else slice(r0, 4)
            out = flex(x[rows])
            # DDP averages the two replicas' gradients; the loss is the whole batch's / 2
            out.pow(2).sum().backward()
            want_mine = want_outs[i][rows]
            torch.testing.assert_close(out.detach(), want_mine, **TOL)
    got = {k.removeprefix("module."): v for k, v in stored.items()}
    for n, p in model.named_parameters():
        want_grad = want_grads[n.removeprefix("module.")]
        assert (p.grad is None) == (want_grad is None), n
        if want_grad is not None:
            torch.testing.assert_close(p.grad, want_grad, **TOL)
    if rank == 0:
        assert sorted(got) == sorted(want)
        for k in want:
            for a, b in zip(got[k], want[k]):
                torch.testing.assert_close(a, b, **TOL)


def _fsdp(kind: str, model: nn.Module) -> nn.Module:
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    return model


def _full_grads(kind: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                    for n, p in model.named_parameters()}
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=30)
def test_fsdp_loop_equals_one_process(kind):
    """FSDP1 / FSDP2 over both ranks: the same loop (forward, backward, announcements)."""
    want, want_outs, want_grads = _reference_loop()
    rank = dist.get_rank()
    model = _fsdp(kind, BranchyNet())
    stored = {}
    with FlexModel(model, stored) as flex:
        prefix = next((n[:-len("first")] for n, _ in model.named_modules()
                       if n.endswith("first")), "")
        _build(flex, prefix)
        outs = _loop(flex, model, rank, stored)
    got = {k[len(prefix):]: v for k, v in stored.items()}
    # FSDP2 itself drops the accumulated gradients in a no_grad forward (with or without
    # FlexModel), so the loop's gradients are compared under FSDP1 only
    grads = _full_grads(kind, model) if kind == "fsdp1" else None
    _compare(got, want, outs, want_outs, rank, grads, want_grads)


@distributed(world_size=2, timeout_s=30)
def test_disk_store_over_a_loop_equals_one_process():
    """store= (DiskStore) under DP: the loop's values read back equal one process's."""
    want, want_outs, _ = _reference_loop()
    rank = dist.get_rank()
    directory = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(directory)
    directory = directory[0]
    try:
        model = DDP(BranchyNet())
        store = DiskStore(directory)
        with FlexModel(model, None, store=store) as flex:
            _build(flex, "module.")
            outs = _loop(flex, model, rank, {})
            flex.check_store()
        store.close()
        dist.barrier()
        if rank == 0:
            reader = DiskStore(directory)
            got = {k.removeprefix("module."): [reader.read(k, s) for s in reader.steps(k)]
                   for k in reader.names()}
            _compare(got, want, outs, want_outs, rank)
        else:
            _compare({}, want, outs, want_outs, rank)
        dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)


@distributed(world_size=2, timeout_s=30)
def test_logit_lens_on_a_flexmodel_under_ddp_with_hooks_equals_one_process():
    """The lens (its own runtime, store_on='all') around a FlexModel over DDP whose own hooks
    retrieve and edit: the lens, the FlexModel's values and the output equal one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))

    def run(flex, x):
        flex.register_forward_hook(HookFunction(prefix + "blocks.0"))
        flex.register_forward_hook(HookFunction(prefix + "blocks.1.up",
                                                editing_function=_triple))
        with LogitLens(flex, layers=[0, 1, 2], top_k=3, **kw) as lens:
            first = lens(x)
            second = lens(x[:, :3])
        return first, second

    prefix, kw = "", dict(process_group=local_group())
    want = {}
    with FlexModel(OddLM(11).double().eval(), want, process_group=local_group()) as flex:
        w1, w2 = run(flex, ids)
    prefix, kw = "module.", {}
    stored = {}
    with FlexModel(DDP(OddLM(11).double().eval()), stored) as flex:
        g1, g2 = run(flex, _half(ids, rank))
    for got, ref in ((g1, w1), (g2, w2)):
        assert got.layers == ref.layers
        assert torch.equal(got.tokens, ref.tokens)
        torch.testing.assert_close(got.logprobs, ref.logprobs, **TOL)
    if rank == 0:
        got = {k.removeprefix("module."): v for k, v in stored.items()}
        assert sorted(got) == sorted(want)
        for k in want:
            for a, b in zip(got[k], want[k]):
                torch.testing.assert_close(a, b, **TOL)


# -- FSDP: the end-of-forward mismatch leaves FSDP usable ------------------------------------

def _skipped_by(seed: int, skipper: int, seq: int = 3) -> torch.Tensor:
    x = _x(seed, seq=seq, take=True)
    x[2 * skipper:2 * skipper + 2, 0, 0] = -5.0
    return x


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("skipper", [0, 1])
@distributed(world_size=2, timeout_s=20)
def test_fsdp_last_hook_on_a_branch_raises_then_the_next_step_equals_one_process(kind, skipper):
    """FSDP1 / FSDP2 with grad: one rank raises inside FSDP's forward (at side's gather), the
    other after it (at the end-of-forward announcement); the next forward and backward still
    equal one process (outputs, side's values, the whole gradients)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    want = {}
    ref = BranchyNet()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        flex.register_forward_hook(HookFunction("side"))
        out_want = flex(_x(2))
        (out_want.pow(2).sum() / 2).backward()
    model = _fsdp(kind, BranchyNet())
    prefix = next(n[:-len("first")] for n, _ in model.named_modules() if n.endswith("first"))
    stored = {}
    with FlexModel(model, stored) as flex:
        flex.register_forward_hook(HookFunction(prefix + "side"))
        with pytest.raises(HookSiteMismatchError):
            flex(_half(_skipped_by(1, skipper), rank)).pow(2).sum().backward()
        stored.clear()
        model.zero_grad()
        out = flex(_half(_x(2), rank))
        out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), _half(out_want.detach(), rank), **TOL)
    for name, grad in _full_grads(kind, model).items():
        torch.testing.assert_close(grad, ref.get_parameter(name).grad, **TOL)
    if rank == 0:
        torch.testing.assert_close(stored[prefix + "side"], want["side"], **TOL)



# -- pipeline x data parallelism (hand-split stages, flex(...) per micro-batch) ---------------

class _Stage(nn.Module):
    """BranchyNet cut in two under its own names: stage 0 ``first`` (+ ``side``), stage 1
    ``up`` and ``down``."""

    def __init__(self, net: BranchyNet, stage: int):
        super().__init__()
        self.stage = stage
        if stage == 0:
            self.first, self.side = net.first, net.side
        else:
            self.up, self.down = net.up, net.down

    def forward(self, x):
        if self.stage == 0:
            take = x[:, 0, 0] > 0
            x = self.first(x)
            if take.any():
                x = torch.where(take[:, None, None], x + self.side(x), x)
            return x
        return self.down(torch.relu(self.up(x)))


def _pp_hooks(flex: FlexModel):
    flex.register_forward_hook(HookFunction("first", editing_function=_triple))
    flex.register_forward_hook(HookFunction("side"))
    flex.register_forward_hook(HookFunction("up"))
    flex.register_forward_pre_hook(HookFunction("down", editing_function=_triple,
                                                replicate_edit=True))
    flex.create_hook_group("late", "up")  # stage 1 only: stage 0 runs with no hook selected
    flex.create_hook_group("early", "first")


PP_STEPS = [(1, 3, "all"), (2, 5, "late"), (3, 2, "early"), (4, 4, "all")]


def pp_dp_steps(flex, link, replica: int, steps) -> list[torch.Tensor]:
    """Steps of two micro-batches each over a PP=2 x DP=2 ``StageLink`` (``steps``: seed,
    sequence length, hook groups): every forward of a step, then every backward; the values
    are collected after each step. Returns the last stage's outputs."""
    outs = []
    for seed, seq, groups in steps:
        ins, ys = [], []
        with link.step():
            for mb in _x(seed, rows=8, seq=seq).chunk(2):
                h = _half(mb, replica) if link.is_first else \
                    link.recv_forward(requires_grad=True)
                y = flex(h, groups=groups)
                if not link.is_last:
                    link.send_forward(y)
                ins.append(h)
                ys.append(y)
            for h, y in zip(ins, ys):
                if link.is_last:
                    y.pow(2).sum().backward()
                    outs.append(y.detach())
                else:
                    y.backward(link.recv_backward())
                if not link.is_first:
                    link.send_backward(h.grad)
        flex.sync_pipeline_outputs(link)
    return outs


def check_pp_dp(flex, ref, outs, want_outs, replica: int) -> None:
    """The data-parallel mean of the gradients and the outputs equal one process (``ref``,
    ``want_outs``); closes ``flex``."""
    dp_group = flex.runtime.mesh.group("dp")
    for name, p in flex.module.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=dp_group)
        torch.testing.assert_close(grad / 2, ref.get_parameter(name).grad, **TOL)
    for got, w in zip(outs, want_outs):
        torch.testing.assert_close(got, _half(w, replica), **TOL)
    flex.close()


@distributed(world_size=4, timeout_s=40)
def test_pp_x_dp_hand_split_with_groups_and_changing_lengths_equals_one_process():
    """PP=2 x DP=2 (ranks 0, 1 stage 0; 2, 3 stage 1), two micro-batches per step, forward
    and backward over a StageLink; groups that select hooks on one stage only, sequence
    lengths that change from step to step: the values collected on rank 0, the outputs and the
    data-parallel mean of the gradients equal one process."""
    from flex_surgery.parallel.pipeline import StageLink

    torch.set_default_dtype(torch.float64)
    want, want_outs = {}, []
    ref = BranchyNet()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        _pp_hooks(flex)
        for seed, seq, groups in PP_STEPS:
            for mb in _x(seed, rows=8, seq=seq).chunk(2):
                out = flex(mb, groups=groups)
                (out.pow(2).sum() / 2).backward()
                want_outs.append(out.detach())
    stage, replica = divmod(dist.get_rank(), 2)
    net = BranchyNet()
    stored = {}
    flex = FlexModel(_Stage(net, stage), stored if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2, data_parallel_size=2)
    assert flex.runtime.mesh.stage == stage and flex.runtime.mesh.rank("dp") == replica
    _pp_hooks(flex)
    link = StageLink(flex.runtime.mesh, timeout_s=30)
    outs = pp_dp_steps(flex, link, replica, PP_STEPS)
    check_pp_dp(flex, ref, outs, want_outs, replica)
    if dist.get_rank() == 0:
        assert sorted(stored) == sorted(want), (sorted(stored), sorted(want))
        for k in want:
            assert len(stored[k]) == len(want[k]), (k, len(stored[k]), len(want[k]))
            for a, b in zip(stored[k], want[k]):
                torch.testing.assert_close(a, b, **TOL)


# -- branch mismatches that must raise ------------------------------------------------------

_KINDS = {
    "plain": {},
    "reduce": dict(reduce="mean_over_batch"),
    "edit": dict(editing_function=_triple),
    "replicate": dict(editing_function=_triple, replicate_edit=True),
    "pre_edit": dict(editing_function=_triple),
}


@pytest.mark.parametrize("skipper", [0, 1], ids=["leader_skips", "other_skips"])
@pytest.mark.parametrize("kind", list(_KINDS))
@distributed(world_size=2, timeout_s=20)
def test_the_last_hook_of_any_kind_on_a_branch_meets_the_end_of_forward(kind, skipper):
    """Only ``side`` is hooked, with a plain retrieval, a reduce=, a leader edit, a replicated
    edit or an edit of its input; rank ``skipper`` skips it: both raise at that forward (the
    hook's announcement meets the end-of-forward one); then, under DDP with backward, equal
    one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    register = "register_forward_pre_hook" if kind == "pre_edit" else "register_forward_hook"
    want = {}
    ref = BranchyNet()
    with FlexModel(ref, want, process_group=local_group()) as flex:
        getattr(flex, register)(HookFunction("side", **_KINDS[kind]))
        want_out = flex(_x(2))
        (want_out.pow(2).sum() / 2).backward()
    model = DDP(BranchyNet())
    stored = {}
    with FlexModel(model, stored) as flex:
        getattr(flex, register)(HookFunction("module.side", **_KINDS[kind]))
        with pytest.raises(HookSiteMismatchError) as refused:
            flex(_half(_skipped_by(1, skipper), rank)).pow(2).sum().backward()
        if rank == 0:
            assert "end of the forward" in str(refused.value), str(refused.value)
        stored.clear()
        model.zero_grad()
        out = flex(_half(_x(2), rank))
        out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), _half(want_out.detach(), rank), **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.get_parameter(n.removeprefix("module.")).grad,
                                   **TOL)
    if rank == 0:
        assert sorted(stored) == ["module.side"]
        torch.testing.assert_close(stored["module.side"], want["side"], **TOL)


def _fails_on_positive(module, tensor, ctx, modules):
    if tensor.numel() and bool(tensor.abs().amax() > 100):
        raise ValueError("refused")
    return tensor * 3


@pytest.mark.parametrize("replicate", [False, True], ids=["leader", "replicate_edit"])
@distributed(world_size=2, timeout_s=20)
def test_an_editing_function_that_raises_on_one_site_and_one_rank(replicate):
    """The editing function of ``up`` raises where a row is very large (rank 1's rows only,
    seen whole by the leader, or on rank 1 alone with replicate_edit): every rank raises at
    that call, and the end-of-forward announcement is not left waiting; the next forwards
    (of another length) equal one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()

    def hooks(flex, p=""):
        flex.register_forward_hook(HookFunction(p + "first"))
        flex.register_forward_hook(HookFunction(p + "up", editing_function=_fails_on_positive,
                                                replicate_edit=replicate))
        flex.register_forward_hook(HookFunction(p + "down"))

    want = {}
    with FlexModel(BranchyNet(), want, process_group=local_group()) as flex:
        hooks(flex)
        with torch.no_grad():
            want_outs = [flex(_x(s, seq=q)) for s, q in ((2, 4), (3, 2))]
    bad = _x(1)
    bad[2:, 1, :] = 1e4  # rank 1's rows: up's output is huge there
    stored = {}
    with FlexModel(BranchyNet(), stored) as flex, torch.no_grad():
        hooks(flex)
        with pytest.raises((RemoteEditError, ValueError)):
            flex(_half(bad, rank))
        stored.clear()
        outs = [flex(_half(_x(s, seq=q), rank)) for s, q in ((2, 4), (3, 2))]
    for a, b in zip(outs, want_outs):
        torch.testing.assert_close(a, _half(b, rank), **TOL)
    if rank == 0:
        assert sorted(stored) == sorted(want)
        for k in want:
            for a, b in zip(stored[k], want[k]):
                torch.testing.assert_close(a, b, **TOL)


# -- known gaps, pinned -------------------------------------------------------------------

@distributed(world_size=2, timeout_s=15)
def test_calls_that_bypass_flex_raise_when_a_replica_skips_the_last_hook():
    """select_hook_groups, then the wrapped module called directly (as a pipelining schedule
    calls a stage per micro-batch). Only ``side`` is hooked; rank 0 takes it in call 1, rank 1
    in call 2. The passes were counted in ``FlexModel.forward`` only and nothing was announced
    at the end of a bypassing call, so rank 1's call-2 gather answered rank 0's call-1 one:
    rank 0 stored its call-1 rows joined with rank 1's call-2 rows. Now both calls raise on
    both ranks (each meets the other rank's end of the call)."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    stored = {}
    flex = FlexModel(BranchyNet(), stored)
    flex.register_forward_hook(HookFunction("side"))
    flex.select_hook_groups("all")
    x1 = _skipped_by(1, skipper=1)  # call 1: rank 0 takes side, rank 1 does not
    x2 = _skipped_by(2, skipper=0)  # call 2: rank 1 takes side, rank 0 does not
    raised = 0
    with torch.no_grad():
        for x in (x1, x2):
            try:
                flex.module(_half(x, rank))
            except HookSiteMismatchError:
                raised += 1
    flex.close()
    if rank == 0 and not raised:
        net = BranchyNet()
        with torch.no_grad():
            mixed = torch.cat([net.side(net.first(_half(x1, 0))),
                               net.side(net.first(_half(x2, 1)))])
        assert not (len(stored.get("side", [])) == 1 and
                    torch.allclose(stored["side"][0], mixed)), \
            "rank 0 stored its call-1 rows joined with rank 1's call-2 rows, silently"
    assert raised == 2, f"rank {rank}: {raised} HookSiteMismatchError(s), not 2"


def _cpu_gloo_rank(rank: int, port: int, queue) -> None:
    """One rank of a fresh world whose default backend is spelled ``"cpu:gloo"`` (as in
    ``"cpu:gloo,cuda:nccl"``, the usual spelling for CPU and CUDA tensors in one job)."""
    import datetime
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("cpu:gloo", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=6))
        torch.set_default_dtype(torch.float64)
        flex = FlexModel(BranchyNet(), {})
        backend = str(dist.get_backend(flex.runtime.mesh.stage_group))
        flex.register_forward_hook(HookFunction("side"))
        with torch.no_grad():
            try:
                flex(_half(_skipped_by(1, 1), rank))   # rank 1 skips side, the last hook
                outcome = "returned"
            except HookSiteMismatchError:
                outcome = "HookSiteMismatchError"
            except Exception as exc:  # the collective's timeout
                outcome = type(exc).__name__
        queue.put((rank, backend, outcome))
    except BaseException as exc:
        queue.put((rank, "?", f"setup failed: {exc!r}"))
    finally:
        queue.close()
        queue.join_thread()  # what was put has left before the process ends
        os._exit(0)


def test_the_end_of_forward_is_announced_under_a_cpu_gloo_backend_string():
    """A world started with ``"cpu:gloo"`` names its groups so: the end of the forward was
    announced only for ``"gloo"``, and rank 0 waited at the last hook rank 1 skipped."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_cpu_gloo_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            try:
                results.append(queue.get(timeout=12))
            except Exception:  # a rank that never answers: still waiting in a gather
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    results = {r: (b, o) for r, b, o in results}
    assert results == {r: ("cpu:gloo", "HookSiteMismatchError") for r in range(2)}, results
