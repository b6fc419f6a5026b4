"""New weights for an ``ExportedProgram`` without exporting again: :func:`inject_weights`.

A program exported with ``torch.export.export(model, ...)`` keeps its weights in
``program.state_dict`` under the model's own ``state_dict()`` names (its graph signature lists
them as parameters and buffers). Those tensors are *the eager model's parameters*, not copies:
copying new values into them in place would silently rewrite the user's model as well. Nobody
who injects weights into a program expects their eager model to change, so the first injection
into a program whose weights may be shared gives the program tensors of its own (new storage,
tied names still sharing one tensor) and records it as owning them; every later injection
copies in place into those tensors. Programs made by :class:`~flex_surgery.export.ExportedModel`
(a private copy at export, or read from a file) own their weights from the start.

Everything is checked before the first byte is written
(:meth:`~flex_surgery.export.layout.WeightLayout.match`): a failed injection leaves the program
exactly as it was, still sharing whatever it shared.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from flex_surgery.export.layout import WeightLayout, WeightSlot

__all__ = ["inject_weights", "owns_weights"]

#: Programs whose state tensors belong to them alone: in-place writes reach no other module.
_OWNING: weakref.WeakSet[torch.export.ExportedProgram] = weakref.WeakSet()
#: program -> {prefix: layout}. A layout depends on names, shapes, dtypes and which names are
#: tied, none of which an injection changes; reusing it keeps repeated injections at the cost
#: of the copy.
_LAYOUTS: weakref.WeakKeyDictionary[torch.export.ExportedProgram, dict[str, WeightLayout]] = (
    weakref.WeakKeyDictionary())

Matched = list[tuple[WeightSlot, torch.Tensor]]


def inject_weights(program: torch.export.ExportedProgram, state_dict: Mapping[str, torch.Tensor],
                   *, strict: bool = True, prefix: str = "") -> torch.export.ExportedProgram:
    """Write ``state_dict`` into ``program``'s weights without re-exporting; return ``program``.

    The program is updated **in place and returned** (the same object), so
    ``program.module()`` built afterwards computes with the new weights at every shape the
    program was exported for. ``state_dict`` is keyed by the eager model's ``state_dict()``
    names (parameters and persistent buffers); a tied weight may be given under any of its
    names, or under several that are equal. Values may live on another device (they are
    copied) but must have the program's dtype and shape.

    The user's eager model never changes: on the first injection into a program whose tensors
    may be shared with it (any program from ``torch.export.export``), the program gets new
    tensors of its own; later injections copy in place. Modules obtained from
    ``program.module()`` *before* that first injection hold the eager model's parameters and
    keep computing with them: call ``program.module()`` again.

    Raises :class:`~flex_surgery.export.layout.WeightMismatchError` listing every missing or
    unexpected key, wrong shape or dtype and disagreeing tied copy, naming each parameter,
    before anything is written. ``strict=False`` allows missing keys (they keep their values).
    ``prefix`` is what the exported root put in front of every model name (``"module."`` for a
    wrapper holding the model as ``self.module``); ``""`` for a model exported directly.
    """
    write_weights(program, program_layout(program, prefix), state_dict, strict)
    return program


def owns_weights(program: torch.export.ExportedProgram) -> bool:
    """Whether ``program``'s weights are known to be its own (in-place writes reach nothing
    else): made by :class:`~flex_surgery.export.ExportedModel`, or injected into once."""
    return program in _OWNING


def declare_owner(program: torch.export.ExportedProgram) -> None:
    """Record that nothing outside ``program`` holds its state tensors (a private copy was
    exported, or the program was read from a file)."""
    _OWNING.add(program)


def program_layout(program: torch.export.ExportedProgram, prefix: str = "") -> WeightLayout:
    """The :class:`WeightLayout` of ``program``'s state, checked against its graph signature.

    The graph signature names what the graph reads as parameters and buffers; the state dict
    must hold exactly the parameters and persistent buffers (non-persistent buffers are
    constants fixed at export). A program with no weights at all was not exported from a module
    with parameters, and nothing can be injected into it.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"inject_weights needs a torch.export.ExportedProgram, not a "
                        f"{type(program).__name__}")
    cached = _LAYOUTS.get(program, {}).get(prefix)
    if cached is not None and len(cached.names) == len(program.state_dict):
        return cached
    signature = program.graph_signature
    fixed = set(signature.non_persistent_buffers)
    expected = [*signature.parameters, *(b for b in signature.buffers if b not in fixed)]
    state = program.state_dict
    if not expected:
        raise ValueError("the program reads no parameters or buffers: it was not exported from "
                         "an nn.Module with weights, so there is nothing to inject into")
    if set(expected) != set(state):
        raise ValueError(f"the program's state_dict does not match its graph signature "
                         f"(only in the signature: {sorted(set(expected) - set(state))[:4]}, "
                         f"only in the state dict: {sorted(set(state) - set(expected))[:4]})")
    constants = [k[len(prefix):] for k in fixed if k.startswith(prefix)]
    layout = WeightLayout(state, prefix, constants=constants)
    _LAYOUTS.setdefault(program, {})[prefix] = layout
    return layout


def write_weights(program: torch.export.ExportedProgram, layout: WeightLayout,
                  weights: Mapping[str, torch.Tensor], strict: bool = True) -> Matched:
    """Validate ``weights`` against ``layout`` (all of it, raising before any write), then write
    them into ``program``; return the (slot, value) pairs written.

    The one write path of the package: :func:`inject_weights` and
    :class:`~flex_surgery.export.ExportedModel` both end here.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of names to tensors, not a "
                        f"{type(weights).__name__}")
    matched = layout.match(weights, strict)
    if owns_weights(program):
        copy_matched(program, layout, matched)
    else:
        _give_private_weights(program, layout, matched)
    return matched


@torch.no_grad()
def copy_matched(program: torch.export.ExportedProgram, layout: WeightLayout,
                 matched: Matched) -> None:
    """Copy each matched value in place into the program tensor of its slot (once per tied
    group). Only for a program that owns its weights.

    A value that shares memory with any of the program's tensors (a view from
    ``ExportedModel.state_dict()``, say a swap of two blocks' weights) is read into a copy
    before anything is written: copied slot by slot, it would be read after its own slot or
    another had been overwritten."""
    state = program.state_dict
    ours = {t.untyped_storage().data_ptr() for t in state.values()
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}
    matched = [(slot, value.clone() if value.untyped_storage().data_ptr() in ours else value)
               for slot, value in matched]
    for slot, value in matched:
        state[layout.prefix + slot.names[0]].copy_(value)


@torch.no_grad()
def _give_private_weights(program: torch.export.ExportedProgram, layout: WeightLayout,
                          matched: Matched) -> None:
    """Replace every state tensor of ``program`` by a new one of its own, filled with the
    matched value (or, for slots left out with ``strict=False``, the current one).

    Tied names get one shared tensor; entries that were ``nn.Parameter`` stay parameters with
    the same ``requires_grad``. The old tensors -- the eager model's -- are only read.
    """
    values = {slot.names[0]: value for slot, value in matched}
    state = program.state_dict
    fresh: dict[str, torch.Tensor] = {}
    for slot in layout.slots:
        old = state[layout.prefix + slot.names[0]]
        new = torch.empty_like(old, memory_format=torch.contiguous_format)
        new.copy_(values.get(slot.names[0], old))
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for name in slot.names:
            fresh[layout.prefix + name] = new
    state.update(fresh)  # all validated and allocated: the swap itself cannot fail halfway
    declare_owner(program)
