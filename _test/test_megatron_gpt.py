"""A real Megatron-core ``GPTModel`` (local layer spec, 2 layers) at TP=2, with and without
sequence parallelism, on two CPU ranks: its forward and backward equal the TP=1 model with the
same full weights, and ``SurgicalTheater`` edits on its shards give the TP=1 model's logits."""

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import build_gpt, forward_backward, full_tensors, gpt_inputs, gpt_parallel
from rank_pool import distributed

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

TOL = dict(rtol=1e-9, atol=1e-11)  # float64; TP changes only the summation order


def _reference() -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Whole weights, logits and gradients of the TP=1 model (the one-process twin)."""
    with gpt_parallel(tp=1):
        model = build_gpt(tp=1)
        logits, grads = forward_backward(model)
        return full_tensors(model), logits, grads


def _assert_all_close(got: dict, want: dict, what: str, **tol) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        assert got[key].shape == want[key].shape, (what, key, got[key].shape, want[key].shape)
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{what} {k}: {m}",
                                   **tol)


@distributed(world_size=2)
def test_megatron_gpt_tp2_equals_tp1():
    ref_weights, ref_logits, ref_grads = _reference()
    for sp in (False, True):
        with gpt_parallel(tp=2):
            model = build_gpt(tp=2, sequence_parallel=sp)
            weights = full_tensors(model)
            logits, grads = forward_backward(model)
        assert dist.get_world_size() == 2
        _assert_all_close(weights, ref_weights, f"sp={sp} weight", rtol=0, atol=0)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        _assert_all_close(grads, ref_grads, f"sp={sp} grad", **TOL)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_megatron_gpt_theater_scale_equals_tp1(sequence_parallel):
    """Scaling one block's MLP weights on each rank's shard gives the TP=1 logits with the
    same scaling; every parameter is bit-identical afterwards."""
    from flex_surgery.surgery import SurgicalTheater

    scale = dict(layers="decoder.layers.1.mlp", modification_type="scale", factor=0.5)

    def scaled_logits(model):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with SurgicalTheater(model, **scale) as theater, torch.no_grad():
            logits = model(*gpt_inputs()).cpu()
        after = {n: p.detach() for n, p in model.named_parameters()}
        restored = all(torch.equal(after[n], before[n]) for n in before)
        return logits, sorted(theater.modified_names), restored

    with gpt_parallel(tp=1):
        model = build_gpt(tp=1)
        with torch.no_grad():
            plain = model(*gpt_inputs()).cpu()
        ref_logits, ref_names, _ = scaled_logits(model)
    with gpt_parallel(tp=2):
        logits, names, restored = scaled_logits(build_gpt(tp=2,
                                                          sequence_parallel=sequence_parallel))
    assert ref_names == ["decoder.layers.1.mlp.linear_fc1.weight",
                         "decoder.layers.1.mlp.linear_fc2.weight"], ref_names
    assert names == ref_names
    assert not torch.allclose(ref_logits, plain)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert restored
