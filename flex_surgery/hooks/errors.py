"""Errors raised by FlexModel and its hooks.

Every mistake a user can make with hooks -- a misspelt module name, an editing function that
forgets to return, a group that does not exist -- raises one of these with a message that names
the hook involved, instead of silently doing nothing. All derive from :class:`FlexModelError`
and from the builtin exception a caller would naturally catch (``LookupError`` for unknown
names, ``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch


class FlexModelError(Exception):
    """Base class of every error raised by :mod:`flex_surgery.hooks`."""


class UnknownNameError(FlexModelError, LookupError):
    """A module, parameter or trainable-module name that the wrapped model does not have."""

    def __str__(self) -> str:  # LookupError subclasses would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownGroupError(UnknownNameError):
    """A hook group that was never created."""


class HookRegistrationError(FlexModelError, ValueError):
    """A hook that cannot be registered as asked (registered twice, wrong kind, ...)."""


class GroupError(FlexModelError, ValueError):
    """A group operation that makes no sense (removing ``"all"``, a hook not in the group)."""


class UnpackError(FlexModelError, IndexError):
    """``unpack_idx`` points past the tensors a module passed to its hook."""


class ShapeMismatchError(FlexModelError, ValueError):
    """The whole tensor a hook saw disagrees with the HookFunction's ``expected_shape``."""


class EditingFunctionError(FlexModelError, ValueError):
    """An editing function returned something that cannot replace the tensor it was given."""


def check_edit_result(owner: object, result: Any, shape: torch.Size, dtype: torch.dtype,
                      device: torch.device) -> None:
    """Raise the :class:`EditingFunctionError` that says why ``result`` (what ``owner``'s
    editing function returned) cannot replace a tensor of ``shape``, ``dtype`` on ``device``:
    ``None``, not a tensor, another shape or dtype, another device.

    A hook calls this only once its one fast comparison (a tensor of the same shape, dtype and
    device) has failed, so these messages are built off the path of every successful call. The
    expected properties are passed as they were before the editing function ran: an in-place op
    (``unsqueeze_``, ``t_``) changes them on the input itself.
    """
    if result is None:
        raise EditingFunctionError(
            f"{owner!r}: the editing function returned None; it must return the (edited) "
            "tensor, e.g. end it with `return tensor`"
        )
    if not isinstance(result, torch.Tensor):
        raise EditingFunctionError(
            f"{owner!r}: the editing function returned a {type(result).__name__}, "
            "expected a torch.Tensor"
        )
    if result.shape != shape or result.dtype != dtype:
        raise EditingFunctionError(
            f"{owner!r}: the editing function returned shape {tuple(result.shape)} dtype "
            f"{result.dtype}; it must keep the input's shape {tuple(shape)} and dtype "
            f"{dtype} (an in-place op that changes them, such as unsqueeze_, counts too)"
        )
    if result.device != device:
        raise EditingFunctionError(
            f"{owner!r}: the editing function returned a tensor on {result.device}; "
            f"it must stay on {device}"
        )


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'a', 'b'?"`` for the closest candidates, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        return ""
    return "; did you mean " + ", ".join(repr(c) for c in close) + "?"
