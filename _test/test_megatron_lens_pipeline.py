"""The logit lens on Megatron-core GPTModel pipeline stages against the lens of the whole model
in one process on the same micro-batches; stages whose blocks are not the next ones refused."""

from __future__ import annotations

import torch
from megatron_gpt_cases import (
    MICROBATCHES,
    build_gpt,
    build_gpt_stage,
    gpt_inputs,
    gpt_parallel,
    load_whole,
    local_group,
)
from rank_pool import distributed


def _micro_batches():
    ids, pos, mask = gpt_inputs()
    return [(ids.roll(k, 1), pos, mask) for k in range(MICROBATCHES)]


def _forward_by_hand(stage, mesh) -> None:
    """The stages run one after the other per micro-batch, the hidden states [s, b, h] sent
    over a StageLink (Megatron's schedules allocate on CUDA; ``multi_gpu_tests`` runs them)."""
    from flex_surgery.parallel.pipeline import StageLink

    link = StageLink(mesh)
    with link.step(), torch.no_grad():
        for ids, pos, mask in _micro_batches():
            if link.is_first:
                link.send_forward(stage(ids, pos, mask))
            else:
                stage.set_input_tensor(link.recv_forward())
                stage(ids, pos, mask)
    return link


@distributed(world_size=2)
def test_megatron_pipeline_lens_equals_one_process():
    from flex_surgery import LogitLens, logit_lens

    with gpt_parallel(tp=1):
        whole_model = build_gpt(tp=1, model_kwargs=dict(share_embeddings_and_output_weights=False))
        whole = {n: p.detach().clone() for n, p in whole_model.named_parameters()}
        batches = _micro_batches()
        joined = tuple(torch.cat(parts, dim=0) for parts in zip(*batches))
        want = logit_lens(whole_model, joined, top_k=3, process_group=local_group())
    with gpt_parallel(tp=1, pp=2):
        stage = build_gpt_stage(2)
        load_whole(stage, whole)
        with LogitLens(stage, top_k=3, pipeline_parallel_size=2) as lens:
            got = lens.result(_forward_by_hand(stage, lens.mesh))
    assert got.layers == want.layers
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-9, atol=1e-11)


@distributed(world_size=2)
def test_stages_whose_blocks_are_not_the_next_ones_are_refused_on_every_stage():
    """An interleaved (virtual) pipeline's chunk holds blocks that are not the next ones in
    stage order (here layers 1 and 3 of 4: what chunk 0 of each stage would hold under
    ``virtual_pipeline_model_parallel_size=2`` if the stages held 1 and 3); numbering them by
    stage order would decode block 3 as block 1. Megatron's ``layer_number`` says so, and every
    stage raises the same error, no hook left behind."""
    import pytest
    import torch.distributed as dist

    from flex_surgery import LogitLens
    from flex_surgery.surgery import SurgeryError

    with gpt_parallel(tp=1, pp=2):
        stage = build_gpt_stage(2)
        stage.decoder.layers[0].layer_number = 2 * dist.get_rank() + 1
        with pytest.raises(SurgeryError, match=r"layer_number, stage by stage, are \[1, 3\]"):
            LogitLens(stage, top_k=3, pipeline_parallel_size=2)
        assert not any(m._forward_hooks for m in stage.modules())
