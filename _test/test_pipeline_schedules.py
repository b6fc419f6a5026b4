"""``torch.distributed.pipelining`` schedules (GPipe, 1F1B; 2 ranks, 4 micro-batches) through
FlexModel equal one process: what every hook kind stores (collected on rank 0, one entry per
micro-batch), the outputs and the parameter gradients, with and without an x2 editing
function -- for hand-built ``PipelineStage``\\ s (whose first step runs an extra shape-inference
forward and backward, which must not be recorded) and for stages split by ``pipeline()``."""

import time

import pytest
import torch
import torch.distributed as dist
from parallel_cases import plain_net
from pipeline_cases import (
    TOL,
    assert_stored_equal,
    inputs,
    loss_fn,
    reference,
    register_sites,
    two_stages,
)
from rank_pool import distributed

from flex_surgery.hooks.hook_function import HookFunction
from flex_surgery.hooks.wrapper import FlexModel
from flex_surgery.parallel.pipeline import StageLink, skip_metadata_inference

N_MICRO = 4


def _schedule(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]


def _run_schedule(flex, stage, schedule, link, x, target):
    """One schedule step on this rank; the merged outputs on the last stage."""
    sched = _schedule(schedule)(stage, n_microbatches=N_MICRO, loss_fn=loss_fn)
    with link.step():
        if link.is_first:
            sched.step(x)
            out = None
        else:
            out = sched.step(target=target)
    flex.sync_pipeline_outputs(link)
    return out


def _check(stored, out, stage_module, ref, case, names=None):
    ref_stored, ref_out, ref_grads = ref
    if dist.get_rank() == 0:
        assert_stored_equal(stored, ref_stored, **TOL)
        assert all(len(v) == N_MICRO for v in stored.values()), case
    else:
        assert stored == {}, case
        torch.testing.assert_close(out, ref_out, **TOL)
    names = names or {}
    for name, p in stage_module.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[names.get(name, name)], **TOL,
                                   msg=lambda m, n=name, c=case: f"{c} {n}: {m}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@distributed(world_size=2)
def test_pipeline_stage_schedule_equals_one_process(schedule):
    from torch.distributed.pipelining import PipelineStage

    x, target, x_mbs, t_mbs = inputs(8, N_MICRO)
    rank = dist.get_rank()
    for edit in (False, True):
        ref = reference(x_mbs, t_mbs, edit)
        stage_module = two_stages(plain_net(), rank)
        stored: dict = {}
        flex = FlexModel(stage_module, stored, pipeline_parallel_size=2, key_by_hook_kind=True)
        register_sites(flex, edit)
        link = StageLink(flex.runtime.mesh)
        stage = skip_metadata_inference(
            PipelineStage(stage_module, rank, 2, torch.device("cpu"), group=link.group))
        out = _run_schedule(flex, stage, schedule, link, x, target)
        _check(stored, out, stage_module, ref, f"{schedule} edit={edit}")


@distributed(world_size=2)
def test_pipeline_split_gpipe_equals_one_process():
    """Stages cut by ``pipeline()`` keep the whole model's module names; hooks fire on them."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    x, target, x_mbs, t_mbs = inputs(8, N_MICRO)
    rank = dist.get_rank()
    for edit in (False, True):
        ref = reference(x_mbs, t_mbs, edit)
        pipe = pipeline(plain_net(), mb_args=(x_mbs[0],),
                        split_spec={"blocks.1": SplitPoint.BEGINNING})
        stage_module = pipe.get_stage_module(rank)
        stored: dict = {}
        flex = FlexModel(stage_module, stored, pipeline_parallel_size=2, key_by_hook_kind=True)
        assert register_sites(flex, edit)
        link = StageLink(flex.runtime.mesh)
        stage = skip_metadata_inference(
            pipe.build_stage(rank, torch.device("cpu"), group=link.group))
        out = _run_schedule(flex, stage, "gpipe", link, x, target)
        _check(stored, out, stage_module, ref, f"pipeline() edit={edit}")


@pytest.mark.parametrize("skip", [True, False])
@distributed(world_size=2)
def test_shape_inference_pass_is_not_recorded(skip):
    """With :func:`skip_metadata_inference` a hook stores once per micro-batch and its editing
    function runs once per micro-batch; without it the first step's shape-inference pass is
    one more call (which is what makes this test able to fail)."""
    from torch.distributed.pipelining import PipelineStage

    x, target, _, _ = inputs(8, N_MICRO)
    rank = dist.get_rank()
    stage_module = two_stages(plain_net(), rank)
    stored: dict = {}
    flex = FlexModel(stage_module, stored, pipeline_parallel_size=2)
    edits = []

    def count(module, tensor, ctx, modules):
        edits.append(tuple(tensor.shape))
        return tensor

    flex.register_forward_hook(HookFunction(f"blocks.{rank}.up", editing_function=count))
    flex.register_full_backward_hook(HookFunction(f"blocks.{rank}.act"))
    link = StageLink(flex.runtime.mesh)
    stage = PipelineStage(stage_module, rank, 2, torch.device("cpu"), group=link.group)
    if skip:
        skip_metadata_inference(stage)
    counts = []
    for _ in range(2):
        _run_schedule(flex, stage, "gpipe", link, x, target)
        counts.append(len(edits))
    calls = {"edits": counts[-1]}
    if rank == 0:
        calls.update({k: len(v) for k, v in stored.items()})
    stored_keys = [f"blocks.{i}.{k}" for i in (0, 1) for k in ("up", "act")]
    assert sorted(calls) == sorted(["edits"] + (stored_keys if rank == 0 else []))
    # Each new schedule infers shapes again on its first step: 5 calls for 4 micro-batches.
    per_step = N_MICRO if skip else N_MICRO + 1
    assert counts == [per_step, 2 * per_step]
    if skip:
        assert set(calls.values()) == {2 * N_MICRO}, calls
    elif rank == 0:  # (the first stage runs no backward inference)
        assert calls["blocks.0.up"] == calls["blocks.1.up"] == 2 * per_step, calls


@distributed(world_size=2)
def _failing_edit_in_schedule(timeout_s: float):
    from torch.distributed.pipelining import PipelineStage

    x, target, _, _ = inputs(8, N_MICRO)
    rank = dist.get_rank()
    stage_module = two_stages(plain_net(), rank)
    flex = FlexModel(stage_module, {}, pipeline_parallel_size=2)

    def boom(module, tensor, ctx, modules):
        raise ValueError("edit exploded")

    if rank == 1:
        flex.register_forward_hook(HookFunction("blocks.1.down", editing_function=boom))
    link = StageLink(flex.runtime.mesh, timeout_s=timeout_s)
    stage = skip_metadata_inference(
        PipelineStage(stage_module, rank, 2, torch.device("cpu"), group=link.group))
    start = time.monotonic()
    try:
        _run_schedule(flex, stage, "gpipe", link, x, target)
    except Exception as exc:  # what each rank raised (and its cause) is the result
        cause = exc.__cause__ or exc.__context__
        return type(exc).__name__, f"{exc} <- {cause!r}", time.monotonic() - start
    return None, "", time.monotonic() - start


def test_failing_edit_in_schedule_ends_within_the_link_timeout():
    """Stage 1 fails at once; stage 0 waits inside the schedule until the link's timeout and
    then raises naming stage 1's error."""
    from rank_pool import get_pool

    from flex_surgery.parallel.collectives import RemoteEditError
    from flex_surgery.parallel.pipeline import PipelineStageError

    (kind0, msg0, s0), (kind1, msg1, s1) = get_pool(2).run(_failing_edit_in_schedule,
                                                           {"timeout_s": 2.0})
    # The schedule wraps the stage's error in a RuntimeError naming the stage.
    assert kind1 == "RuntimeError" and RemoteEditError.__name__ in msg1, msg1
    assert "edit exploded" in msg1 and s1 < 10, (msg1, s1)
    assert kind0 == PipelineStageError.__name__, (kind0, msg0)
    assert "stage 1" in msg0 and "edit exploded" in msg0, msg0
    assert 1.5 < s0 < 10, s0


@distributed(world_size=2)
def test_hook_groups_chosen_per_step_under_a_schedule():
    """A schedule calls the stage module directly: groups are chosen with select_hook_groups."""
    from torch.distributed.pipelining import PipelineStage

    x, target, _, _ = inputs(8, N_MICRO)
    rank = dist.get_rank()
    stage_module = two_stages(plain_net(), rank)
    stored: dict = {}
    flex = FlexModel(stage_module, stored, pipeline_parallel_size=2)
    flex.create_hook_group("up", "*.up")
    flex.create_hook_group("act", "*.act")
    link = StageLink(flex.runtime.mesh)
    stage = skip_metadata_inference(
        PipelineStage(stage_module, rank, 2, torch.device("cpu"), group=link.group))
    flex.select_hook_groups("up")
    _run_schedule(flex, stage, "gpipe", link, x, target)
    seen_first = sorted(stored)
    flex.select_hook_groups("up", complement=True)
    _run_schedule(flex, stage, "gpipe", link, x, target)
    if rank == 0:
        assert seen_first == ["blocks.0.up", "blocks.1.up"]
        assert {k: len(v) for k, v in stored.items()} == {
            "blocks.0.up": N_MICRO, "blocks.1.up": N_MICRO,
            "blocks.0.act": N_MICRO, "blocks.1.act": N_MICRO}
    else:
        assert stored == {}


@distributed(world_size=4, timeout_s=60)
def test_dp_x_pp_schedule_with_overlap_retrieval_collects_every_stage():
    """DP=2 x PP=2 under a ``torch.distributed.pipelining`` schedule (which calls the stage
    module, not ``flex(...)``), ``overlap_retrieval=True``: the retrievals of dp-sharded
    activations are completed at the next ``wait_for_host_copies``, which no ``flex(...)``
    call made; ``sync_pipeline_outputs`` collected before them, so rank 0 lacked every stage-1
    key (they came with the next step's). It now waits for them first."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    dp = 2
    _, _, x_mbs, t_mbs = inputs(4 * N_MICRO, N_MICRO)  # 4 micro-batches of 4 rows
    stored: dict = {}
    # FlexModel's own mesh: (pp, dp, tp) order -> ranks 0, 1 are stage 0; ranks 2, 3 stage 1.
    stage = dist.get_rank() // dp
    dp_rank = dist.get_rank() % dp
    ref_stored, _, _ = reference(x_mbs, t_mbs, edit=False)
    stage_module = two_stages(plain_net(), stage)
    flex = FlexModel(stage_module, stored if dist.get_rank() == 0 else None,
                     pipeline_parallel_size=2, data_parallel_size=dp, key_by_hook_kind=True,
                     overlap_retrieval=True)
    assert flex.runtime.mesh.stage == stage and flex.runtime.mesh.rank("dp") == dp_rank
    register_sites(flex, edit=False)
    link = StageLink(flex.runtime.mesh, timeout_s=30)
    pstage = skip_metadata_inference(
        PipelineStage(stage_module, link.stage, 2, torch.device("cpu"), group=link.group))
    # This replica's rows of every micro-batch, in micro-batch order (the schedule chunks
    # along dim 0 into N_MICRO pieces).
    mine_x = torch.cat([mb.chunk(dp)[dp_rank] for mb in x_mbs])
    mine_t = torch.cat([mb.chunk(dp)[dp_rank] for mb in t_mbs])
    sched = ScheduleGPipe(pstage, n_microbatches=N_MICRO, loss_fn=loss_fn)
    with link.step():
        if link.is_first:
            sched.step(mine_x)
        else:
            sched.step(target=mine_t)
    flex.sync_pipeline_outputs(link)
    got = {k: list(v) for k, v in stored.items()}  # before close (a collective), so no rank
    flex.close()                                   # is left waiting when rank 0 fails
    if dist.get_rank() == 0:
        # every key of both stages, one whole (dp-gathered) tensor per micro-batch
        assert_stored_equal(got, ref_stored, **TOL)
