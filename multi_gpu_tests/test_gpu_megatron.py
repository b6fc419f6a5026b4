"""Megatron-core on GPUs, where it is installed: flex_surgery's collectives over Megatron's own
tensor-parallel group gather exactly what Megatron's mapping gathers ([seq, batch, hidden]
activations, hidden split over TP); a real ``GPTModel`` (local layer spec) at TP=2, with and
without sequence parallelism, equals the TP=1 model with the same full weights over NCCL, and
so do FlexModel's retrieval and edits on it; and the same model split in two pipeline stages
and run by Megatron's 1F1B schedule equals the schedule without pipelining (losses and
gradients).

The GPTModel is the one of the CPU tests (``_test/megatron_gpt_cases.py``), in float64.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flex_surgery.parallel.collectives import all_gather, gather_to_one

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

TOL = dict(rtol=1e-9, atol=1e-11)  # float64: the parallel runs differ in summation order only


def _gpt_cases():
    """``_test/megatron_gpt_cases.py``: one GPTModel recipe for the CPU and GPU tests."""
    test_dir = str(Path(__file__).resolve().parents[1] / "_test")
    if test_dir not in sys.path:
        sys.path.insert(0, test_dir)
    import megatron_gpt_cases

    return megatron_gpt_cases


def _skip_unless_divisible(by: int) -> None:
    """Megatron needs the world to split into groups of ``by`` (same decision on every rank)."""
    if dist.get_world_size() % by:
        pytest.skip(f"Megatron needs a world divisible by {by}; this one has "
                    f"{dist.get_world_size()} ranks")


def _assert_all_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{what} {k}: {m}",
                                   **TOL)


@pytest.mark.cuda_only
@pytest.mark.world_size(2)
def test_gather_agrees_with_megatron_on_its_tensor_parallel_group(device):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    size = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=size)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        generator = torch.Generator().manual_seed(tp_rank)
        local = torch.randn(5, 2, 3, generator=generator).to(device)  # [seq, batch, hidden/tp]
        theirs = gather_from_tensor_model_parallel_region(local)
        everywhere = all_gather(local, dim=-1, group=group)
        on_leader = gather_to_one(local, dim=-1, group=group, dst=0)
    finally:
        parallel_state.destroy_model_parallel()
    assert theirs.shape == (5, 2, 3 * size)
    assert torch.equal(everywhere, theirs)
    if tp_rank == 0:
        assert torch.equal(on_leader, theirs)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_megatron_gpt_tp2_equals_tp1(device, sequence_parallel):
    """Whole weights, logits and gradients of the TP=2 GPTModel equal the TP=1 model's (every
    data-parallel replica runs the same batch)."""
    _skip_unless_divisible(2)
    cases = _gpt_cases()
    with cases.gpt_parallel(tp=1):
        reference = cases.build_gpt(tp=1, device=device)
        ref_weights = cases.full_tensors(reference)
        ref_logits, ref_grads = cases.forward_backward(reference, device=device)
    with cases.gpt_parallel(tp=2):
        model = cases.build_gpt(tp=2, sequence_parallel=sequence_parallel, device=device)
        weights = cases.full_tensors(model)
        logits, grads = cases.forward_backward(model, device=device)
    _assert_all_close(weights, ref_weights, "weight")
    torch.testing.assert_close(logits, ref_logits, **TOL)
    _assert_all_close(grads, ref_grads, "grad")


@pytest.mark.world_size(2)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_megatron_gpt_flexmodel_tp2_equals_tp1(device, sequence_parallel):
    """Under FlexModel (Megatron's groups adopted), hooks on the TP=2 GPTModel store the TP=1
    tensors, and edits give the TP=1 logits and gradients (every data-parallel replica runs
    its rows of the batch)."""
    _skip_unless_divisible(2)
    cases = _gpt_cases()
    sites = cases.DATA_PARALLEL_SITES
    with cases.gpt_parallel(tp=1):
        ref_stored, ref_logits, ref_grads, _ = cases.run_flex(
            cases.build_gpt(tp=1, device=device), sites, False, cases.local_group(), device)
        _, ref_edited, ref_edited_grads, _ = cases.run_flex(
            cases.build_gpt(tp=1, device=device), cases.EDIT_SITES, True, cases.local_group(),
            device)
    with cases.gpt_parallel(tp=2):
        rows = cases.data_parallel_rows()
        model = cases.build_gpt(tp=2, sequence_parallel=sequence_parallel, device=device)
        stored, logits, grads, _ = cases.run_flex(model, sites, False, device=device,
                                                  data_parallel=True)
        _, edited, edited_grads, _ = cases.run_flex(model, cases.EDIT_SITES, True,
                                                    device=device, data_parallel=True)
    torch.testing.assert_close(logits, ref_logits[rows], **TOL)
    _assert_all_close(grads, ref_grads, "grad")
    torch.testing.assert_close(edited, ref_edited[rows], **TOL)
    _assert_all_close(edited_grads, ref_edited_grads, "edited grad")
    if dist.get_rank() == 0:
        problems = cases.stored_mismatches(stored, ref_stored, **TOL)
        assert not problems, "\n".join(problems)
    else:
        assert stored == {}


@pytest.mark.world_size(2)
def test_megatron_gpt_pp2_schedule_equals_no_pipelining(device):
    """Two pipeline stages run by Megatron's 1F1B schedule (3 micro-batches): the last stage's
    losses and every stage's gradients equal the whole model's under the schedule without
    pipelining."""
    _skip_unless_divisible(2)
    if not torch.cuda.is_available():
        pytest.skip("Megatron's schedules allocate a token counter on device='cuda' "
                    "(pipeline_parallel/schedules.py, megatron-core 0.16.1)")
    cases = _gpt_cases()
    with cases.gpt_parallel(tp=1, pp=1):
        whole = cases.build_gpt_stage(pp=1, device=device)
        whole_weights = {n: p.detach().clone() for n, p in whole.named_parameters()}
        ref_losses, ref_grads = cases.schedule_step(whole, device=device)
    with cases.gpt_parallel(tp=1, pp=2):
        from megatron.core import parallel_state

        last = parallel_state.is_pipeline_last_stage()
        stage = cases.build_gpt_stage(pp=2, device=device)
        cases.load_whole(stage, whole_weights)
        losses, grads = cases.schedule_step(stage, device=device)
    assert len(ref_losses) == cases.MICROBATCHES
    assert len(losses) == (cases.MICROBATCHES if last else 0)
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want, **TOL)
    assert grads, "this stage holds no parameters"
    _assert_all_close(grads, {n: ref_grads[n] for n in grads}, "grad")
