"""Where each eager weight lives inside an exported program, and whether new weights fit there.

An ``ExportedProgram`` keeps its weights in ``ep.state_dict`` under *program keys*: the eager
parameter and persistent-buffer names, with a prefix when the module was wrapped for export (see
``program.py``). Tied weights (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) appear
under every name that reaches them but share one storage, so they form one *slot*: a checkpoint
that names any one of them fills the slot, and the tensor is written once.

:class:`WeightLayout` is that map plus the checks that run before any byte is written: names
(missing / unexpected, with the closest known name as a suggestion), shapes, dtypes and tied
copies that disagree. Every problem is collected and reported in one :class:`WeightMismatchError`,
so a wrong checkpoint is diagnosed in one go rather than one key at a time.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["WeightLayout", "WeightMismatchError", "WeightSlot"]

_MAX_LISTED = 8


class WeightMismatchError(ValueError):
    """New weights do not fit the exported program; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the weights to inject:\n{lines}")


@dataclass(frozen=True)
class WeightSlot:
    """One tensor of the program, reachable under one or more (tied) eager names.

    ``names[0]`` is the canonical name: the one weight files are written under.
    """

    names: tuple[str, ...]
    shape: torch.Size
    dtype: torch.dtype


def _storage_identity(t: torch.Tensor) -> tuple:
    """Two state-dict entries are the same weight iff they view the same elements."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


class WeightLayout:
    """Eager names <-> program keys, grouped into slots of tied names.

    Built from the program's own ``state_dict``: names whose tensors share storage are tied.
    ``prefix`` is what the export wrapper put in front of every eager name ("" when none).
    """

    def __init__(self, program_state: Mapping[str, torch.Tensor], prefix: str = "",
                 constants: Iterable[str] = ()):
        self.prefix = prefix
        #: Eager names the graph reads as constants fixed at export (non-persistent buffers):
        #: naming one in new weights is reported as such rather than as an unknown key.
        self.constants = frozenset(constants)
        by_storage: dict[tuple, list[str]] = {}
        for key, tensor in program_state.items():
            if not key.startswith(prefix):
                raise ValueError(f"program key {key!r} lacks the export prefix {prefix!r}")
            by_storage.setdefault(_storage_identity(tensor), []).append(key[len(prefix):])
        self.slots: tuple[WeightSlot, ...] = tuple(
            WeightSlot(tuple(names), program_state[prefix + names[0]].shape,
                       program_state[prefix + names[0]].dtype)
            for names in by_storage.values()
        )
        self._slot_of: dict[str, WeightSlot] = {n: s for s in self.slots for n in s.names}

    # -- name map ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every eager name the program accepts, tied aliases included, in program order."""
        return list(self._slot_of)

    @property
    def tied(self) -> list[tuple[str, ...]]:
        """Groups of eager names that share one tensor in the program."""
        return [s.names for s in self.slots if len(s.names) > 1]

    def program_key(self, name: str) -> str:
        """The ``ep.state_dict`` key of eager ``name``."""
        if name not in self._slot_of:
            raise KeyError(f"{name!r} is not a weight of the exported program"
                           f"{_suggestion(name, self.names)}")
        return self.prefix + name

    def name_map(self) -> dict[str, str]:
        """``{eager name: program key}`` for every accepted name."""
        return {n: self.prefix + n for n in self._slot_of}

    # -- validation ----------------------------------------------------------------------------
    def match(self, weights: Mapping[str, torch.Tensor], strict: bool = True
              ) -> list[tuple[WeightSlot, torch.Tensor]]:
        """Pair each slot with the one tensor that fills it, or raise :class:`WeightMismatchError`.

        ``strict`` requires every slot to be filled; unexpected names are an error either way,
        because a name that matches nothing is almost always a prefix or spelling mistake that
        would otherwise leave the program silently running on its old weights.
        """
        problems: list[str] = []
        fixed = [k for k in weights if k in self.constants]
        if fixed:
            problems.append(f"{', '.join(repr(k) for k in fixed[:_MAX_LISTED])}: non-persistent "
                            f"buffer(s), constants fixed at export that cannot be injected "
                            f"(leave them out, as model.state_dict() does)")
        unexpected = [k for k in weights if k not in self._slot_of and k not in self.constants]
        hint = ""
        if unexpected:
            hint = _prefix_hint(unexpected, self.names)
            shown = 3 if hint else _MAX_LISTED  # the hint explains them all
            listed = ", ".join(f"{k!r}{'' if hint else _suggestion(k, self.names)}"
                               for k in unexpected[:shown])
            more = f" (and {len(unexpected) - shown} more)" if len(unexpected) > shown else ""
            problems.append(f"unexpected key(s): {listed}{more}{hint}")

        n_given = len(weights) - len(fixed)
        if len(unexpected) > 1 and 2 * len(unexpected) >= n_given and not hint:
            problems.append(f"{len(unexpected)} of the {n_given} given names are not weights of "
                            f"the program: are these the weights of another architecture?")

        matched: list[tuple[WeightSlot, torch.Tensor]] = []
        missing: list[str] = []
        for slot in self.slots:
            given = [(n, weights[n]) for n in slot.names if n in weights]
            if not given:
                missing.append(slot.names[0])
                continue
            bad = [p for n, v in given if (p := _misfit(n, v, slot))]
            if bad:
                problems.extend(bad)
                continue
            name, value = given[0]
            disagreeing = [n for n, v in given[1:] if not _same_values(v, value)]
            if disagreeing:
                problems.append(f"tied weights disagree: {name!r} and {disagreeing} share one "
                                f"tensor in the program but differ in the new weights")
                continue
            matched.append((slot, value))

        if strict and missing:
            listed = ", ".join(repr(n) for n in missing[:_MAX_LISTED])
            more = (f" (and {len(missing) - _MAX_LISTED} more)"
                    if len(missing) > _MAX_LISTED else "")
            problems.append(f"missing key(s): {listed}{more} (pass strict=False to keep the "
                            f"program's current values for them)")
        if problems:
            raise WeightMismatchError(problems)
        return matched


def _misfit(name: str, value: object, slot: WeightSlot) -> str | None:
    """Why ``value`` cannot fill ``slot``, or None when it can."""
    if not isinstance(value, torch.Tensor):
        return f"{name!r} is a {type(value).__name__}, not a tensor"
    if _is_dtensor(value):
        return f"{name!r} is a sharded DTensor; gather it with .full_tensor() first"
    if value.is_meta or value.layout != torch.strided:
        # Checked here, with the rest, so that nothing is written: the copy would fail at this
        # slot after the earlier ones had been overwritten.
        return (f"{name!r} holds no values to copy ({'meta' if value.is_meta else value.layout}"
                " tensor: an offloaded or empty-initialised model?); load its weights first")
    if value.shape != slot.shape:
        return (f"shape mismatch for {name!r}: the program has {tuple(slot.shape)}, "
                f"the new weight is {tuple(value.shape)}")
    if value.dtype != slot.dtype:
        return (f"dtype mismatch for {name!r}: the program has {slot.dtype}, the new weight "
                f"is {value.dtype} (cast it explicitly)")
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and _storage_identity(a) == _storage_identity(b):
        return True  # the usual case: an eager model's tied parameters, one tensor
    return torch.equal(a.to(b.device), b)


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _prefix_hint(unexpected: list[str], known: list[str]) -> str:
    """Name a prefix to add or strip when it would make *every* unexpected key known.

    Checkpoints of a base model (``layers.0...``) against a model with a head
    (``model.layers.0...``), or saved from a wrapper (``module.``), differ exactly like this.
    """
    known_set = set(known)
    first = unexpected[0]
    for k in known:
        if k.endswith("." + first):
            add = k[: -len(first)]
            if all(add + u in known_set for u in unexpected):
                return f"; every unexpected key is known with the prefix {add!r} added"
    parts = first.split(".")
    for i in range(1, len(parts)):
        strip = ".".join(parts[:i]) + "."
        if all(u.startswith(strip) and u[len(strip):] in known_set for u in unexpected):
            return f"; every unexpected key is known with the prefix {strip!r} removed"
    return ""
