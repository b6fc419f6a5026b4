"""Pipeline stages with fairscale tensor parallelism inside (TP x PP on 4 ranks) and data
parallelism across (DP x TP x PP on 8 ranks, fairscale's (dp, pp, tp) rank order adopted through
ParallelMesh) equal one process: what every hook kind stores (collected on global rank 0), the
outputs and the whole parameter gradients, with and without an x2 editing function."""

import time

import torch
import torch.distributed as dist
from parallel_cases import clean, fairscale_net, plain_net
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
from flex_surgery.parallel.collectives import all_gather
from flex_surgery.parallel.layout import fairscale_param_dim
from flex_surgery.parallel.pipeline import StageLink

N_MICRO = 2


def _whole_grads(stage_module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter gradient of this stage, gathered over tensor parallelism."""
    grads = {}
    for mod_name, mod in stage_module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            dim = fairscale_param_dim(mod, p)
            g = p.grad.detach()
            grads[clean(f"{mod_name}.{p_name}")] = g if dim is None else all_gather(g, dim,
                                                                                   tp_group)
    return grads


def _tp_x_pp_case(dp: int) -> None:
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2, pipeline_length=2)
    stage = dist.get_rank(fs.get_pipeline_parallel_group())
    dp_rank = fs.get_data_parallel_rank()
    _, _, x_mbs, t_mbs = inputs(4 * dp, N_MICRO)

    def mine(t: torch.Tensor) -> torch.Tensor:  # this dp replica's rows of a micro-batch
        return t.chunk(dp)[dp_rank]

    for edit in (False, True):
        case = f"dp={dp} edit={edit}"
        ref_stored, ref_out, ref_grads = reference(x_mbs, t_mbs, edit)
        stage_module = two_stages(fairscale_net(plain_net()), stage)
        stored: dict = {}
        flex = FlexModel(stage_module, stored, tensor_parallel_size=2, pipeline_parallel_size=2,
                         data_parallel_size=dp, key_by_hook_kind=True)
        mesh = flex.runtime.mesh
        assert (mesh.source, mesh.sizes, mesh.stage) == (
            "fairscale", {"dp": dp, "tp": 2, "pp": 2}, stage)
        edits = []

        def counted_times_two(module, tensor, ctx, modules, edits=edits):
            edits.append(tuple(tensor.shape))
            return tensor * 2

        n_hooks = len(register_sites(flex, edit, editing_function=counted_times_two))
        link = StageLink(mesh)
        assert link.ranks == dist.get_process_group_ranks(fs.get_pipeline_parallel_group())
        out = hand_split_step(flex, link, [mine(x) for x in x_mbs], [mine(t) for t in t_mbs])
        if dp > 1:  # what DDP does: average parameter gradients over the replicas
            for p in stage_module.parameters():
                dist.all_reduce(p.grad, group=fs.get_data_parallel_group())
                p.grad /= dp
        flex.sync_pipeline_outputs(link)
        # Each editing function ran once per call, on its stage's leader only.
        assert len(edits) == (n_hooks * N_MICRO if edit and mesh.is_stage_leader() else 0)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
            assert all(len(v) == N_MICRO for v in stored.values())
        else:
            assert stored == {}, (dist.get_rank(), sorted(stored))
        if link.is_last:
            want = torch.cat([mine(o) for o in ref_out.chunk(N_MICRO)])
            torch.testing.assert_close(out, want, **TOL)
        grads = _whole_grads(stage_module, fs.get_model_parallel_group())
        assert grads
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], **TOL,
                                       msg=lambda m, n=name, c=case: f"{c} {n}: {m}")
        flex.restore()


@distributed(world_size=4)
def test_tp_x_pp_equals_one_process():
    _tp_x_pp_case(dp=1)


@distributed(world_size=8)
def test_dp_x_tp_x_pp_equals_one_process():
    _tp_x_pp_case(dp=2)


@distributed(world_size=4)
def _failing_edit_tp_x_pp():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2, pipeline_length=2)
    stage = dist.get_rank(fs.get_pipeline_parallel_group())
    _, _, x_mbs, t_mbs = inputs(4, N_MICRO)
    flex = FlexModel(two_stages(fairscale_net(plain_net()), stage), {}, tensor_parallel_size=2,
                     pipeline_parallel_size=2)

    def boom(module, tensor, ctx, modules):
        raise ValueError("edit exploded")

    if stage == 1:
        flex.register_forward_hook(HookFunction("blocks.1.act", editing_function=boom))
    link = StageLink(flex.runtime.mesh)
    start = time.monotonic()
    try:
        hand_split_step(flex, link, x_mbs, t_mbs)
        flex.sync_pipeline_outputs(link)
    except Exception as exc:  # what each rank raised is the result
        return stage, type(exc).__name__, str(exc), time.monotonic() - start
    return stage, None, "", time.monotonic() - start


def test_failing_edit_on_a_tp_stage_fails_every_rank_fast():
    """Both TP ranks of stage 1 raise the editing error; both ranks of stage 0 stop waiting."""
    from rank_pool import get_pool

    for stage, kind, message, seconds in get_pool(4).run(_failing_edit_tp_x_pp):
        assert seconds < 10 and "edit exploded" in message, (stage, seconds, message)
        assert kind == ("RemoteEditError" if stage == 1 else "PipelineStageError"), (kind, message)
