"""One spelling of module and parameter names, whatever wrappers the model is in.

Two kinds of wrapper change the names PyTorch reports, and users name things as in the
unwrapped model, so every part of flex_surgery (hooks, surgery, export, the anatomy table, the
hook map) compares names through this module and spells no wrapper itself:

* wrappers *inside* the tree -- FSDP1 units, activation checkpointing and ``torch.compile`` --
  insert path components (:data:`WRAPPER_ATTRS`) into ``named_modules()`` /
  ``named_parameters()``; :func:`clean_name` removes them;
* wrappers *around* the model -- DDP and FlexModel -- put ``module.`` in front of every name;
  :func:`unwrap_model` peels them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["WRAPPER_ATTRS", "clean_name", "join_name", "modules_by_clean_name", "unwrap_model"]

#: The attribute under which FSDP1, activation checkpointing and ``torch.compile`` keep the
#: module they wrap: a path component that :func:`clean_name` removes.
WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

_WRAPPER_TOKENS = tuple(f"{attr}." for attr in WRAPPER_ATTRS)


def clean_name(name: str) -> str:
    """The module/parameter name with FSDP1, activation-checkpoint and compile wrappers removed."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    for leaf in WRAPPER_ATTRS:
        if name == leaf:
            return ""
        if name.endswith("." + leaf):
            name = name[: -len(leaf) - 1]
    return name


def join_name(*parts: str) -> str:
    """Dotted name of the non-empty ``parts`` (the root module's name is ``""``)."""
    return ".".join(p for p in parts if p)


def modules_by_clean_name(root: nn.Module, *, outermost: bool = False) -> dict[str, nn.Module]:
    """Every module of ``root`` by clean name, in model order.

    A wrapper and the module it wraps share a clean name: ``outermost=False`` (what hooks use)
    gives the wrapped module, where activations are seen as written; ``outermost=True`` gives
    the wrapper, which owns the module's place in its parent. A module shared under two names
    is found under both.
    """
    table: dict[str, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if outermost:
            table.setdefault(clean_name(name), module)
        else:
            table[clean_name(name)] = module  # named_modules lists a wrapper first
    return table


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel wrappers that add a name prefix (DDP's ``module.``, FlexModel's ``module.``), so
    that parameter names -- and with them seeded noise -- are the same with or without them."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "FlexModel" and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
