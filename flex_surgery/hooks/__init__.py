"""FlexModel-style hooks: read and edit whole activations and gradients of any model."""

from flex_surgery.hooks.dummy import DummyModule
from flex_surgery.hooks.errors import (
    EditingFunctionError,
    FlexModelError,
    GroupError,
    HookRegistrationError,
    ShapeMismatchError,
    UnknownGroupError,
    UnknownNameError,
    UnpackError,
)
from flex_surgery.hooks.groups import ALL
from flex_surgery.hooks.hook_function import HookFunction, output_key, pure_edit
from flex_surgery.hooks.wrapper import FlexModel

__all__ = [
    "ALL",
    "DummyModule",
    "EditingFunctionError",
    "FlexModel",
    "FlexModelError",
    "GroupError",
    "HookFunction",
    "HookRegistrationError",
    "ShapeMismatchError",
    "UnknownGroupError",
    "UnknownNameError",
    "UnpackError",
    "output_key",
    "pure_edit",
]
