"""Megatron-core's gated MLP (``gated_linear_unit=True``: SwiGLU, as Llama-style models use)
under TP: ``linear_fc1`` keeps its gate and up halves interleaved per rank (``partition_stride``
2: rank r holds ``[gate_r, up_r]``), so its whole output, weight and bias are *not* the ranks'
pieces joined end to end (``[g0, u0, g1, u1]`` where one process has ``[g0, g1, u0, u1]``).
Hooks on its output -- retrieval, both edit paths, backward hooks, with sequence parallelism
and with data parallelism -- its weight and bias (whole parameters, export, surgery) equal the
TP=1 twin; its returned bias and its parameters' gradients, whose layouts join pieces end to
end, are refused on every rank."""

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    build_gpt,
    data_parallel_rows,
    forward_backward,
    gpt_parallel,
    local_group,
    run_flex,
    stored_mismatches,
)
from rank_pool import distributed

from flex_surgery import FlexModel, HookFunction
from flex_surgery.parallel.frameworks.base import LayoutError

TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64; TP changes only the summation order
GATED = {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}
FC1 = "decoder.layers.0.mlp.linear_fc1"
SITES = [(FC1, "forward", 0),
         ("decoder.layers.1.mlp.linear_fc1", "forward", 0),
         (FC1, "forward_pre", 0),
         ("decoder.layers.0.mlp", "forward", 0),
         ("decoder.layers.0.mlp.linear_fc2", "forward_pre", 0),
         ("decoder.layers.1.mlp.linear_fc1", "full_backward", 0),
         ("decoder.layers.0.mlp.linear_fc2", "full_backward_pre", 0)]
EDITS = [(FC1, "forward", 0), ("decoder.layers.1.mlp.linear_fc1", "forward", 0),
         ("decoder.layers.0.mlp.linear_fc2", "forward_pre", 0)]


def _assert_grads(got: dict, want: dict) -> None:
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_gated_fc1_hooks_equal_tp1(sequence_parallel):
    """Retrieval of fc1's output, input and gradient; edits of it on the leader path and
    replicated (one of the two edits depends on each element's place in the whole tensor):
    the TP=1 tensors, logits and gradients."""
    with gpt_parallel(tp=1):
        ref, ref_logits, ref_grads, _ = run_flex(build_gpt(tp=1, **GATED), SITES, False,
                                                 local_group())
        _, ref_edited, ref_edited_grads, _ = run_flex(build_gpt(tp=1, **GATED), EDITS, True,
                                                      local_group())
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel, **GATED)
        stored, logits, grads, _ = run_flex(model, SITES, False)
        for mode in (True, "replicated"):
            _, edited, edited_grads, _ = run_flex(model, EDITS, mode)
            torch.testing.assert_close(edited, ref_edited, **TOL)
            _assert_grads(edited_grads, ref_edited_grads)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    _assert_grads(grads, ref_grads)
    assert not torch.allclose(ref_edited, ref_logits)  # the edits did something
    if dist.get_rank() == 0:
        problems = stored_mismatches(stored, ref, **TOL)
        assert not problems, "\n".join(problems)


@distributed(world_size=4)
def test_gated_fc1_hooks_equal_tp1_under_dp2_tp2():
    with gpt_parallel(tp=1):
        ref, _, _, _ = run_flex(build_gpt(tp=1, **GATED), SITES, False, local_group())
        _, ref_edited, ref_edited_grads, _ = run_flex(build_gpt(tp=1, **GATED), EDITS, True,
                                                      local_group())
    with gpt_parallel(tp=2):
        rows = data_parallel_rows()
        model = build_gpt(tp=2, **GATED)
        stored, _, _, _ = run_flex(model, SITES, False, data_parallel=True)
        _, edited, edited_grads, _ = run_flex(model, EDITS, True, data_parallel=True)
    torch.testing.assert_close(edited, ref_edited[rows], **TOL)
    _assert_grads(edited_grads, ref_edited_grads)
    if dist.get_rank() == 0:
        problems = stored_mismatches(stored, ref, **TOL)
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind,name", [("forward", FC1), ("tensor", f"{FC1}.weight")])
@distributed(world_size=2)
def test_the_gated_fc1_bias_and_gradients_are_refused_on_every_rank(kind, name):
    """Its returned bias (the bias parameter itself) and its parameters' gradients have
    layouts that join pieces end to end: refused, not stored in the wrong order."""
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        flex = FlexModel(model, {})
        if kind == "tensor":
            flex.register_hook(HookFunction(name))
        else:
            flex.register_forward_hook(HookFunction(name, unpack_idx=1))
        try:
            with pytest.raises(LayoutError, match="partition_stride"):
                forward_backward(model, wrapper=flex)
        finally:
            flex.restore()


def _zero_neuron_5(w: torch.Tensor) -> torch.Tensor:
    """Zero row 5 of the whole weight (a gate unit): needs the interleaved rows mapped."""
    delta = torch.zeros_like(w)
    delta[5] = -w[5]
    return delta


def _with_surgery(model, names: list[str]) -> tuple[torch.Tensor, ...]:
    """Logits: plain, with gate unit 5 of the whole fc1 weight zeroed, with seeded noise on
    the fc1 weight and bias; then plain again (checked equal: restored)."""
    from flex_surgery.surgery import SurgicalTheater

    base, _ = forward_backward(model)
    with SurgicalTheater(model, layers=names[0], modification_fn=_zero_neuron_5,
                         full_parameter=True):
        zeroed, _ = forward_backward(model)
    with SurgicalTheater(model, layers=names, modification_type="noise", noise_scale=0.1,
                         seed=3, params="all"):
        noised, _ = forward_backward(model)
    assert torch.equal(forward_backward(model)[0], base)
    return base, zeroed, noised


@distributed(world_size=2)
def test_the_gated_fc1_parameters_are_mapped_whole():
    """Parameter views map the interleaved blocks: ``get_module_parameter``, export's
    ``full_weights`` and a full-parameter surgery (zero gate unit 5) equal TP=1; noise seeded
    on the whole parameter lands on the same elements; everything is restored."""
    from flex_surgery.export import full_weights

    names = [f"{FC1}.weight", f"{FC1}.bias"]
    with gpt_parallel(tp=1):
        ref = build_gpt(tp=1, **GATED)
        want = {n: ref.get_parameter(n).detach().clone() for n in names}
        base_ref, zeroed_ref, noised_ref = _with_surgery(ref, names)
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
        base, zeroed, noised = _with_surgery(model, names)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n  # restored bit-exactly
    torch.testing.assert_close(base, base_ref, **TOL)
    torch.testing.assert_close(zeroed, zeroed_ref, **TOL)
    torch.testing.assert_close(noised, noised_ref, **TOL)
    assert not torch.allclose(zeroed, base) and not torch.allclose(noised, base)


@pytest.mark.parametrize("options", [{"overlap_retrieval": True}, {"store_on": "all"}],
                         ids=["overlap", "store_on_all"])
@distributed(world_size=2)
def test_gated_fc1_retrieval_paths_equal_tp1(options):
    """The overlapped gather and the all-ranks store put the blocks back too."""
    sites = [(FC1, "forward", 0), ("decoder.layers.1.mlp.linear_fc1", "full_backward", 0)]
    with gpt_parallel(tp=1):
        ref, _, _, _ = run_flex(build_gpt(tp=1, **GATED), sites, False, local_group())
    stored: dict = {}
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        flex = FlexModel(model, stored, **options)
        flex.register_forward_hook(HookFunction(FC1))
        flex.register_full_backward_hook(HookFunction("decoder.layers.1.mlp.linear_fc1"))
        forward_backward(model, wrapper=flex)
        flex.restore()
    if dist.get_rank() == 0 or options.get("store_on") == "all":
        problems = stored_mismatches(stored, ref, **TOL)
        assert not problems, "\n".join(problems)


def test_unblocked_views_put_interleaved_blocks_in_one_process_order():
    """``unblocked`` + a plain gather of the part dim + ``join_blocks`` is the one-process
    order; collectives refuse a blocked spec as it is; unsupported blockings raise."""
    from flex_surgery.parallel.layout_specs import Layout, ShardSpec, join_blocks, unblocked

    whole = torch.arange(2 * 3 * 8.0).view(2, 3, 8)  # last dim: [gate 0..3, up 4..7]
    pieces = [torch.cat([whole[..., 2 * r:2 * r + 2], whole[..., 4 + 2 * r:6 + 2 * r]], -1)
              for r in range(2)]  # rank r: [gate_r, up_r]
    layout = Layout((ShardSpec("tp", -1, (4, 4), blocks=2),))
    with pytest.raises(LayoutError, match="unblocked"):
        layout.spec_for("tp")
    views = [unblocked(p, layout) for p in pieces]
    view, plain, joined = views[0]
    assert joined == 2 and view.shape == (2, 3, 2, 2)
    assert plain.spec_for("tp") == ShardSpec("tp", 3, (2, 2))
    gathered = torch.cat([v for v, _, _ in views], dim=3)  # what a gather of dim 3 gives
    assert torch.equal(join_blocks(gathered, joined), whole)
    assert unblocked(whole, Layout())[2] is None
    with pytest.raises(LayoutError, match="last split dim"):
        unblocked(pieces[0], Layout((ShardSpec("tp", -1, (4, 4), blocks=2),
                                     ShardSpec("dp", 2, (4, 4)))))
    with pytest.raises(LayoutError, match="divide"):
        unblocked(pieces[0], Layout((ShardSpec("tp", -1, (4, 4), blocks=3),)))
