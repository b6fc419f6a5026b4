"""Adversarial equivalence tests for the replicated edit path, overlapped retrieval and the
one-process fast path: each case is one that the equivalence matrix (``times_two`` on every
site, even batches) does not reach -- editing functions that couple the pieces of a sharded
tensor (their gradients need every rank's share), uneven data-parallel batches (the padding
path), in-place edits, ``store_on`` other than ``"rank0"``, hooks of several kinds sharing one
``output_dict`` key, ``keep="last"``, stores, and passes that raise midway. Every case compares
with one process in float64: the output, what the hooks stored and the parameter gradients.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    FF,
    H,
    assert_grads_equal,
    assert_stored_equal,
    clean,
    clean_keys,
    dtensor_plan,
    fairscale_net,
    local_group,
    plain_grads,
    plain_net,
)
from pipeline_cases import hand_split_step, inputs, reference, register_sites, two_stages
from rank_pool import distributed
from test_equivalence_tp import _fairscale_grads
from test_store_distributed import _done_with, _shared_dir

from flex_surgery import FlexModel, HookFunction
from flex_surgery.hooks import ShapeMismatchError
from flex_surgery.hooks.hook_function import pure_edit
from flex_surgery.parallel import distributed_runtime
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.layout import LayoutError
from flex_surgery.parallel.pipeline import StageLink
from flex_surgery.store import DiskStore, MemoryStore

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
TIMEOUT_S = 60  # a hang fails the test within this bound
REPLICATE = (False, True)  # the leader path (the control) and the replicated one


def _x(batch: int, seed: int = 1) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(batch, 3, H, generator=torch.Generator().manual_seed(seed))


def _rows(x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


# -- editing functions that couple the pieces of a sharded tensor ------------------------------
def batch_center(module, tensor, ctx, modules):
    """Each row depends on every row of the batch: under data parallelism, on every replica."""
    return tensor - tensor.mean(dim=0, keepdim=True) * 0.5


def batch_softmax_gate(module, tensor, ctx, modules):
    """A softmax over the batch dim (rows of other replicas) gating the activation."""
    return tensor * torch.softmax(tensor, dim=0) * 2.0


def hidden_softmax_gate(module, tensor, ctx, modules):
    """A softmax over the last dim (sharded over tp after a column layer)."""
    return tensor * torch.softmax(tensor, dim=-1) * 3.0


def grad_center(module, tensor, ctx, modules):
    """A gradient edit mixing every entry: each entry minus half the mean of all of them."""
    return tensor - tensor.mean() * 0.5


def _sum_loss(total_rows: int, dp: int):
    """The loss whose data-parallel average equals one process's mean over the global batch,
    also when the replicas' batches differ in size."""
    return lambda y: y.pow(2).sum() * (dp / total_rows)


# (name, hook kind, editing function, expected_shape)
DP_HOOKS = [
    ("blocks.0.up", "forward", batch_center, (None, 3, FF)),
    ("blocks.1.act", "forward", batch_softmax_gate, None),
    ("blocks.1.down", "forward_pre", batch_center, None),
    ("blocks.1.act", "full_backward", batch_center, None),
    ("blocks.1.up", "full_backward_pre", batch_softmax_gate, None),
    ("blocks.1.up.weight", "tensor", grad_center, None),
    ("blocks.0.down.bias", "tensor", grad_center, None),
]
_REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
             "full_backward": "register_full_backward_hook",
             "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


def _hooked(model, x, hooks, replicate, loss, names=None, steps=1, **kwargs):
    """FlexModel with ``hooks`` on ``model``; ``steps`` forward + backward passes on ``x``.
    Returns (stored, last output, flex)."""
    stored: dict = {}
    flex = FlexModel(model, stored, key_by_hook_kind=True, **kwargs)
    names = names or {}
    for name, kind, fn, expected in hooks:
        getattr(flex, _REGISTER[kind])(HookFunction(names.get(name, name), expected_shape=expected,
                                                    editing_function=fn,
                                                    replicate_edit=replicate))
    for _ in range(steps):
        out = flex(x)
        loss(out).backward()
    return clean_keys(stored), out.detach(), flex


def _reference(x, hooks):
    """One process on the whole batch, with the mean over it as the loss."""
    return _reference_on(plain_net(), x, hooks)


def _reference_on(model, x, hooks):
    stored, out, flex = _hooked(model, x, hooks, False, _sum_loss(x.shape[0], 1),
                                process_group=local_group())
    flex.restore()
    return stored, out, plain_grads(model)


def _names(model) -> dict[str, str]:
    names = {}
    for n, _ in list(model.named_modules()) + list(model.named_parameters()):
        names[clean(n)] = n
    return names


# -- replicate_edit under data parallelism -----------------------------------------------------
@pytest.mark.parametrize("sizes", [(3, 1), (2, 2), (4, 0)], ids=["uneven", "even", "empty"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_ddp_edits_coupling_the_batch_equal_one_process(sizes):
    """DDP with uneven replicas (the padded gather) and even ones (gathered straight into the
    whole tensor): edits whose every row depends on every replica's rows, on activations,
    activation gradients and parameter gradients, plus an ``expected_shape`` check."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = _x(sum(sizes))
    ref_stored, ref_out, ref_grads = _reference(x, DP_HOOKS)
    local_x = _rows(x, sizes, dist.get_rank())
    for replicate in REPLICATE:
        model = DDP(plain_net())
        stored, out, flex = _hooked(model, local_x, DP_HOOKS, replicate, _sum_loss(sum(sizes), 2),
                                    names=_names(model))
        case = f"sizes={sizes} replicate={replicate}"
        torch.testing.assert_close(out, _rows(ref_out, sizes, dist.get_rank()), **TOL,
                                   msg=lambda m, c=case: f"{c}: {m}")
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        else:
            assert stored == {}
        assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()}, ref_grads,
                           **TOL)
        flex.restore()


@pytest.mark.parametrize("wrapper", ["fsdp1", "fsdp2"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_fsdp_edits_coupling_the_batch_equal_one_process(wrapper):
    """FSDP1 (use_orig_params) and FSDP2: parameter gradients hooked on the tensors FSDP
    really uses in forward, averaged over dp; uneven replicas."""
    from parallel_cases import Block
    from test_equivalence_dp import _fsdp1_params, _grads_by_sgd_step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    sizes = (1, 3)
    x = _x(sum(sizes))
    ref_stored, ref_out, ref_grads = _reference(x, DP_HOOKS)
    mesh = init_device_mesh("cpu", (2,))
    for replicate in REPLICATE:
        if wrapper == "fsdp1":
            model = FSDP(plain_net(), auto_wrap_policy=ModuleWrapPolicy({Block}),
                         use_orig_params=True, device_id=torch.device("cpu"))
        else:
            model = plain_net()
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        stored, out, flex = _hooked(model, _rows(x, sizes, dist.get_rank()), DP_HOOKS, replicate,
                                    _sum_loss(4, 2), names=_names(model))
        torch.testing.assert_close(out, _rows(ref_out, sizes, dist.get_rank()), **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        if wrapper == "fsdp1":
            grads = _grads_by_sgd_step(model, lambda m=model: _fsdp1_params(m))
        else:
            grads = {clean(n): p.grad.full_tensor() for n, p in model.named_parameters()}
        assert_grads_equal(grads, ref_grads, **TOL)
        flex.restore()


@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_fsdp2_x_dtensor_tp_with_dtensors_in_the_hooks_equals_one_process():
    """A 2-D mesh: DTensor TP (hooks see DTensors) inside FSDP2, uneven replicas, edits
    coupling the batch and the hidden dim, gradient hooks on DTensor parameters (sharded over
    tp, averaged over dp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    def both(module, tensor, ctx, modules):
        return hidden_softmax_gate(module, batch_center(module, tensor, ctx, modules), ctx,
                                   modules)

    hooks = [(n, k, both if k in ("forward", "forward_pre") else fn, e)
             for n, k, fn, e in TP_HOOKS]
    sizes = (3, 1)
    x = _x(4)
    ref_stored, ref_out, ref_grads = _reference(x, hooks)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(False))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    stored, out, flex = _hooked(model, _rows(x, sizes, dp_rank), hooks, True, _sum_loss(4, 2))
    assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    torch.testing.assert_close(out, _rows(ref_out, sizes, dp_rank), **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    assert_grads_equal({clean(n): p.grad.full_tensor() for n, p in model.named_parameters()},
                       ref_grads, **TOL)
    flex.restore()


# -- replicate_edit under tensor parallelism ---------------------------------------------------
TP_HOOKS = [
    ("blocks.0.up", "forward", hidden_softmax_gate, (None, 3, FF)),  # tp-sharded hidden dim
    ("blocks.0.act", "forward", hidden_softmax_gate, None),
    ("blocks.1.down", "forward_pre", hidden_softmax_gate, None),     # row input: sharded
    ("blocks.1.up", "forward_pre", hidden_softmax_gate, None),       # column input: replicated
    ("blocks.1.act", "full_backward", grad_center, None),
    ("blocks.1.up", "full_backward_pre", grad_center, None),
    ("blocks.1.up.weight", "tensor", grad_center, None),             # tp-sharded gradient
    ("blocks.1.down.bias", "tensor", grad_center, None),             # replicated gradient
]


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_dtensor_tp_with_dtensors_in_the_hooks_equals_one_process():
    """``use_local_output=False``: hooks see DTensors; every rank edits its gathered copy and
    hands back a DTensor of its piece."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    hooks = TP_HOOKS
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    x = _x(2)
    loss = _sum_loss(2, 1)
    ref_stored, ref_out, ref_grads = _reference(x, hooks)
    for replicate in REPLICATE:
        model = parallelize_module(plain_net(), mesh, dtensor_plan(False))
        stored, out, flex = _hooked(model, x, hooks, replicate, loss)
        if isinstance(out, DTensor):
            out = out.full_tensor()
        torch.testing.assert_close(out, ref_out, **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        grads = {clean(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for n, p in model.named_parameters()}
        assert_grads_equal(grads, ref_grads, **TOL)
        flex.restore()


@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_dp_x_tp_uneven_edits_coupling_every_shard_equal_one_process():
    """fairscale TP=2 inside DDP over dp=2, uneven replicas; edits coupling the batch (across
    replicas) and the hidden dim (across tp ranks) on the same tensors."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    def both(module, tensor, ctx, modules):
        return hidden_softmax_gate(module, batch_center(module, tensor, ctx, modules), ctx,
                                   modules)

    hooks = [(n, k, both if k in ("forward", "forward_pre") else fn, e)
             for n, k, fn, e in TP_HOOKS]
    fs.initialize_model_parallel(2)
    sizes = (3, 1)
    x = _x(4)
    loss = _sum_loss(4, 2)
    ref_stored, ref_out, ref_grads = _reference(x, hooks)
    dp_rank = fs.get_data_parallel_rank()
    for replicate in REPLICATE:
        net = fairscale_net(plain_net())
        model = DDP(net, process_group=fs.get_data_parallel_group())
        stored, out, flex = _hooked(model, _rows(x, sizes, dp_rank), hooks, replicate, loss,
                                    names=_names(model), tensor_parallel_size=2,
                                    data_parallel_size=2)
        assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
        torch.testing.assert_close(out, _rows(ref_out, sizes, dp_rank), **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        else:
            assert stored == {}
        assert_grads_equal(_fairscale_grads(net, fs.get_model_parallel_group()), ref_grads,
                           **TOL)
        flex.restore()


@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_dp_x_tp_failure_on_one_rank_raises_everywhere_within_seconds():
    """replicate_edit fails on global rank 3 only (a tp and a dp non-leader): every rank raises
    at that call, then every rank can go on (the next forward works)."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    fs.initialize_model_parallel(2)
    fail = [True]

    def flaky(module, tensor, ctx, modules):
        if fail[0] and dist.get_rank() == 3:
            raise ValueError("rank-local failure")
        return batch_center(module, tensor, ctx, modules)

    x = _x(2)
    net = fairscale_net(plain_net())
    model = DDP(net, process_group=fs.get_data_parallel_group())
    flex = FlexModel(model, {}, tensor_parallel_size=2, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("module.blocks.0.up", editing_function=flaky,
                                            replicate_edit=True))
    start = time.monotonic()
    with pytest.raises(RemoteEditError) as info:
        flex(x)
    assert time.monotonic() - start < 10
    if dist.get_rank() == 3:
        assert isinstance(info.value.__cause__, ValueError)
    else:
        assert "group rank 3" in str(info.value)
    fail[0] = False
    with torch.no_grad():
        flex(x)  # every rank is at the same point: the next call goes through
    flex.restore()


# -- in-place edits and store_on ---------------------------------------------------------------
def double_in_place(module, tensor, ctx, modules):
    tensor.mul_(2.0)
    return tensor


INPLACE_HOOKS = [
    ("blocks.0.up", "forward", double_in_place, None),     # dp-sharded (gathered copy)
    ("blocks.1.act", "full_backward", double_in_place, None),
    ("blocks.1.up.weight", "tensor", double_in_place, None),
]


@pytest.mark.parametrize("replicate", REPLICATE, ids=["leader", "replicated"])
@pytest.mark.parametrize("store_on", ["rank0", "all", "replica_leaders"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_in_place_edits_store_the_value_before_the_edit(store_on, replicate):
    """An editing function that edits its argument in place: what is stored is the value
    before the edit (as in one process), on whichever ranks store."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = (3, 1)
    x = _x(4)
    loss = _sum_loss(4, 2)
    ref_stored, ref_out, ref_grads = _reference(x, INPLACE_HOOKS)
    model = DDP(plain_net())
    stored, out, flex = _hooked(model, _rows(x, sizes, dist.get_rank()), INPLACE_HOOKS,
                                replicate, loss, names=_names(model), store_on=store_on)
    torch.testing.assert_close(out, _rows(ref_out, sizes, dist.get_rank()), **TOL)
    if store_on == "replica_leaders":  # each replica's rows on its leader; dp averages on 0
        rank = dist.get_rank()
        ref_stored = {k: [_rows(v, sizes, rank) for v in vals] for k, vals in ref_stored.items()
                      if not k.endswith(":grad")} | \
            {k: v for k, v in ref_stored.items() if k.endswith(":grad") and rank == 0}
    if dist.get_rank() == 0 or store_on != "rank0":
        assert_stored_equal(stored, ref_stored, **TOL)
    assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()}, ref_grads,
                       **TOL)
    flex.restore()


@pytest.mark.parametrize("replicate", REPLICATE, ids=["leader", "replicated"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_in_place_edit_of_a_replicated_tensor_stores_the_value_before_the_edit(replicate):
    """Under TP a row layer's output is replicated: the replicated path hands the editing
    function the model's own tensor (nothing to gather); the stored copy must predate the
    edit."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    hooks = [("blocks.0.down", "forward", double_in_place, None),
             ("blocks.0", "forward", double_in_place, None),
             ("blocks.1.down.bias", "tensor", double_in_place, None)]
    x = _x(2)
    loss = _sum_loss(2, 1)
    ref_stored, ref_out, ref_grads = _reference(x, hooks)
    for store_on in ("rank0", "all"):
        model = fairscale_net(plain_net())
        stored, out, flex = _hooked(model, x, hooks, replicate, loss, store_on=store_on,
                                    tensor_parallel_size=2)
        torch.testing.assert_close(out, ref_out, **TOL)
        if dist.get_rank() == 0 or store_on == "all":
            assert_stored_equal(stored, ref_stored, **TOL)
        assert_grads_equal(_fairscale_grads(model, fs.get_model_parallel_group()),
                           ref_grads, **TOL)
        flex.restore()


# -- overlapped retrieval ----------------------------------------------------------------------
def _retrieval(model, x, sites, overlap, loss, steps=1, names=None, **kwargs):
    """FlexModel with plain retrieval hooks (``(name, kind)`` or ``(name, kind, reduce)``)."""
    stored: dict = {} if "store" not in kwargs else None
    flex = FlexModel(model, stored, overlap_retrieval=overlap, **kwargs)
    names = names or {}
    for site in sites:
        name, kind = site[:2]
        reduce = site[2] if len(site) > 2 else None
        getattr(flex, _REGISTER[kind])(HookFunction(names.get(name, name), reduce=reduce))
    started = []
    real = distributed_runtime.start_gather

    def spy(*args, **kw):
        started.append(1)
        return real(*args, **kw)

    distributed_runtime.start_gather = spy
    try:  # the pool rank lives on: undo the patch whatever happens
        for _ in range(steps):
            out = flex(x)
            loss(out).backward()
    finally:
        distributed_runtime.start_gather = real
    # the overlapped path was taken (some gather started) exactly when asked for
    assert bool(started) == (overlap and isinstance(flex.runtime,
                                                     distributed_runtime.DistributedRuntime))
    flex.restore()
    return stored, out.detach()


@pytest.mark.parametrize("keep", ["all", "last"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_overlap_keeps_the_call_order_of_hooks_sharing_a_key(keep):
    """Two hooks store under one key: ``blocks.1.down``'s input (tp-sharded: its gather is
    overlapped) and its output (replicated: stored at once) with ``keep="all"``; a plain
    retrieval (overlapped) and a ``last_token`` reduction (stored at once) of ``blocks.0.up``
    with ``keep="last"``. The stored order must be the call order, as in one process."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    if keep == "all":
        sites = [("blocks.1.down", "forward_pre"), ("blocks.1.down", "forward")]
    else:
        sites = [("blocks.0.up", "forward"), ("blocks.0.up", "forward", "last_token")]
    x = _x(2)
    loss = _sum_loss(2, 1)
    ref, ref_out = _retrieval(plain_net(), x, sites, False, loss, steps=2, keep=keep,
                              process_group=local_group())
    for overlap in (False, True):
        stored, out = _retrieval(fairscale_net(plain_net()), x, sites, overlap, loss, steps=2,
                                 keep=keep, tensor_parallel_size=2)
        torch.testing.assert_close(out, ref_out, **TOL)
        if dist.get_rank() == 0:
            if keep == "last":
                stored, want = {k: [v] for k, v in stored.items()}, \
                    {k: [v] for k, v in ref.items()}
            else:
                want = ref
            assert_stored_equal(stored, want, **TOL)


class Boom(Exception):
    pass


def _failing_pass_run(model, x, overlap, where, **kwargs):
    """Retrieval hooks whose gathers are overlapped (tp-sharded), then an editing hook that
    raises on every rank in the forward (``where="forward"``) or in the backward; then a second,
    successful pass. Returns what was stored after the failed pass and after the second one."""
    stored: dict = {}
    flex = FlexModel(model, stored, key_by_hook_kind=True, overlap_retrieval=overlap, **kwargs)
    fail = [True]

    def boom(module, tensor, ctx, modules):
        if fail[0]:
            raise Boom("edit failed")
        return tensor

    flex.register_forward_hook(HookFunction("blocks.0.up"))
    flex.register_full_backward_hook(HookFunction("blocks.1.act"))
    if where == "forward":
        flex.register_forward_hook(HookFunction("blocks.1.up", editing_function=boom))
    else:
        flex.register_full_backward_hook(HookFunction("blocks.0.act", editing_function=boom))
    with pytest.raises((Boom, RemoteEditError)):
        flex(x).pow(2).sum().backward()
    after_failure = {k: list(v) for k, v in stored.items()}
    fail[0] = False
    stored.clear()
    flex(x).pow(2).sum().backward()
    flex.restore()
    return after_failure, stored


@pytest.mark.parametrize("where", ["forward", "backward"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_overlap_a_pass_that_raises_leaves_nothing_for_the_next_one(where):
    """What a failed pass stored is what one process stores (the values of the hooks that ran
    before the failure), and none of it turns up after ``output_dict`` was cleared for the next
    pass."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    x = _x(2)
    ref_failed, ref_next = _failing_pass_run(plain_net(), x, False, where,
                                             process_group=local_group())
    for overlap in (False, True):
        failed, nxt = _failing_pass_run(fairscale_net(plain_net()), x, overlap, where,
                                        tensor_parallel_size=2)
        if dist.get_rank() == 0:
            assert_stored_equal(nxt, ref_next, **TOL)  # nothing of the failed pass
            assert_stored_equal(failed, ref_failed, **TOL)


# Overlapped under DP: the batch-sharded activation and activation gradient; the parameter
# gradient (a dp average) is stored at once.
OVERLAP_DP_SITES = [("blocks.0.up", "forward"), ("blocks.1.act", "full_backward"),
                    ("blocks.1.up", "full_backward_pre"), ("blocks.1.up.weight", "tensor"),
                    ("blocks.0.act", "forward", "mean_over_batch")]


def _cleaned(stored: dict) -> dict:
    return {clean(k.partition(":")[0]) + k.partition(":")[1] + k.partition(":")[2]: v
            for k, v in stored.items()}


@pytest.mark.parametrize("how", ["keep_all", "keep_last", "store", "disk"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_overlap_under_ddp_with_uneven_batches_equals_one_process(how):
    """Two steps of DDP with replicas of 3 and 1 rows: the overlapped gathers are padded, the
    gradients scaled; ``keep="last"`` keeps the second step's values, a store gets both."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = (3, 1)
    x = _x(4)
    keep = "last" if how == "keep_last" else "all"
    ref, ref_out = _retrieval(plain_net(), x, OVERLAP_DP_SITES, False, _sum_loss(4, 1), steps=2,
                              keep=keep, key_by_hook_kind=True, process_group=local_group())
    for overlap in (False, True):
        model = DDP(plain_net())
        directory = _shared_dir() if how == "disk" else None
        store = MemoryStore() if how == "store" else \
            DiskStore(directory, buffer_bytes=1024) if how == "disk" else None
        options = dict(store=store) if store is not None else dict(keep=keep)
        stored, out = _retrieval(model, _rows(x, sizes, dist.get_rank()), OVERLAP_DP_SITES,
                                 overlap, _sum_loss(4, 2), steps=2, names=_names(model),
                                 key_by_hook_kind=True, **options)
        torch.testing.assert_close(out, _rows(ref_out, sizes, dist.get_rank()), **TOL)
        if how == "store":
            stored = store.to_dict()
        elif how == "disk":
            store.close()
            dist.barrier()
            reader = DiskStore(directory)
            stored = {n: [reader.read(n, step) for step in reader.steps(n)]
                      for n in reader.names()}
            _done_with(directory)
        if dist.get_rank() == 0:
            got, want = _cleaned(stored), ref
            if keep == "last":
                got, want = {k: [v] for k, v in got.items()}, {k: [v] for k, v in want.items()}
            assert_stored_equal(got, want, **TOL)
        elif store is None:
            assert stored == {}


# -- Megatron-core sequence parallelism: pieces along dim 0 (gathered straight into the whole
# tensor), edits coupling the sequence ------------------------------------------------------
def sequence_softmax_gate(module, tensor, ctx, modules):
    """A softmax over the sequence dim (dim 0 of Megatron's ``[s, b, h]``: sequence-sharded)."""
    return tensor * torch.softmax(tensor, dim=0) * 2.0


def sequence_cumsum(module, tensor, ctx, modules):
    """Each position depends on every earlier one, across the sequence shards."""
    return tensor.cumsum(dim=0) * 0.5


SP_HOOKS = [
    ("embed", "forward", sequence_softmax_gate, None),
    ("up", "forward_pre", sequence_cumsum, None),
    ("up", "forward", sequence_softmax_gate, None),
    ("down", "forward", sequence_cumsum, None),
    ("act", "full_backward", sequence_cumsum, None),
    ("down", "full_backward_pre", sequence_softmax_gate, None),
    ("down.bias", "tensor", grad_center, None),  # sequence-parallel: a partial sum over tp
    ("up.weight", "tensor", grad_center, None),
]


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_megatron_sequence_parallel_edits_and_overlap_equal_one_process():
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp, token_ids
    from test_megatron_layers import _whole_grads, all_gather_list

    ids = token_ids()  # weights drawn in float32 (Megatron initialises through float32)
    loss = _sum_loss(1, 1)
    with megatron_parallel(2):
        model = plain_mlp().to(torch.float64)
        ref_stored, ref_out, flex = _hooked(model, ids, SP_HOOKS, False, loss,
                                            process_group=local_group())
        flex.restore()
        ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        for replicate in REPLICATE:
            model = megatron_mlp(plain_mlp(), True, torch.float64)
            stored, out, flex = _hooked(model, ids, SP_HOOKS, replicate, loss)
            out = torch.cat(all_gather_list(out), dim=0)
            torch.testing.assert_close(out, ref_out, **TOL,
                                       msg=lambda m, r=replicate: f"replicate={r}: {m}")
            if dist.get_rank() == 0:
                assert_stored_equal(stored, ref_stored, **TOL)
            assert_grads_equal(_whole_grads(model), ref_grads, **TOL)
            flex.restore()
        sites = [(n, k) for n, k, _, _ in SP_HOOKS]
        ref, ref_out = _retrieval(plain_mlp().to(torch.float64), ids, sites, False, loss,
                                  key_by_hook_kind=True, process_group=local_group())
        stored, _ = _retrieval(megatron_mlp(plain_mlp(), True, torch.float64), ids, sites, True,
                               loss, key_by_hook_kind=True)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref, **TOL)


# -- pipeline stages: the replicated edit and overlap on a stage with nothing to gather --------
@pure_edit
def pure_batch_center(module, tensor, ctx, modules):
    return batch_center(module, tensor, ctx, modules)


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_pipeline_stages_replicated_edit_and_overlap_equal_one_process():
    """Two hand-split stages, micro-batches, an edit declared pure (coupling the micro-batch's
    rows) on every hook kind, overlapped retrieval on: equal to the whole model in one process
    micro-batch by micro-batch."""
    x, _, x_mbs, t_mbs = inputs(4, 2)
    ref, ref_out, ref_grads = reference(x_mbs, t_mbs, True, editing_function=pure_batch_center)

    stage = two_stages(plain_net(), dist.get_rank())
    stored: dict = {}
    flex = FlexModel(stage, stored, pipeline_parallel_size=2, key_by_hook_kind=True,
                     overlap_retrieval=True)
    register_sites(flex, True, editing_function=pure_batch_center)
    link = StageLink(flex.runtime.mesh)
    out = hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref, **TOL)
    else:
        torch.testing.assert_close(out, ref_out, **TOL)
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL)
    flex.restore()


# -- one process: the short path equals the runtime path ---------------------------------------
def _one_process(runtime_path: bool, checkpoint: bool = False, **kwargs):
    """Hooks of every sort on a one-process FlexModel; ``runtime_path`` sends every call
    through LocalRuntime (the path before the short one). Returns (stored, output, grads)."""
    from torch.utils.checkpoint import checkpoint as ckpt

    x = _x(4)
    model = plain_net()
    if checkpoint:  # block 1 re-runs its forward in backward: edits again, stores nothing
        block = model.blocks[1]
        inner = block.forward
        block.forward = lambda h: ckpt(inner, h, use_reentrant=False)
    stored: dict = {}
    flex = FlexModel(model, None if "store" in kwargs else stored, key_by_hook_kind=True,
                     **kwargs)
    hooks = [HookFunction("blocks.0.up", editing_function=double_in_place),
             HookFunction("blocks.0.up", reduce="last_token"),
             HookFunction("blocks.0.act", reduce="mean_over_batch",
                          editing_function=batch_center),
             HookFunction("blocks.1.up", expected_shape=(None, 3, FF),
                          editing_function=batch_softmax_gate),
             HookFunction("blocks.1.act")]
    for hf in hooks:
        flex.register_forward_hook(hf)
    grad_hook = HookFunction("blocks.1.act", editing_function=batch_center)
    flex.register_full_backward_hook(grad_hook)
    param_hook = HookFunction("blocks.1.up.weight", editing_function=grad_center)
    flex.register_hook(param_hook)
    if runtime_path:
        for hf in hooks + [grad_hook, param_hook]:
            hf._local = False
    for _ in range(2):
        out = flex(x)
        out.pow(2).mean().backward()
    if "store" in kwargs:
        stored = kwargs["store"].to_dict()
    flex.restore()
    return stored, out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("options", [{}, {"keep": "last"}, {"store": "memory"},
                                     {"checkpoint": True}], ids=["all", "last", "store", "ckpt"])
def test_one_process_short_path_equals_the_runtime_path(options):
    if options.get("store"):
        got = _one_process(False, store=MemoryStore())
        want = _one_process(True, store=MemoryStore())
    else:
        got, want = _one_process(False, **options), _one_process(True, **options)
    for a, b in zip(got[1:], want[1:]):
        assert_grads_equal(a, b, rtol=0, atol=0) if isinstance(a, dict) else \
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    stored, ref = got[0], want[0]
    if options.get("keep") == "last":
        stored, ref = {k: [v] for k, v in stored.items()}, {k: [v] for k, v in ref.items()}
    assert_stored_equal(stored, ref, rtol=0, atol=0)
    if not options:  # the in-place edit stored the value before it; the next hook sees it x2
        whole, last = stored["blocks.0.up"][:2]
        assert torch.equal(last, (whole * 2)[:, -1:])


def test_one_process_short_path_checks_expected_shape():
    x = _x(2)  # sets the float64 default the model is built in
    flex = FlexModel(plain_net(), {})
    flex.register_forward_hook(HookFunction("blocks.0.up", expected_shape=(None, 3, FF + 1),
                                            editing_function=batch_center))
    with pytest.raises(ShapeMismatchError):
        flex(x)
    flex.restore()


# -- a partial sum in the hook (a DTensor with a Partial placement) ----------------------------
class _Finish(torch.nn.Module):
    """Turns a DTensor (any placement) into the whole plain tensor; identity otherwise."""

    def forward(self, y):
        return y.full_tensor() if hasattr(y, "full_tensor") else y


class _PartialNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        net = plain_net()
        self.up, self.act, self.down = net.blocks[0].up, torch.nn.GELU(), net.blocks[0].down
        self.finish = _Finish()

    def forward(self, x):
        return self.finish(self.down(self.act(self.up(x))))


@pytest.mark.parametrize("replicate", REPLICATE, ids=["leader", "replicated"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_partial_sum_output_edited_equals_one_process(replicate):
    """A row layer that leaves its output a partial sum over tp (``output_layouts=Partial()``):
    the hook sees a Partial DTensor. The replicated path keeps the whole edited tensor on tp
    rank 0 and zeros elsewhere; every rank's backward must still run the mirror all-reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    x = _x(2)
    hooks = [("down", "forward", hidden_softmax_gate, None)]
    ref_stored, ref_out, ref_grads = _reference_on(_PartialNet(), x, hooks)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    plan = {"up": ColwiseParallel(use_local_output=False),
            "down": RowwiseParallel(output_layouts=Partial(), use_local_output=False)}
    model = parallelize_module(_PartialNet(), mesh, plan)
    stored: dict = {}
    flex = FlexModel(model, stored, key_by_hook_kind=True)
    flex.register_forward_hook(HookFunction("down", editing_function=hidden_softmax_gate,
                                            replicate_edit=replicate))
    out = flex(x)
    # Every rank's backward must run the same collectives: the output requires grad on every
    # rank or on none (checked here, rather than left to hang in backward).
    flags = torch.tensor([float(out.requires_grad)])
    dist.all_reduce(flags)
    assert flags.item() == dist.get_world_size(), "the output requires grad on some ranks only"
    _sum_loss(2, 1)(out).backward()
    torch.testing.assert_close(out.detach(), ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for n, p in model.named_parameters()}
    assert_grads_equal(grads, ref_grads, **TOL)
    flex.restore()


# -- activation checkpointing: the forward re-run in backward edits again --------------------
def _checkpointed(model):
    """Block 1 re-runs its forward in backward (non-reentrant checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    block = model.blocks[1]
    inner = block.forward
    block.forward = lambda h: checkpoint(inner, h, use_reentrant=False)
    return model


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_ddp_checkpointed_block_edits_coupling_the_batch_equal_one_process():
    """The recomputed forward gathers and edits again inside backward (every rank at the same
    point), stores nothing a second time, and the gradients are one process's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    hooks = [("blocks.1.up", "forward", batch_center, None),
             ("blocks.1.act", "forward", batch_softmax_gate, None),
             ("blocks.1.act", "full_backward", batch_center, None)]
    sizes = (3, 1)
    x = _x(4)
    ref_stored, ref_out, ref_grads = _reference(x, hooks)
    for replicate in REPLICATE:
        model = DDP(_checkpointed(plain_net()))
        stored, out, flex = _hooked(model, _rows(x, sizes, dist.get_rank()), hooks, replicate,
                                    _sum_loss(4, 2), names=_names(model))
        torch.testing.assert_close(out, _rows(ref_out, sizes, dist.get_rank()), **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        assert_grads_equal({clean(n): p.grad for n, p in model.named_parameters()}, ref_grads,
                           **TOL)
        flex.restore()


def _unchanged(module, tensor, ctx, modules):
    """An edit that leaves the values as they are (so chained hooks all see the same ones)."""
    return tensor * 1.0


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_replica_leaders_edit_hooks_keep_their_rows_like_retrievals():
    """``store_on="replica_leaders"`` with an ``output_dict``: docs/store.md says each replica
    leader's dict holds its own rows. A hook that edits stores what a retrieval-only hook on
    the same tensor stores."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = (3, 1)
    x = _x(4)
    model = DDP(plain_net())
    stored: dict = {}
    flex = FlexModel(model, stored, store_on="replica_leaders")
    flex.register_forward_hook(HookFunction("module.blocks.0.up"))
    for replicate in REPLICATE:
        flex.register_forward_hook(HookFunction("module.blocks.0.up",
                                                editing_function=_unchanged,
                                                replicate_edit=replicate))
    flex(_rows(x, sizes, dist.get_rank()))
    flex.restore()
    plain, *edited = stored["module.blocks.0.up"]
    assert plain.shape[0] == sizes[dist.get_rank()] and len(edited) == 2
    for value in edited:
        assert torch.equal(plain, value), (plain.shape, value.shape)


# -- the model changes an edited tensor in place after the hook --------------------------------
def _triple_in_place(module, args, output):
    """A plain torch hook after FlexModel's: the model changes the hook's result in place (an
    in-place activation, a residual ``+=``)."""
    output.mul_(3.0)


@pytest.mark.parametrize("replicate", REPLICATE, ids=["leader", "replicated"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_the_model_may_change_an_edited_tensor_in_place(replicate):
    """What an edit hands back (each rank's scattered or kept piece) is the model's to change
    in place, as in one process: it must not be a view a custom Function returned."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    hooks = [("blocks.0.up", "forward", hidden_softmax_gate, None),
             ("blocks.1.act", "forward", hidden_softmax_gate, None)]
    x = _x(2)

    def run(model, **kwargs):
        handles = [model.blocks[0].up, model.blocks[1].act]
        stored: dict = {}
        flex = FlexModel(model, stored, **kwargs)
        for name, kind, fn, _ in hooks:
            getattr(flex, _REGISTER[kind])(HookFunction(name, editing_function=fn,
                                                        replicate_edit=replicate))
        removers = [m.register_forward_hook(_triple_in_place) for m in handles]
        out = flex(x)
        _sum_loss(2, 1)(out).backward()
        for r in removers:
            r.remove()
        flex.restore()
        return stored, out.detach()

    ref_model = plain_net()
    ref_stored, ref_out = run(ref_model, process_group=local_group())
    model = fairscale_net(plain_net())
    stored, out = run(model, tensor_parallel_size=2)
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    assert_grads_equal(_fairscale_grads(model, fs.get_model_parallel_group()),
                       plain_grads(ref_model), **TOL)


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_overlap_with_uneven_dtensor_shards_and_expected_shape_equals_one_process():
    """DTensor TP with an odd column width (shards of 8 and 7: the padded gather), DTensors in
    the hooks, an ``expected_shape`` on an overlapped retrieval; then a mismatching one raises
    on every rank and leaves nothing in flight for the next forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    ff = FF - 1
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    x = _x(2)

    def run(model, expected, **kwargs):
        stored: dict = {}
        flex = FlexModel(model, stored, key_by_hook_kind=True, **kwargs)
        flex.register_forward_hook(HookFunction("blocks.0.up", expected_shape=expected))
        flex.register_forward_hook(HookFunction("blocks.1.act"))
        flex.register_full_backward_hook(HookFunction("blocks.1.act"))
        out = flex(x)
        out = out.full_tensor() if isinstance(out, DTensor) else out
        _sum_loss(2, 1)(out).backward()
        return stored, out.detach(), flex

    ref, ref_out, flex = run(plain_net(ff=ff), (2, 3, ff), process_group=local_group())
    flex.restore()
    model = parallelize_module(plain_net(ff=ff), mesh, dtensor_plan(False))
    stored, out, flex = run(model, (2, 3, ff), overlap_retrieval=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref, **TOL)
    flex.restore()

    model = parallelize_module(plain_net(ff=ff), mesh, dtensor_plan(False))
    with pytest.raises(ShapeMismatchError):
        run(model, (2, 3, ff + 1), overlap_retrieval=True)
    stored, out, flex = run(parallelize_module(plain_net(ff=ff), mesh, dtensor_plan(False)),
                            (2, 3, ff), overlap_retrieval=True)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref, **TOL)
    flex.restore()


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_an_overlapped_retrieval_is_stored_when_its_hook_is_removed_during_the_forward():
    """An overlapped retrieval stores its value at the end of the forward. The hook fired while
    it was registered, so its value is stored even if the hook is removed before the forward
    ends (by a later module, on every rank): the value is one process's, and the removed hook
    stores nothing in the next forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    x = _x(2)

    def run(model, **kwargs):
        stored: dict = {}
        flex = FlexModel(model, stored, **kwargs)
        first = HookFunction("blocks.0.up")
        flex.register_forward_hook(first)
        flex.register_forward_hook(HookFunction("blocks.1.act"))
        later = dict(flex.module.named_modules())["blocks.1.up"]
        handle = later.register_forward_pre_hook(lambda *_: flex.remove_hook_function(first))
        out = flex(x)
        handle.remove()
        out = out.full_tensor() if isinstance(out, DTensor) else out
        return stored, out.detach(), flex

    ref, ref_out, flex = run(plain_net(), process_group=local_group())
    flex.restore()
    assert sorted(ref) == ["blocks.0.up", "blocks.1.act"]
    stored, out, flex = run(parallelize_module(plain_net(), mesh, dtensor_plan(False)),
                            overlap_retrieval=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref, **TOL)
    stored.clear()
    flex(x)  # the removed hook is gone: only the other one stores
    if dist.get_rank() == 0:
        assert sorted(stored) == ["blocks.1.act"]
    flex.restore()


@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_dp_x_tp_replica_leaders_disk_store_with_edits_equals_one_process():
    """fairscale TP=2 inside DDP (dp=2), uneven replicas, ``store_on="replica_leaders"`` into a
    DiskStore: editing hooks on both paths write each replica's rows from its leader; read
    back, the store holds one process's whole tensors."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    fs.initialize_model_parallel(2)
    hooks = [("blocks.0.up", "forward", batch_center, None),
             ("blocks.1.act", "full_backward", batch_center, None),
             ("blocks.1.up.weight", "tensor", grad_center, None)]
    sizes = (3, 1)
    x = _x(4)
    ref_stored, _, _ = _reference(x, hooks)
    dp_rank = fs.get_data_parallel_rank()
    for replicate in REPLICATE:
        directory = _shared_dir()
        store = DiskStore(directory)
        model = DDP(fairscale_net(plain_net()), process_group=fs.get_data_parallel_group())
        flex = FlexModel(model, None, store=store, store_on="replica_leaders",
                         key_by_hook_kind=True, tensor_parallel_size=2, data_parallel_size=2)
        for name, kind, fn, _ in hooks:
            getattr(flex, _REGISTER[kind])(HookFunction(_names(model)[name], editing_function=fn,
                                                        replicate_edit=replicate))
        _sum_loss(4, 2)(flex(_rows(x, sizes, dp_rank))).backward()
        flex.restore()
        store.close()
        dist.barrier()
        if dist.get_rank() == 0:
            reader = DiskStore(directory)
            got = {n: [reader.read(n, step) for step in reader.steps(n)] for n in reader.names()}
            assert_stored_equal(_cleaned(got), ref_stored, **TOL)
        _done_with(directory)


def _short_group(seconds: float = 10.0) -> dist.ProcessGroup:
    """A group whose collectives give up after ``seconds`` (a hung peer fails the test fast)."""
    return dist.new_group(list(range(dist.get_world_size())),
                          timeout=datetime.timedelta(seconds=seconds))


def _times_two(module, tensor, ctx, modules):
    return tensor * 2


@pytest.mark.parametrize("replicate", [False, True], ids=["leader", "replicated"])
@distributed(world_size=2, timeout_s=60)
def test_ddp_edit_of_replicas_with_different_sequence_lengths_raises_on_every_rank(replicate):
    """Dynamic padding (each DDP rank pads its batch to its own longest sequence) with an
    editing hook and no expected_shape: the gather pads only the batch dim, so gloo receives
    pieces of another size. Found: the rank receiving the larger piece is aborted by gloo
    (SIGABRT), and on the leader path the leader with the longer sequence goes on with
    uninitialised memory in the whole tensor (stored and edited). Retrieval-only hooks raise
    LayoutError on every rank here (collect_pieces); edits must too, and the next forward
    must work."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    group = _short_group()
    stored = {}
    flex = FlexModel(DDP(plain_net(), process_group=group), stored, process_group=group)
    flex.register_forward_hook(HookFunction("module.blocks.0.up", editing_function=_times_two,
                                            replicate_edit=replicate))
    with torch.no_grad():
        with pytest.raises(LayoutError):
            flex(torch.randn(2, 4 - rank, H))  # rank 0: 4 positions, rank 1: 3
        x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(2))
        out = flex(x[2 * rank:2 * rank + 2])
    flex.restore()
    ref_stored = {}
    with FlexModel(plain_net(), ref_stored, process_group=local_group()) as ref:
        ref.register_forward_hook(HookFunction("blocks.0.up", editing_function=_times_two))
        with torch.no_grad():
            ref_out = ref(x)
    torch.testing.assert_close(out, ref_out[2 * rank:2 * rank + 2], rtol=1e-9, atol=1e-12)
    if rank == 0:  # the failed call stored nothing
        assert len(stored["module.blocks.0.up"]) == 1
        torch.testing.assert_close(stored["module.blocks.0.up"][0],
                                   ref_stored["blocks.0.up"][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("replicate", [False, True], ids=["leader", "replicated"])
@distributed(world_size=4, timeout_s=60)
def test_dp_x_tp_edit_of_replicas_with_different_sequence_lengths_raises_on_every_rank(
        replicate):
    """fairscale TP=2 inside DDP over dp=2, each replica padded to its own sequence length:
    on the leader path only the tp-rank-0 ranks take the dp step of the gather, so the check
    that the replicas' pieces fit is made by every rank before the walk (a check inside the
    step would raise on those ranks only, and the others would wait for the edit's outcome).
    Every rank raises LayoutError at that call; the next forward equals one process."""
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    fs.initialize_model_parallel(2)
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    dp_rank = fs.get_data_parallel_rank()
    model = DDP(fairscale_net(plain_net()), process_group=fs.get_data_parallel_group())
    flex = FlexModel(model, {}, tensor_parallel_size=2, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("module.blocks.0.up", editing_function=_times_two,
                                            replicate_edit=replicate))
    start = time.monotonic()
    with torch.no_grad():
        with pytest.raises(LayoutError, match="cannot form one tensor"):
            flex(torch.randn(2, 4 - dp_rank, H))
    assert time.monotonic() - start < 30
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = flex(x[2 * dp_rank:2 * dp_rank + 2])
    flex.restore()
    with FlexModel(plain_net(), {}, process_group=local_group()) as ref:
        ref.register_forward_hook(HookFunction("blocks.0.up", editing_function=_times_two))
        with torch.no_grad():
            want = ref(x)[2 * dp_rank:2 * dp_rank + 2]
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
