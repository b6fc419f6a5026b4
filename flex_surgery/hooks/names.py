"""Resolving the names hooks are registered with to the modules and parameters of a model.

Hooks are addressed by the names of the model as written (wrapper-free, see
:func:`~flex_surgery.naming.clean_name`). Building the name table walks every module, so
:class:`ModelNames` builds it once, lazily, and keeps it: registering a hook is then a
dictionary lookup whatever the size of the model, instead of a walk of the whole tree per hook.

A kept table can go stale: model surgery replaces and deletes blocks (temporarily, in
:mod:`flex_surgery.surgery`), and users assign submodules. A stale entry must never resolve a
name to a module that is no longer in the model, so every hit is checked against the live tree
by its raw path (a walk of the path's few ``_modules`` entries), and a failed check or a miss
rebuilds the table before answering.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flex_surgery.hooks.errors import UnknownNameError, did_you_mean
from flex_surgery.naming import (
    _LAYER_SURGERY,
    StageBlockNames,
    StageNamesError,
    clean_name,
    join_name,
    stage_of_a_pipeline,
)

__all__ = ["ModelNames"]

# Clean name -> (raw path in named_modules, module).
ModuleTable = dict[str, tuple[str, nn.Module]]
# Clean dotted parameter name -> (raw path of the owning module, leaf, parameter, owner).
ParameterTable = dict[str, tuple[str, str, nn.Parameter, nn.Module]]


class ModelNames:
    """The module and parameter names of one model, built on first use and checked on use.

    ``builds`` counts table builds (each one walks every module): registration must leave it
    unchanged while the model's tree does not change.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._modules: ModuleTable | None = None
        self._parameters: ParameterTable | None = None
        self._stage_lists: list[str] = []
        self.builds = 0

    # -- the tables -------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget the tables; the next lookup walks the model again."""
        self._modules = None
        self._parameters = None

    def _build(self) -> None:
        """Both tables in one walk.

        FSDP1, activation checkpointing and ``torch.compile`` insert wrapper modules into
        paths; a hook lands on the innermost module of its name (``named_modules`` lists a
        wrapper before what it wraps, so the later entry wins). ``remove_duplicate=False``: a
        module shared under two names is found under both.
        """
        modules: ModuleTable = {}
        parameters: ParameterTable = {}
        walked = list(self.root.named_modules(remove_duplicate=False))
        whole = StageBlockNames(walked)  # a pipeline stage's blocks by whole-model names
        self._stage_lists = [raw for raw, m in walked
                             if isinstance(m, nn.ModuleList) and stage_of_a_pipeline(m)]
        for raw, module in walked:
            modules[whole(clean_name(raw))] = (raw, module)
            for leaf, parameter in module._parameters.items():
                if parameter is not None:
                    parameters[whole(clean_name(join_name(raw, leaf)))] = \
                        (raw, leaf, parameter, module)
        self._modules, self._parameters = modules, parameters
        self.builds += 1

    def module_table(self, fresh: bool = False) -> dict[str, nn.Module]:
        """Modules by clean name, in model order; ``fresh``: walk the model again first."""
        if fresh or self._modules is None:
            self._build()
        return {name: module for name, (_, module) in self._modules.items()}

    def parameter_table(self, fresh: bool = False) -> dict[str, tuple[nn.Parameter, nn.Module]]:
        """``(parameter, owning module)`` by clean dotted parameter name, in model order."""
        if fresh or self._parameters is None:
            self._build()
        return {name: (p, owner) for name, (_, _, p, owner) in self._parameters.items()}

    def names(self) -> set[str]:
        """Every clean module and parameter name."""
        if self._modules is None:
            self._build()
        return set(self._modules) | set(self._parameters)

    def check_stage_names(self) -> None:
        """Raise :class:`~flex_surgery.naming.StageNamesError` while layer surgery reorders a
        pipeline stage's blocks: their whole-model names cannot be told then (see
        :class:`~flex_surgery.naming.StageBlockNames`). ModelSurgery installs its lists on
        every stage, so every stage raises alike. A few dict lookups per block list."""
        if self._modules is None:
            self._build()
        for raw in self._stage_lists:
            current: nn.Module | None = self.root
            for part in raw.split(".") if raw else ():
                current = current._modules.get(part) if current is not None else None
            if current is not None and _LAYER_SURGERY in vars(current):
                raise StageNamesError(
                    f"the blocks of {clean_name(raw)!r} on this pipeline stage are under layer "
                    "surgery (reordered, removed or replaced), so their whole-model names "
                    "cannot be told; register hooks outside of layer surgery")

    # -- lookups ------------------------------------------------------------------------------

    def _live_module(self, raw: str, module: nn.Module) -> bool:
        """Whether ``module`` is still at path ``raw`` (the path's own ``_modules`` entries,
        as ``named_modules`` walked them; a few dict lookups)."""
        current: nn.Module | None = self.root
        for part in raw.split(".") if raw else ():
            current = current._modules.get(part)
            if current is None:
                return False
        return current is module

    def _find_module(self, name: str) -> nn.Module | None:
        built = self._modules is None
        if built:
            self._build()
        entry = self._modules.get(name)
        if entry is not None and self._live_module(*entry):
            return entry[1]
        if not built:  # stale or new: the tree changed since the table was built
            self._build()
            entry = self._modules.get(name)
            if entry is not None:
                return entry[1]
        return None

    def _find_parameter(self, name: str) -> tuple[nn.Parameter, nn.Module] | None:
        built = self._parameters is None
        if built:
            self._build()
        entry = self._parameters.get(name)
        if entry is not None:
            raw, leaf, parameter, owner = entry
            if self._live_module(raw, owner) and owner._parameters.get(leaf) is parameter:
                return parameter, owner
        if not built:  # stale, new, or a parameter object replaced (FSDP swaps views)
            self._build()
            entry = self._parameters.get(name)
            if entry is not None:
                return entry[2], entry[3]
        return None

    def module(self, name: str, known_elsewhere: frozenset[str] = frozenset()) -> nn.Module:
        """The module named ``name`` (wrapper-free), or an :class:`UnknownNameError`.

        A name in ``known_elsewhere`` (another pipeline stage's) that is not in the table is
        refused without walking the model again: registering the hooks of the other stages
        stays a lookup too.
        """
        key = clean_name(name)
        if self._modules is not None and key not in self._modules and key in known_elsewhere:
            raise UnknownNameError(f"module {name!r} lives on another pipeline stage")
        found = self._find_module(key)
        if found is None:
            self._unknown(name, "module", self._modules, self._parameters,
                          "it is a parameter: use register_hook for its gradient")
        return found

    def parameter(self, name: str, known_elsewhere: frozenset[str] = frozenset()
                  ) -> tuple[nn.Parameter, nn.Module]:
        """``(parameter, owning module)`` of the dotted parameter name ``name``."""
        key = clean_name(name)
        if self._parameters is not None and key not in self._parameters and \
                key in known_elsewhere:
            raise UnknownNameError(f"parameter {name!r} lives on another pipeline stage")
        found = self._find_parameter(key)
        if found is None:
            self._unknown(name, "parameter", self._parameters, self._modules,
                          "it is a module: use register_forward_hook and friends")
        return found

    def _unknown(self, name: str, kind: str, table: dict[str, Any], other: dict[str, Any],
                 other_hint: str) -> None:
        """Raise an UnknownNameError that says what the name is instead (a module given to a
        parameter hook, or the reverse) or the closest names."""
        hint = f"; {other_hint}" if clean_name(name) in other else ""
        raise UnknownNameError(
            f"no {kind} named {name!r} in the wrapped {type(self.root).__name__}"
            f"{hint or did_you_mean(name, table)}"
        )
