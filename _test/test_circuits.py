"""CircuitModel in one process: NeuroSurgeon's masking semantics (soft/hard masks, ablations,
L0 statistics), every supported layer type, training (by hand and with the HF Trainer), the
hand-off to MaskTheater, bad input, and the model coming back unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flex_surgery.surgery import MaskTheater
from flex_surgery.surgery.circuits import (
    CircuitConfig,
    CircuitModel,
    anneal_temperature,
    temperature_at,
)


class _Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.down(self.drop(F.gelu(self.up(x))))


def _config(**hp) -> CircuitConfig:
    return CircuitConfig(mask_hparams={"mask_init_value": 0.3, **hp},
                         target_layers=["up", "down"], l0_lambda=1e-3)


def _tree(model: nn.Module) -> list:
    """Everything a user could observe of the module tree and its parameters."""
    return [(n, type(m), id(m), m.training, len(m._forward_pre_hooks), len(m._forward_hooks),
             [(pn, id(p), p.requires_grad, p.data_ptr()) for pn, p in m._parameters.items()])
            for n, m in model.named_modules()]


def _train(circuit: CircuitModel, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.Adam(circuit.parameters(), lr=0.1)
    for step in range(steps):
        loss = F.mse_loss(circuit(x), y) + circuit.config.l0_lambda * circuit.l0_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        anneal_temperature(circuit, step + 1, steps, final_temperature=50.0)


class _ReferenceMaskedLinear(nn.Module):
    """NeuroSurgeon's ContSparseLinear forward, written out: the contract being matched."""

    def __init__(self, lin: nn.Linear, init: float) -> None:
        super().__init__()
        self.lin = lin
        self.weight_mask_params = nn.Parameter(torch.full_like(lin.weight, init))
        self.temperature = 1.0

    def forward(self, x):
        if self.training:
            mask = torch.sigmoid(self.temperature * self.weight_mask_params)
        else:
            mask = (self.weight_mask_params > 0).float()
        return F.linear(x, self.lin.weight * mask, self.lin.bias)


def test_training_matches_neurosurgeon_formulas_and_base_is_untouched():
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    model = _Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    tree = _tree(model)
    model.train()
    tree_train = _tree(model)
    circuit = CircuitModel(_config(), model)
    # freeze_base: only masks train, the base modules are in eval mode (dropout off)
    assert {n for n, p in circuit.named_parameters() if p.requires_grad} == {
        "mask_logits.up-weight", "mask_logits.down-weight"}
    assert not model.training and not model.drop.training and circuit.training

    ref = _Net()
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.up, ref.down = _ReferenceMaskedLinear(ref.up, 0.3), _ReferenceMaskedLinear(ref.down, 0.3)
    ref_opt = torch.optim.Adam([ref.up.weight_mask_params, ref.down.weight_mask_params], lr=0.1)
    for step in range(5):
        ref.up.train(), ref.down.train()
        l0 = sum(torch.sigmoid(m.temperature * m.weight_mask_params).sum()
                 for m in (ref.up, ref.down))
        (F.mse_loss(ref(x), y) + 1e-3 * l0).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for m in (ref.up, ref.down):
            m.temperature = 50.0 ** ((step + 1) / 5)
    _train(circuit, x, y)
    assert circuit.temperature == pytest.approx(50.0)
    torch.testing.assert_close(circuit.mask_logits["up-weight"], ref.up.weight_mask_params,
                               rtol=1e-6, atol=1e-7)
    circuit.eval()
    ref.up.eval(), ref.down.eval()
    torch.testing.assert_close(circuit(x), ref(x), rtol=1e-6, atol=1e-7)

    for n, p in model.named_parameters():  # base weights never written
        assert torch.equal(p, before[n]), n
    assert circuit.remove_masks() is model
    assert _tree(model) == tree_train
    model.eval()
    assert _tree(model) == tree


def test_soft_mask_is_sigmoid_of_temperature_times_logits_and_hard_at_eval():
    x = torch.randn(3, 6)
    model = _Net()
    circuit = CircuitModel(_config(mask_init_value=0.0), model)
    with torch.no_grad():
        circuit.mask_logits["up-weight"].copy_(torch.randn(10, 6))
    circuit.temperature = 3.0
    m = circuit.mask_logits["up-weight"].detach()
    with torch.no_grad():
        got = circuit(x)
        h = F.gelu(F.linear(x, model.up.weight * torch.sigmoid(3.0 * m), model.up.bias))
        want = F.linear(h, model.down.weight * 0.5, model.down.bias)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        circuit.eval()
        h = F.gelu(F.linear(x, model.up.weight * (m > 0), model.up.bias))
        assert torch.equal(circuit(x), F.linear(h, model.down.weight * 0, model.down.bias))
        circuit.use_masks(False, ["down"])
        assert torch.equal(circuit(x), F.linear(h, model.down.weight, model.down.bias))
    with pytest.raises(ValueError, match="must be > 0"):
        circuit.temperature = 0.0


def _trained_circuit(**hp) -> tuple[nn.Module, CircuitModel]:
    model = _Net()
    circuit = CircuitModel(_config(**hp), model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in circuit.mask_logits.values():
            p.copy_(torch.randn(p.shape, generator=gen) - 0.7)  # keeps about a quarter
    circuit.eval()
    return model, circuit


def test_ablation_modes():
    x = torch.randn(3, 6)
    model, circuit = _trained_circuit(mask_bias=True)
    logits = {k: v.detach().clone() for k, v in circuit.mask_logits.items()}
    kept = {k: int((v > 0).sum()) for k, v in logits.items()}
    masks = circuit.hard_masks()
    assert set(masks) == {"up.weight", "up.bias", "down.weight", "down.bias"}
    assert torch.equal(masks["up.weight"], logits["up-weight"] > 0)

    circuit.set_ablate_mode("zero_ablate")
    assert torch.equal(circuit.hard_masks()["up.weight"], logits["up-weight"] <= 0)
    stats = circuit.compute_l0_statistics()
    assert stats["total_l0"] == sum(v.numel() - kept[k] for k, v in logits.items())

    for mode in ("randomly_sampled", "complement_sampled"):
        circuit.set_ablate_mode(mode)
        first = circuit.hard_masks()
        assert torch.equal(circuit.hard_masks()["up.weight"], first["up.weight"])  # drawn once
        for k, v in logits.items():
            name = k.replace("-", ".")
            assert int((~first[name]).sum()) == kept[k], (mode, name)
            if mode == "complement_sampled":
                assert not (~first[name] & (v > 0)).any()  # removed only outside the circuit
        circuit.set_ablate_mode(mode, force_resample=True)
        again = circuit.hard_masks()
        assert not torch.equal(again["up.weight"], first["up.weight"])
        # seeded: a second circuit with the same seed draws the same masks
        _, twin = _trained_circuit(mask_bias=True)
        twin.set_ablate_mode(mode)
        assert all(torch.equal(twin.hard_masks()[k], first[k]) for k in first)

    circuit.set_ablate_mode("random_ablate")
    with torch.no_grad():
        def blend(layer: str, pname: str) -> torch.Tensor:
            lm = circuit._layers[layer]
            fresh = lm._random_values(lm.params[pname])
            keep = logits[f"{layer}-{pname}"] > 0  # the circuit's weights are re-initialised
            return torch.where(keep, fresh, getattr(model, layer)._parameters[pname])

        h = F.gelu(F.linear(x, blend("up", "weight"), blend("up", "bias")))
        torch.testing.assert_close(circuit(x), F.linear(h, blend("down", "weight"),
                                                        blend("down", "bias")))
        fresh = circuit._layers["up"]._random_values(circuit._layers["up"].params["weight"])
        assert 0 < fresh.abs().max() <= 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5))
    with pytest.raises(ValueError, match="not a multiplicative mask"):
        circuit.hard_masks()
    circuit.train()
    with pytest.raises(ValueError, match="ablation 'random_ablate' is for evaluation"):
        circuit(x)
    with pytest.raises(ValueError, match="expected one of"):
        circuit.set_ablate_mode("prune")


def test_hard_masks_through_mask_theater_equal_the_circuit():
    x = torch.randn(5, 6)
    model, circuit = _trained_circuit()
    with torch.no_grad():
        want = circuit(x)
        masks = circuit.hard_masks()
        circuit.use_masks(False)
        with MaskTheater(model, masks):
            assert torch.equal(model(x), want)
        circuit.set_ablate_mode("zero_ablate")
        circuit.use_masks(True)
        ablated = circuit(x)
        circuit.use_masks(False)
        with MaskTheater(model, circuit.hard_masks()):
            assert torch.equal(model(x), ablated)


def test_neuron_masks_and_l0_statistics():
    model = _Net()
    circuit = CircuitModel(_config(mask_unit="neuron", mask_bias=True), model)
    assert circuit.mask_logits["up-weight"].shape == (10, 1)
    assert circuit.mask_logits["up-bias"].shape == (10,)
    with torch.no_grad():
        circuit.mask_logits["up-weight"][:3] = -1.0
        circuit.mask_logits["down-bias"][1] = -1.0
    stats = circuit.compute_l0_statistics()
    # NeuroSurgeon counts the weights a neuron mask covers: 7 neurons x 6 inputs + 10 biases
    assert stats["layer2l0"] == {"up": 7 * 6 + 10, "down": 40 + 3}
    assert stats["layer2maxl0"] == {"up": 70, "down": 44}
    assert stats["total_l0"] == 95 and stats["max_l0"] == 114
    circuit.eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        h = F.gelu(F.linear(x, model.up.weight * (torch.arange(10) >= 3)[:, None],
                            model.up.bias * 1.0))
        torch.testing.assert_close(circuit(x), F.linear(
            h, model.down.weight, model.down.bias * torch.tensor([1.0, 0, 1, 1])),
            rtol=0, atol=0)
        masks = circuit.hard_masks()
    assert masks["up.weight"].shape == (10, 6) and int(masks["up.weight"].sum()) == 42


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.c2, self.c1, self.gpt = nn.Conv2d(3, 4, 3), nn.Conv1d(4, 5, 2), Conv1D(7, 5)

    def forward(self, x):
        h = self.c2(x).mean(-1)          # [b, 4, w]
        h = self.c1(h)                   # [b, 5, w-1]
        return self.gpt(h.transpose(1, 2).contiguous())


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_conv_layers_and_gpt2_conv1d(unit):
    model = _Convs()
    x = torch.randn(2, 3, 6, 6)
    circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_unit=unit, mask_init_value=1.0),
                                         target_layers=["c2", "c1", "gpt"]), model)
    shapes = {k: tuple(v.shape) for k, v in circuit.mask_logits.items()}
    if unit == "neuron":
        assert shapes == {"c2-weight": (4, 1, 1, 1), "c1-weight": (5, 1, 1), "gpt-weight": (1, 7)}
    loss = circuit(x).square().mean()
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in circuit.mask_logits.values())
    circuit.eval()
    with torch.no_grad():
        full = circuit(x)
        masks = circuit.hard_masks()
        assert all(m.all() for m in masks.values())
        circuit.use_masks(False)
        assert torch.equal(circuit(x), full)  # mask all ones at logit 1.0


def test_masks_follow_dtype_and_l0_joins_the_hf_loss():
    from flex_surgery.models import example_inputs, tiny_hf_model

    model = tiny_hf_model("gpt2", dtype=torch.bfloat16)
    inputs = example_inputs("gpt2")
    circuit = CircuitModel(CircuitConfig(mask_hparams=dict(mask_init_value=0.5),
                                         target_layers=["transformer.h.0.mlp.c_fc"],
                                         l0_lambda=1e-2), model)
    assert all(p.dtype == torch.bfloat16 for p in circuit.parameters())
    with torch.no_grad():
        plain = model(**inputs, labels=inputs["input_ids"]).loss  # hooks still mask
        out = circuit(**inputs, labels=inputs["input_ids"])
        torch.testing.assert_close(out.loss, plain + 1e-2 * circuit.l0_loss())
        assert circuit.l0_loss().item() == pytest.approx(64 * 256 * torch.sigmoid(
            torch.tensor(0.5)).item(), rel=1e-2)
        circuit.eval()
        assert torch.equal(circuit(**inputs, labels=inputs["input_ids"]).loss,
                           model(**inputs, labels=inputs["input_ids"]).loss)


def test_bad_input_is_refused_and_nothing_is_modified():
    model = _Net()
    model.norm = nn.LayerNorm(4)
    tree = _tree(model)

    def refused(match: str, **kw) -> None:
        cfg = dict(mask_hparams={}, target_layers=["up"])
        cfg.update(kw)
        with pytest.raises(ValueError, match=match):
            CircuitModel(CircuitConfig(**cfg), model)
        assert _tree(model) == tree

    refused(r"'norm' is a torch.nn.modules.normalization.LayerNorm, not a supported layer "
            r"\(nn.Linear", target_layers=["up", "norm"])
    refused(r"'blocks.0.up' matches no module", target_layers=["blocks.0.up"])
    refused(r"'drop' is a .*Dropout", target_layers=["drop"])
    refused("target_layers is empty", target_layers=[])
    refused(r"unknown mask_hparams \['mask_init_percentage'\]",
            mask_hparams={"mask_init_percentage": 0.5})
    refused("mask_method 'pruning' is not supported", mask_method="pruning")
    refused(r"mask_init_percentage 1.5 is outside", mask_method="hard_concrete",
            mask_hparams={"mask_init_percentage": 1.5})
    refused(r"unknown mask_hparams \['mask_init_value'\] for hard_concrete",
            mask_method="hard_concrete", mask_hparams={"mask_init_value": 0.5})
    refused("ablation 'zero'", mask_hparams={"ablation": "zero"})
    refused("mask_unit 'row'", mask_hparams={"mask_unit": "row"})
    circuit = CircuitModel(CircuitConfig(target_layers=["up"]), model)
    with pytest.raises(ValueError, match=r"no masks on \['down'\]"):
        circuit.use_masks(False, ["down"])


def test_neurosurgeon_names_mask_params_on_the_layers_l0_term_and_layer_modes():
    """What NeuroSurgeon's own tests read (_test/test_neurosurgeon_compat.py): a masked layer's
    ``weight_mask_params`` / ``bias_mask_params`` (here the logits of ``mask_logits``, as plain
    attributes: not parameters of the model), ``_compute_l0_loss`` (0.0 in eval mode), the
    masked layers following the circuit's mode under ``freeze_base``, and ``use_masks`` by
    ``wrapped_model.<layer>`` names."""
    model = _Net()
    tree = _tree(model)
    state = set(model.state_dict())
    circuit = CircuitModel(_config(mask_bias=True, mask_init_value=-0.3), model)
    assert model.up.weight_mask_params is circuit.mask_logits["up-weight"]
    assert model.down.bias_mask_params is circuit.mask_logits["down-bias"]
    assert set(model.state_dict()) == state
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in _Net().named_parameters()}

    assert model.up.training and model.down.training and not model.drop.training
    x = torch.randn(3, 6)
    assert torch.equal(circuit._compute_l0_loss(), circuit.l0_loss())
    circuit.eval()
    assert not model.up.training and not model.down.training
    assert circuit._compute_l0_loss() == 0.0
    masked = circuit(x)
    circuit.use_masks(False, ["wrapped_model.up", "wrapped_model.down"])
    assert torch.equal(circuit(x), model.eval()(x)) and not torch.equal(masked, circuit(x))

    # a second circuit on a model that still carries one is refused before anything changes
    inner = _tree(model)
    with pytest.raises(ValueError,
                       match=r"inside another CircuitModel \(masked layers \['down', 'up'\]"):
        CircuitModel(_config(), model)
    assert _tree(model) == inner
    circuit.remove_masks()
    assert not hasattr(model.up, "weight_mask_params")
    assert not hasattr(model.down, "bias_mask_params")
    assert _tree(model) == tree


def test_hard_concrete_gates_follow_louizos_and_neurosurgeon():
    """``mask_method="hard_concrete"`` (NeuroSurgeon's HardConcreteLayer, written out here):
    logits start at log(p / (1 - p)); in training each forward draws new gates
    ``clamp(sigmoid((log u - log(1 - u) + a) / (2/3)) * 1.2 - 0.1, 0, 1)`` with ``u`` from the
    circuit's seeded generator, and L0 is the expected number of open gates,
    ``sum(sigmoid(a - 2/3 log(0.1 / 1.1)))``; in eval the mask is NeuroSurgeon's
    ``clamp(sigmoid(a) * 1.2 - 0.1, 0, 1) > 0.5`` and L0 counts it."""
    from flex_surgery.surgery.circuit_masks import _generator

    model = _Net()
    config = CircuitConfig(mask_method="hard_concrete", target_layers=["up"], seed=5,
                           mask_hparams={"mask_init_percentage": 0.7, "mask_bias": True})
    circuit = CircuitModel(config, model)
    logits = circuit.mask_logits
    assert torch.allclose(logits["up-weight"], torch.full((10, 6), math.log(0.7 / 0.3)))
    with torch.no_grad():  # a spread of logits, some negative
        logits["up-weight"].copy_(torch.linspace(-3, 3, 60).view(10, 6))
        logits["up-bias"].copy_(torch.linspace(-1, 2, 10))
    x = torch.randn(4, 6)

    def gates(name: str, draw: int, a: torch.Tensor) -> torch.Tensor:
        u = torch.rand(a.shape, generator=_generator(5, f"up.{name}/gates", draw,
                                                     torch.device("cpu")),
                       dtype=torch.float64).clamp_(1e-4, 1 - 1e-4).float()
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / (2 / 3))
        return torch.clamp(s * 1.2 - 0.1, 0, 1)

    def reference(wmask: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
        up = F.linear(x, model.up.weight * wmask, model.up.bias * bmask)
        return model.down(model.drop(F.gelu(up)))

    a_w, a_b = logits["up-weight"].detach(), logits["up-bias"].detach()
    outs = []
    for draw in range(2):  # new gates at every forward
        got = circuit(x)
        want = reference(gates("weight", draw, a_w), gates("bias", draw, a_b))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        outs.append(got)
    assert not torch.equal(outs[0], outs[1])
    shift = (2 / 3) * math.log(0.1 / 1.1)
    want_l0 = torch.sigmoid(a_w - shift).sum() + torch.sigmoid(a_b - shift).sum()
    torch.testing.assert_close(circuit.l0_loss().float(), want_l0, rtol=1e-6, atol=1e-5)
    circuit.l0_loss().backward()  # the L0 term has a gradient for every logit
    assert logits["up-weight"].grad is not None and bool((logits["up-weight"].grad > 0).all())

    circuit.eval()
    neuro_hard = lambda a: torch.clamp(torch.sigmoid(a) * 1.2 - 0.1, 0, 1) > 0.5  # noqa: E731
    torch.testing.assert_close(circuit(x), reference(neuro_hard(a_w).float(),
                                                     neuro_hard(a_b).float()))
    assert circuit.compute_l0_statistics()["total_l0"] == \
        int(neuro_hard(a_w).sum() + neuro_hard(a_b).sum())
    masks = circuit.hard_masks()
    assert torch.equal(masks["up.weight"], neuro_hard(a_w))
    with pytest.warns(UserWarning, match="temperature is ignored by hard_concrete"):
        circuit.temperature = 5.0
    circuit.remove_masks()


def test_magnitude_pruning_removes_the_smallest_magnitudes_of_the_weights_as_they_are():
    """``mask_method="magnitude_pruning"``: nothing trains; each parameter keeps the weights
    whose magnitude is at least its ``prune_percentage`` quantile (all above it at 1.0), from
    the weights as they are at each forward; the ablations and statistics follow the mask."""
    model = _Net()
    x = torch.randn(5, 6)
    with torch.no_grad():
        plain = model.eval()(x)

    def circuit_for(p: float) -> CircuitModel:
        return CircuitModel(CircuitConfig(mask_method="magnitude_pruning", target_layers=["up"],
                                          mask_hparams={"prune_percentage": p,
                                                        "mask_bias": True}), model)

    circuit = circuit_for(0.5)
    assert not any(p.requires_grad for p in circuit.parameters())
    w, b = model.up.weight.detach(), model.up.bias.detach()
    keep_w = w.abs() >= torch.quantile(w.abs().reshape(-1), 0.5)
    keep_b = b.abs() >= torch.quantile(b.abs(), 0.5)
    want = model.down(F.gelu(F.linear(x, w * keep_w, b * keep_b)))
    torch.testing.assert_close(circuit(x), want)
    l0_half = circuit.compute_l0_statistics()["total_l0"]
    assert l0_half == int(keep_w.sum() + keep_b.sum()) == 35
    assert torch.equal(circuit.hard_masks()["up.weight"], keep_w)
    circuit.eval()
    circuit.set_ablate_mode("zero_ablate")
    torch.testing.assert_close(circuit(x), model.down(F.gelu(F.linear(x, w * ~keep_w,
                                                                      b * ~keep_b))))
    circuit.set_ablate_mode("none")
    circuit.use_masks(False)
    torch.testing.assert_close(circuit(x), plain)
    circuit.use_masks(True)
    with torch.no_grad():  # the weights change (an unfrozen base): so does the mask
        model.up.weight.mul_(torch.linspace(0.1, 3.0, 60).view(10, 6))
    assert not torch.equal(circuit.hard_masks()["up.weight"], keep_w)
    with torch.no_grad():
        model.up.weight.div_(torch.linspace(0.1, 3.0, 60).view(10, 6))
    circuit.remove_masks()
    assert circuit_for(0.75).compute_l0_statistics()["total_l0"] == 15 + 3
    with pytest.raises(ValueError, match="mask_unit must be 'weight'"):
        CircuitConfig(mask_method="magnitude_pruning", target_layers=["up"],
                      mask_hparams={"mask_unit": "neuron"}).hparams()


def test_temperature_schedule():
    assert temperature_at(0, 10, 200.0) == 1.0
    assert temperature_at(10, 10, 200.0) == pytest.approx(200.0)
    assert temperature_at(20, 10, 200.0) == pytest.approx(200.0)
    # NeuroSurgeon's recipe: multiply by final ** (1 / N) after each epoch
    t = 1.0
    for epoch in range(1, 6):
        t *= 200.0 ** (1 / 10)
        assert temperature_at(epoch, 10, 200.0) == pytest.approx(t)


def test_hf_trainer_trains_a_circuit(tmp_path):
    from transformers import Trainer, TrainingArguments

    from flex_surgery.models import tiny_hf_model
    from flex_surgery.surgery.circuit_training import TemperatureCallback

    model = tiny_hf_model("gpt2")
    ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    circuit = CircuitModel(CircuitConfig(
        mask_hparams=dict(mask_init_value=0.2),
        target_layers=["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"],
        l0_lambda=1e-4), model)
    before = {k: v.detach().clone() for k, v in circuit.mask_logits.items()}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = TemperatureCallback(final_temperature=100.0, track_l0=True)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2,
                             per_device_train_batch_size=4, learning_rate=0.05,
                             save_strategy="no", report_to=[], logging_steps=1,
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    Trainer(model=circuit, args=args, train_dataset=data, callbacks=[callback]).train()
    assert circuit.temperature == pytest.approx(100.0)
    assert [h[0] for h in callback.history] == [0, 2, 4]
    assert callback.history[1][1] == pytest.approx(10.0)
    assert all(not torch.equal(before[k], v) for k, v in circuit.mask_logits.items())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


DOCS = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs"


def test_docs_page_runs():
    import re

    namespace = {"__name__": "docs_example"}
    page = DOCS / "circuits.md"
    for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        exec(compile(block, str(page), "exec"), namespace)


def test_vit_example_finds_a_conv2d_circuit():
    """docs/examples/circuit_vit.py in reduced size: the patch-embedding Conv2d is masked and
    the circuit shrinks while the task is still solved."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("circuit_vit",
                                                  DOCS / "examples" / "circuit_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.example()  # the defaults: about 10 s on an idle 2-core machine
    assert out["l0"] < 0.1 * out["max_l0"]
    assert out["history"][-1] < out["history"][0]
    assert out["dense_accuracy"] > 0.9
    assert out["accuracy"] > out["dense_accuracy"] - 0.1
    red, green, blue = out["patch_weights_per_channel"]
    assert red > green and red > blue
