"""FlexModel's hook-group methods: create groups of hooks by name pattern, choose them per call.

:class:`HookGroupAPI` is the part of :class:`~flex_surgery.hooks.wrapper.FlexModel` that speaks
FlexModel 0.1.0's group API (``create_hook_group``, ``update_hook_groups``, ...) over the
membership kept by :class:`~flex_surgery.hooks.groups.HookGroups`, and that turns a call's
``groups=`` into which hooks run.

PyTorch hooks stay installed while groups are chosen: choosing flips a flag on each
HookFunction, which keeps the order of several hooks on one module fixed (registration order
matters when they edit). What a choice enables is computed when the choice or the groups
change, not per forward call: repeating the same ``groups=`` costs one comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from torch import nn

from flex_surgery.hooks.errors import UnknownNameError, did_you_mean
from flex_surgery.hooks.groups import ALL, HookGroups, HookSelection, name_matcher
from flex_surgery.hooks.hook_function import EditingFunction, HookFunction
from flex_surgery.hooks.names import ModelNames
from flex_surgery.hooks.registration import MODULE_BACKWARD_KINDS
from flex_surgery.parallel.runtime import HOOK_TYPES

__all__ = ["HookGroupAPI"]

# Names FlexModel 0.1.0 used for hook kinds, accepted by create_hook_group.
_HOOK_TYPE_ALIASES = {"backward": "full_backward", "backward_pre": "full_backward_pre",
                      "pre_forward": "forward_pre", "pre_backward": "full_backward_pre",
                      "tensor_backward": "tensor", "parameter": "tensor"}

_CREATE_HOOK_GROUP_OPTIONS = ("expected_shape", "editing_function", "unpack_idx", "hook_type")


class HookGroupAPI:
    """Named groups of registered hooks, and the choice of which run.

    A mixin: :class:`~flex_surgery.hooks.wrapper.FlexModel` creates the state it reads and
    provides registration (:class:`~flex_surgery.hooks.registration.HookRegistration`).
    """

    # Set by FlexModel.__init__ / provided by HookRegistration.
    module: nn.Module
    _names: ModelNames
    _remote_names: frozenset[str]
    _groups: HookGroups
    _selection_key: tuple | None
    _hooks_selected: bool  # whether the last selection enabled any hook
    _backward_hooks_selected: bool  # ... any hook that fires in backward, on this stage
    _check_usable: Callable[[], None]
    _register: Callable[[HookFunction, str], None]
    remove_hook_function: Callable[[HookFunction], None]
    _install_backward_hooks: Callable[[dict[int, nn.Module]], None]

    def create_hook_group(
        self,
        group_name: str,
        group_constructor: str | Any,
        expected_shape: Sequence[int | None] | None = None,
        editing_function: EditingFunction | None = None,
        unpack_idx: int = 0,
        hook_type: str = "forward",
        **kwargs: Any,
    ) -> list[HookFunction]:
        """Create and register one HookFunction per module matching ``group_constructor``.

        ``group_constructor`` is a name pattern (substring, glob, ``re:`` regex or compiled
        pattern; see :mod:`flex_surgery.hooks.groups`) matched against module names, or
        against parameter names when ``hook_type="tensor"``. All created hooks share
        ``expected_shape``, ``editing_function`` and ``unpack_idx``, and are added to
        ``group_name`` (and ``"all"``). Returns them in model order.
        """
        if kwargs:
            unknown = next(iter(kwargs))
            raise TypeError(
                f"create_hook_group() got an unexpected keyword argument {unknown!r}"
                f"{did_you_mean(unknown, _CREATE_HOOK_GROUP_OPTIONS)} "
                f"(options: {', '.join(_CREATE_HOOK_GROUP_OPTIONS)})"
            )
        self._check_usable()
        if not isinstance(group_name, str) or not group_name:
            # Checked before anything is registered: all of the group's hooks or none.
            raise ValueError(f"a group name is a non-empty str, got {group_name!r}")
        hook_type = _HOOK_TYPE_ALIASES.get(hook_type, hook_type)
        if hook_type not in HOOK_TYPES:
            raise ValueError(f"unknown hook_type {hook_type!r}; choose from {HOOK_TYPES}"
                             f"{did_you_mean(str(hook_type), HOOK_TYPES)}")
        matches = name_matcher(group_constructor)
        # A pattern is matched against every name, so this walks the model anyway: walk it
        # afresh, which also makes the lookups of the registrations below hits.
        if hook_type == "tensor":
            candidates = list(self._names.parameter_table(fresh=True))
        else:
            candidates = list(self._names.module_table(fresh=True))
        names = [n for n in candidates if n and matches(n)]
        if not names and any(matches(n) for n in self._remote_names):
            self._groups.create(group_name)  # the group exists on every stage
            return []  # every match lives on another pipeline stage
        if not names:
            kind = "parameter" if hook_type == "tensor" else "module"
            raise UnknownNameError(
                f"group constructor {group_constructor!r} matches no {kind} name of the wrapped "
                f"{type(self.module).__name__}"
                f"{did_you_mean(str(group_constructor), candidates)}"
            )
        created = [HookFunction(n, expected_shape, editing_function, unpack_idx) for n in names]
        registered: list[HookFunction] = []
        try:
            for hf in created:
                self._register(hf, hook_type)
                registered.append(hf)
            self._groups.update(created, group_name)
        except BaseException:  # Ctrl-C too: no half-registered group
            for hf in registered:  # all or nothing
                self.remove_hook_function(hf)
            raise
        return created

    def update_hook_groups(self, hook_functions: HookSelection, group_name: str) -> None:
        """Add hook functions (one, a list, or a name pattern) to ``group_name``."""
        self._groups.update(hook_functions, group_name)

    def remove_hook_groups(self, hook_functions: HookSelection, group_name: str) -> None:
        """Remove hook functions (one, a list, or a name pattern) from ``group_name``.

        A pattern selects the matching hook functions that are in the group. Group ``"all"``
        cannot be removed.
        """
        self._groups.remove(hook_functions, group_name)

    def get_hook_function_groups(
        self, hook_function: HookFunction | None = None
    ) -> set[str] | dict[HookFunction, set[str]]:
        """The groups of ``hook_function``; without an argument, of every hook function."""
        if hook_function is not None:
            return self._groups.groups_of(hook_function)
        return {hf: self._groups.groups_of(hf) for hf in self._groups.hook_functions()}

    @property
    def _hook_fn_group_manager(self) -> SimpleNamespace:
        """FlexModel 0.1.0's group manager, for code that reads it: ``hook_fn_to_groups_map``
        is :meth:`get_hook_function_groups` (a snapshot taken at each access)."""
        return SimpleNamespace(hook_fn_to_groups_map=self.get_hook_function_groups())

    def get_group_hook_functions(self, group_name: str) -> list[HookFunction]:
        """The hook functions in ``group_name``, in registration order."""
        return self._groups.members(group_name)

    @property
    def hook_groups(self) -> set[str]:
        """Names of every existing group, ``"all"`` included."""
        return self._groups.names()

    @property
    def hook_functions(self) -> list[HookFunction]:
        """Every registered hook function, in registration order."""
        return self._groups.hook_functions()

    def select_hook_groups(self, groups: str | Sequence[str] = ALL,
                           complement: bool = False) -> None:
        """Choose the hooks of ``groups`` for calls of the wrapped module that do not go
        through :meth:`~flex_surgery.hooks.wrapper.FlexModel.forward` (a pipelining schedule
        calls its stage module directly)."""
        self._check_usable()
        self._select(groups, complement)

    def _select(self, groups: str | Sequence[str], complement: bool) -> None:
        """Enable exactly the hooks of ``groups`` (or all others); a no-op when neither the
        choice nor the groups changed since the last call (``HookGroups.version``)."""
        names = (groups,) if isinstance(groups, str) else tuple(groups)
        key = (names, bool(complement), self._groups.version)
        if key == self._selection_key:
            return
        active = self._groups.select(names, complement)
        reinstall: dict[int, nn.Module] = {}
        for hf in self._groups.hook_functions():
            enabled = hf in active
            if hf._enabled != enabled:
                hf._enabled = enabled
                if hf.hook_type in MODULE_BACKWARD_KINDS and not hf.is_remote:
                    reinstall[id(hf._site.module)] = hf._site.module
        if reinstall:
            self._install_backward_hooks(reinstall)
        self._selection_key = key
        self._hooks_selected = bool(active)
        # every rank of a stage selects the same hooks, so all of them watch the backward
        self._backward_hooks_selected = any(
            hf.hook_type in (*MODULE_BACKWARD_KINDS, "tensor") and not hf.is_remote
            for hf in active)
