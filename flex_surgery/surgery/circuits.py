"""Circuit discovery by continuous sparsification, on one process or a sharded model.

:class:`CircuitModel` follows NeuroSurgeon's ``CircuitModel``/``CircuitConfig`` (same names,
hyperparameters, ablation modes and L0 statistics) so experiments written for it run here, and
adds what it cannot do: tensor-parallel (fairscale, DTensor) and FSDP2 models, with each rank
holding and training the mask of its own shard (see :mod:`flex_surgery.surgery.circuit_masks`),
and training with the ``transformers`` ``Trainer``
(:class:`~flex_surgery.surgery.circuit_training.TemperatureCallback`).

Unlike NeuroSurgeon, target layers are not replaced: the masked weight is put in the layer's
parameter slot by a forward pre-hook for the duration of its forward. Module and parameter names
stay those of the model (hooks, :class:`~flex_surgery.surgery.masks.MaskTheater` and state dicts
keep working), the base weights are never written, and :meth:`CircuitModel.remove_masks` gives
back the original model unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import clean_name
from flex_surgery.parallel import frameworks
from flex_surgery.surgery.circuit_masks import (
    MASK_UNITS,
    LayerMask,
    hard_concrete_logit,
    world_group,
)
from flex_surgery.surgery.circuit_targets import SUPPORTED_LAYERS as SUPPORTED_LAYERS
from flex_surgery.surgery.circuit_targets import (
    check_ablation,
    elect_leaders,
    layer_views,
    resolve_targets,
)

__all__ = ["CircuitConfig", "CircuitModel", "anneal_temperature", "temperature_at"]

MASK_METHODS = ("continuous_sparsification", "hard_concrete", "magnitude_pruning")
_COMMON_DEFAULTS: dict[str, Any] = {"ablation": "none", "mask_unit": "weight",
                                    "mask_bias": False}
# Each method's own initial value (NeuroSurgeon's names): a logit, or the share of gates open.
_HPARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "continuous_sparsification": {**_COMMON_DEFAULTS, "mask_init_value": 0.0},
    "hard_concrete": {**_COMMON_DEFAULTS, "mask_init_percentage": 0.5},
    "magnitude_pruning": {**_COMMON_DEFAULTS, "prune_percentage": 0.5},
}


@dataclass
class CircuitConfig:
    """What to mask and how (NeuroSurgeon's ``CircuitConfig``).

    Args:
        mask_method: ``"continuous_sparsification"`` (Savarese et al., 2020),
            ``"hard_concrete"`` (Louizos et al., 2018) or ``"magnitude_pruning"`` (not trained:
            the ``prune_percentage`` smallest-magnitude weights of each parameter removed).
        mask_hparams: ``ablation`` (one of :data:`ABLATIONS`, default ``"none"``),
            ``mask_unit`` (``"weight"`` or ``"neuron"``), ``mask_bias`` (mask biases too);
            continuous sparsification: ``mask_init_value`` (initial mask logit; positive keeps
            weights at first); hard concrete: ``mask_init_percentage`` (the share of gates
            open at first, in [0, 1]); magnitude pruning: ``prune_percentage`` (the share
            removed, in [0, 1]).
        target_layers: module names of the layers to mask (as in ``named_modules()`` of the
            unwrapped model).
        freeze_base: keep the model's own parameters frozen and its modules in eval mode.
        add_l0: add ``l0_lambda * L0`` to the ``loss`` the model returns while training.
        l0_lambda: weight of the L0 penalty.
        seed: seed of the sampled ablations and ``random_ablate`` values (the same draws in
            every process and every layout).
    """

    mask_method: str = "continuous_sparsification"
    mask_hparams: dict[str, Any] = field(default_factory=dict)
    target_layers: list[str] = field(default_factory=list)
    freeze_base: bool = True
    add_l0: bool = True
    l0_lambda: float = 1e-8
    seed: int = 0

    def hparams(self) -> dict[str, Any]:
        """``mask_hparams`` with defaults filled in, checked."""
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method {self.mask_method!r} is not supported; expected one "
                             f"of {MASK_METHODS}")
        defaults = _HPARAM_DEFAULTS[self.mask_method]
        unknown = sorted(set(self.mask_hparams) - set(defaults))
        if unknown:
            raise ValueError(f"unknown mask_hparams {unknown} for {self.mask_method}; expected "
                             f"keys {sorted(defaults)}")
        hp = {**defaults, **self.mask_hparams}
        for key in ("mask_init_percentage", "prune_percentage"):
            if key in hp and not 0.0 <= hp[key] <= 1.0:
                raise ValueError(f"{key} {hp[key]} is outside [0, 1]")
        if self.mask_method == "magnitude_pruning" and hp["mask_unit"] != "weight":
            raise ValueError("magnitude_pruning masks single weights: mask_unit must be "
                             f"'weight', got {hp['mask_unit']!r}")
        check_ablation(hp["ablation"])
        if hp["mask_unit"] not in MASK_UNITS:
            raise ValueError(f"mask_unit {hp['mask_unit']!r}; expected one of {MASK_UNITS}")
        if not self.target_layers:
            raise ValueError("target_layers is empty: name the layers to mask")
        return hp


_MASKED_BY = "_flex_surgery_circuit"  # a masked layer's __dict__: (its CircuitModel, LayerMask)


def _refuse_masked_model(model: nn.Module, layers: list[LayerMask],
                         group: dist.ProcessGroup | None) -> None:
    """Refuse, on every rank of ``group`` alike, a model that is inside another CircuitModel
    (any of its modules masked: a second circuit would also take the first one's frozen flags
    for the model's own) or whose target layers already have an attribute named like the mask
    parameters. Checked before anything is modified; the ranks agree first, so a model left
    masked on one rank only raises on every rank instead of leaving the others in a
    collective."""
    inside = sorted({name for name, m in model.named_modules() if _MASKED_BY in m.__dict__})
    clashes = [f"{layer.name}.{p}_mask_params" for layer in layers for p in layer.params
               if hasattr(layer.module, f"{p}_mask_params")]
    problem = None
    if inside:
        problem = (f"the model is inside another CircuitModel (masked layers {inside}); "
                   "remove_masks() that one first")
    elif clashes:
        problem = f"these layers already have attributes named {clashes}"
    problems = [problem]
    if group is not None:
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    found = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if found:
        rank, first = found[0]
        where = f" (on rank {rank} of the circuit's group)" if group is not None else ""
        raise ValueError(f"cannot mask this model: {first}{where}")


def _apply_mask(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a masked layer: ``weight * mask`` (and the bias's) in the parameter
    slots for the duration of the layer's forward."""
    circuit, layer = module.__dict__[_MASKED_BY]
    for p, mp in layer.params.items():
        if module.__dict__.get(f"{p}_mask_params") is not mp.logits:
            raise ValueError(
                f"{layer.name}.{p}_mask_params was replaced or deleted, but the circuit masks "
                f"with its own logits: change them in place ({layer.name}.{p}_mask_params"
                ".data.copy_(...), or through circuit.mask_logits)")
    live = {p: module._parameters[p] for p in layer.params}
    layer.saved.append(live)
    if layer.use_masks:  # every mask made before any slot changes (a mask may read them)
        module._parameters.update({p: layer.masked(p, value, circuit.training,
                                                   circuit._temperature)
                                   for p, value in live.items()})


def _restore_parameters(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (run even when the forward raises): the original parameters back."""
    _, layer = module.__dict__[_MASKED_BY]
    if layer.saved:
        module._parameters.update(layer.saved.pop())


class CircuitModel(nn.Module):
    """Wrap ``model`` with trainable masks (continuous sparsification or hard concrete) on
    ``config.target_layers``.

    Every rank of a sharded model builds it with the same config (construction is collective
    over ``process_group``: the ranks that hold this model, by default every rank; a group of
    one rank is one process, e.g. a one-process twin built on every rank of a job, or one
    circuit per data-parallel replica given its tensor-parallel group). Train the masks
    (``circuit.parameters()`` are the masks when ``freeze_base``), anneal :attr:`temperature`
    (continuous sparsification), then evaluate the hard mask (``circuit.eval()``), ablate it
    (:meth:`set_ablate_mode`) or hand it to :class:`~flex_surgery.surgery.masks.MaskTheater`
    (:meth:`hard_masks`).
    """

    def __init__(self, config: CircuitConfig, model: nn.Module,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        hp = config.hparams()
        self._group = world_group(process_group)
        targets = resolve_targets(model, config.target_layers)
        views = layer_views(model, targets, hp["mask_bias"], self._group)
        tp_group = frameworks.tensor_parallel_group(model=model)
        held_by = dist.get_world_size(self._group) if self._group is not None else 1
        split = any(v.kind != "plain" for layer in views.values() for v in layer.values())
        if split and tp_group is not None and dist.get_world_size(tp_group) > held_by:
            raise frameworks.UnknownLayoutError(
                f"process_group holds {held_by} rank(s) but the model is split over a "
                f"tensor-parallel group of {dist.get_world_size(tp_group)}: give the ranks "
                "that hold the model (at least its tensor-parallel group)")
        init = {"continuous_sparsification": lambda: hp["mask_init_value"],
                "hard_concrete": lambda: hard_concrete_logit(hp["mask_init_percentage"]),
                "magnitude_pruning": lambda: 1.0}[config.mask_method]()
        layers = [LayerMask(name, targets[name], views[name], mask_unit=hp["mask_unit"],
                            mask_bias=hp["mask_bias"], mask_init_value=init,
                            seed=config.seed, tp_group=tp_group, group=self._group,
                            method=config.mask_method,
                            prune_percentage=hp.get("prune_percentage", 0.0))
                  for name in targets]
        elect_leaders(layers, self._group)
        compute_dtypes = frameworks.fsdp2_compute_dtypes(model)
        for layer in layers:
            for p, mp in layer.params.items():
                mp.compute_dtype = compute_dtypes.get((id(layer.module), p))
        self.config = config
        self.wrapped_model = model
        self.mask_logits = nn.ParameterDict({
            f"{layer.name}.{p}".replace(".", "-"): mp.logits
            for layer in layers for p, mp in layer.params.items()})
        self._layers = {layer.name: layer for layer in layers}
        self._temperature = 1.0
        self._saved_flags = ([p.requires_grad for p in model.parameters()],
                             [m.training for m in model.modules()])
        self._handles: list[Any] = []
        self._removed = False
        _refuse_masked_model(model, layers, self._group)
        for layer in layers:
            # NeuroSurgeon's name for a layer's mask logits, as a plain attribute: not in the
            # model's parameters or state dict (they are this module's ``mask_logits``)
            for p, mp in layer.params.items():
                layer.module.__dict__[f"{p}_mask_params"] = mp.logits
            # The hooks find the circuit and the mask through the module itself, so that a
            # deep copy of the circuit (or of the model inside it) masks with its own copies.
            layer.module.__dict__[_MASKED_BY] = (self, layer)
            self._handles.append(layer.module.register_forward_pre_hook(_apply_mask))
            self._handles.append(layer.module.register_forward_hook(
                _restore_parameters, prepend=True, always_call=True))
        if config.freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
        self.set_ablate_mode(hp["ablation"])
        self.train(True)

    # -- modes -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> CircuitModel:
        """Masks train (soft) or evaluate (hard); with ``freeze_base`` the model's modules stay
        in eval mode (dropout off) but for the masked layers themselves, which follow ``mode``
        as NeuroSurgeon's mask layers do (a plain linear or convolution computes the same in
        either mode; the mask follows this module's own mode)."""
        self.training = mode
        self.wrapped_model.train(False if self.config.freeze_base else mode)
        for layer in self._layers.values():
            layer.module.training = mode
        return self

    @property
    def temperature(self) -> float:
        """The soft mask is ``sigmoid(temperature * logits)``; raise it to anneal."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        if self.config.mask_method != "continuous_sparsification":
            warnings.warn(f"the temperature is ignored by {self.config.mask_method} masks",
                          stacklevel=2)
        self._temperature = float(value)

    def set_ablate_mode(self, ablation: str, force_resample: bool = False) -> None:
        """How the eval mask is made: ``none`` (the trained mask), ``zero_ablate`` (its
        complement), ``random_ablate`` (kept weights re-initialised), ``randomly_sampled`` /
        ``complement_sampled`` (a seeded random mask removing as many weights, from everywhere
        or from outside the trained mask)."""
        check_ablation(ablation)
        for layer in self._layers.values():
            if layer.ablation != ablation:
                for mp in layer.params.values():
                    mp.sampled, mp.draws = None, 0
            layer.ablation = ablation
            layer.force_resample = force_resample
            for mp in layer.params.values():  # each parameter draws again once
                mp.resample = force_resample

    def use_masks(self, on: bool, names: Iterable[str] | None = None) -> None:
        """Turn the masks of all layers (or of the named ones) on or off."""
        # NeuroSurgeon names layers as this module's submodules: "wrapped_model.<layer>"
        chosen = list(self._layers) if names is None else \
            [n if n in self._layers else clean_name(n.removeprefix("wrapped_model."))
             for n in (clean_name(n) for n in names)]
        unknown = [n for n in chosen if n not in self._layers]
        if unknown:
            raise ValueError(f"no masks on {unknown}; masked layers: {list(self._layers)}")
        for n in chosen:
            self._layers[n].use_masks = on

    # -- forward and L0 ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; while training with ``add_l0``, ``l0_lambda * L0`` is added to
        the ``loss`` of the output (when the model computed one)."""
        output = self.wrapped_model(*args, **kwargs)
        if self.config.add_l0 and self.training and getattr(output, "loss", None) is not None:
            output.loss = output.loss + self.config.l0_lambda * self.l0_loss()
        return output

    def l0_loss(self) -> torch.Tensor:
        """The soft L0 of the whole mask (global value; each rank's gradient is that of its own
        mask elements, as in one process). Collective under distribution."""
        local = leader = None
        for layer in self._layers.values():
            t, lead = layer.l0_terms(self.training, self._temperature)
            local = t if local is None else local + t
            leader = lead if leader is None else leader + lead
        group = self._group
        if group is None:
            return local
        total = leader.detach().clone()
        dist.all_reduce(total, group=group)
        return local + (total - local.detach())

    def _compute_l0_loss(self) -> torch.Tensor | float:
        """NeuroSurgeon's name for the L0 term of the loss: :meth:`l0_loss` while training,
        ``0.0`` in eval mode (where NeuroSurgeon adds no L0 to the loss)."""
        return self.l0_loss() if self.training else 0.0

    @torch.no_grad()
    def compute_l0_statistics(self) -> dict[str, Any]:
        """``total_l0``, ``max_l0``, ``layer2l0``, ``layer2maxl0`` of the eval (hard) mask in
        the current ablation mode, over the full model (collective under distribution)."""
        names = list(self._layers)
        values = torch.stack([self._layers[n].l0_terms(False, self._temperature)[1].double()
                              for n in names])
        group = self._group
        if group is not None:
            dist.all_reduce(values, group=group)
        layer2l0 = {n: float(v) for n, v in zip(names, values.tolist())}
        layer2maxl0 = {n: self._layers[n].max_l0() for n in names}
        return {"total_l0": float(sum(layer2l0.values())),
                "max_l0": int(sum(layer2maxl0.values())),
                "layer2l0": layer2l0, "layer2maxl0": layer2maxl0}

    # -- handing the circuit on --------------------------------------------------------------
    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: full-shape bool mask}`` of the eval mask in the current ablation
        mode -- what :class:`~flex_surgery.surgery.masks.MaskTheater` takes. Collective under
        distribution (each full mask is assembled from the shards)."""
        if any(layer.ablation == "random_ablate" for layer in self._layers.values()):
            raise ValueError("random_ablate replaces weights, it is not a multiplicative mask; "
                             "choose none, zero_ablate, randomly_sampled or complement_sampled")
        out: dict[str, torch.Tensor] = {}
        for layer in self._layers.values():
            for pname, mp in layer.params.items():
                full = mp.gather(layer.mask(pname, False, self._temperature)) > 0.5
                out[f"{layer.name}.{pname}"] = full.expand(mp.param_full_shape).clone()
        return out

    def remove_masks(self) -> nn.Module:
        """Take the masks off and give back the model as it was: hooks removed, the original
        ``requires_grad`` and train/eval flags restored (its weights were never written)."""
        if self._removed:  # once: a second call must not undo what was done since
            return self.wrapped_model
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers.values():
            for p, mp in layer.params.items():
                if layer.module.__dict__.get(f"{p}_mask_params") is mp.logits:
                    del layer.module.__dict__[f"{p}_mask_params"]
            layer.module.__dict__.pop(_MASKED_BY, None)
        grads, modes = self._saved_flags
        for p, g in zip(self.wrapped_model.parameters(), grads):
            p.requires_grad_(g)
        for m, t in zip(self.wrapped_model.modules(), modes):
            m.training = t
        return self.wrapped_model

    @property
    def masked_layers(self) -> list[str]:
        return list(self._layers)


def temperature_at(epoch: float, total_epochs: float, final_temperature: float,
                   initial_temperature: float = 1.0) -> float:
    """The continuous-sparsification schedule: exponential from ``initial_temperature`` to
    ``final_temperature`` over ``total_epochs`` (NeuroSurgeon's ``temp *= final ** (1 / N)``
    after each epoch, from 1), constant afterwards."""
    if total_epochs <= 0 or final_temperature <= 0 or initial_temperature <= 0:
        raise ValueError("total_epochs and both temperatures must be > 0")
    progress = min(max(epoch / total_epochs, 0.0), 1.0)
    return initial_temperature * (final_temperature / initial_temperature) ** progress


def anneal_temperature(circuit: CircuitModel, epoch: float, total_epochs: float,
                       final_temperature: float, initial_temperature: float = 1.0) -> float:
    """Set ``circuit.temperature`` for the end of ``epoch`` (call it after each epoch of a
    hand-written loop) and return it."""
    circuit.temperature = temperature_at(epoch, total_epochs, final_temperature,
                                         initial_temperature)
    return circuit.temperature
