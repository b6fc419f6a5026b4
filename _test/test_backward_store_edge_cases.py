"""Second reader: gradient hooks and stores at sites and in sequences the equivalence matrix and
the adversarial suites do not reach, each compared with one process running the same weights
on the same inputs (float64, tight tolerances):

* Megatron-core TP=2 with and without sequence parallelism: the gradient of the column layer's
  input and of the embedding's output (sequence-sharded under SP), the row layer's input
  gradient, and parameter hooks on the vocab-sharded embedding and the column bias, with edits
  coupling every shard (retrieval only, leader edit, replicated edit);
* DTensor TP: full-backward hooks on a rowwise layer and on a colwise layer whose input gradient
  is a partial sum, with coupling edits, ``use_local_output`` both ways;
* ``reduce=`` on gradient hooks (full-backward, full-backward-pre, parameter) under DDP with a
  replica of zero rows and under fairscale DP x TP with uneven replicas, with
  ``store_on`` "rank0" (MemoryStore), "replica_leaders" (DiskStore) and "all" (``keep="last"``);
* several passes in a row where one forward, or one backward, raises mid-way: what the stores
  hold afterwards equals one process running the same sequence.
"""

from __future__ import annotations

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
from rank_pool import distributed
from test_equivalence_tp import _fairscale_grads
from test_store_distributed import _done_with, _shared_dir

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.store import DiskStore, MemoryStore

TOL = dict(rtol=1e-9, atol=1e-12)  # float64: only summation order differs
TIMEOUT_S = 40
REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
            "full_backward": "register_full_backward_hook",
            "full_backward_pre": "register_full_backward_pre_hook", "tensor": "register_hook"}


def _read_all(directory) -> dict:
    """Every value a DiskStore directory holds, by name, in step order."""
    reader = DiskStore(directory)
    return {n: [reader.read(n, s) for s in reader.steps(n)] for n in reader.names()}


def _x(batch: int, seed: int = 1) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(batch, 3, H, generator=torch.Generator().manual_seed(seed))


def _rows(x: torch.Tensor, sizes: tuple[int, ...], rank: int, dim: int = 0) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def _sum_loss(total_rows: int, dp: int):
    """A loss whose data-parallel average equals one process's mean over the global batch,
    also when the replicas' batches differ in size (or one is empty)."""
    return lambda y: y.pow(2).sum() * (dp / total_rows)


def _names(model) -> dict[str, str]:
    names = {}
    for n, _ in list(model.named_modules()) + list(model.named_parameters()):
        names[clean(n)] = n
    return names


# -- editing functions coupling every entry of a gradient ---------------------------------------
def grad_center(module, g, ctx, modules):
    """Every entry minus half the mean of all entries (couples every shard)."""
    return g - g.mean() * 0.5


def grad_unit(module, g, ctx, modules):
    """The gradient scaled to unit norm, plus a constant: neither linear nor homogeneous."""
    return g / (g.norm() + 1e-3) + 0.01


def seq_cumsum(module, g, ctx, modules):
    """Each position of dim 0 (Megatron's sequence) depends on every earlier one."""
    return g.cumsum(dim=0) * 0.5


def hidden_softmax(module, g, ctx, modules):
    """A softmax over the last dim (split over tp after a column layer)."""
    return g * torch.softmax(g * 50.0, dim=-1) * 3.0


def _hooked(model, x, hooks, edit, loss, names=None, steps=1, **kwargs):
    """FlexModel with ``hooks`` = [(name, kind, fn)]; ``edit``: False (retrieve only), True
    (leader) or "replicated". Returns (stored, last output, flex)."""
    stored: dict = {}
    flex = FlexModel(model, stored, key_by_hook_kind=True, **kwargs)
    names = names or {}
    for name, kind, fn in hooks:
        options = {} if not edit else dict(editing_function=fn,
                                           replicate_edit=edit == "replicated")
        getattr(flex, REGISTER[kind])(HookFunction(names.get(name, name), **options))
    out = None
    for _ in range(steps):
        out = flex(x)
        loss(out).backward()
    return clean_keys(stored), out.detach(), flex


# -- Megatron-core TP / SP: gradient sites the existing matrices leave out -----------------------
MEGATRON_GRAD_HOOKS = [
    ("up", "full_backward", seq_cumsum),            # grad of the column input (SP: seq-sharded)
    ("embed", "full_backward_pre", grad_unit),      # grad of the embedding output
    ("down", "full_backward", hidden_softmax),      # grad of the row input: tp-sharded hidden
    ("act", "full_backward_pre", grad_center),      # grad of the GELU output: tp-sharded
    ("embed.weight", "tensor", grad_unit),          # vocab-sharded parameter gradient
    ("up.bias", "tensor", grad_center),             # column bias: sharded on dim 0
    ("down.weight", "tensor", grad_unit),           # row weight: sharded on dim 1
    ("down.bias", "tensor", grad_unit),             # SP: a partial sum over tp
]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_megatron_gradient_sites_with_coupling_edits_equal_one_process(sequence_parallel):
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp, token_ids
    from test_megatron_layers import _whole_grads, all_gather_list

    ids = token_ids()
    loss = _sum_loss(1, 1)
    with megatron_parallel(2):
        for edit in (False, True, "replicated"):
            ref_model = plain_mlp().to(torch.float64)
            ref_stored, ref_out, ref_flex = _hooked(ref_model, ids, MEGATRON_GRAD_HOOKS, edit,
                                                    loss, process_group=local_group(),
                                                    batch_dim=1)
            ref_flex.restore()
            ref_grads = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}
            model = megatron_mlp(plain_mlp(), sequence_parallel, torch.float64)
            stored, out, flex = _hooked(model, ids, MEGATRON_GRAD_HOOKS, edit, loss)
            if sequence_parallel:
                out = torch.cat(all_gather_list(out), dim=0)
            case = f"sp={sequence_parallel} edit={edit}"
            torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m, c=case: f"{c}: {m}")
            if dist.get_rank() == 0:
                assert_stored_equal(stored, ref_stored, **TOL)
            else:
                assert stored == {}
            assert_grads_equal(_whole_grads(model), ref_grads, **TOL)
            flex.restore()


# -- DTensor TP: gradient sites on the rowwise layer and a partial-sum input gradient -------------
DTENSOR_GRAD_HOOKS = [
    ("blocks.1.down", "full_backward", hidden_softmax),   # grad of the rowwise input
    ("blocks.1.down", "full_backward_pre", grad_unit),    # grad of the rowwise output
    ("blocks.1.up", "full_backward", grad_center),        # grad of the colwise input
    ("blocks.1", "full_backward", grad_unit),             # grad of the block's input
    ("blocks.1.down.weight", "tensor", grad_unit),        # Shard(1)
    ("blocks.1.up.bias", "tensor", grad_center),          # Shard(0)
    ("blocks.0.down.bias", "tensor", grad_unit),          # replicated
]


@pytest.mark.parametrize("use_local_output", [True, False], ids=["local", "dtensor"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_dtensor_tp_gradient_sites_with_coupling_edits_equal_one_process(use_local_output):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    x = _x(4)
    loss = _sum_loss(4, 1)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    for edit in (False, True, "replicated"):
        ref = plain_net()
        ref_stored, ref_out, ref_flex = _hooked(ref, x, DTENSOR_GRAD_HOOKS, edit, loss,
                                                process_group=local_group())
        ref_flex.restore()
        model = parallelize_module(plain_net(), mesh, dtensor_plan(use_local_output))
        stored, out, flex = _hooked(model, x, DTENSOR_GRAD_HOOKS, edit, loss)
        out = out.full_tensor() if isinstance(out, DTensor) else out
        torch.testing.assert_close(out, ref_out, **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        grads = {clean(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for n, p in model.named_parameters()}
        assert_grads_equal(grads, plain_grads(ref), **TOL)
        flex.restore()


# -- reduce= on gradient hooks under DDP, a replica with zero rows --------------------------------
# (name, kind, reduce): statistics of activation gradients and of a parameter gradient
REDUCE_HOOKS = [
    ("blocks.0.act", "forward", "mean_over_batch"),
    ("blocks.1.act", "full_backward", "mean_over_batch"),
    ("blocks.1.up", "full_backward_pre", "last_token"),
    ("blocks.1.down", "full_backward_pre", None),
    ("blocks.1.up.weight", "tensor", "mean_over_batch"),
    ("blocks.0.down.bias", "tensor", None),
]


def _reduce_run(model, xs, loss, names=None, store=None, **kwargs):
    """One forward + backward per input of ``xs``; returns the output_dict (None with a
    store) and the FlexModel (closed)."""
    stored = None if store is not None else {}
    flex = FlexModel(model, stored, store=store, key_by_hook_kind=True, **kwargs)
    names = names or {}
    for name, kind, reduce in REDUCE_HOOKS:
        getattr(flex, REGISTER[kind])(HookFunction(names.get(name, name), reduce=reduce))
    for x in xs:
        loss(x.shape[0])(flex(x)).backward()
    flex.close()
    return stored


def _reduce_reference(xs, total):
    """One process on the whole batch, the mean over it as the loss (what the DDP average of
    the replicas' :func:`_sum_loss` equals); returns (stored, whole parameter gradients)."""
    model = plain_net()
    stored = _reduce_run(model, xs, lambda n: _sum_loss(total, 1), process_group=local_group())
    return stored, plain_grads(model)


@pytest.mark.parametrize("store_on", ["rank0", "replica_leaders", "all"])
@pytest.mark.parametrize("sizes", [(3, 0), (0, 3)], ids=["empty_second", "empty_first"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_ddp_reductions_of_gradients_with_an_empty_replica_equal_one_process(store_on, sizes):
    from torch.nn.parallel import DistributedDataParallel as DDP

    xs = [_x(3, seed) for seed in (1, 2)]
    want, want_grads = _reduce_reference(xs, sum(sizes))
    r = dist.get_rank()
    model = DDP(plain_net())
    mine = [_rows(x, sizes, r) for x in xs]
    loss = lambda n: _sum_loss(sum(sizes), 2)  # noqa: E731
    directory = None
    if store_on == "rank0":
        store = MemoryStore()
        got = _reduce_run(model, mine, loss, _names(model), store=store)
        got = store.to_dict() if r == 0 else None
    elif store_on == "replica_leaders":
        directory = _shared_dir()
        with DiskStore(directory) as store:
            _reduce_run(model, mine, loss, _names(model), store=store,
                        store_on="replica_leaders")
        dist.barrier()
        got = _read_all(directory)
    else:
        got = _reduce_run(model, mine, loss, _names(model), store_on="all")
    if got is not None:
        assert_stored_equal(clean_keys(got), want, **TOL)
    if directory is not None:
        _done_with(directory)
    assert_grads_equal(plain_grads(model), want_grads, **TOL)


# -- reduce= on gradient hooks under fairscale DP x TP, uneven replicas -------------------------
@pytest.mark.parametrize("store_on", ["replica_leaders", "all"])
@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_dp_x_tp_reductions_of_gradients_with_uneven_replicas_equal_one_process(store_on):
    from fairscale.nn.model_parallel import initialize as fs
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = (1, 3)
    xs = [_x(4, seed) for seed in (1, 2)]
    want, want_grads = _reduce_reference(xs, 4)
    fs.initialize_model_parallel(2)
    dp_rank = fs.get_data_parallel_rank()
    net = fairscale_net(plain_net())
    model = DDP(net, process_group=fs.get_data_parallel_group())
    mine = [_rows(x, sizes, dp_rank) for x in xs]
    loss = lambda n: _sum_loss(4, 2)  # noqa: E731
    if store_on == "replica_leaders":
        directory = _shared_dir()
        with DiskStore(directory) as store:
            _reduce_run(model, mine, loss, _names(model), store=store,
                        store_on="replica_leaders")
        dist.barrier()
        got = _read_all(directory)
        assert_stored_equal(clean_keys(got), want, **TOL)
        _done_with(directory)
    else:
        got = _reduce_run(model, mine, loss, _names(model), store_on="all", keep="last")
        assert_stored_equal({k: [v] for k, v in clean_keys(got).items()},
                            {k: [v[-1]] for k, v in want.items()}, **TOL)
    assert_grads_equal(_fairscale_grads(net, fs.get_model_parallel_group()), want_grads, **TOL)


# -- several passes in a row, one raising mid-way ----------------------------------------------
FAIL = {"forward": False, "backward": False}  # set alike on every rank and in the reference


class Boom(RuntimeError):
    pass


def fail_in_forward(module, t, ctx, modules):
    if FAIL["forward"]:
        raise Boom("forward")
    return t * 1.5


def fail_in_backward(module, g, ctx, modules):
    if FAIL["backward"]:
        raise Boom("backward")
    return g - g.mean() * 0.5


# (name, kind, editing function, reduce)
RAISING_HOOKS = [
    ("blocks.0.act", "forward", None, None),
    ("blocks.1.up", "forward", fail_in_forward, None),      # stores, then raises
    ("blocks.1", "forward", None, "mean_over_batch"),
    ("blocks.1.act", "full_backward", None, None),
    ("blocks.1.up", "full_backward_pre", fail_in_backward, "last_token"),  # stores, then raises
    ("blocks.0.up", "full_backward_pre", None, None),
    ("blocks.0.up.weight", "tensor", None, None),
]


def _raising_passes(model, xs, where, loss, names=None, store=None, **kwargs):
    """Three forward + backward passes; the second raises in ``where``. Returns the
    output_dict (None with a store) and the parameter gradients of the last pass."""
    stored = None if store is not None else {}
    flex = FlexModel(model, stored, store=store, key_by_hook_kind=True, **kwargs)
    names = names or {}
    for name, kind, fn, reduce in RAISING_HOOKS:
        getattr(flex, REGISTER[kind])(HookFunction(names.get(name, name), editing_function=fn,
                                                   reduce=reduce))
    try:
        for i, x in enumerate(xs):
            FAIL[where] = i == 1
            if i == 1:
                with pytest.raises(Exception) as info:
                    loss(flex(x)).backward()
                assert isinstance(info.value, (Boom, RemoteEditError)), info.value
                model.zero_grad()
            else:
                loss(flex(x)).backward()
    finally:
        FAIL[where] = False
    flex.close()
    return stored, {clean(n): p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["memory_rank0", "disk_replica_leaders", "all"])
@pytest.mark.parametrize("where", ["forward", "backward"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_a_pass_raising_midway_then_good_passes_equal_one_process(where, how):
    sizes = (3, 1)
    xs = [_x(4, seed) for seed in (1, 2, 3)]
    want, want_grads = _raising_passes(plain_net(), xs, where, _sum_loss(4, 1),
                                       process_group=local_group())
    r = dist.get_rank()
    mine = [_rows(x, sizes, r) for x in xs]
    model = plain_net()  # no DDP: a backward that raises would leave its reducer mid-way
    loss = _sum_loss(4, 2)
    directory = None
    if how == "memory_rank0":
        store = MemoryStore()
        _, grads = _raising_passes(model, mine, where, loss, store=store, data_parallel_size=2)
        got = store.to_dict() if r == 0 else None
    elif how == "disk_replica_leaders":
        directory = _shared_dir()
        with DiskStore(directory) as store:
            _, grads = _raising_passes(model, mine, where, loss, store=store,
                                       store_on="replica_leaders", data_parallel_size=2)
        dist.barrier()
        got = _read_all(directory)
    else:
        got, grads = _raising_passes(model, mine, where, loss, store_on="all",
                                     data_parallel_size=2)
    if got is not None:
        assert_stored_equal(got, want, **TOL)
    if directory is not None:
        _done_with(directory)
    for g in grads.values():  # without DDP: average the replicas' gradients by hand
        dist.all_reduce(g)
        g /= 2
    assert_grads_equal(grads, want_grads, **TOL)


# -- Megatron-core TP=2 x DP=2 (batch dim 1), uneven replicas, gradient hooks ----------------------
MEGATRON_REDUCE_HOOKS = [
    ("up", "full_backward", "mean_over_batch"),
    ("embed", "full_backward_pre", "last_token"),
    ("act", "full_backward_pre", None),
    ("down", "full_backward", "mean_over_batch"),
    ("down.bias", "tensor", None),
    ("embed.weight", "tensor", None),
]


def _megatron_reduce_run(model, ids, loss, store=None, **kwargs):
    stored = None if store is not None else {}
    flex = FlexModel(model, stored, store=store, key_by_hook_kind=True, **kwargs)
    for name, kind, reduce in MEGATRON_REDUCE_HOOKS:
        getattr(flex, REGISTER[kind])(HookFunction(name, reduce=reduce))
    for step in range(2):
        loss(flex(ids * (step + 1) % 16)).backward()
    flex.close()
    return stored


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@distributed(world_size=4, timeout_s=TIMEOUT_S)
def test_megatron_dp_x_tp_gradient_hooks_with_uneven_replicas_equal_one_process(
        sequence_parallel):
    from megatron.core import parallel_state
    from megatron_cases import S, V, megatron_mlp, megatron_parallel, plain_mlp
    from test_megatron_layers import _whole_grads

    sizes = (2, 1)
    ids = torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(5))
    with megatron_parallel(2):
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_group = parallel_state.get_data_parallel_group()
        mine = _rows(ids, sizes, dp_rank)

        def averaged(model):
            grads = _whole_grads(model)
            for g in grads.values():  # no DDP wrapper: the replicas' average by hand
                dist.all_reduce(g, group=dp_group)
                g /= 2
            return grads

        for edit in (False, True):
            ref_model = plain_mlp().to(torch.float64)
            ref_stored, _, ref_flex = _hooked(ref_model, ids, MEGATRON_GRAD_HOOKS, edit,
                                              _sum_loss(3, 1), process_group=local_group(),
                                              batch_dim=1)
            ref_flex.restore()
            ref_grads = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}
            model = megatron_mlp(plain_mlp(), sequence_parallel, torch.float64)
            stored, _, flex = _hooked(model, mine, MEGATRON_GRAD_HOOKS, edit, _sum_loss(3, 2))
            assert flex.runtime.mesh.sizes == {"dp": 2, "tp": 2, "pp": 1}
            if dist.get_rank() == 0:
                assert_stored_equal(stored, ref_stored, **TOL)
            assert_grads_equal(averaged(model), ref_grads, **TOL)
            flex.restore()

        want = _megatron_reduce_run(plain_mlp().to(torch.float64), ids, _sum_loss(3, 1),
                                    process_group=local_group(), batch_dim=1)
        directory = _shared_dir()
        with DiskStore(directory) as store:
            _megatron_reduce_run(megatron_mlp(plain_mlp(), sequence_parallel, torch.float64),
                                 mine, _sum_loss(3, 2), store=store, store_on="replica_leaders")
        dist.barrier()
        got = _read_all(directory)
        assert_stored_equal(got, want, **TOL)
        _done_with(directory)


# -- DTensor sequence parallelism (SequenceParallel norm, Shard(1) between regions) ---------------
class NormMLP(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = torch.nn.LayerNorm(H)
        self.up, self.act, self.down = torch.nn.Linear(H, FF), torch.nn.GELU(), \
            torch.nn.Linear(FF, H)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / 2)

    def forward(self, x):
        return self.down(self.act(self.up(self.norm(x))))


def seq1_cumsum(module, g, ctx, modules):
    """Each position of dim 1 (the sequence of ``[b, s, h]``) depends on every earlier one."""
    return g.cumsum(dim=1) * 0.5


# (name, kind, editing function, expected_shape)
DTENSOR_SP_HOOKS = [
    ("norm", "forward", None, None),
    ("norm", "full_backward_pre", grad_unit, None),
    ("up", "full_backward", grad_center, None),
    ("act", "full_backward_pre", hidden_softmax, None),
    ("down", "full_backward_pre", seq1_cumsum, (2, 4, H)),  # refused without expected_shape
    ("norm.weight", "tensor", grad_unit, None),
    ("norm.bias", "tensor", grad_center, None),
    ("up.weight", "tensor", grad_center, None),
]


def _hooked_shapes(model, x, hooks, edit, **kwargs):
    stored: dict = {}
    flex = FlexModel(model, stored, key_by_hook_kind=True, **kwargs)
    for name, kind, fn, expected in hooks:
        options = {} if not edit else dict(editing_function=fn)
        getattr(flex, REGISTER[kind])(HookFunction(name, expected_shape=expected, **options))
    out = flex(x)
    local = out.to_local() if hasattr(out, "to_local") else out
    local.pow(2).sum().backward()
    flex.restore()
    return clean_keys(stored), local.detach()


@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_dtensor_sequence_parallel_gradient_hooks_equal_one_process():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    torch.set_default_dtype(torch.float64)
    x = torch.randn(2, 4, H, generator=torch.Generator().manual_seed(3))
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    plan = {"norm": SequenceParallel(),
            "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1))}
    r = dist.get_rank()
    for edit in (False, True):
        ref = NormMLP()
        ref_stored, ref_out = _hooked_shapes(ref, x, DTENSOR_SP_HOOKS, edit,
                                             process_group=local_group())
        model = parallelize_module(NormMLP(), mesh, plan)
        stored, out = _hooked_shapes(model, x[:, 2 * r:2 * r + 2], DTENSOR_SP_HOOKS, edit)
        torch.testing.assert_close(torch.cat(_all_gather_list(out), dim=1), ref_out, **TOL)
        if r == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        grads = {clean(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for n, p in model.named_parameters()}
        assert_grads_equal(grads, plain_grads(ref), **TOL)


def _all_gather_list(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


# -- edits and reductions on the same hooks, replica leaders, an empty replica ---------------------
def batch_center(module, t, ctx, modules):
    return t - t.mean(dim=0, keepdim=True) * 0.5


EDIT_REDUCE_HOOKS = [
    ("blocks.0.act", "forward", batch_center, "mean_over_batch"),
    ("blocks.1.down", "forward_pre", batch_center, "last_token"),
    ("blocks.1.act", "full_backward", grad_unit, "mean_over_batch"),
    ("blocks.1.up", "full_backward_pre", batch_center, "last_token"),
    ("blocks.1.down", "full_backward_pre", grad_center, None),
]


def _edit_reduce_run(model, xs, loss, replicate, names=None, store=None, **kwargs):
    stored = None if store is not None else {}
    flex = FlexModel(model, stored, store=store, key_by_hook_kind=True, **kwargs)
    names = names or {}
    for name, kind, fn, reduce in EDIT_REDUCE_HOOKS:
        getattr(flex, REGISTER[kind])(HookFunction(names.get(name, name), editing_function=fn,
                                                   replicate_edit=replicate, reduce=reduce))
    for x in xs:
        loss(flex(x)).backward()
    flex.close()
    return stored


@pytest.mark.parametrize("replicate", [False, True], ids=["leader", "replicated"])
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_ddp_edits_with_reductions_under_replica_leaders_equal_one_process(replicate):
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = (0, 3)
    xs = [_x(3, seed) for seed in (1, 2)]
    ref = plain_net()
    want = _edit_reduce_run(ref, xs, _sum_loss(3, 1), False, process_group=local_group())
    r = dist.get_rank()
    model = DDP(plain_net())
    directory = _shared_dir()
    with DiskStore(directory) as store:
        _edit_reduce_run(model, [_rows(x, sizes, r) for x in xs], _sum_loss(3, 2), replicate,
                         _names(model), store=store, store_on="replica_leaders")
    dist.barrier()
    got = _read_all(directory)
    assert_stored_equal(clean_keys(got), want, **TOL)
    _done_with(directory)
    assert_grads_equal(plain_grads(model), plain_grads(ref), **TOL)


# -- a DiskStore reopened by a run with other replica sizes and another store_on -----------------
@distributed(world_size=2, timeout_s=TIMEOUT_S)
def test_disk_store_reopened_across_store_on_and_empty_replicas_equals_one_process():
    from torch.nn.parallel import DistributedDataParallel as DDP

    xs = [_x(3, seed) for seed in (1, 2, 3, 4)]
    ref = plain_net()
    want = _reduce_run(ref, xs, lambda n: _sum_loss(3, 1), process_group=local_group())
    r = dist.get_rank()
    model = DDP(plain_net())
    directory = _shared_dir()
    for sizes, store_on, part in (((0, 3), "replica_leaders", xs[:2]),
                                  ((2, 1), "rank0", xs[2:3]),
                                  ((3, 0), "replica_leaders", xs[3:])):
        with DiskStore(directory) as store:
            _reduce_run(model, [_rows(x, sizes, r) for x in part],
                        lambda n: _sum_loss(3, 2), _names(model), store=store,
                        store_on=store_on)
        dist.barrier()
    got = _read_all(directory)
    assert_stored_equal(clean_keys(got), want, **TOL)
    _done_with(directory)
    assert_grads_equal(plain_grads(model), plain_grads(ref), **TOL)
