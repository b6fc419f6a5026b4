"""Train a :class:`~flex_surgery.surgery.circuits.CircuitModel` with the ``transformers``
``Trainer``: the continuous-sparsification temperature schedule as a ``TrainerCallback``.

Kept apart from :mod:`flex_surgery.surgery.circuits` because importing ``transformers`` costs
seconds, and hand-written loops need only :func:`~flex_surgery.surgery.circuits.anneal_temperature`.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from flex_surgery.surgery.circuits import CircuitModel, anneal_temperature

__all__ = ["TemperatureCallback"]


class TemperatureCallback(TrainerCallback):
    """Anneal ``model.temperature`` exponentially from ``initial_temperature`` to
    ``final_temperature`` over ``total_epochs`` (default: the run's ``num_train_epochs``),
    setting it at the start of training and after every epoch; with ``per_step`` the same
    curve is followed after every optimizer step (``epoch`` is fractional then).

    ``history`` records ``(global_step, temperature, total_l0)`` after each update when
    ``track_l0`` (a collective under distribution: every rank runs the callback).
    """

    def __init__(self, final_temperature: float, total_epochs: float | None = None,
                 initial_temperature: float = 1.0, per_step: bool = False,
                 track_l0: bool = False) -> None:
        self.final_temperature = final_temperature
        self.total_epochs = total_epochs
        self.initial_temperature = initial_temperature
        self.per_step = per_step
        self.track_l0 = track_l0
        self.history: list[tuple[int, float, float | None]] = []

    @staticmethod
    def _circuit(kwargs: dict[str, Any]) -> CircuitModel:
        model = kwargs.get("model")
        while model is not None and not isinstance(model, CircuitModel):
            model = getattr(model, "module", None)  # DDP / accelerate wrappers
        if model is None:
            raise TypeError("TemperatureCallback needs the Trainer's model to be a CircuitModel")
        return model

    def _update(self, state, kwargs: dict[str, Any], epoch: float) -> None:
        circuit = self._circuit(kwargs)
        total = self.total_epochs or state.num_train_epochs
        anneal_temperature(circuit, epoch, total, self.final_temperature,
                           self.initial_temperature)
        l0 = None
        if self.track_l0:
            l0 = circuit.compute_l0_statistics()["total_l0"]
        self.history.append((state.global_step, circuit.temperature, l0))

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state, kwargs, 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.per_step:
            self._update(state, kwargs, float(state.epoch or 0.0))

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.per_step:
            self._update(state, kwargs, float(round(state.epoch or 0.0)))
