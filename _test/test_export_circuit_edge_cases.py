"""Exported-program weight swaps and circuit masks where a guess gave wrong numbers without a
word: a failed injection half-written, weights() blocks exited out of order, L0 counts in half
precision, the complement of a mask, forced resampling of the bias mask, a layer named twice,
and a replicated layer of an FSDP2 model. Each fails on the code that guessed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import H, plain_net
from rank_pool import distributed
from torch import nn

from flex_surgery.export import ExportedModel
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel


# -- export ---------------------------------------------------------------------------------------
def _small_exported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    return model, x, ExportedModel.export(model, (x,), output=None)


def test_failed_inject_of_a_meta_value_leaves_the_program_unchanged():
    """'Bad weights change nothing ... raised before the first byte is written'. A value on the
    meta device (an accelerate-offloaded or init_empty_weights model's parameter) passed every
    check, so the copy failed at that slot with the earlier slots already overwritten. It is
    refused with the other checks now."""
    model, x, exported = _small_exported()
    before = {k: v.clone() for k, v in exported.state_dict().items()}
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    new["1.bias"] = torch.empty(2, device="meta")  # the last slot: all others written first
    from flex_surgery.export.layout import WeightMismatchError

    with pytest.raises(WeightMismatchError, match="'1.bias' holds no values"):
        exported.inject(new)
    changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"a failed inject left {changed} overwritten"


def test_weights_blocks_exited_out_of_order_restore_or_refuse():
    """Two weights() blocks left in the wrong order (interleaved generators, an ExitStack
    split across tasks): the outer one restores the original weights, then the inner one
    copies the outer block's weights back -- the program keeps w1 silently. SurgicalTheater
    raises SurgeryError for the same misuse."""
    _, x, exported = _small_exported()
    base = {k: v.clone() for k, v in exported.state_dict().items()}
    w1 = {k: v + 1 for k, v in base.items()}
    w2 = {k: v + 2 for k, v in base.items()}
    outer, inner = exported.weights(w1), exported.weights(w2)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        outer.__exit__(None, None, None)  # out of order: the weights from before it are back
    with pytest.raises(RuntimeError, match="out of order"):
        inner.__exit__(None, None, None)  # restores nothing
    left = [k for k, v in exported.state_dict().items() if not torch.equal(v, base[k])]
    assert left == [], f"after both blocks exited, {left} still hold a block's weights"
    with exported.weights(w1):  # in order, as before
        with exported.weights(w2):
            pass
    assert all(torch.equal(v, base[k]) for k, v in exported.state_dict().items())


# -- circuit masks --------------------------------------------------------------------------------
def _stats(model: nn.Module, target: str = "0") -> dict:
    circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_init_value=0.5),
                                         target_layers=[target]), model)
    circuit.eval()
    return circuit.compute_l0_statistics()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_l0_statistics_of_a_half_precision_model_are_exact(dtype):
    """Mask logits take the model's dtype, and l0_terms sums the hard mask in that dtype:
    in bf16 a 257x3 layer with every weight kept reports 772 of 771 weights kept; in fp16 a
    300x300 layer reports total_l0 = inf. compute_l0_statistics returns these as counts."""
    shape = (257, 3) if dtype == torch.bfloat16 else (300, 300)
    stats = _stats(nn.Sequential(nn.Linear(*shape)).to(dtype))
    assert stats["total_l0"] == stats["max_l0"] == shape[0] * shape[1], stats


def test_complement_sampled_counts_zero_logits_as_removed():
    """The hard mask keeps logits > 0 and zero_ablate removes logits <= 0, but
    complement_sampled draws from logits < 0 only: with the default mask_init_value 0.0, a
    mask whose untrained logits stay exactly 0 (no gradient reached them) is refused as
    'more than half kept' (2 kept, '0 removed' while zero_ablate counts 70 removed), and a
    partly-zero mask never samples its zero-logit weights."""
    model = nn.Sequential(nn.Linear(8, 9))
    circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_init_value=0.0),
                                         target_layers=["0"]), model)
    with torch.no_grad():
        logits = circuit._layers["0"].params["weight"].logits
        logits.zero_()
        logits.view(-1)[:2] = 1.0  # the circuit: two weights; every other logit exactly 0
    circuit.eval()
    circuit.set_ablate_mode("zero_ablate")
    assert circuit.compute_l0_statistics()["total_l0"] == 70  # 70 weights outside the circuit
    circuit.set_ablate_mode("complement_sampled")
    stats = circuit.compute_l0_statistics()  # raised ValueError: "0 removed"
    assert stats["total_l0"] == 70
    removed = ~circuit.hard_masks()["0.weight"]
    assert removed.sum() == 2 and not removed.view(-1)[:2].any()


def test_force_resample_redraws_the_bias_mask():
    """'Sampled masks are drawn once per mode, again after force_resample=True': the flag is
    per layer and cleared by the weight's draw, so the bias mask (mask_bias=True) is never
    drawn again -- every 'resampled' ablation reuses the first bias draw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_init_value=0.0, mask_bias=True),
                                         target_layers=["0"]), model)
    with torch.no_grad():
        for mp in circuit._layers["0"].params.values():
            mp.logits.copy_(torch.randn_like(mp.logits))
    circuit.eval()
    weights, biases = [], []
    for _ in range(5):
        circuit.set_ablate_mode("randomly_sampled", force_resample=True)
        masks = circuit.hard_masks()
        weights.append(masks["0.weight"])
        biases.append(masks["0.bias"])
    assert any(not torch.equal(weights[0], w) for w in weights[1:])  # the weight is redrawn
    assert any(not torch.equal(biases[0], b) for b in biases[1:]), \
        "five forced resamples gave the same bias mask: the bias was never drawn again"


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # one layer under two names, called twice

    def forward(self, x):
        return self.b(self.a(x))


def test_one_layer_named_twice_is_not_counted_twice():
    """A module shared under two names (both found by modules_by_clean_name) gets two
    LayerMasks: both multiply the same weight at every call, and L0 and max_l0 count its 16
    weights twice. Unknown which call site each mask belongs to: it should be refused (or
    masked once)."""
    model = _Shared()
    try:
        circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_init_value=0.5),
                                             target_layers=["a", "b"]), model)
    except ValueError:
        return  # refused: acceptable
    circuit.eval()
    stats = circuit.compute_l0_statistics()
    assert stats["max_l0"] == 16, stats


# -- FSDP2 with a target outside every fully_shard unit -----------------------------------------
STEPS = 4


def _train(circuit: CircuitModel, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(circuit.mask_logits.parameters(), lr=2.0)
    for _ in range(STEPS):
        out = circuit(x)
        out = out.full_tensor() if hasattr(out, "full_tensor") else out
        loss = F.mse_loss(out, y) + circuit.config.l0_lambda * circuit.l0_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()


@distributed(world_size=2, timeout_s=60)
def test_fsdp2_plain_target_outside_the_sharded_blocks_is_averaged_or_refused():
    """FSDP2 on the blocks only (data parallel, each rank on half of the batch); the head stays
    a plain replicated nn.Linear. Its mask is 'plain with no TP group', so
    _refuse_unaveraged_replicas skips it as 'a model without parallelism', yet the model IS
    data parallel: nothing averages the head mask's gradient, the ranks' head masks drift
    apart, and the L0 statistics and hard_masks() report rank 0's while rank 1 computes with
    its own. Expected: refused (UnknownLayoutError) or equal to the one-process circuit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flex_surgery.parallel.frameworks import UnknownLayoutError

    config = CircuitConfig(mask_hparams=dict(mask_init_value=0.05), target_layers=["head"],
                           l0_lambda=2e-2, seed=3)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, H, generator=gen), torch.randn(8, 6, generator=gen)
    ref = CircuitModel(config, plain_net(0))
    _train(ref, x, y)

    mesh = init_device_mesh("cpu", (2,))
    model = plain_net(0)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    try:
        par = CircuitModel(config, model)
    except UnknownLayoutError:
        return  # refused on every rank: acceptable
    rank = dist.get_rank()
    rows = slice(4 * rank, 4 * rank + 4)
    _train(par, x[rows], y[rows])
    got = par._layers["head"].params["weight"].logits.detach()
    want = ref._layers["head"].params["weight"].logits.detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
