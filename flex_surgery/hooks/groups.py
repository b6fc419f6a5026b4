"""Hook groups: named sets of HookFunctions, chosen per forward call.

Each registered HookFunction carries a set of group names and is always in :data:`ALL`. A
forward call names groups; exactly the hooks in their union run (or, with ``complement=True``,
exactly the others). Groups are plain set membership: adding a hook to a group it is in, or
selecting a group twice, changes nothing; a group exists from its creation on, even if it later
becomes empty.

Module names are selected with :func:`name_matcher`:

* a plain string matches every name that *contains* it (``"mlp"``);
* a string with ``*``, ``?`` or ``[`` is a glob matched against the whole name
  (``"*.mlp"``, ``"model.layers.?.self_attn"``);
* ``"re:<regex>"`` or a compiled :class:`re.Pattern` must match the whole name
  (``"re:model\\.layers\\.(0|1)\\.mlp"``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from flex_surgery.hooks.errors import GroupError, UnknownGroupError, did_you_mean
from flex_surgery.hooks.hook_function import HookFunction

ALL = "all"

NamePattern = str | re.Pattern
HookSelection = HookFunction | Iterable[HookFunction] | NamePattern


def name_matcher(pattern: NamePattern) -> Callable[[str], bool]:
    """A predicate on module/parameter names for a substring, glob or regex pattern."""
    if isinstance(pattern, re.Pattern):
        return lambda name: pattern.fullmatch(name) is not None
    if not isinstance(pattern, str):
        raise TypeError(f"a name pattern is a str or re.Pattern, got {type(pattern).__name__}")
    if not pattern:
        raise ValueError("an empty name pattern would match every module; name what you mean")
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.fullmatch(name) is not None
    if any(c in pattern for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: pattern in name


class HookGroups:
    """Group membership of the HookFunctions registered with one FlexModel.

    ``version`` increases on every change, so a caller can cache what a selection resolved to.
    """

    def __init__(self) -> None:
        self._groups_of: dict[HookFunction, set[str]] = {}  # registration order
        self._names: set[str] = {ALL}
        self.version = 0

    # -- membership of hooks ----------------------------------------------------------------

    def add(self, hook_function: HookFunction) -> None:
        self._groups_of[hook_function] = {ALL}
        self.version += 1

    def discard(self, hook_function: HookFunction) -> None:
        self._groups_of.pop(hook_function, None)
        self.version += 1

    def hook_functions(self) -> list[HookFunction]:
        return list(self._groups_of)

    def names(self) -> set[str]:
        return set(self._names)

    def groups_of(self, hook_function: HookFunction) -> set[str]:
        self._check_registered([hook_function])
        return set(self._groups_of[hook_function])

    def members(self, group_name: str) -> list[HookFunction]:
        self._check_known([group_name])
        return [hf for hf, groups in self._groups_of.items() if group_name in groups]

    # -- editing groups -----------------------------------------------------------------------

    def resolve(self, selection: HookSelection) -> list[HookFunction]:
        """HookFunctions named by ``selection``: one, an iterable, or a name pattern."""
        if isinstance(selection, HookFunction):
            hooks = [selection]
        elif isinstance(selection, (str, re.Pattern)):
            matches = name_matcher(selection)
            hooks = [hf for hf in self._groups_of if matches(hf.module_name)]
            if not hooks:
                raise GroupError(
                    f"pattern {selection!r} matches no registered hook function (registered: "
                    f"{sorted({hf.module_name for hf in self._groups_of})})"
                )
        else:
            hooks = list(selection)
            bad = [h for h in hooks if not isinstance(h, HookFunction)]
            if bad:
                raise TypeError(f"expected HookFunctions, got {type(bad[0]).__name__}")
        self._check_registered(hooks)
        return hooks

    def create(self, group_name: str) -> None:
        """Make ``group_name`` exist with no member here (yet).

        Under pipelining a group's hooks may all live on other stages; the group must still
        exist on this one, so that every stage accepts ``flex(x, groups=group_name)`` -- a
        stage that raised UnknownGroupError there would leave the others waiting for it.
        """
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"a group name is a non-empty str, got {group_name!r}")
        if group_name not in self._names:
            self._names.add(group_name)
            self.version += 1

    def update(self, selection: HookSelection, group_name: str) -> None:
        """Add the selected hook functions to ``group_name``, creating it if new."""
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"a group name is a non-empty str, got {group_name!r}")
        for hf in self.resolve(selection):
            self._groups_of[hf].add(group_name)
        self._names.add(group_name)
        self.version += 1

    def remove(self, selection: HookSelection, group_name: str) -> None:
        """Remove the selected hook functions from ``group_name``.

        Hook functions named explicitly must be in the group; a pattern selects the matching
        hook functions that are in it, and must select at least one.
        """
        if group_name == ALL:
            raise GroupError(f"every hook function is in group {ALL!r}; it cannot be removed "
                             "(to run without a hook, select other groups or complement=True)")
        self._check_known([group_name])
        hooks = self.resolve(selection)
        if isinstance(selection, (str, re.Pattern)):
            hooks = [hf for hf in hooks if group_name in self._groups_of[hf]]
            if not hooks:
                raise GroupError(f"pattern {selection!r} matches no hook function of group "
                                 f"{group_name!r}")
        missing = [hf for hf in hooks if group_name not in self._groups_of[hf]]
        if missing:
            raise GroupError(f"{missing[0]!r} is not in group {group_name!r}")
        for hf in hooks:
            self._groups_of[hf].discard(group_name)
        self.version += 1

    # -- selection ----------------------------------------------------------------------------

    def select(self, groups: str | Iterable[str], complement: bool) -> set[HookFunction]:
        """The hook functions to run: the union of ``groups``, or everything else."""
        wanted = {groups} if isinstance(groups, str) else set(groups)
        self._check_known(wanted)
        return {
            hf for hf, member_of in self._groups_of.items()
            if member_of.isdisjoint(wanted) == complement
        }

    # -- checks -------------------------------------------------------------------------------

    def _check_known(self, group_names: Iterable[str]) -> None:
        for name in group_names:
            if name not in self._names:
                raise UnknownGroupError(
                    f"no hook group named {name!r} (groups: {sorted(self._names)})"
                    f"{did_you_mean(str(name), self._names)}"
                )

    def _check_registered(self, hook_functions: Iterable[HookFunction]) -> None:
        for hf in hook_functions:
            if hf not in self._groups_of:
                raise GroupError(f"{hf!r} is not registered with this FlexModel")
