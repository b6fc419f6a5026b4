"""Megatron-core's gated MLP (``gated_linear_unit=True``: SwiGLU, as Llama-style models use)
at TP=2: ``linear_fc1`` keeps its gate and up halves interleaved per rank (``partition_stride``
2: rank r holds ``[gate_r, up_r]``), so its whole output, weight and bias are *not* the ranks'
pieces joined end to end. Hooks and parameter reads on it are refused on every rank with an
error that names the module; everything around it (the MLP's input and output, ``linear_fc2``
and its input, the attention) still equals the TP=1 twin."""

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    build_gpt,
    forward_backward,
    gpt_parallel,
    local_group,
    run_flex,
    stored_mismatches,
)
from rank_pool import distributed

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.frameworks.base import LayoutError

TOL = {"rtol": 1e-10, "atol": 1e-10}
GATED = {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}
FC1 = "decoder.layers.0.mlp.linear_fc1"


@distributed(world_size=2)
def test_sites_around_the_gated_fc1_equal_tp1():
    sites = [("decoder.layers.0.mlp", "forward", 0),
             ("decoder.layers.0.mlp.linear_fc2", "forward_pre", 0),
             ("decoder.layers.1.mlp.linear_fc2", "forward", 0),
             ("decoder.layers.0.self_attention.linear_qkv", "forward", 0)]
    with gpt_parallel(tp=1):
        ref, ref_logits, _, _ = run_flex(build_gpt(tp=1, **GATED), sites, False, local_group())
    with gpt_parallel(tp=2):
        stored, logits, _, _ = run_flex(build_gpt(tp=2, **GATED), sites, False)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    if dist.get_rank() == 0:
        assert not stored_mismatches(stored, ref, **TOL), stored_mismatches(stored, ref, **TOL)


@pytest.mark.parametrize("kind,idx", [("forward", 0), ("forward", 1), ("forward_pre", 0)])
@distributed(world_size=2)
def test_a_hook_on_the_gated_fc1_output_is_refused_on_every_rank(kind, idx):
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        flex = FlexModel(model, {})
        register = {"forward": flex.register_forward_hook,
                    "forward_pre": flex.register_forward_pre_hook}[kind]
        register(HookFunction(FC1, unpack_idx=idx))
        try:
            if kind == "forward_pre":  # its input is the replicated hidden state: fine
                forward_backward(model, wrapper=flex)
                return
            with pytest.raises(LayoutError, match="interleav"):
                forward_backward(model, wrapper=flex)
        finally:
            flex.restore()


@distributed(world_size=2)
def test_the_gated_fc1_weight_is_refused_not_joined_end_to_end():
    with gpt_parallel(tp=2):
        flex = FlexModel(build_gpt(tp=2, **GATED), None)
        for leaf in ("weight", "bias"):
            with pytest.raises(LayoutError, match="partition_stride"):
                flex.get_module_parameter(f"{FC1}.{leaf}")
        fc2 = flex.get_module_parameter("decoder.layers.0.mlp.linear_fc2.weight")
        flex.restore()
    with gpt_parallel(tp=1):
        want = build_gpt(tp=1, **GATED).decoder.layers[0].mlp.linear_fc2.weight.detach()
    assert torch.equal(fc2, want)  # the row-parallel weight after it is still whole
