"""An identity module: a hook point wherever a model has no module of its own."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

T = TypeVar("T")


class DummyModule(nn.Module):
    """Returns its input unchanged, so hooks can be attached at any point of a forward.

    Insert it where the value you want to read or edit is computed inline (a residual sum, a
    scaled attention score): ``self.resid_point = DummyModule()`` in ``__init__`` and
    ``h = self.resid_point(h)`` in ``forward``. It has no parameters and costs one call.
    """

    def forward(self, x: T) -> T:
        return x
