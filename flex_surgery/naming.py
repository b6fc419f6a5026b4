"""One spelling of module and parameter names, whatever wrappers the model is in.

FSDP1, activation checkpointing and ``torch.compile`` insert path components
(``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod``) into
``named_modules()``/``named_parameters()``. Users name things as in the unwrapped model, so hooks,
surgery, export and the hook map all compare names after :func:`clean_name`.
"""

from __future__ import annotations

__all__ = ["clean_name"]

_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_WRAPPER_LEAVES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """The module/parameter name with FSDP1, activation-checkpoint and compile wrappers removed."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    for leaf in _WRAPPER_LEAVES:
        if name == leaf:
            return ""
        if name.endswith("." + leaf):
            name = name[: -len(leaf) - 1]
    return name
