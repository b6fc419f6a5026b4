"""Megatron-core's gated MLP (``gated_linear_unit=True``: SwiGLU, as Llama-style models use)
at TP=2: ``linear_fc1`` keeps its gate and up halves interleaved per rank (``partition_stride``
2: rank r holds ``[gate_r, up_r]``), so its whole output, weight and bias are *not* the ranks'
pieces joined end to end. Its weight and bias are mapped block by block (whole parameters,
export, surgery equal TP=1); hooks on its output and its parameters' gradients are refused on
every rank with an error that names the split; everything around it (the MLP's input and
output, ``linear_fc2`` and its input, the attention) equals the TP=1 twin."""

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


def _zero_neuron_5(w: torch.Tensor) -> torch.Tensor:
    """Zero row 5 of the whole weight (a gate unit): needs the interleaved rows mapped."""
    delta = torch.zeros_like(w)
    delta[5] = -w[5]
    return delta


@distributed(world_size=2)
def test_the_gated_fc1_parameters_are_mapped_whole():
    """Parameter views map the interleaved blocks: ``get_module_parameter``, export's
    ``full_weights`` and a full-parameter surgery (zero gate unit 5) equal TP=1; noise seeded
    on the whole parameter lands on the same elements; everything is restored."""
    from flex_surgery.export import full_weights
    from flex_surgery.surgery import SurgicalTheater

    names = [f"{FC1}.weight", f"{FC1}.bias"]
    with gpt_parallel(tp=1):
        ref = build_gpt(tp=1, **GATED)
        want = {n: ref.get_parameter(n).detach().clone() for n in names}
        base_ref, _ = forward_backward(ref)
        with SurgicalTheater(ref, layers=names[0],
                                              modification_fn=_zero_neuron_5,
                                              full_parameter=True):
            zeroed_ref, _ = forward_backward(ref)
        with SurgicalTheater(ref, layers=names, modification_type="noise",
                                              noise_scale=0.1, seed=3, params="all"):
            noised_ref, _ = forward_backward(ref)
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        flex = FlexModel(model, None)
        for n in names:
            assert torch.equal(flex.get_module_parameter(n), want[n]), n
        flex.restore()
        weights = full_weights(model)
        for n in names:
            assert torch.equal(weights[n], want[n]), n
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with SurgicalTheater(model, layers=names[0],
                                              modification_fn=_zero_neuron_5,
                                              full_parameter=True):
            zeroed, _ = forward_backward(model)
        with SurgicalTheater(model, layers=names, modification_type="noise",
                                              noise_scale=0.1, seed=3, params="all"):
            noised, _ = forward_backward(model)
        base, _ = forward_backward(model)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n  # restored bit-exactly
    torch.testing.assert_close(base, base_ref, **TOL)
    torch.testing.assert_close(zeroed, zeroed_ref, **TOL)
    torch.testing.assert_close(noised, noised_ref, **TOL)
    assert not torch.allclose(zeroed, base) and not torch.allclose(noised, base)


@distributed(world_size=2)
def test_the_gated_fc1_gradient_layout_is_refused():
    """A parameter-gradient hook joins the ranks' gradients end to end: refused for an
    interleaved parameter, on every rank."""
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        flex = FlexModel(model, {})
        flex.register_hook(HookFunction(f"{FC1}.weight"))
        try:
            with pytest.raises(LayoutError, match="partition_stride"):
                forward_backward(model, wrapper=flex)
        finally:
            flex.restore()
