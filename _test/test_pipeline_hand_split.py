"""Hand-split pipeline stages (each rank holds an ``nn.Module`` stage, activations move over a
StageLink) through FlexModel equal one process: what every hook kind stores (collected on rank
0, one entry per micro-batch), the outputs and the parameter gradients, with and without an x2
editing function; hook groups per call; a failing editing function makes every rank fail fast."""

import time

import pytest
import torch
import torch.distributed as dist
from parallel_cases import plain_net, times_two
from pipeline_cases import (
    TOL,
    assert_stored_equal,
    hand_split_step,
    inputs,
    reference,
    register_sites,
    two_stages,
)
from rank_pool import distributed

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.pipeline import PipelineStageError, StageLink

N_MICRO = 2


@distributed(world_size=2)
def test_hand_split_two_stages_equal_one_process():
    x, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    for edit in (False, True):
        case = f"edit={edit}"
        ref_stored, ref_out, ref_grads = reference(x_mbs, t_mbs, edit)
        stage = two_stages(plain_net(), dist.get_rank())
        stored: dict = {}
        flex = FlexModel(stage, stored, pipeline_parallel_size=2, key_by_hook_kind=True)
        assert flex.runtime.mesh.stage == dist.get_rank()
        register_sites(flex, edit)
        link = StageLink(flex.runtime.mesh)
        out = hand_split_step(flex, link, x_mbs, t_mbs)
        before = {k: len(v) for k, v in stored.items()}
        flex.sync_pipeline_outputs(link)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
            assert all(len(v) == N_MICRO for v in stored.values())
            assert any(k.startswith("blocks.1") for k in stored) and before.keys() < stored.keys()
        else:
            assert before and stored == {}  # moved to rank 0, not copied
            torch.testing.assert_close(out, ref_out, **TOL)
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], **TOL,
                                       msg=lambda m, n=name, c=case: f"{c} {n}: {m}")
        flex.restore()


@distributed(world_size=2)
def test_hook_groups_per_call_and_store_on_all():
    """Group "up" on one step, group "down" on the next: each step records its own group."""
    _, _, x_mbs, t_mbs = inputs(2, 1)
    stage = two_stages(plain_net(), dist.get_rank())
    stored: dict = {}
    flex = FlexModel(stage, stored, pipeline_parallel_size=2)
    flex.create_hook_group("up", "*.up")
    flex.create_hook_group("down", "*.down")
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs, groups="up")
    flex.sync_pipeline_outputs(link)
    hand_split_step(flex, link, x_mbs, t_mbs, groups="down")
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert {k: len(v) for k, v in stored.items()} == {
            "blocks.0.up": 1, "blocks.1.up": 1, "blocks.0.down": 1, "blocks.1.down": 1}
    else:
        assert stored == {}
    flex.restore()
    # store_on="all": every rank of the pipeline line ends up with every stage's entries.
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), {}, pipeline_parallel_size=2)
    flex.runtime.store_on = "all"
    flex.register_forward_hook(HookFunction(f"blocks.{dist.get_rank()}.up"))
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs()  # without a link: the mesh's pp group
    assert sorted(flex.output_dict) == ["blocks.0.up", "blocks.1.up"]


@distributed(world_size=2)
def _failing_edit(failing_stage: int):
    """Run a step whose editing function raises on ``failing_stage``; report what each rank
    saw and how long it took."""
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    stage = two_stages(plain_net(), dist.get_rank())
    flex = FlexModel(stage, {}, pipeline_parallel_size=2)

    def boom(module, tensor, ctx, modules):
        raise ValueError("edit exploded")

    if dist.get_rank() == failing_stage:
        flex.register_forward_hook(HookFunction(f"blocks.{failing_stage}.down",
                                                editing_function=boom))
    link = StageLink(flex.runtime.mesh, timeout_s=60)
    start = time.monotonic()
    try:
        hand_split_step(flex, link, x_mbs, t_mbs)
        flex.sync_pipeline_outputs(link)
    except Exception as exc:  # what each rank raised is the result
        return type(exc).__name__, str(exc), time.monotonic() - start
    return None, "", time.monotonic() - start


@pytest.mark.parametrize("failing_stage", [0, 1])
def test_failing_edit_fails_every_rank_fast(failing_stage):
    from rank_pool import get_pool

    results = get_pool(2).run(_failing_edit, {"failing_stage": failing_stage})
    for rank, (kind, message, seconds) in enumerate(results):
        assert seconds < 10, (rank, seconds)
        assert "edit exploded" in message, (rank, message)
        if rank == failing_stage:
            assert kind == RemoteEditError.__name__ and "blocks." in message, message
        else:
            assert kind == PipelineStageError.__name__, (kind, message)
            assert f"stage {failing_stage}" in message, message


@distributed(world_size=2)
def test_sync_is_a_no_op_without_pipelining():
    """dp = 2, pp = 1: every rank keeps what it stored (rank 0 all of it, rank 1 nothing)."""
    x, _, _, _ = inputs(4, 1)
    stored: dict = {}
    flex = FlexModel(plain_net(), stored, data_parallel_size=2)
    flex.register_forward_hook(HookFunction("blocks.1.up"))
    flex(x.chunk(2)[dist.get_rank()])
    before = {k: [t.clone() for t in v] for k, v in stored.items()}
    flex.sync_pipeline_outputs()
    assert stored.keys() == before.keys() and all(
        torch.equal(a, b) for k in stored for a, b in zip(stored[k], before[k]))
    if dist.get_rank() == 0:
        assert [tuple(t.shape) for t in stored["blocks.1.up"]] == [(4, 3, 16)]
    else:
        assert stored == {}


@distributed(world_size=2)
def test_stage_link_carries_any_shape_and_dtype():
    """The header gives the receiver each tensor's dtype and shape; objects travel pickled."""
    link = StageLink(FlexModel(torch.nn.Linear(2, 2), {}, pipeline_parallel_size=2).runtime.mesh)
    g = torch.Generator().manual_seed(0)  # both ranks build the same tensors
    sent = [torch.randn(2, 3, 4, generator=g).bfloat16(), torch.tensor(7),
            torch.tensor([True, False]),
            torch.empty(0, 4, dtype=torch.float64), torch.arange(6).reshape(3, 2).t()]
    if link.is_first:
        for t in sent:
            link.send_forward(t)
        link.send_object({"a": [sent[0]]}, 1)
        assert torch.equal(link.recv_backward(), sent[1])
        with pytest.raises(ValueError, match="dtype"):
            link.send_forward(torch.zeros(2, dtype=torch.complex64))
    else:
        got = [link.recv_forward() for _ in sent]
        for a, b in zip(got, sent):
            assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
        assert torch.equal(link.recv_object(0)["a"][0], sent[0])
        link.send_backward(got[1])


@distributed(world_size=2)
def test_every_rank_can_register_every_hook():
    """SPMD registration: both stages register hooks on every module of the whole model; each
    fires on the stage that owns its module, groups may hold remote hooks, and a name that no
    stage has is still an error on every rank."""
    from pipeline_cases import _REGISTER, STAGE_PARAM_SITES, STAGE_SITES

    from flex_surgery.hooks.errors import UnknownNameError

    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=True)
    stage = two_stages(plain_net(), dist.get_rank())
    stored: dict = {}
    flex = FlexModel(stage, stored, pipeline_parallel_size=2, key_by_hook_kind=True)
    hooks = []
    for name, kind in STAGE_SITES:  # no filtering by stage
        hf = HookFunction(name, editing_function=times_two)
        getattr(flex, _REGISTER[kind])(hf)
        hooks.append(hf)
    for name in STAGE_PARAM_SITES:
        hf = HookFunction(name, editing_function=times_two)
        flex.register_hook(hf)
        hooks.append(hf)
    remote = [hf for hf in hooks if hf.is_remote]
    assert remote and len(remote) < len(hooks)
    assert all(not hf.module_name.startswith(f"blocks.{dist.get_rank()}") for hf in remote)
    flex.update_hook_groups(hooks, "everything")
    assert flex.create_hook_group("heads", "head") == ([] if dist.get_rank() == 0 else
                                                       flex.get_group_hook_functions("heads"))
    with pytest.raises(UnknownNameError, match="no module named 'blocks.7.up'"):
        flex.register_forward_hook(HookFunction("blocks.7.up"))
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs, groups="everything")
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
    flex.restore()
    assert not any(hf.is_registered for hf in hooks)


@distributed(world_size=2)
def test_a_stage_without_an_output_dict_still_sends_its_entries():
    _, _, x_mbs, t_mbs = inputs(2, 1)
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    stage = two_stages(plain_net(), dist.get_rank())
    stored: dict | None = {} if dist.get_rank() == 0 else None
    flex = FlexModel(stage, stored, pipeline_parallel_size=2, key_by_hook_kind=True)
    keys = register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh)
    hand_split_step(flex, link, x_mbs, t_mbs)
    flex.sync_pipeline_outputs(link)
    if dist.get_rank() == 0:
        assert any(k.startswith("blocks.1") for k in stored)
        assert_stored_equal(stored, {k: v for k, v in ref_stored.items() if k in stored}, **TOL)
    else:
        assert keys


@distributed(world_size=2)
def test_keep_last_is_refused_with_pipelining():
    """Stages' calls are collected on rank 0 as lists, so keep="last" is an error on every
    rank, and the model can then be wrapped with keep="all"."""
    stage = two_stages(plain_net(), dist.get_rank())
    with pytest.raises(ValueError, match="keep='last' is not available with pipeline"):
        FlexModel(stage, {}, pipeline_parallel_size=2, keep="last")
    FlexModel(stage, {}, pipeline_parallel_size=2).close()


@distributed(world_size=2)
def test_stage_link_objects_round_trip_exactly():
    """Objects cross stages with their structure pickled and their tensors as one flat byte
    buffer: every dtype, shape (0-dim, empty, non-contiguous) and plain value comes back equal."""
    from flex_surgery.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.build(pp=2)
    g = torch.Generator().manual_seed(0)
    obj = {"a": [torch.randn(3, 5, generator=g), torch.randn(4, 6, generator=g).t()],
           "b": [torch.randn(7, generator=g).to(torch.bfloat16), torch.tensor(3.5),
                 torch.empty(0, 2), torch.arange(5), torch.tensor([True, False, True])],
           "c": [torch.randn(2, 3, generator=g, dtype=torch.float64), None, "text", 4]}
    with StageLink(mesh) as link:
        if link.stage == 1:
            link.send_object(obj, 0)
            return
        got = link.recv_object(1)
    assert got.keys() == obj.keys()
    for key in obj:
        for a, b in zip(got[key], obj[key]):
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
                assert a.untyped_storage().nbytes() == b.numel() * b.element_size()
            else:
                assert a == b
