"""A number naming a hook site and the forward it fires in, the same on every rank, sent with
the shapes a gather exchanges.

Under data parallelism each rank runs the model on its own batch, and a model may take a branch
on some ranks only (``if mask.any():``, routing, early exit). A hook on that branch fires on
those ranks only, and its collective meets whatever collective the other ranks reach next --
a later hook's, whose rows it would store as its own, or, when it was the last hook, the same
hook's in the *next* forward -- with no error. Every exchange of shapes that comes before a
gather over data-parallel ranks (:func:`~flex_surgery.parallel.piece_transfer.exchange_sizes`,
the header of :func:`~flex_surgery.parallel.piece_transfer.collect_pieces` and of
:func:`~flex_surgery.parallel.piece_transfer.announce_pieces`,
:func:`~flex_surgery.parallel.shape_agreement.agree_on_whole_shape`) carries the site's
:func:`stamp`, so ranks at different sites, or in different forwards, raise
:class:`HookSiteMismatchError` there, together. The stamp travels in a row that is exchanged
anyway where there is one; a hook whose first message carries no shapes (every size known, or
a path that exchanges over dp first) announces its site first, one small header per call.

A stamp is a site's tag (:func:`site_tag`: a CRC-32 of the hook's module name, role and tensor
index) in its low 32 bits and the runtime's count of hooked forwards
(:attr:`~flex_surgery.parallel.distributed_runtime.DistributedRuntime.passes`) above them. Every
rank registers the same hooks, so every rank has made every tag, and can name the site another
rank was at.

Under data parallelism on a stage group that moves CPU tensors through gloo, every hook call
begins the same way, whatever it does and whatever path its tensor then takes: a header with
its site's stamp to the stage leader, who answers every rank with its own stamp (see
``DistributedRuntime.meets_at_sites`` and
:meth:`~flex_surgery.parallel.axis_walk.AxisWalk.announce_site`). Ranks at different hooks
therefore always meet in that first message. A rank that reaches no further hook announces
:data:`END_OF_FORWARD` the same way when its hooked forward returns, so the ranks still waiting
at a hook raise with it instead of waiting while it goes on into the model's own collectives
(DDP's gradient all-reduce in backward); and :data:`END_OF_BACKWARD` when its backward through a
hooked forward with backward hooks selected ends, for a backward hook on a branch when no later
backward hook fires. What it cannot catch: on an NCCL-only stage group, two hooks whose first
exchanges are different collectives (one with an ``expected_shape``, whose shape agreement is
an all-gather over the stage, and one without) or a rank that reaches no further hook. Gradient
hooks on parameters DDP's ``find_unused_parameters`` leaves unused on some ranks never meet
mid-backward: they run at the end of the backward on every rank
(:mod:`~flex_surgery.parallel.unused_parameters`).
"""

from __future__ import annotations

import functools
import zlib

from flex_surgery.parallel.frameworks.base import LayoutError

__all__ = ["END_OF_BACKWARD", "END_OF_FORWARD", "NO_SITE", "HookSiteMismatchError",
           "check_same_site", "describe_site", "site_tag", "stamp"]

NO_SITE = 0  # a transfer that serves no hook site (parameters, tables): compared with nothing

_NAMES: dict[int, str] = {}  # tag -> what it names, for the tags this process has made
_TAG_BITS = 32


class HookSiteMismatchError(LayoutError):
    """The ranks of one collective reached different hooks (a branch some ranks skip)."""


def _named(text: str) -> int:
    tag = zlib.crc32(text.encode()) or 1
    _NAMES.setdefault(tag, text)
    return tag


@functools.lru_cache(maxsize=4096)
def site_tag(module_name: str, role: str, unpack_idx: int = 0) -> int:
    """The tag of the tensor ``unpack_idx`` of ``role`` at ``module_name``: a CRC-32 of the
    three (the same on every rank, unlike Python's salted ``hash``); never :data:`NO_SITE`."""
    return _named(f"{role} of {module_name!r}" + (f" (tensor {unpack_idx})" if unpack_idx
                                                   else ""))


#: Where a rank is when its hooked forward has returned: announced like a hook site (see
#: ``DistributedRuntime.end_of_hooked_forward``), so a rank still waiting at a hook that the
#: others skipped learns that they reached no further hook.
END_OF_FORWARD = _named("end of the forward (no further hook)")

#: The same for a backward pass through a hooked forward whose backward hooks are selected
#: (``DistributedRuntime.watch_backward``): a rank left at a backward hook the others skipped
#: (no later backward hook fires on them) meets their end of the backward.
END_OF_BACKWARD = _named("end of the backward (no further backward hook)")

#: Where a rank is when a data-parallel framework is about to reduce gradients inside the
#: backward (an FSDP1 unit's reduce-scatter, ``DistributedRuntime.watch_backward``): a rank
#: left at a backward hook the others skipped meets them there, before their collective.
#: The same before an FSDP unit's all-gather in the backward (its pre-backward hook, which
#: unshards it or prefetches the one before it).
BACKWARD_UNSHARD = _named("all-gather of an FSDP unit in the backward (no further backward "
                          "hook before it)")

GRADIENT_REDUCTION = _named("gradient reduction of an FSDP unit (no further backward hook "
                            "before it)")


def stamp(tag: int, passes: int) -> int:
    """``tag`` in forward number ``passes`` (see the module docstring); ``NO_SITE`` stays."""
    return tag | (passes % 2**30) << _TAG_BITS if tag != NO_SITE else NO_SITE


def describe_site(stamped: int) -> str:
    """What a stamp names: the site (one every rank registered) and the forward."""
    if stamped == NO_SITE:
        return "no hook"
    tag, passes = stamped & (2**_TAG_BITS - 1), stamped >> _TAG_BITS
    name = _NAMES.get(tag, f"hook site with tag {tag}")
    return f"{name} in hooked forward {passes}" if passes else name


def check_same_site(tags: dict[int, int], where: str) -> None:
    """Raise :class:`HookSiteMismatchError` when the ranks (``{rank: tag}``) of one exchange
    serve different hook sites. Every rank of the exchange sees the same tags, so every one
    raises, at the same call. :data:`NO_SITE` is compared with nothing."""
    if len(set(tags.values()) - {NO_SITE}) <= 1:
        return
    seen = "; ".join(f"rank {r}: the {describe_site(t)}" for r, t in sorted(tags.items()))
    raise HookSiteMismatchError(
        f"{where}: the ranks reached different hooks at one collective ({seen}). A hook on a "
        f"module that some data-parallel ranks skip (a branch taken on the data: "
        f"`if mask.any():`, routing, early exit) cannot gather over those ranks, and would "
        f"otherwise store another hook's tensors (or its own from another forward) as its own. "
        f"Hook a module every rank runs, or run the branch on every rank (with no rows where it "
        f"has none)")
