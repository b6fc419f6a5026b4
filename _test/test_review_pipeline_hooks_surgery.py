"""A second reader's adversarial tests of three recent changes:

* the hook call's fast paths (one comparison of an editing function's result, an editing
  function returning its input skips it, a one-process forward hook on a bare tensor skips
  unpacking): every case compares values *and* gradients with the same edit done by raw torch
  hooks;
* pipeline collection (stages stage values only for a collecting rank that keeps them, stage
  objects sent tensor by tensor, the sync skipped when nobody keeps);
* SurgicalTheater's agreement on a distributed model (unseeded noise's seed, the outcome of
  entering and exiting), and that a model that is not distributed runs no collective.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery import FlexModel, HookFunction
from flex_surgery.hooks.errors import EditingFunctionError

# -- one process: the hook fast paths against raw torch hooks -----------------------------------


def _net(dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.to(dtype)


def _input(dtype=torch.float64, requires_grad=True) -> torch.Tensor:
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)).to(dtype)
    return x.requires_grad_(requires_grad)


# Editing functions: each returns its input (in-place edits), a view of it, or a tensor with
# other strides / requires_grad. ``fn(t) -> t`` on the hooked tensor.
def inplace_mul(t):
    return t.mul_(2.0)


def inplace_on_a_view(t):
    t[:1].mul_(3.0)  # edits through a view of the input, returns the input
    return t


def view_of_input(t):
    return (t * 2.0).view(t.shape)


def returns_input_as_view(t):
    return t.view_as(t)


def other_strides(t):
    return (t * 2.0).transpose(0, 1).contiguous().transpose(0, 1)


def detached(t):
    return t.detach() * 2.0


EDITS = [inplace_mul, inplace_on_a_view, view_of_input, returns_input_as_view, other_strides,
         detached]

# (module name, hook kind): forward hooks on a bare tensor take the new fast path; a
# forward_pre hook, full backward (pre) hooks and a parameter's gradient hook the general one.
KINDS = [("2", "forward"), ("3", "forward_pre"), ("2", "full_backward"),
         ("2", "full_backward_pre"), ("2.weight", "tensor")]


def _grads(net: nn.Module) -> dict:
    return {n: p.grad for n, p in net.named_parameters()}


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _raw(net: nn.Module, name: str, kind: str, fn, x: torch.Tensor):
    """The same edit done by a raw torch hook: output, stored value, gradients."""
    stored = []
    if kind == "tensor":
        param = net.get_parameter(name)
        handle = param.register_hook(lambda g: (stored.append(g.detach().clone()), fn(g))[1])
    else:
        module = net.get_submodule(name)
        if kind == "forward":
            def hook(m, a, o):
                stored.append(o.detach().clone())
                return fn(o)
            handle = module.register_forward_hook(hook)
        elif kind == "forward_pre":
            def hook(m, args):
                stored.append(args[0].detach().clone())
                return (fn(args[0]),) + args[1:]
            handle = module.register_forward_pre_hook(hook)
        elif kind == "full_backward":
            def hook(m, gi, go):
                stored.append(gi[0].detach().clone())
                return (fn(gi[0]),) + gi[1:]
            handle = module.register_full_backward_hook(hook)
        else:
            def hook(m, go):
                stored.append(go[0].detach().clone())
                return (fn(go[0]),) + go[1:]
            handle = module.register_full_backward_pre_hook(hook)
    y = net(x)
    y.float().pow(2).sum().backward()
    handle.remove()
    return y.detach(), stored, _grads(net), x.grad


def _flex(net: nn.Module, name: str, kind: str, fn, x: torch.Tensor):
    out: dict = {}
    flex = FlexModel(net, out)
    hf = HookFunction(name, editing_function=lambda m, t, ctx, mods: fn(t))
    {"forward": flex.register_forward_hook, "forward_pre": flex.register_forward_pre_hook,
     "full_backward": flex.register_full_backward_hook,
     "full_backward_pre": flex.register_full_backward_pre_hook,
     "tensor": flex.register_hook}[kind](hf)
    y = flex(x)
    y.float().pow(2).sum().backward()
    return y.detach(), out[hf.output_key], _grads(net), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fn", EDITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("site", KINDS, ids=lambda s: f"{s[0]}:{s[1]}")
def test_one_process_edit_matches_raw_torch_hook(site, fn, dtype):
    """Values, the stored (pre-edit) tensor, parameter and input gradients: bitwise equal to a
    raw torch hook doing the same edit, for in-place edits returning the input, views, other
    strides and detached results, in float64 and bfloat16."""
    name, kind = site
    x_raw, x_flex = _input(dtype), _input(dtype)
    want = _raw(_net(dtype), name, kind, fn, x_raw)
    got = _flex(_net(dtype), name, kind, fn, x_flex)
    assert torch.equal(got[0], want[0])
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        assert _same(got[2][n], want[2][n]), n
    assert _same(got[3], want[3])


def test_one_process_inplace_edit_of_a_leaf_input_matches_raw_torch():
    """An in-place edit of the model's input (a leaf requiring grad) through a forward-pre
    hook: raw torch refuses it; FlexModel must refuse it too, not silently detach."""
    def raw():
        net, x = _net(), _input()
        net[0].register_forward_pre_hook(lambda m, a: (a[0].mul_(2.0),))
        net(x)
    with pytest.raises(RuntimeError, match="leaf"):
        raw()
    net, x = _net(), _input()
    flex = FlexModel(net, {})
    flex.register_forward_pre_hook(HookFunction("0", editing_function=lambda m, t, c, d:
                                                t.mul_(2.0)))
    with pytest.raises(RuntimeError, match="leaf"):
        flex(x)


def test_one_process_int_input_edited_in_place():
    """An int tensor (token ids into an embedding) edited in place through a forward-pre
    hook and returned: the same output as raw torch."""
    emb = nn.Embedding(10, 3)
    ids = torch.tensor([[1, 2, 3]])
    want = emb(ids.clone() + 1)
    flex = FlexModel(emb, out := {})
    flex.register_forward_pre_hook(HookFunction("", editing_function=lambda m, t, c, d:
                                                t.add_(1)))
    got = flex(ids.clone())
    assert torch.equal(got, want)
    assert torch.equal(out[""][0], ids)  # stored before the in-place edit


def _swap_dtype(t):
    t.data = t.data.float()  # same tensor object, another dtype
    return t


@pytest.mark.parametrize("edit", [
    lambda t: t.unsqueeze_(0),  # an in-place view op: returns its input with another shape
    lambda t: t.t_(),
    _swap_dtype,
], ids=["unsqueeze_", "t_", "data_dtype"])
def test_editing_function_returning_its_input_with_another_shape_or_dtype_raises(edit):
    """The editing function's contract: keep the input's shape and dtype. An in-place op that
    changes them (``unsqueeze_``, ``t_``, ``set_``) returns the very tensor it was given, so a
    check by identity lets a wrong shape through silently (here the model's output would gain a
    dimension or change its dtype); it must raise EditingFunctionError like any other result of
    the wrong shape."""
    net = _net()
    flex = FlexModel(net, {})
    flex.register_forward_hook(HookFunction("2", editing_function=lambda m, t, c, d:
                                            edit(t)))
    with pytest.raises(EditingFunctionError, match="shape|dtype"):
        with torch.no_grad():
            flex(_input(requires_grad=False))


# -- SurgicalTheater on a distributed model: the agreement ---------------------------------------

def _ddp_llama():
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_surgery.models import tiny_hf_model

    return DDP(tiny_hf_model("llama"))


@pytest.mark.parametrize("seed", [7, None], ids=["seeded", "unseeded"])
@distributed(world_size=2, timeout_s=20)
def test_a_failure_capturing_the_training_state_on_one_rank_is_raised_on_every_rank(seed):
    """Capturing the training state is part of the agreed entry: a failure there on rank 1
    only must make rank 1 raise its own error and rank 0 a RemoteEditError naming rank 1,
    weights untouched, for seeded *and* unseeded noise. With ``seed=None`` rank 0 goes on to
    the seed's broadcast while rank 1 is already in the failure's all-reduce: two different
    collectives matched with each other (a hang, or a wrong seed / verdict)."""
    from test_surgery_support import differing_bytes, raw_state

    from flex_surgery.parallel.failures import RemoteEditError
    from flex_surgery.surgery import SurgicalTheater, active_theaters
    from flex_surgery.surgery.training_guard import TrainingState

    model = _ddp_llama()
    before = raw_state(model)
    capture = TrainingState.capture

    def flaky(*args, **kwargs):
        if dist.get_rank() == 1:
            raise RuntimeError("capture failed on rank 1 only")
        return capture(*args, **kwargs)

    TrainingState.capture = staticmethod(flaky)
    try:
        expected = RuntimeError if dist.get_rank() == 1 else RemoteEditError
        with pytest.raises(expected, match="capture failed on rank 1 only|failed on rank 1"):
            with SurgicalTheater(model, modification_type="noise", noise_scale=0.1, seed=seed,
                                 layers=[0]):
                pytest.fail("the body must not run")
    finally:
        TrainingState.capture = capture
    assert active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0
    # Still in step: the next theater agrees on one seed on both ranks.
    with SurgicalTheater(model, modification_type="noise", noise_scale=0.1, layers=[0]) as t:
        mine = t._targets[0].local.detach().clone()
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    assert torch.equal(*both)


# -- pipeline collection on DP x PP (4 ranks, built mesh: pp0 = ranks 0, 1; pp1 = ranks 2, 3) ----

def _dp_pp_case(dicts_on: tuple[int, ...], store_on: str, n_micro: int = 3, steps: int = 2):
    """Hand-split stages on a DP x PP mesh, each replica feeding its rows of every
    micro-batch, ``n_micro`` micro-batches per step before one sync, a fresh dict per step on
    the ranks in ``dicts_on``. Returns (this rank's dicts per step, the reference)."""
    from parallel_cases import plain_net
    from pipeline_cases import hand_split_step, inputs, reference, register_sites, two_stages

    from flex_surgery.parallel.pipeline import StageLink

    rank = dist.get_rank()
    stage, dp_rank = rank // 2, rank % 2
    _, _, x_mbs, t_mbs = inputs(4 * n_micro, n_micro)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=True)
    flex = FlexModel(two_stages(plain_net(), stage), {} if rank in dicts_on else None,
                     pipeline_parallel_size=2, data_parallel_size=2, key_by_hook_kind=True,
                     store_on=store_on)
    mesh = flex.runtime.mesh
    assert (mesh.coords["pp"], mesh.coords["dp"]) == (stage, dp_rank)
    register_sites(flex, edit=True)
    got = []
    for _ in range(steps):
        stored = {} if rank in dicts_on else None
        flex.output_dict = stored
        link = StageLink(mesh)
        hand_split_step(flex, link, [x.chunk(2)[dp_rank] for x in x_mbs],
                        [t.chunk(2)[dp_rank] for t in t_mbs])
        flex.sync_pipeline_outputs(link)
        link.close()
        got.append(stored)
    flex.restore()
    return got, ref_stored


@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_dict_on_rank0_only_collects_every_stage_every_step():
    """DP x PP, a dict on rank 0 only, replaced per step, three micro-batches per sync: rank 0
    holds, per step, what one process stores (both stages, every hook kind), and nothing piles
    up on stage 1's leader."""
    from pipeline_cases import TOL, assert_stored_equal

    got, ref = _dp_pp_case((0,), "rank0")
    if dist.get_rank() == 0:
        for stored in got:
            assert_stored_equal(stored, ref, **TOL)
    else:
        assert got == [None, None]


@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_store_on_all_a_dict_on_a_non_leader_collects_its_line():
    """store_on="all" on DP x PP with a dict on rank 1 only (stage 0, replica 1: not a stage
    leader): its line's stage 1 (rank 3) stages for it, so rank 1 holds what one process
    stores."""
    from pipeline_cases import TOL, assert_stored_equal

    got, ref = _dp_pp_case((1,), "all")
    if dist.get_rank() == 1:
        for stored in got:
            assert_stored_equal(stored, ref, **TOL)


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "all_gather_object", "broadcast_object_list", "barrier", "reduce_scatter",
                "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv",
                "monitored_barrier", "new_group", "all_to_all", "all_to_all_single", "reduce")


@distributed(world_size=2, timeout_s=60)
def test_theaters_on_a_model_that_is_not_distributed_run_no_collective_at_all():
    """A plain model, and a FlexModel over a one-rank group, under a two-rank world: every
    modification type (unseeded noise, full-parameter custom included), nested and repeated
    entries, entered on rank 1 only, call no function of torch.distributed that
    communicates -- not only all_reduce and broadcast."""
    from parallel_cases import local_group

    from flex_surgery.models import tiny_hf_model
    from flex_surgery.surgery import SurgicalTheater

    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    called: list[str] = []

    def refusing(name):
        def refuse(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"a theater on a model that is not distributed ran {name}")
        return refuse

    plain = tiny_hf_model("llama")
    flex = FlexModel(tiny_hf_model("llama"), {}, process_group=local_group())
    if dist.get_rank() == 1:
        for name in saved:
            setattr(dist, name, refusing(name))
        try:
            for model in (plain, flex):
                for kwargs in (dict(modification_type="noise", noise_scale=0.1),
                               dict(modification_type="scale", factor=0.5),
                               dict(modification_type="disable"),
                               dict(modification_type="custom",
                                    modification_fn=lambda p: p * 0.5),
                               dict(modification_type="custom", full_parameter=True,
                                    modification_fn=lambda p: p * 0.5)):
                    outer = SurgicalTheater(model, layers=[0], **kwargs)
                    for _ in range(2):  # repeated entries, with an inner theater
                        with outer, SurgicalTheater(model, layers=[1], **kwargs):
                            pass
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        assert called == []
    flex.restore()
    dist.barrier()


@distributed(world_size=2, timeout_s=60)
def test_unseeded_noise_on_pipeline_stages_is_one_processes_noise():
    """A FlexModel over hand-split pipeline stages counts as distributed: both stages use rank
    0's draw, so each stage's parameters get exactly the noise one process adds to the whole
    model with that seed (parameters keep their whole-model names on every stage)."""
    from parallel_cases import plain_net
    from pipeline_cases import two_stages

    from flex_surgery.surgery import SurgicalTheater

    torch.set_default_dtype(torch.float64)
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), {}, pipeline_parallel_size=2)
    ref = plain_net()  # (building draws from the global generator)
    torch.manual_seed(100 + dist.get_rank())  # the ranks' generators differ
    draw = int(torch.randint(0, 2**62, (1,)).item())
    draws = [None, None]
    dist.all_gather_object(draws, draw)
    torch.manual_seed(100 + dist.get_rank())
    with torch.no_grad(), SurgicalTheater(ref, modification_type="noise", noise_scale=0.1,
                                          seed=draws[0], params="all"):
        want = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad(), SurgicalTheater(flex, modification_type="noise", noise_scale=0.1,
                                          params="all") as theater:
        got = {s.name: s.local.detach().clone() for s in theater._targets}
    assert got and set(got) <= set(want)
    for name, value in got.items():
        assert torch.equal(value, want[name]), name
    flex.restore()


def _tp_model(kind: str) -> nn.Module:
    if kind == "fairscale":
        from fairscale.nn.model_parallel import initialize as fs_init
        from test_surgery_distributed import _fairscale_pair

        fs_init.initialize_model_parallel(2)
        return _fairscale_pair()[0]
    from test_surgery_distributed import _llama, _wrap

    return _wrap("dtensor_tp", _llama())


@pytest.mark.parametrize("full_parameter", [False, True])
@pytest.mark.parametrize("kind", ["dtensor_tp", "fairscale"])
@distributed(world_size=2, timeout_s=60)
def test_a_failure_on_one_tp_rank_while_entering_is_raised_on_every_rank(kind, full_parameter):
    """Tensor parallelism (DTensor, fairscale): rank 1's custom function fails at its second
    parameter (after the first one's gather when ``full_parameter``); every rank rolls back
    bit-exactly and raises (rank 1 its own error, rank 0 one naming it); then unseeded noise
    agrees and the replicated/sharded weights stay one model."""
    from test_surgery_support import differing_bytes, raw_state

    from flex_surgery.parallel.failures import RemoteEditError
    from flex_surgery.surgery import SurgicalTheater, active_theaters

    model = _tp_model(kind)
    before = raw_state(model)
    calls: list = []

    def fails_on_rank_1(p):
        calls.append(p.shape)
        if dist.get_rank() == 1 and len(calls) == 2:
            raise RuntimeError("rank 1 ran out of memory")
        return -0.5 * p

    expected = RuntimeError if dist.get_rank() == 1 else RemoteEditError
    with pytest.raises(expected, match="rank 1 ran out of memory"):
        with SurgicalTheater(model, modification_fn=fails_on_rank_1,
                             full_parameter=full_parameter, params="all"):
            pytest.fail("the body must not run")
    assert active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0
    torch.manual_seed(dist.get_rank())
    with SurgicalTheater(model, modification_type="noise", noise_scale=0.1, params="all") as t:
        states = {s.name: s.local.detach().clone() for s in t._targets}
    assert differing_bytes(before, raw_state(model)) == 0
    for name, local in states.items():  # a replicated parameter got one noise on both ranks
        both = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(both, local.contiguous())
        if name.endswith("down.bias") or "norm" in name:
            assert torch.equal(*both), name


@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_replica_leaders_with_a_store_on_rank0_only_loses_no_rows():
    """store_on="replica_leaders" on DP x PP with a store on rank 0 only (the pattern the
    stage-to-store collection of ``sync_pipeline_outputs`` serves): what the store holds must
    be what one process stores, or the FlexModel must refuse -- never half of the batch."""
    from parallel_cases import plain_net
    from pipeline_cases import (
        TOL,
        assert_stored_equal,
        hand_split_step,
        inputs,
        reference,
        register_sites,
        two_stages,
    )

    from flex_surgery.parallel.pipeline import StageLink
    from flex_surgery.store.memory import MemoryStore

    rank = dist.get_rank()
    stage, dp_rank = rank // 2, rank % 2
    _, _, x_mbs, t_mbs = inputs(8, 2)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    store = MemoryStore() if rank == 0 else None
    try:
        flex = FlexModel(two_stages(plain_net(), stage), None, pipeline_parallel_size=2,
                         data_parallel_size=2, key_by_hook_kind=True,
                         store_on="replica_leaders", store=store)
    except ValueError:
        return  # refused on every rank: fine
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, [x.chunk(2)[dp_rank] for x in x_mbs],
                    [t.chunk(2)[dp_rank] for t in t_mbs])
    flex.sync_pipeline_outputs(link)
    flex.restore()
    if rank == 0:
        got = store.to_dict()
        forward = sorted(k for k in ref_stored if ":" not in k and "weight" not in k
                         and "bias" not in k)
        assert_stored_equal({k: got.get(k, []) for k in forward}, ref_stored, keys=forward,
                            **TOL)


@pytest.mark.parametrize("later_stage_dicts", [True, False])
@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_replica_leaders_dicts_each_replica_collects_its_rows_of_every_stage(
        later_stage_dicts):
    """store_on="replica_leaders" on DP x PP with a dict on every rank: each replica's leader
    holds its own rows (docs/store.md). After sync_pipeline_outputs replica 0's first-stage
    leader (rank 0) holds its rows of both stages; replica 1's (rank 1) must too -- not only
    of stage 0 while its stage-1 rows stay behind on rank 3 (or, staged there for want of a
    dict, are dropped)."""
    from parallel_cases import plain_net
    from pipeline_cases import TOL, hand_split_step, inputs, reference, register_sites, two_stages

    from flex_surgery.parallel.pipeline import StageLink

    rank = dist.get_rank()
    stage, dp_rank = rank // 2, rank % 2
    _, _, x_mbs, t_mbs = inputs(8, 2)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    stored: dict | None = {} if stage == 0 or later_stage_dicts else None
    flex = FlexModel(two_stages(plain_net(), stage), stored, pipeline_parallel_size=2,
                     data_parallel_size=2, key_by_hook_kind=True, store_on="replica_leaders")
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, [x.chunk(2)[dp_rank] for x in x_mbs],
                    [t.chunk(2)[dp_rank] for t in t_mbs])
    flex.sync_pipeline_outputs(link)
    flex.restore()
    # Forward activations are split over dp: each replica leader's rows of each call.
    forward = sorted(k for k in ref_stored if k.split(".")[0] == "blocks"
                     and (":" not in k or k.endswith(":input")))
    assert any(k.startswith("blocks.1") for k in forward)
    if stage == 0:
        for key in forward:
            assert key in stored, (rank, key, sorted(stored))
            want = [v.chunk(2)[dp_rank] for v in ref_stored[key]]
            assert len(stored[key]) == len(want), key
            for a, b in zip(stored[key], want):
                torch.testing.assert_close(a, b, **TOL)
    elif stored is not None:
        assert not any(k in stored for k in forward), (rank, sorted(stored))


def _odd_objects() -> dict:
    """Tensors send_object must carry as values: conjugate and negative views (bits that a
    raw byte view ignores or refuses), dtypes outside the usual set, a tensor that requires
    grad, the same tensor twice, and many small tensors in one object."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, generator=g, dtype=torch.complex64)
    x = torch.randn(4, generator=g)
    shared = torch.arange(6.0)
    out = {
        "conj": z.conj(),  # contiguous, conj bit set
        "neg": torch._neg_view(x),  # contiguous, neg bit set
        "c128": torch.randn(3, generator=g, dtype=torch.complex128),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "i16": torch.arange(7, dtype=torch.int16),
        "grad": torch.randn(3, generator=g).requires_grad_(),
        "twice": [shared, shared],
        "many": [torch.full((2,), float(i)) for i in range(300)],
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)
    return out


@distributed(world_size=2, timeout_s=60)
def test_stage_link_objects_carry_values_of_conj_neg_and_unusual_tensors():
    from flex_surgery.parallel.pipeline import StageLink, _BlockingLine

    flex = FlexModel(nn.Linear(2, 2), {}, pipeline_parallel_size=2)
    for link in (StageLink(flex.runtime.mesh), _BlockingLine(flex.runtime.mesh)):
        sent = _odd_objects()
        if link.is_first:
            link.send_object(sent, 1)
            continue
        got = link.recv_object(0)
        assert sorted(got) == sorted(sent)
        for key, want in sent.items():
            pairs = zip(got[key], want) if isinstance(want, list) else [(got[key], want)]
            for a, b in pairs:
                assert a.dtype == b.dtype and a.shape == b.shape, key
                b = b.detach().resolve_conj().resolve_neg()
                if a.dtype.is_floating_point and a.element_size() == 1:  # float8: compare bits
                    a, b = a.view(torch.uint8), b.view(torch.uint8)
                assert torch.equal(a, b), key
                assert not a.is_conj() and not a.is_neg() and not a.requires_grad, key
    flex.restore()


@distributed(world_size=2, timeout_s=60)
def test_a_store_on_rank0_receives_later_stages_reduced_values_as_one_process():
    """store= on rank 0 only, reduce= hooks on both stages (with and without an editing
    function): the later stage's reductions reach rank 0's store at sync_pipeline_outputs,
    reduced once, step by step, equal to one process's store."""
    from parallel_cases import local_group, plain_net
    from pipeline_cases import TOL, hand_split_step, inputs, two_stages

    from flex_surgery.parallel.pipeline import StageLink
    from flex_surgery.store.memory import MemoryStore

    sites = [("blocks.0.up", "mean_over_batch", None), ("blocks.1.up", "mean_over_batch", None),
             ("blocks.1.act", "last_token", lambda m, t, c, d: t * 2.0),
             ("head", "mean_over_batch", lambda m, t, c, d: t - 1.0)]

    def hooks(flex):
        names = {n for n, _ in flex.module.named_modules()}
        for name, reduce, fn in sites:
            if name in names or flex.runtime.__class__.__name__ != "LocalRuntime":
                flex.register_forward_hook(HookFunction(name, reduce=reduce,
                                                        editing_function=fn))

    _, _, x_mbs, t_mbs = inputs(4, 2)
    ref_store = MemoryStore()
    ref = FlexModel(plain_net(), None, store=ref_store, process_group=local_group())
    hooks(ref)
    for x in x_mbs:
        ref(x)
    ref.restore()
    store = MemoryStore() if dist.get_rank() == 0 else None
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), None, store=store,
                     pipeline_parallel_size=2)
    hooks(flex)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    flex.restore()
    if dist.get_rank() == 0:
        got, want = store.to_dict(), ref_store.to_dict()
        assert sorted(got) == sorted(want)
        for key in want:
            assert len(got[key]) == len(want[key]), key
            for a, b in zip(got[key], want[key]):
                assert a.shape == b.shape, key
                torch.testing.assert_close(a, b, **TOL)


@distributed(world_size=4, timeout_s=90)
def test_tp_x_pp_dict_on_rank0_only_with_edits_equals_one_process():
    """fairscale TP x PP, a dict on rank 0 only: the stage-1 leader stages (its tp peer does
    not), rank 0 collects every stage equal to one process; the edited outputs match."""
    from fairscale.nn.model_parallel import initialize as fs
    from parallel_cases import fairscale_net, plain_net
    from pipeline_cases import (
        TOL,
        assert_stored_equal,
        hand_split_step,
        inputs,
        reference,
        register_sites,
        two_stages,
    )

    from flex_surgery.parallel.pipeline import StageLink

    fs.initialize_model_parallel(2, pipeline_length=2)
    stage = dist.get_rank(fs.get_pipeline_parallel_group())
    _, _, x_mbs, t_mbs = inputs(4, 2)
    ref_stored, ref_out, _ = reference(x_mbs, t_mbs, edit=True)
    stored = {} if dist.get_rank() == 0 else None
    flex = FlexModel(two_stages(fairscale_net(plain_net()), stage), stored,
                     tensor_parallel_size=2, pipeline_parallel_size=2, key_by_hook_kind=True)
    register_sites(flex, edit=True)
    link = StageLink(flex.runtime.mesh)
    out = hand_split_step(flex, link, x_mbs, t_mbs)
    staged = flex._shared.output_dict
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    elif stage == 1:
        assert (staged is not None) == flex.runtime.mesh.is_stage_leader()
    if link.is_last:
        torch.testing.assert_close(out, ref_out, **TOL)
    flex.restore()


@distributed(world_size=2, timeout_s=60)
def test_a_nested_theater_failing_on_one_rank_leaves_the_outer_one_in_step():
    """Inside an outer theater (DDP), an inner custom theater fails on rank 1 only: every rank
    raises from the inner entry and is back at the outer theater's weights bit-exactly; the
    ranks stay in step (a second inner theater agrees), and leaving the outer one normally
    puts the original weights back."""
    from test_surgery_support import differing_bytes, raw_state

    from flex_surgery.parallel.failures import RemoteEditError
    from flex_surgery.surgery import SurgicalTheater, active_theaters

    model = _ddp_llama()
    before = raw_state(model)

    def fails_on_rank_1(p):
        if dist.get_rank() == 1:
            raise RuntimeError("inner failed on rank 1")
        return p * 3.0

    outer = SurgicalTheater(model, layers=[0], modification_type="scale", factor=0.5)
    with outer:
        inside = raw_state(model)
        expected = RuntimeError if dist.get_rank() == 1 else RemoteEditError
        with pytest.raises(expected, match="inner failed on rank 1"):
            with SurgicalTheater(model, layers=[0, 1], modification_fn=fails_on_rank_1):
                pytest.fail("the body must not run")
        assert active_theaters() == (outer,)
        assert differing_bytes(inside, raw_state(model)) == 0
        torch.manual_seed(dist.get_rank())
        with SurgicalTheater(model, layers=[1], modification_type="noise",
                             noise_scale=0.1) as inner:
            local = inner._targets[0].local.detach().clone()
        both = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(both, local)
        assert torch.equal(*both)
        assert differing_bytes(inside, raw_state(model)) == 0
    assert active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0


@distributed(world_size=2, timeout_s=20)
def test_a_failed_restore_after_the_body_raised_can_be_retried_on_that_rank():
    """The body raises on every rank (so no exit agreement runs) and putting the weights back
    fails on rank 1 only: rank 1 alone keeps its theater active. The documented retry,
    ``restore()``, must then work on rank 1 -- the other rank has left its theater (its
    ``restore()`` is an error) and will not join an exit agreement."""
    from test_surgery_support import differing_bytes, raw_state

    from flex_surgery.surgery import RestoreError, SurgeryError, SurgicalTheater, active_theaters
    from flex_surgery.surgery.snapshot import Snapshot

    model = _ddp_llama()
    before = raw_state(model)
    restore, failed = Snapshot.restore, []

    def flaky(self):
        if dist.get_rank() == 1 and not failed:
            failed.append(True)
            raise RuntimeError("restore failed on rank 1")
        restore(self)

    theater = SurgicalTheater(model, modification_type="scale", factor=0.5, layers=[0])
    Snapshot.restore = flaky
    try:
        expected = RestoreError if dist.get_rank() == 1 else KeyError
        with pytest.raises(expected):
            with theater:
                raise KeyError("the body failed on every rank")
    finally:
        Snapshot.restore = restore
    if dist.get_rank() == 1:
        assert active_theaters() == (theater,)
        theater.restore()  # the retry the RestoreError asks for
    else:
        assert active_theaters() == ()
        with pytest.raises(SurgeryError, match="not active"):
            theater.restore()
    assert active_theaters() == ()
    assert differing_bytes(before, raw_state(model)) == 0
    dist.barrier()


def _inplace_on_grads(module, tensor, ctx, modules):
    """In place (returning its input) where autograd allows it: on gradients, which do not
    require grad; functional on forward values."""
    return tensor.mul_(2.0) if not tensor.requires_grad else tensor * 2.0


@distributed(world_size=2, timeout_s=60)
def test_pipeline_in_place_gradient_edits_returning_the_input_equal_one_process():
    """Hand-split PP, every hook kind edited, gradient hooks in place returning their input:
    the stored values (before the edits), outputs and parameter gradients equal one process
    doing the same, collected on rank 0 (a dict on rank 0 only)."""
    from parallel_cases import plain_net
    from pipeline_cases import (
        TOL,
        assert_stored_equal,
        hand_split_step,
        inputs,
        reference,
        register_sites,
        two_stages,
    )

    from flex_surgery.parallel.pipeline import StageLink

    _, _, x_mbs, t_mbs = inputs(4, 2)
    ref_stored, ref_out, ref_grads = reference(x_mbs, t_mbs, edit=True,
                                               editing_function=_inplace_on_grads)
    stored = {} if dist.get_rank() == 0 else None
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), stored,
                     pipeline_parallel_size=2, key_by_hook_kind=True)
    register_sites(flex, edit=True, editing_function=_inplace_on_grads)
    link = StageLink(flex.runtime.mesh)
    out = hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    if link.is_last:
        torch.testing.assert_close(out, ref_out, **TOL)
    for name, p in flex.module.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL)
    flex.restore()


@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_store_on_all_with_dicts_everywhere_every_rank_holds_everything():
    from pipeline_cases import TOL, assert_stored_equal

    got, ref = _dp_pp_case((0, 1, 2, 3), "all", n_micro=2)
    for stored in got:
        assert_stored_equal(stored, ref, **TOL)


@pytest.mark.parametrize("fn", [inplace_mul, inplace_on_a_view, returns_input_as_view],
                         ids=lambda f: f.__name__)
def test_one_process_inplace_edit_of_the_models_input_matches_raw_torch(fn):
    """The model's input, a leaf that does not require grad, edited in place by a
    forward-pre hook on the first layer: output, stored value and gradients as raw torch."""
    x_raw, x_flex = _input(requires_grad=False), _input(requires_grad=False)
    want = _raw(_net(), "0", "forward_pre", fn, x_raw)
    got = _flex(_net(), "0", "forward_pre", fn, x_flex)
    assert torch.equal(got[0], want[0]) and torch.equal(x_flex, x_raw)
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert all(_same(got[2][n], want[2][n]) for n in want[2])


def test_one_process_inplace_edit_of_a_view_of_a_leaf_requiring_grad_raises_as_raw_torch():
    """The hooked input is a view of a leaf that requires grad: an in-place edit is refused by
    autograd with raw hooks; FlexModel must not hide it (no silent detach)."""
    base = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    net = _net()
    net[0].register_forward_pre_hook(lambda m, a: (a[0].mul_(2.0),))
    with pytest.raises(RuntimeError, match="view of a leaf"):
        net(base[:, :4])
    flex = FlexModel(_net(), {})
    flex.register_forward_pre_hook(HookFunction("0", editing_function=lambda m, t, c, d:
                                                t.mul_(2.0)))
    with pytest.raises(RuntimeError, match="view of a leaf"):
        flex(base[:, :4])


def test_giving_a_dict_to_a_flexmodel_built_with_a_store_is_refused():
    """FlexModel refuses output_dict and store together at construction; assigning a dict
    later must be refused too: hooks write to the store only, so the dict would stay empty
    without a word (and under pipelining the later stages' values would land in the dict
    while this stage's went to the store)."""
    from flex_surgery.store.memory import MemoryStore

    flex = FlexModel(_net(), None, store=MemoryStore())
    with pytest.raises(ValueError, match="store"):
        flex.output_dict = {}
    flex.output_dict = None  # keeping nothing more is fine
    flex.restore()


@distributed(world_size=4, timeout_s=60)
def test_unseeded_noise_on_flexmodels_over_two_sub_groups_agrees_within_each():
    """Ranks {0, 1} and {2, 3} each run a data-parallel FlexModel over their own group: a
    theater on it uses the draw of its group's first rank (replicas equal), and the groups draw
    apart."""
    from parallel_cases import plain_net

    from flex_surgery.surgery import SurgicalTheater

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    flex = FlexModel(plain_net(), {}, data_parallel_size=2, process_group=groups[rank // 2])
    torch.manual_seed(rank)
    with SurgicalTheater(flex, layers=["blocks.0.up"], modification_type="noise",
                         noise_scale=0.1) as theater:
        local = theater._targets[0].local.detach().clone()
    flex.restore()
    every = [torch.empty_like(local) for _ in range(4)]
    dist.all_gather(every, local)
    assert torch.equal(every[0], every[1]) and torch.equal(every[2], every[3])
    assert not torch.equal(every[0], every[2])
