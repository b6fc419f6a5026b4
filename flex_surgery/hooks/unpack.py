"""Find the tensor a hook works on inside whatever a module hands its hooks, and put it back.

Modules return tensors, tuples, dicts, HF ``ModelOutput``s (which ``transformers`` registers as
pytree nodes) and mixtures of those with non-tensor leaves (``None``, caches, ints). A hook works
on exactly one tensor: the ``unpack_idx``-th tensor leaf of ``torch.utils._pytree``'s flattening,
in the order pytree visits leaves (positional order for tuples/lists, insertion order for dicts
and ``ModelOutput`` fields that are not ``None``). Repacking puts a replacement at the same leaf
and rebuilds the original container type.

A bare tensor -- the common case for linear layers, norms and MLPs -- skips pytree entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from flex_surgery.hooks.errors import UnpackError

Repack = Callable[[torch.Tensor], Any]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def unpack(value: Any, unpack_idx: int, owner: object) -> tuple[torch.Tensor, Repack]:
    """The ``unpack_idx``-th tensor in ``value`` and a function that puts a replacement back.

    ``owner`` is only used to name the hook in the error raised when there is no such tensor.
    """
    if isinstance(value, torch.Tensor):
        if unpack_idx != 0:
            raise UnpackError(
                f"{owner!r}: unpack_idx={unpack_idx} but the hooked value is a single tensor "
                "(only unpack_idx=0 exists)"
            )
        return value, _identity

    if type(value) is tuple and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return _unpack_flat_tuple(value, unpack_idx, owner)

    leaves, spec = pytree.tree_flatten(value)
    position = _tensor_position(leaves, unpack_idx, value, owner)

    def repack(tensor: torch.Tensor) -> Any:
        new_leaves = list(leaves)
        new_leaves[position] = tensor
        return pytree.tree_unflatten(new_leaves, spec)

    return leaves[position], repack


def unpack_inputs(args: tuple, kwargs: dict, unpack_idx: int,
                  owner: object) -> tuple[torch.Tensor, Repack]:
    """:func:`unpack` of a module's inputs ``(args, kwargs)``; the repack gives both back.

    Tensors of ``args`` come first, then those of ``kwargs``, as pytree orders ``(args,
    kwargs)``. The common call -- tensors passed positionally -- skips pytree.
    """
    if all(a is None or isinstance(a, torch.Tensor) for a in args) and \
            unpack_idx < sum(isinstance(a, torch.Tensor) for a in args):
        tensor, repack_args = _unpack_flat_tuple(args, unpack_idx, owner)
        return tensor, lambda new: (repack_args(new), kwargs)
    return unpack((args, kwargs), unpack_idx, owner)


def _unpack_flat_tuple(value: tuple, unpack_idx: int,
                       owner: object) -> tuple[torch.Tensor, Repack]:
    """Same result as the pytree path for a tuple of tensors and ``None``s, without pytree.

    Attention layers and backward hooks (``grad_input``/``grad_output``) hand over such tuples
    on every call; this path costs a fraction of a flatten/unflatten.
    """
    position = _tensor_position(value, unpack_idx, value, owner)

    def repack(tensor: torch.Tensor) -> tuple:
        return value[:position] + (tensor,) + value[position + 1:]

    return value[position], repack


def _tensor_position(leaves: Sequence[Any], unpack_idx: int, value: Any, owner: object) -> int:
    """Index in ``leaves`` of the ``unpack_idx``-th tensor."""
    seen = 0
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            if seen == unpack_idx:
                return position
            seen += 1
    found = f"{seen} tensor(s), valid unpack_idx 0..{seen - 1}" if seen else "no tensor"
    raise UnpackError(
        f"{owner!r}: unpack_idx={unpack_idx} is out of range: the hooked "
        f"{type(value).__name__} holds {found}"
    )
