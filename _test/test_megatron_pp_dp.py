"""Megatron-core GPTModel pipeline stages (CPU, gloo, float64) combined with
data parallelism and with sequence parallelism, the logit lens and seeded theater noise on them,
each against the same model (same full weights) in one process.

World 4 throughout, ranks ordered ``(pp, dp, tp)`` by Megatron: with ``tp=1, pp=2`` ranks 0, 1
are stage 0 (dp replicas 0, 1) and 2, 3 stage 1; with ``tp=2, pp=2`` ranks 0, 1 are stage 0's
two TP ranks. The stages run by hand over a ``StageLink`` (Megatron's schedules need CUDA).

Under data parallelism each replica runs its own batch rows of every micro-batch (uneven rows
too: 3 rows split 2 + 1) and its loss is ``dp`` times its rows' share of the one-process loss
(DDP's mean convention, which FlexModel's gradient scaling follows): hooks on rank 0 must then
hold both replicas' rows joined on Megatron's batch dim (dim 1 of ``[s, b, h]``), equal to one
process, forward and backward (the values stored before the edits run), with edits
on every site.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    SEQ,
    VOCAB,
    SequenceParallelLayerNorm,
    finish_grads,
    full_tensors,
    global_names,
    gpt_parallel,
    load_whole,
    local_group,
    times_two_by_position,
)
from rank_pool import distributed
from test_megatron_pipeline_stages import _flex_hooks, _gpt, _load_sharded, _raw_hooks, _whole

TOL = dict(rtol=1e-9, atol=1e-11)
MICROBATCHES = 2  # (the suite is near its time budget)


# -- inputs and steps with batch rows ------------------------------------------------------------
def _batches(batch: int, rows: slice = slice(None)):
    """MICROBATCHES micro-batches of ``batch`` rows (only ``rows`` of each): ids, positions
    (shifted per row, so a misplaced row shows), causal mask."""
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(0))
    pos = (torch.arange(SEQ) + torch.arange(batch)[:, None]) % SEQ
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(batch, 1, SEQ, SEQ)
    return [(ids.roll(k, 1)[rows], pos[rows], mask[rows]) for k in range(MICROBATCHES)]


def _loss(logits: torch.Tensor, batch: int, rows: slice = slice(None), dp: int = 1):
    w = torch.linspace(-1.0, 1.0, batch * SEQ * VOCAB, dtype=logits.dtype
                       ).view(batch, SEQ, VOCAB)[rows]
    return (logits * w).sum() * dp


def _replica_rows(batch: int) -> tuple[slice, int]:
    """This rank's dp replica's rows (``torch.chunk`` sizes: 3 rows -> 2 + 1) and dp."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    r = parallel_state.get_data_parallel_rank()
    size = -(-batch // dp)
    return slice(min(r * size, batch), min((r + 1) * size, batch)), dp


def _one_process(model, batch: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = []
    for ids, pos, mask in _batches(batch):
        out = model(ids, pos, mask)
        _loss(out, batch).backward()
        logits.append(out.detach())
    return logits


def _pipeline(stage, mesh, batch: int, rows: slice = slice(None), dp: int = 1,
              backward: bool = True):
    """Forward (and backward) of every micro-batch's ``rows`` through 2 stages by hand: the
    last stage's logits ([] elsewhere) and the link."""
    from flex_surgery.parallel.pipeline import StageLink

    stage.zero_grad(set_to_none=True)
    link = StageLink(mesh, timeout_s=60)
    logits = []
    with link.step(), torch.set_grad_enabled(backward):
        for ids, pos, mask in _batches(batch, rows):
            if link.is_first:
                y = stage(ids, pos, mask)
                link.send_forward(y.detach())
                if backward:
                    y.backward(link.recv_backward())
            else:
                h = link.recv_forward(requires_grad=backward)
                stage.set_input_tensor(h)
                out = stage(ids, pos, mask)
                if backward:
                    _loss(out, batch, rows, dp).backward()
                    link.send_backward(h.grad)
                logits.append(out.detach())
    return logits, link


def _dp_mean_grads(stage) -> dict[str, torch.Tensor]:
    """The stage's gradients averaged over Megatron's dp group (what DDP's all-reduce makes),
    under whole-model names."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    dp = parallel_state.get_data_parallel_world_size()
    names = global_names(stage)
    out = {}
    for n, p in stage.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=group)
        out[names[n]] = g / dp
    return out


def _mismatches(got: dict, want: dict) -> list[str]:
    bad = [f"{k}: missing" for k in want if k not in got]
    bad += [f"{k}: unexpected" for k in got if k not in want]
    for k in want.keys() & got.keys():
        if len(got[k]) != len(want[k]):
            bad.append(f"{k}: {len(got[k])} calls, want {len(want[k])}")
            continue
        for i, (a, b) in enumerate(zip(got[k], want[k])):
            if a.shape != b.shape:
                bad.append(f"{k}[{i}]: shape {tuple(a.shape)}, want {tuple(b.shape)}")
            elif not torch.allclose(a, b, **TOL):
                bad.append(f"{k}[{i}]: differs by {(a - b).abs().max().item():.3g}")
    return sorted(bad)


# -- 1. dp=2 x pp=2: hooks by whole-model names, forward and backward, edits -----------------------
# 4 blocks, stage 0 holds 0, 1; stage 1 holds 2, 3 (its local 0, 1).
DP_SITES = [("embedding", "forward"), ("decoder.layers.1", "forward"),
            ("decoder.layers.2", "forward"), ("decoder.layers.2", "full_backward_pre"),
            ("decoder.final_layernorm", "forward"), ("output_layer", "forward"),
            ("output_layer", "full_backward_pre"), ("output_layer.weight", "tensor"),
            ("embedding.word_embeddings.weight", "tensor"),
            ("decoder.layers.1.mlp.linear_fc1.weight", "tensor")]


@distributed(world_size=4)
def test_dp2_pp2_hooks_collect_both_replicas_rows_on_rank0():
    """Rank 0 holds, per micro-batch and site, both replicas' rows joined on the batch dim,
    equal to one process (edits applied once on the whole tensor); nothing elsewhere; the last
    stage's logits are its replica's rows of one process's; dp-averaged gradients equal one
    process's."""
    from flex_surgery import FlexModel

    fn, batch = times_two_by_position, 3  # uneven: replica 0 runs rows 0, 1; replica 1 row 2
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        want, handles = _raw_hooks(model, DP_SITES, fn)
        want_logits = _one_process(model, batch)
    for h in handles:
        h.remove()
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    with gpt_parallel(tp=1, pp=2):
        stage = _gpt(4, pp=2)
        load_whole(stage, whole)
        rows, dp = _replica_rows(batch)
        stored: dict = {}
        flex = FlexModel(stage, stored, key_by_hook_kind=True)
        assert (flex.runtime.mesh.pp_size, flex.runtime.mesh.dp_size) == (2, 2)
        _flex_hooks(flex, DP_SITES, fn)
        logits, link = _pipeline(stage, flex.runtime.mesh, batch, rows, dp)
        flex.sync_pipeline_outputs(link)
        grads = _dp_mean_grads(stage)
        flex.restore()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TOL, msg=name)
    if dist.get_rank() >= 2:
        for a, b in zip(logits, want_logits, strict=True):
            torch.testing.assert_close(a, b[rows], **TOL)
    if dist.get_rank() != 0:
        assert stored == {}
        return
    assert _mismatches(stored, want) == []


# -- 2. tp=2 with sequence parallelism x pp=2 ----------------------------------------------------
def _sp_stage(whole: dict[str, torch.Tensor]):
    """This rank's stage (of 2 blocks, one per stage) at TP=2 with sequence parallelism, the
    norms :class:`SequenceParallelLayerNorm`, loaded with the whole model's weights."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_gpt_cases import HEADS, HIDDEN

    dtype = torch.float64
    cfg = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            tensor_model_parallel_size=2, sequence_parallel=True,
                            pipeline_model_parallel_size=2, pipeline_dtype=dtype,
                            batch_p2p_sync=False, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype)
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = SequenceParallelLayerNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    spec = TransformerBlockSubmodules(layer_specs=[spec], layer_norm=SequenceParallelLayerNorm)
    stage = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     parallel_output=False, share_embeddings_and_output_weights=False,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage()).to(dtype=dtype)
    _load_sharded(stage, whole)
    return stage


# Stage 1's input hidden states (its block's input and the norm before its first TP layer)
# have their own test below.
SP_SITES = [("embedding", "forward"), ("decoder.layers.0", "forward"),
            ("decoder.layers.0.pre_mlp_layernorm", "forward"),
            ("decoder.layers.1.pre_mlp_layernorm", "forward"), ("decoder.layers.1", "forward"),
            ("decoder.layers.1", "full_backward_pre"),
            ("decoder.final_layernorm", "forward"), ("output_layer", "forward"),
            ("decoder.layers.1.input_layernorm.weight", "tensor"),
            ("decoder.final_layernorm.bias", "tensor")]


def _sp_run(sites, fn, batch: int = 2) -> list[str]:
    """tp=2 (sequence parallel) x pp=2 with hooks at ``sites`` (editing with ``fn``) vs one
    process: every difference (gradients, last stage's logits, rank 0's stored values)."""
    from flex_surgery import FlexModel

    with gpt_parallel(tp=1):
        model, whole = _whole(2)
        want, handles = _raw_hooks(model, sites, fn)
        want_logits = _one_process(model, batch)
    for h in handles:
        h.remove()
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    with gpt_parallel(tp=2, pp=2):
        stage = _sp_stage(whole)
        stored: dict = {}
        flex = FlexModel(stage, stored, key_by_hook_kind=True)
        assert (flex.runtime.mesh.tp_size, flex.runtime.mesh.pp_size) == (2, 2)
        _flex_hooks(flex, sites, fn)
        logits, link = _pipeline(stage, flex.runtime.mesh, batch)
        flex.sync_pipeline_outputs(link)
        finish_grads(stage)
        names = global_names(stage)
        grads = {names[n]: g for n, g in full_tensors(stage, grads=True).items()}
        flex.restore()
    bad = [f"grad {n}" for n, g in grads.items() if not torch.allclose(g, want_grads[n], **TOL)]
    if dist.get_rank() >= 2:
        bad += [f"logits[{i}]" for i, (a, b) in enumerate(zip(logits, want_logits, strict=True))
                if not torch.allclose(a, b, **TOL)]
    if dist.get_rank() == 0:
        bad += _mismatches(stored, want)
    elif stored:
        bad.append(f"rank {dist.get_rank()} stored {sorted(stored)}")
    return bad


@distributed(world_size=4)
def test_sequence_parallel_inside_pipeline_stages_equals_one_process():
    """Each stage's activations are [s/2, b, h] per TP rank (the stage sends its shard down
    its line); hooks on blocks and norms (after a TP layer of their stage) store the whole
    [s, b, h] on rank 0, equal to one process, and edits on the whole tensor give one
    process's logits and whole gradients (SP norms summed over TP)."""
    assert _sp_run(SP_SITES, times_two_by_position) == []


@distributed(world_size=4)
def test_sequence_parallel_stage_input_norm_equals_one_process():
    """decoder.layers.1.input_layernorm is stage 1's first module: it sees the hidden states
    the previous stage sent, split on the sequence. Stored whole on rank 0 and edited as the
    whole tensor, or an error on every rank."""
    assert _sp_run([("decoder.layers.1.input_layernorm", "forward")],
                   times_two_by_position) == []


# -- 3. the logit lens: dp=2 x pp=2 and tp=2 x pp=2 ------------------------------------------------
@pytest.mark.parametrize("tp, batch", [(1, 3), (2, 2)])
@distributed(world_size=4)
def test_logit_lens_on_dp_or_tp_pipeline_equals_one_process(tp, batch):
    """tp=1: dp=2 replicas run their rows (3 rows: 2 + 1); tp=2: dp=1. The lens on every rank
    equals the one-process lens of the micro-batches joined on the batch."""
    from flex_surgery import LogitLens, logit_lens

    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        joined = tuple(torch.cat(parts, dim=0) for parts in zip(*_batches(batch)))
        want = logit_lens(model, joined, top_k=3, process_group=local_group())
    with gpt_parallel(tp=tp, pp=2):
        stage = _gpt(4, pp=2, tp=tp)
        _load_sharded(stage, whole)
        rows, dp = _replica_rows(batch)
        assert dp == 4 // (2 * tp)
        with LogitLens(stage, top_k=3, pipeline_parallel_size=2) as lens:
            _, link = _pipeline(stage, lens.mesh, batch, rows, backward=False)
            got = lens.result(link)
    assert got.layers == want.layers == [0, 1, 2, 3]
    assert torch.equal(got.tokens, want.tokens)
    # The lens's log-probabilities are float32 (lens_unembedding.local_topk casts the logits
    # with .float() before the log-sum-exp): with the vocabulary split over TP the log-sum-exp
    # is merged from two float32 halves, ~2 float32 ulps from one process (measured 9.5e-7).
    tol = TOL if tp == 1 else dict(rtol=0, atol=4e-6)
    torch.testing.assert_close(got.logprobs, want.logprobs, **tol)


# -- 4. seeded theater noise under dp=2 x pp=2 --------------------------------------------------
@distributed(world_size=4)
def test_seeded_theater_noise_is_one_process_noise_on_every_replica():
    """SurgicalTheater(noise, seed) on decoder.layers.*.mlp: inside it every rank's stage
    parameters equal the one-process noisy weights (so both replicas hold the same noise);
    the logits of each replica's rows equal one process; weights restored after."""
    from flex_surgery import FlexModel
    from flex_surgery.surgery import SurgicalTheater

    def theater(m):
        return SurgicalTheater(m, layers="decoder.layers.*.mlp", modification_type="noise",
                               noise_scale=0.05, seed=11)

    batch = 3
    with gpt_parallel(tp=1):
        model, whole = _whole(4)
        with theater(model):
            noisy = {n: p.detach().clone() for n, p in model.named_parameters()}
            want = _one_process(model, batch)
    assert any(not torch.equal(noisy[n], whole[n]) for n in whole if ".mlp." in n)
    with gpt_parallel(tp=1, pp=2):
        stage = _gpt(4, pp=2)
        load_whole(stage, whole)
        rows, dp = _replica_rows(batch)
        names = global_names(stage)
        flex = FlexModel(stage, {})
        with theater(flex):
            inside = {names[n]: p.detach().clone() for n, p in stage.named_parameters()}
            got, _ = _pipeline(stage, flex.runtime.mesh, batch, rows, dp)
        flex.restore()
        after = {names[n]: p.detach().clone() for n, p in stage.named_parameters()}
    for n, p in inside.items():
        torch.testing.assert_close(p, noisy[n], rtol=0, atol=0, msg=n)
        assert torch.equal(after[n], whole[n]), n
    if dist.get_rank() >= 2:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b[rows], **TOL)

