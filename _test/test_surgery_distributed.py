"""SurgicalTheater under DDP, FSDP1 (both use_orig_params), FSDP2, fairscale TP, DTensor TP and
DP x TP: the modified forward equals the single-process modified forward of the same weights,
for scale, disable, seeded noise and custom deltas (elementwise and full-parameter); after exit
every local shard is byte-identical, in the same storage, and the forward is the original one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from parallel_cases import llama_tp_plan
from rank_pool import distributed
from test_surgery_support import differing_bytes, raw, raw_state
from torch import nn

import flex_surgery.surgery.modifications as modifications_module
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgeryError, SurgicalTheater
from flex_surgery.surgery.shards import local_shards, reshard_for_surgery


def _shrink(p: torch.Tensor) -> torch.Tensor:
    return -0.25 * p


def _center_rows(p: torch.Tensor) -> torch.Tensor:
    """Not elementwise: needs the whole row, so it asks for the full parameter."""
    return -p.mean(dim=-1, keepdim=True).expand_as(p).clone()


MODIFICATIONS = [
    dict(modification_type="scale", factor=0.5),
    dict(modification_type="disable", layers=[1], backup="cpu"),
    dict(modification_type="noise", noise_scale=0.05, seed=11),
    dict(modification_type="noise", noise_scale=0.05, seed=12, layers=[0], params="all"),
    dict(modification_fn=_shrink),
    dict(modification_fn=_center_rows, full_parameter=True),
]


def _logits(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def _clean_key(key: str) -> str:
    return key.removeprefix("module.")


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _check_equivalence(model: nn.Module, make_ref, inputs: dict, *, exact: bool,
                       check_state_dict: bool = True, sharded: bool = True,
                       blocks: tuple[str, ...] | None = None) -> None:
    """The body every layout runs: compare with the unsharded run, then check restoration.

    ``blocks`` names the blocks of a model that is not in the anatomy table (for ``layers=[i]``).
    """
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    ref = make_ref()
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        base = _logits(model(**inputs))  # leaves FSDP roots gathered: the hard case
        torch.testing.assert_close(base, _logits(ref(**inputs)), **tol)
    before = raw_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Small noise blocks (3 rows of 64, or 200 elements of a vector) so that block boundaries
    # cut through every kind of shard.
    modifications_module.NOISE_CHUNK_ELEMENTS = 200
    try:
        _compare_modifications(model, ref, inputs, base, before, opt, ref_state, tol,
                               check_state_dict, sharded, blocks)
    finally:
        modifications_module.NOISE_CHUNK_ELEMENTS = 1 << 16


def _compare_modifications(model, ref, inputs, base, before, opt, ref_state, tol,
                           check_state_dict, sharded, blocks) -> None:
    for mod in MODIFICATIONS:
        if blocks is not None and "layers" in mod:
            mod = {**mod, "layers": [blocks[i] for i in mod["layers"]]}
        with torch.no_grad():
            with SurgicalTheater(ref, **mod):
                want = _logits(ref(**inputs))
            with SurgicalTheater(model, **mod) as theater:
                got = _logits(model(**inputs))
                assert theater.modified_names, mod
                stats = theater.stats  # extra memory: exactly the local modified bytes
                full = sum(math.prod(s.full_shape) * s.local.element_size()
                           for s in theater._targets)
                assert stats["backup_bytes"] == stats["modified_bytes"] > 0
                assert (stats["modified_bytes"] < full) == sharded
                with pytest.raises(SurgeryError, match="optimizer.step"):
                    opt.step()
                if check_state_dict and mod.get("seed") == 11:
                    sd = model.state_dict()
                    for key, value in sd.items():
                        key = _clean_key(key)
                        if key in ref_state:
                            assert torch.equal(_full(value), ref_state[key]), key
                    del sd
            assert not torch.allclose(want, base), mod  # the modification does something
            torch.testing.assert_close(got, want, **tol, msg=lambda m, mod=mod: f"{mod}: {m}")
            assert differing_bytes(before, raw_state(model)) == 0, mod
            after = _logits(model(**inputs))
            torch.testing.assert_close(after, base, rtol=0, atol=0)


def _check_grad_guard(model: nn.Module, inputs: dict) -> None:
    """A backward during validation does not reach the gradients accumulated before it."""
    from flex_surgery.surgery.theater import _all_parameters

    _logits(model(**inputs)).sum().backward()
    grads = [(p, p.grad, raw_grad(p)) for p in _all_parameters(model) if p.grad is not None]
    assert grads
    with SurgicalTheater(model, modification_type="scale", factor=3.0):
        (_logits(model(**inputs)) ** 2).sum().backward()
    for p, grad, saved in grads:
        assert p.grad is grad and torch.equal(raw_grad(p), saved)
    model.zero_grad(set_to_none=True)


def raw_grad(p: torch.Tensor) -> torch.Tensor:
    return raw(p.grad)


def _llama():
    return tiny_hf_model("llama")


def _inputs():
    return example_inputs("llama", seed=dist.get_rank() % 2)  # data parallel: batches differ


@distributed(world_size=2)
def test_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_llama())
    _check_grad_guard(model, _inputs())
    _check_equivalence(model, _llama, _inputs(), exact=True, sharded=False)


@pytest.mark.parametrize("use_orig_params", [True, False])
@distributed(world_size=2)
def test_fsdp1(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = FSDP(_llama(), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                 use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    shards = local_shards(model)
    assert {s.kind for s in shards} == {"fsdp1"}
    # Each rank holds about half of the elements, and no full parameter is materialised.
    local = sum(s.local.numel() for s in shards)
    total = sum(p.numel() for p in _llama().parameters())
    assert local <= total // 2 + 64
    _check_grad_guard(model, _inputs())
    _check_equivalence(model, _llama, _inputs(), exact=False)


@distributed(world_size=2)
def test_fsdp2():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = _llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reshard_for_surgery(model)
    assert {s.kind for s in local_shards(model)} == {"dtensor"}
    _check_grad_guard(model, _inputs())
    _check_equivalence(model, _llama, _inputs(), exact=False)


def _tp_plan():
    return llama_tp_plan(2)


@distributed(world_size=2)
def test_dtensor_tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(_llama(), mesh, _tp_plan())
    inputs = example_inputs("llama")  # TP: every rank sees the same batch
    _check_equivalence(model, _llama, inputs, exact=False)


@distributed(world_size=4)
def test_fsdp2_over_dtensor_tp():
    """DP x TP: FSDP2 on the "dp" mesh dimension over DTensor TP on "tp" (strided shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(_llama(), mesh["tp"], _tp_plan())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh["dp"].get_local_rank()
    _check_equivalence(model, _llama, example_inputs("llama", seed=dp_rank), exact=False)


class _MLP(nn.Module):
    """A two-layer MLP, either plain or fairscale-parallel, with the same parameter names."""

    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _fairscale_pair():
    from fairscale.nn.model_parallel import layers as fs

    torch.manual_seed(0)
    up = fs.ColumnParallelLinear(16, 32, gather_output=False, keep_master_weight_for_test=True)
    down = fs.RowParallelLinear(32, 16, input_is_parallel=True, keep_master_weight_for_test=True)
    par = _MLP(up, down)
    ref_up, ref_down = nn.Linear(16, 32), nn.Linear(32, 16)
    with torch.no_grad():
        ref_up.weight.copy_(up.master_weight)
        ref_down.weight.copy_(down.master_weight)
        # fairscale initialises biases to zero; the replicated bias of the row layer is full.
        ref_up.bias.zero_()
        ref_down.bias.copy_(down.bias)
    del up.master_weight, down.master_weight
    return par, _MLP(ref_up, ref_down)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fairscale_tp(world_size):
    """TP=2; on 4 ranks fairscale adds DP=2 (DP x TP)."""
    from rank_pool import get_pool

    get_pool(world_size).run(_fairscale_body)


@distributed(world_size=2)
def _fairscale_body():
    from fairscale.nn.model_parallel import initialize as fs_init

    fs_init.initialize_model_parallel(2)
    par, ref = _fairscale_pair()
    assert {s.kind for s in local_shards(par) if s.name != "down.bias"} == {"fairscale"}
    gen = torch.Generator().manual_seed(fs_init.get_data_parallel_rank())
    x = torch.randn(3, 16, generator=gen)
    _check_equivalence(par, lambda: _fairscale_pair()[1], {"x": x}, exact=False,
                       check_state_dict=False, blocks=("up", "down"))


@distributed(world_size=4)
def test_masks_under_fsdp2_over_tp_match_one_process():
    """Full-shape masks cut per shard (strided FSDP2 x TP shards, no gather)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from flex_surgery.surgery import MaskTheater, continuous_mask

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(_llama(), mesh["tp"], _tp_plan())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    ref = _llama()
    gen = torch.Generator().manual_seed(0)
    masks = {n: continuous_mask(torch.randn(p.shape, generator=gen))
             for n, p in ref.named_parameters() if n.startswith("model.layers.1.")}
    inputs = example_inputs("llama", seed=mesh["dp"].get_local_rank())
    before = raw_state(model)
    with torch.no_grad():
        with MaskTheater(ref, masks):
            want = ref(**inputs).logits
        with MaskTheater(model, masks):
            got = _logits(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, ref(**inputs).logits)
    assert differing_bytes(before, raw_state(model)) == 0


def _train_sharded(wrap, validate: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = wrap(_llama())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [example_inputs("llama", seed=2 * s + dist.get_rank() % 2)["input_ids"]
            for s in range(4)]
    for step in range(20):
        ids = data[step % 4]
        model(input_ids=ids, labels=ids).loss.backward()
        if validate and step % 5 == 4:
            kind = ("noise", "scale", "disable", "noise")[step // 5]
            with SurgicalTheater(model, modification_type=kind, seed=step,
                                 params="all"), torch.no_grad():
                model.eval()
                model(input_ids=data[0], labels=data[0])
                if step == 9:
                    model.state_dict()  # a checkpoint during validation
        opt.step()
        opt.zero_grad()
    return raw_state(model)


def _fsdp1_flat(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                use_orig_params=False, device_id=torch.device("cpu"))


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


@pytest.mark.parametrize("wrap", ["fsdp1_flat", "fsdp2"])
@distributed(world_size=2)
def test_sharded_training_with_validation_ends_with_the_same_shards(wrap):
    """AdamW, 20 steps, validation (with a state_dict) every 5 steps inside a theater: every
    local shard ends bit-identical to the run without validation."""
    wrap_fn = {"fsdp1_flat": _fsdp1_flat, "fsdp2": _fsdp2}[wrap]
    plain, validated = _train_sharded(wrap_fn, False), _train_sharded(wrap_fn, True)
    assert plain.keys() == validated.keys()
    for name, (data, _) in plain.items():
        assert torch.equal(data, validated[name][0]), name


# -- ranks agree: unseeded noise, a failure on one rank ---------------------------------------
def _wrap(kind: str, model: nn.Module) -> nn.Module:
    """The same llama under DDP (replicas), FSDP1 or FSDP2 (shards) or DTensor TP (shards and
    replicated norms)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if kind == "ddp":
        return DDP(model)
    if kind == "fsdp1":
        return _fsdp1_flat(model)
    if kind == "fsdp2":
        return _fsdp2(model)
    return parallelize_module(model, init_device_mesh("cpu", (2,)), _tp_plan())


def _first_rank_draw(seed: int) -> int:
    """What ``torch.randint(0, 2**62, (1,))`` gives after ``torch.manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2**62, (1,), generator=gen).item())


@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2", "dtensor_tp"])
@distributed(world_size=2)
def test_unseeded_noise_is_the_first_ranks_draw_on_every_rank(kind):
    """seed=None on ranks whose generators differ: every rank adds the noise of rank 0's draw,
    so replicas stay equal and shards are cut from one process's noise; each rank's generator
    ends one draw of its own further on."""
    model, ref = _wrap(kind, _llama()), _llama()
    inputs = example_inputs("llama")
    noise = dict(modification_type="noise", noise_scale=0.05, params="all")
    theater = SurgicalTheater(model, **noise)
    for entry in range(2):  # consecutive entries draw (and agree on) different seeds
        first = 1000 + 10 * entry
        with torch.no_grad(), SurgicalTheater(ref, **noise, seed=_first_rank_draw(first)):
            want = {n: p.detach().clone() for n, p in ref.named_parameters()}
            want_logits = ref(**inputs).logits
        torch.manual_seed(first + dist.get_rank())
        with torch.no_grad(), theater:
            assert len(theater._targets) == len(want)
            for shard in theater._targets:  # this rank's elements of rank 0's noise, exactly
                assert torch.equal(shard.local, shard.region.take(want[shard.name])), shard.name
            got = _logits(model(**inputs))
        torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-5)
        after = torch.get_rng_state()
        torch.manual_seed(first + dist.get_rank())
        torch.randint(0, 2**62, (1,))
        assert torch.equal(after, torch.get_rng_state())


@distributed(world_size=2)
def test_a_plain_model_communicates_nothing():
    """No framework says a plain model is shared: its theater never waits for another rank
    (a rank may enter it alone), and unseeded noise is each rank's own."""
    model = _llama()

    def refuse(*args, **kwargs):
        raise AssertionError("a theater on a plain model ran a collective")

    saved = dist.all_reduce, dist.broadcast
    dist.all_reduce = dist.broadcast = refuse
    try:
        if dist.get_rank() == 1:
            with SurgicalTheater(model, modification_type="scale", factor=0.5):
                pass
        torch.manual_seed(dist.get_rank())
        with SurgicalTheater(model, layers=[0], modification_type="noise") as theater:
            target = theater._targets[0].local.clone()
    finally:
        dist.all_reduce, dist.broadcast = saved
    both = [torch.empty_like(target) for _ in range(2)]
    dist.all_gather(both, target)
    assert not torch.equal(*both)


@distributed(world_size=2, timeout_s=60)
def test_leaving_the_body_by_an_exception_runs_no_collective():
    """An exception out of the body means the ranks are no longer in step: an exit agreement
    could be matched with a peer's collective inside the body and hand it a wrong value. The
    rank puts its own weights back bit-exactly, runs no collective, and re-raises unchanged."""
    from flex_surgery.surgery import active_theaters

    model = _wrap("ddp", _llama())
    before = raw_state(model)
    entered = []

    def refuse(*args, **kwargs):
        raise AssertionError("leaving the body by an exception ran a collective")

    saved = dist.all_reduce, dist.broadcast
    try:
        with pytest.raises(KeyError, match="from the body"):
            with SurgicalTheater(model, modification_type="scale", factor=0.5, layers=[0]):
                entered.append(True)  # entering agreed (a collective) before this point
                dist.all_reduce = dist.broadcast = refuse
                raise KeyError("from the body")
    finally:
        dist.all_reduce, dist.broadcast = saved
    assert entered and active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0
    dist.barrier()  # both ranks are still in step after it


def _fails_on_rank_1(p: torch.Tensor, calls: list) -> torch.Tensor:
    calls.append(p.shape)
    if dist.get_rank() == 1 and len(calls) == 2:
        raise RuntimeError("out of memory on rank 1 only")
    return -0.5 * p


FAILURES = {
    # an elementwise custom function: no collective while entering, one agreement at its end
    "custom": lambda: dict(modification_fn=_fails_on_rank_1, calls=[]),
    # full-parameter gathers: the others must not start the next gather
    "full_parameter": lambda: dict(modification_fn=_fails_on_rank_1, calls=[],
                                   full_parameter=True),
    # a target only one rank lacks: it fails before modifying anything
    "missing_target": lambda: dict(modification_type="scale", layers=[
        "model.layers.0.mlp" if dist.get_rank() == 0 else "model.layers.7.mlp"]),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
@distributed(world_size=2, timeout_s=60)
def test_a_failure_while_entering_on_one_rank_is_raised_on_every_rank(kind, failure):
    """Rank 1 fails while entering: every rank rolls back bit-exactly and raises -- rank 1 its
    own error, rank 0 one naming rank 1 and that error -- instead of rank 0 entering the body
    and waiting in its first collective; the next theater works."""
    from flex_surgery.parallel.failures import RemoteEditError
    from flex_surgery.surgery import active_theaters

    model, ref = _wrap(kind, _llama()), _llama()
    inputs = example_inputs("llama")
    with torch.no_grad():
        base = _logits(model(**inputs))
    before = raw_state(model)
    model.train()
    own = ValueError if failure == "missing_target" else RuntimeError
    why = "model.layers.7.mlp" if failure == "missing_target" else "out of memory on rank 1"
    expected = own if dist.get_rank() == 1 else RemoteEditError
    match = why if dist.get_rank() == 1 else f"failed on rank 1: {own.__name__}: .*{why}"
    with pytest.raises(expected, match=match):
        with SurgicalTheater(model, **FAILURES[failure]()):
            pytest.fail("the body must not run")
    assert differing_bytes(before, raw_state(model)) == 0
    assert active_theaters() == () and model.training
    with torch.no_grad():
        with SurgicalTheater(ref, layers=[1], modification_type="scale", factor=0.5):
            want = ref(**inputs).logits
        with SurgicalTheater(model, layers=[1], modification_type="scale", factor=0.5):
            got = _logits(model(**inputs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(model(**inputs)), base, rtol=0, atol=0)
    assert differing_bytes(before, raw_state(model)) == 0


@distributed(world_size=2, timeout_s=60)
def test_a_restore_that_fails_on_one_rank_keeps_every_rank_active_until_retried():
    """Putting the weights back fails on rank 1 only: every rank raises RestoreError and keeps
    its theater (guards included); restore() on every rank then leaves together."""
    from flex_surgery.surgery import RestoreError, active_theaters
    from flex_surgery.surgery.snapshot import Snapshot

    model = _wrap("fsdp2", _llama())
    before = raw_state(model)
    restore, failed = Snapshot.restore, []

    def flaky(self):
        if dist.get_rank() == 1 and not failed:
            failed.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        restore(self)

    theater = SurgicalTheater(model, modification_type="scale", factor=0.5, params="all")
    Snapshot.restore = flaky
    try:
        match = "illegal memory access" if dist.get_rank() == 1 else \
            "failed on rank 1: RestoreError: .*illegal memory access.*call restore"
        with pytest.raises(RestoreError, match=match):
            with theater:
                pass
    finally:
        Snapshot.restore = restore
    assert active_theaters() == (theater,)
    with pytest.raises(SurgeryError, match="optimizer.step"):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    theater.restore()
    assert active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0


@pytest.mark.parametrize("fail", [False, True])
@distributed(world_size=2, timeout_s=60)
def test_ranks_with_different_numbers_of_gathers_agree_as_often(fail):
    """As pipeline stages do, rank 0 gathers three parameters and rank 1 one: both agree the
    same number of times (and rank 1's failure in its only edit still reaches rank 0)."""
    from flex_surgery.parallel.failures import RemoteEditError

    model = _wrap("ddp", _llama())
    before = raw_state(model)
    layers = ["model.layers.0.mlp", "model.layers.1.mlp"] if dist.get_rank() == 0 else \
        ["model.layers.1.mlp.up_proj"]
    calls: list = []

    def shrink(p: torch.Tensor) -> torch.Tensor:
        calls.append(p.shape)
        if fail and dist.get_rank() == 1:
            raise RuntimeError("rank 1 cannot")
        return -0.5 * p

    theater = SurgicalTheater(model, layers=layers, modification_fn=shrink, full_parameter=True)
    if fail:
        with pytest.raises(RuntimeError if dist.get_rank() == 1 else RemoteEditError,
                           match="rank 1 cannot"):
            with theater:
                pytest.fail("the body must not run")
    else:
        with theater:
            assert len(theater._targets) == (6 if dist.get_rank() == 0 else 1)
    assert differing_bytes(before, raw_state(model)) == 0
    with SurgicalTheater(model, modification_type="scale"):  # the ranks are in step
        pass


@distributed(world_size=4, timeout_s=60)
def test_two_models_on_two_groups_agree_within_their_own_group():
    """Ranks {0, 1} and {2, 3} each run a DDP model on their own group: unseeded noise is the
    draw of each group's first rank, and rank 3's failure is raised by ranks 2 and 3 only (its
    message carried from group rank 1), while ranks 0 and 1 enter and leave undisturbed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.parallel.failures import RemoteEditError

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    mine = groups[rank // 2]
    model = DDP(_llama(), process_group=mine)
    torch.manual_seed(rank)
    with SurgicalTheater(model, layers=[0], modification_type="noise") as theater:
        local = theater._targets[0].local.clone()
    every = [torch.empty_like(local) for _ in range(4)]
    dist.all_gather(every, local)
    assert torch.equal(every[0], every[1]) and torch.equal(every[2], every[3])
    assert not torch.equal(every[0], every[2])  # each group drew its own (ranks 0 and 2)

    before = raw_state(model)

    def fails_on_rank_3(p):
        if rank == 3:
            raise RuntimeError("rank 3 is out of memory")
        return -0.5 * p

    theater = SurgicalTheater(model, layers=[0], modification_fn=fails_on_rank_3)
    if rank < 2:
        with theater:
            pass
    else:
        expected = RuntimeError if rank == 3 else RemoteEditError
        with pytest.raises(expected, match="rank 3 is out of memory"):
            with theater:
                pytest.fail("the body must not run")
    assert differing_bytes(before, raw_state(model)) == 0
