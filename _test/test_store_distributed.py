"""Stores under DP x TP (4 ranks), FSDP2 (2) and a hand-split pipeline (2): what a DiskStore
gives back is bit-identical to what the in-memory ``output_dict`` of the same run holds, with
``store_on="rank0"`` and with ``"replica_leaders"`` (each replica's leader writes its rows)."""

import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    _REGISTER,
    PARAM_SITES,
    SITES,
    actual_names,
    dtensor_plan,
    local_group,
    plain_net,
)
from pipeline_cases import hand_split_step, inputs, register_sites, two_stages
from rank_pool import distributed

from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.pipeline import StageLink
from flex_surgery.store import DiskStore, MemoryStore, StoreError

BATCH = 4
FORWARD_SITES = [(n, k) for n, k in SITES if k == "forward"]


def _shared_dir() -> str:
    """One fresh directory every rank writes to (made by rank 0)."""
    box = [tempfile.mkdtemp(prefix="flex_store_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _done_with(directory: str) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)


def _x():
    torch.set_default_dtype(torch.float64)  # reset by the rank pool after each body
    return torch.randn(BATCH, 3, 8, generator=torch.Generator().manual_seed(1))


def _run(model, x, *, store=None, store_on="rank0", sites=SITES, param_sites=PARAM_SITES,
         reduce=None, process_group=None, backward=True):
    """Two forward/backward steps with hooks at ``sites``; returns the output_dict (or None)."""
    stored = {} if store is None else None
    flex = FlexModel(model, stored, store=store, store_on=store_on, process_group=process_group)
    names = actual_names(model)
    for name, kind in sites:
        getattr(flex, _REGISTER[kind])(HookFunction(names[name], reduce=reduce))
    for name in param_sites:
        flex.register_hook(HookFunction(names[name]))
    for _ in range(2):
        if backward:
            flex(x).pow(2).mean().backward()
        else:
            with torch.no_grad():
                flex(x)
    flex.close()
    if store is not None:
        store.close()
    return stored


def _assert_store_equals(directory: str, stored: dict) -> set:
    """On rank 0: every tensor of ``stored`` read back bit-identical; returns the writers."""
    reader = DiskStore(directory)
    assert reader.names() == sorted(stored)
    for key, tensors in stored.items():
        assert reader.steps(key) == list(range(len(tensors))), key
        for step, tensor in enumerate(tensors):
            got = reader.read(key, step)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (key, step)
    return {e["writer"] for e in reader.index()}


def _fsdp2_x_tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(plain_net(), mesh["tp"], dtensor_plan(True))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh.get_local_rank("dp"), mesh.get_local_rank("tp")


def _fsdp2():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = plain_net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, dist.get_rank(), 0


@distributed(world_size=4)
def test_disk_store_equals_the_in_memory_store_under_fsdp2_x_tp():
    _check_layout(_fsdp2_x_tp)


@distributed(world_size=2)
def test_disk_store_equals_the_in_memory_store_under_fsdp2():
    _check_layout(_fsdp2)


def _check_layout(make):
    x = _x()
    model, dp_rank, tp_rank = make()
    local_x = x.chunk(2)[dp_rank]
    ref = _run(model, local_x)
    for store_on in ("rank0", "replica_leaders"):
        directory = _shared_dir()
        model, _, _ = make()
        _run(model, local_x, store=DiskStore(directory, buffer_bytes=2048), store_on=store_on)
        dist.barrier()
        if dist.get_rank() == 0:
            writers = _assert_store_equals(directory, ref)
            if store_on == "rank0":
                assert writers == {0}
            else:  # every replica's leader wrote its rows; no other rank wrote anything
                assert len(writers) == 2 and 0 in writers
        _done_with(directory)


@distributed(world_size=2)
def test_mean_over_batch_equals_the_one_process_mean():
    x = _x()
    one: dict = {}
    flex = FlexModel(plain_net(), one, process_group=local_group())
    for name, kind in FORWARD_SITES:
        getattr(flex, _REGISTER[kind])(HookFunction(name))
    for _ in range(2):
        flex(x).pow(2).mean().backward()
    flex.close()

    for store_on in ("rank0", "replica_leaders"):  # rank0: reduced on the storing rank
        directory = _shared_dir()
        model, dp_rank, _ = _fsdp2()
        _run(model, x.chunk(2)[dp_rank], store=DiskStore(directory), store_on=store_on,
             sites=FORWARD_SITES, param_sites=[], reduce="mean_over_batch")
        dist.barrier()
        reader = DiskStore(directory)
        for name, _ in FORWARD_SITES:
            key = actual_names(model)[name]
            for step in range(2):
                want = one[name][step].mean(0, keepdim=True)
                got = reader.read(key, step)
                # Not torch.equal: the ranks' matmuls run on half the batch, whose blocking
                # (and so the last bit of a float64 sum) depends on the threads available.
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        _done_with(directory)

    model, _, _ = _fsdp2()
    flex = FlexModel(model, None, store=DiskStore(tempfile.mkdtemp()), store_on="replica_leaders")
    with pytest.raises(ValueError, match="one replica's rows"):  # every rank, at registration
        flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0"],
                                                reduce=lambda t: t.sum()))
    flex.close()


@distributed(world_size=2)
def test_pipeline_stage_leaders_write_their_own_stage():
    _, _, x_mbs, t_mbs = inputs(4, 2)
    stage = two_stages(plain_net(), dist.get_rank())
    ref: dict = {}
    flex = FlexModel(stage, ref, pipeline_parallel_size=2, key_by_hook_kind=True)
    register_sites(flex, False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    flex.restore()

    directory = _shared_dir()
    stage = two_stages(plain_net(), dist.get_rank())
    store = DiskStore(directory)
    flex = FlexModel(stage, None, pipeline_parallel_size=2, key_by_hook_kind=True, store=store)
    register_sites(flex, False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.restore()
    store.close()
    dist.barrier()
    if dist.get_rank() == 0:
        assert _assert_store_equals(directory, ref) == {0, 1}  # each stage wrote its own
    _done_with(directory)


@distributed(world_size=2)
def test_store_of_another_mesh_is_refused_on_every_rank():
    directory = _shared_dir()
    x = _x()
    model, dp_rank, _ = _fsdp2()
    _run(model, x.chunk(2)[dp_rank], store=DiskStore(directory), sites=FORWARD_SITES,
         param_sites=[])
    dist.barrier()
    if dist.get_rank() == 0:  # a one-process run of the same model into the same directory
        with pytest.raises(StoreError, match="holds a run of"):
            FlexModel(plain_net(), None, store=DiskStore(directory), process_group=local_group())
    dist.barrier()
    # Only rank 0 holds an index with a fingerprint of another model: every rank refuses.
    stage = two_stages(plain_net(), dist.get_rank())
    with pytest.raises(StoreError):
        FlexModel(stage, None, pipeline_parallel_size=2, store=DiskStore(directory))
    _done_with(directory)


@distributed(world_size=4)
def test_replica_leaders_under_megatron_tp_x_dp_on_batch_dim_one():
    """Megatron-core TP=2 x DP=2: activations are [s, b, h], so each replica's rows sit on
    dim 1; read back, they equal what the in-memory store of a rank0 run holds."""
    from megatron.core import parallel_state
    from megatron_cases import B, S, megatron_mlp, megatron_parallel, plain_mlp

    sites = [("embed", "forward"), ("up", "forward"), ("act", "forward"), ("down", "forward"),
             ("down", "forward_pre"), ("up", "forward_pre")]
    with megatron_parallel(2):
        dp_rank = parallel_state.get_data_parallel_rank()
        ids = torch.randint(0, 16, (2 * B, S), generator=torch.Generator().manual_seed(3))
        local_ids = ids[dp_rank * B:(dp_rank + 1) * B]
        ref = _run(megatron_mlp(plain_mlp(), dtype=torch.float64), local_ids, sites=sites,
                   param_sites=[], backward=False)
        directory = _shared_dir()
        _run(megatron_mlp(plain_mlp(), dtype=torch.float64), local_ids, sites=sites,
             param_sites=[], backward=False, store=DiskStore(directory),
             store_on="replica_leaders")
        dist.barrier()
        if dist.get_rank() == 0:
            assert len(_assert_store_equals(directory, ref)) == 2  # both replica leaders
            entry = next(e for e in DiskStore(directory).index() if e["name"] == "up")
            assert entry["batch_dim"] == 1
        _done_with(directory)


class _FailingStore(MemoryStore):
    """A MemoryStore whose first ``put`` under a name containing ``part`` raises (a full disk)."""

    def __init__(self, part: str):
        super().__init__()
        self.part, self.failed = part, False

    def put(self, name, tensor, meta):
        if self.part in name and not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        super().put(name, tensor, meta)


def _raised_on_every_rank(info, rank_with_store: int = 0) -> None:
    if dist.get_rank() == rank_with_store:
        assert "failed: OSError: [Errno 28] No space left on device" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
    else:
        assert f"the store of rank {rank_with_store} (at least) failed" in str(info.value)


@distributed(world_size=2)
def test_a_store_failing_in_a_hook_raises_on_every_rank_at_the_end_of_the_forward():
    """DTensor TP=2, a store on rank 0 only, whose put fails in the first hook of a forward.
    Both ranks finish the forward and raise StoreError at its end (raised in the hook, rank 0
    would leave rank 1 waiting in the next layer's collective). The next forward stores every
    site, equal to an output_dict run of the same model and input."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    x = _x()
    model = parallelize_module(plain_net(), mesh, dtensor_plan(True))
    names = actual_names(model)
    ref: dict = {}
    flex = FlexModel(model, ref)
    for name, _ in FORWARD_SITES:
        flex.register_forward_hook(HookFunction(names[name]))
    with torch.no_grad():
        want = flex(x)
    flex.close()

    store = _FailingStore(names[FORWARD_SITES[0][0]]) if dist.get_rank() == 0 else None
    flex = FlexModel(model, None, store=store)
    for name, _ in FORWARD_SITES:
        flex.register_forward_hook(HookFunction(names[name]))
    with torch.no_grad():
        with pytest.raises(StoreError) as info:
            flex(x)
        _raised_on_every_rank(info)
        out = flex(x)  # raised once; the next forward stores again
    assert torch.equal(out, want)
    flex.check_store()  # nothing failed since, on any rank
    flex.close()
    if dist.get_rank() == 0:
        assert sorted(store.data) == sorted(ref)
        for key, values in ref.items():  # one value each: nothing stored after the failure
            assert len(store.data[key]) == 1 and torch.equal(store.data[key][0], values[0])


@pytest.mark.parametrize("failing", ["blocks.0", "blocks.1"], ids=["in_stage_0s_hook",
                                                                     "at_collection"])
@distributed(world_size=2)
def test_a_store_failing_under_pipelining_raises_on_every_stage_at_collection(failing):
    """PP=2, a store on rank 0 only, failing in one of stage 0's own hooks (``blocks.0``) or
    when rank 0 writes stage 1's values at collection (``blocks.1``). No stage raises at the
    end of its forward (the other stage is not in it and would be left waiting): the step
    finishes on both stages, and ``sync_pipeline_outputs`` raises StoreError on both."""
    _, _, x_mbs, t_mbs = inputs(4, 2)
    stage = two_stages(plain_net(), dist.get_rank())
    store = _FailingStore(failing) if dist.get_rank() == 0 else None
    flex = FlexModel(stage, None, pipeline_parallel_size=2, key_by_hook_kind=True, store=store)
    register_sites(flex, False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)  # no stage raises mid-step
    with pytest.raises(StoreError) as info:
        flex.sync_pipeline_outputs(link)
    _raised_on_every_rank(info)
    if dist.get_rank() == 0 and failing == "blocks.1":  # stage 0's values, stored as it ran
        assert store.data and all("blocks.1" not in name for name in store.data)
    flex.restore()


@distributed(world_size=2)
def test_a_memory_store_under_replica_leaders_with_dp_is_refused_on_every_rank():
    """FSDP2 on 2 ranks, store_on="replica_leaders", a MemoryStore on every rank: each replica
    leader would keep its own rows in its own process, and rank 0's read() would return half
    the batch as the whole. Refused when the FlexModel is built, on every rank; rank0 works."""
    x = _x()
    model, dp_rank, _ = _fsdp2()
    with pytest.raises(ValueError, match=r"rank 1 \(at least\) has a store that keeps them"):
        FlexModel(model, None, store=MemoryStore(), store_on="replica_leaders")
    # A rank with a DiskStore beside one with a MemoryStore: refused on both, alike.
    store = DiskStore(tempfile.mkdtemp()) if dp_rank == 1 else MemoryStore()
    with pytest.raises(ValueError, match=r"rank 0 \(at least\) has a store that keeps them"):
        FlexModel(model, None, store=store, store_on="replica_leaders")
    store.close()
    one = _up_in_one_process(x)
    store = MemoryStore()
    flex = FlexModel(model, None, store=store)  # store_on="rank0": the whole batch on rank 0
    flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0.up"]))
    with torch.no_grad():
        flex(x.chunk(2)[dp_rank])
    flex.close()
    if dist.get_rank() == 0:
        got = store.read(actual_names(model)["blocks.0.up"], 0)
        torch.testing.assert_close(got, one, rtol=1e-12, atol=1e-14)


def _up_in_one_process(x: torch.Tensor) -> torch.Tensor:
    """What one process stores for ``blocks.0.up`` on ``x`` (each rank alone)."""
    one: dict = {}
    flex = FlexModel(plain_net(), one, process_group=local_group())
    flex.register_forward_hook(HookFunction("blocks.0.up"))
    with torch.no_grad():
        flex(x)
    flex.close()
    return one["blocks.0.up"][0]


def _steps_run(directory, store_on, x_local, steps):
    model, _, _ = _fsdp2()
    name = actual_names(model)["blocks.0.up"]
    store = DiskStore(directory)
    flex = FlexModel(model, None, store=store, store_on=store_on)
    flex.register_forward_hook(HookFunction(name))
    with torch.no_grad():
        for _ in range(steps):
            flex(x_local)
    flex.close()
    store.close()
    return name


@distributed(world_size=2)
def test_a_reopened_disk_store_continues_after_every_writers_steps():
    """Run 1 (store_on="rank0": writer 0 only) stores 2 calls; run 2 (the same model and mesh,
    "replica_leaders": writers 0 and 1) appends 2. Writer 1, which wrote nothing before, also
    starts at step 2 (before: at 0, and step 0 read run 1's batch and run 2's rows as one
    tensor of 6 rows; steps 2-3 held writer 0's rows only). Every step is the whole batch."""
    x = _x()
    want = _up_in_one_process(x)
    local = x.chunk(2)[dist.get_rank()]
    directory = _shared_dir()
    name = _steps_run(directory, "rank0", local, 2)
    dist.barrier()
    _steps_run(directory, "replica_leaders", local, 2)
    dist.barrier()
    if dist.get_rank() == 0:
        reader = DiskStore(directory, writer=99)
        assert reader.steps(name) == [0, 1, 2, 3]
        assert {e["writer"] for e in reader.index() if e["step"] >= 2} == {0, 1}
        for step in range(4):
            torch.testing.assert_close(reader.read(name, step), want, rtol=1e-12, atol=1e-14)
    _done_with(directory)


@distributed(world_size=2)
def test_ranks_whose_disk_stores_hold_different_steps_are_refused_on_every_rank():
    """Rank 0's directory holds 2 steps, rank 1's is another, empty one: the ranks would number
    the same call 2 and 0. Refused when the FlexModel is built, on every rank."""
    x = _x()
    directory = _shared_dir()
    _steps_run(directory, "rank0", x.chunk(2)[dist.get_rank()], 2)
    dist.barrier()
    mine = directory if dist.get_rank() == 0 else tempfile.mkdtemp()
    model, _, _ = _fsdp2()
    with pytest.raises(StoreError, match="hold different steps"):
        FlexModel(model, None, store=DiskStore(mine), store_on="replica_leaders")
    if dist.get_rank() == 1:
        shutil.rmtree(mine, ignore_errors=True)
    _done_with(directory)


def _reduce_to_a_list(t):
    return t.norm(dim=-1).tolist()  # not a tensor: apply_reduce raises TypeError


def _double(module, t, ctx, modules):
    return t * 2


@distributed(world_size=2, timeout_s=60)
def test_a_reduce_that_raises_on_the_storing_rank_raises_on_every_rank():
    """DTensor TP=2, store_on="rank0", a reduce callable that returns a list: it runs on the
    storing rank only (after the gather). Before, it raised there alone and the other rank
    waited in blocks.0.down's all-reduce. With a store: StoreError on both ranks at the end of
    the forward (the store failure path). With an output_dict: every rank raises at that hook
    call (RemoteEditError, the agreement editing functions use), with or without an editing
    function. The process groups still work: a reduction that succeeds is stored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.failures import RemoteEditError

    mesh = init_device_mesh("cpu", (2,))
    x = _x()
    model = parallelize_module(plain_net(), mesh, dtensor_plan(True))
    site = actual_names(model)["blocks.0.up"]
    flex = FlexModel(model, None, store=MemoryStore())
    flex.register_forward_hook(HookFunction(site, reduce=_reduce_to_a_list))
    with torch.no_grad():
        with pytest.raises(StoreError) as info:
            flex(x)
    if dist.get_rank() == 0:
        assert "storing" in str(info.value) and "must return a tensor" in str(info.value)
        assert isinstance(info.value.__cause__, TypeError)
    else:
        assert "the store of rank 0 (at least) failed" in str(info.value)
    flex.close()
    for edit in (None, _double):
        stored: dict = {}
        flex = FlexModel(model, stored)
        hook = HookFunction(site, reduce=_reduce_to_a_list, editing_function=edit)
        flex.register_forward_hook(hook)
        with torch.no_grad():
            with pytest.raises(RemoteEditError, match="must return a tensor"):
                flex(x)
        flex.close()
    stored = {}
    flex = FlexModel(model, stored)
    flex.register_forward_hook(HookFunction(site, reduce=lambda t: t.norm(dim=-1)))
    with torch.no_grad():
        flex(x)
    flex.close()
    if dist.get_rank() == 0:
        assert stored[site][0].shape == (BATCH, 3)


def _fails_on_rank1(t):
    if dist.get_rank() == 1:
        raise MemoryError("rank 1 ran out")
    return t.sum(dim=-1)


@distributed(world_size=2, timeout_s=60)
def test_a_reduce_that_fails_on_one_rank_only_raises_on_every_rank():
    """store_on="all": every rank reduces its own whole copy, so a reduction can fail on one
    rank only (out of memory, rank-local state). Before, that rank raised alone and the other
    went on into blocks.0.down's all-reduce and waited there. Now every rank raises at that
    hook call, naming the reduce= (not an editing function), with or without an editing
    function; the failing rank's error is its own. The groups still work afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.parallel.failures import RemoteEditError

    mesh = init_device_mesh("cpu", (2,))
    x = _x()
    model = parallelize_module(plain_net(), mesh, dtensor_plan(True))
    site = actual_names(model)["blocks.0.up"]
    for edit in (None, _double):
        flex = FlexModel(model, {}, store_on="all")
        flex.register_forward_hook(HookFunction(site, reduce=_fails_on_rank1,
                                                editing_function=edit))
        with torch.no_grad():
            with pytest.raises(RemoteEditError, match="reduce= of hook") as info:
                flex(x)
        if dist.get_rank() == 1:
            assert "ran out" in str(info.value), info.value
        flex.close()
    stored: dict = {}
    flex = FlexModel(model, stored, store_on="all")
    flex.register_forward_hook(HookFunction(site, reduce=lambda t: t.sum(dim=-1)))
    with torch.no_grad():
        flex(x)
    flex.close()
    assert stored[site][0].shape == (BATCH, 3)
