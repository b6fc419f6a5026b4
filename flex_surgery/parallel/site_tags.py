"""A number naming a hook site, the same on every rank, sent with the shapes a gather exchanges.

Under data parallelism each rank runs the model on its own batch, and a model may take a branch
on some ranks only (``if mask.any():``, routing, early exit). A hook on that branch fires on
those ranks only, and its collective meets whatever collective the other ranks reach next --
a later hook's, whose rows it would store as its own, with no error. Every exchange of shapes
that comes before a gather over data-parallel ranks (:func:`~flex_surgery.parallel.
piece_transfer.exchange_sizes`, the header of :func:`~flex_surgery.parallel.piece_transfer.
collect_pieces`, :func:`~flex_surgery.parallel.shape_agreement.agree_on_whole_shape`) carries
the tag of the site it serves, so ranks that reached different hooks raise
:class:`HookSiteMismatchError` there, together. The tag travels in a row that is exchanged
anyway: it costs no collective.

What it cannot catch: a rank that reaches *no* further hook in the pass goes on into the
model's own collectives (DDP's gradient all-reduce, FSDP's parameter gathers) or returns, and
the ranks at the hook wait for it until the process group's timeout.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable

from flex_surgery.parallel.frameworks.base import LayoutError

__all__ = ["NO_SITE", "HookSiteMismatchError", "check_same_site", "describe_site",
           "remember_module_names", "site_tag"]

NO_SITE = 0  # a transfer that serves no hook site (parameters, tables): never compared unequal

_NAMES: dict[int, str] = {}  # tag -> what it names, for the tags this process has made
_MODULE_NAMES: set[str] = set()  # every watched model's module names, to name other ranks' tags
_ROLES = ("output", "input", "grad_output", "grad_input")


class HookSiteMismatchError(LayoutError):
    """The ranks of one collective reached different hooks (a branch some ranks skip)."""


@functools.lru_cache(maxsize=4096)
def site_tag(module_name: str, role: str, unpack_idx: int = 0) -> int:
    """The tag of the tensor ``unpack_idx`` of ``role`` at ``module_name``: a CRC-32 of the
    three (the same on every rank, unlike Python's salted ``hash``); never :data:`NO_SITE`."""
    text = f"{role} of {module_name!r}" + (f" (tensor {unpack_idx})" if unpack_idx else "")
    tag = zlib.crc32(text.encode()) or 1
    _NAMES.setdefault(tag, text)
    return tag


def remember_module_names(names: Iterable[str]) -> None:
    """Module names whose tags :func:`describe_site` can name when another rank sent them
    (this rank may not have reached that site yet)."""
    _MODULE_NAMES.update(names)


def describe_site(tag: int) -> str:
    """What a tag names: one this process made, else one of the remembered modules' (searched
    on the error path only)."""
    if tag == NO_SITE:
        return "no hook"
    if tag not in _NAMES:
        for name in _MODULE_NAMES:
            for role in _ROLES:
                for idx in range(4):
                    if site_tag(name, role, idx) == tag:
                        return _NAMES[tag]
    return _NAMES.get(tag, f"hook site with tag {tag}")


def check_same_site(tags: dict[int, int], where: str) -> None:
    """Raise :class:`HookSiteMismatchError` when the ranks (``{rank: tag}``) of one exchange
    serve different hook sites. Every rank of the exchange sees the same tags, so every one
    raises, at the same call."""
    if len(set(tags.values())) <= 1:
        return
    seen = "; ".join(f"rank {r}: the {describe_site(t)}" for r, t in sorted(tags.items()))
    raise HookSiteMismatchError(
        f"{where}: the ranks reached different hooks at one collective ({seen}). A hook on a "
        f"module that some data-parallel ranks skip (a branch taken on the data: "
        f"`if mask.any():`, routing, early exit) cannot gather over those ranks, and would "
        f"otherwise store another hook's tensors as its own. Hook a module every rank runs, or "
        f"run the branch on every rank (with no rows where it has none)")
