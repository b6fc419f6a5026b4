"""Ranks that share a distributed model agree before they part ways: on the base seed of unseeded
noise, and on whether entering or leaving a theater worked.

Why: a :class:`~flex_surgery.surgery.SurgicalTheater` on a sharded or replicated model is entered
by every rank (the contract of ``docs/surgery.md``), and what follows the ``with`` is usually a
forward full of collectives. Two things would otherwise go wrong silently or hang:

* ``"noise"`` with ``seed=None`` drew its base seed from each rank's own generator: replicas of a
  parameter (DDP, the replicated parameters of TP) received different noise, and the shards of
  one parameter (FSDP, TP) pieces of noises no one process would draw. The first rank of the
  model's ranks draws; everyone uses its draw (:func:`agree_on_seed`).
* a failure on one rank only (a ``modification_fn`` that raises there, a target missing there,
  an out-of-memory snapshot) made that rank roll back and raise while the others entered the
  ``with`` body and waited in its first collective. :func:`agree_on_outcome` is one all-reduce of
  three integers on success (every agreement, the seed's included, has that shape); on
  failure every rank learns which rank failed and why.

Both happen only for a model *known* to be distributed -- a module of a registered framework
(:mod:`flex_surgery.parallel.frameworks`), DTensor parameters, or a FlexModel running over more
than one rank -- as read from the model itself, so every rank takes the same path. A plain model
under a process group communicates nothing: nothing says the other ranks enter a theater too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.failures import (
    LostRankError,
    RemoteEditError,
    broadcast_status,
    naming_lost_ranks,
)
from flex_surgery.surgery.guard import RestoreError

__all__ = ["AgreedFailure", "ModelGroups", "agree_on_outcome", "agree_on_restore", "agree_on_seed",
           "check_peers", "model_groups", "settle_failed_entry"]

Group = dist.ProcessGroup | None
#: The process groups that together span the ranks sharing a model (``()``: one process).
#: ``None`` is the default group. Several groups form a grid (a mesh's dims): a collective run
#: over each in turn reaches every rank of the grid.
ModelGroups = tuple[Group, ...]
_WORLD: ModelGroups = (None,)


def _span(groups: Iterable[Group]) -> ModelGroups:
    """The groups of more than one rank among ``groups``; the world if one of them is."""
    world = dist.get_world_size()
    kept: list[Group] = []
    for group in groups:
        size = dist.get_world_size(group)
        if group is None or size == world:
            return _WORLD
        if size > 1:
            kept.append(group)
    return tuple(kept)


def _flex_model_groups(module: nn.Module) -> ModelGroups:
    """The ranks of a FlexModel's runtime mesh, if it runs over more than one."""
    runtime = getattr(module, "runtime", None)
    mesh = getattr(runtime, "mesh", None)
    if mesh is None or getattr(module, "_restored", False) or mesh.world_size <= 1:
        return ()
    if mesh.world_size == dist.get_world_size():
        return _WORLD
    return _span(mesh.group(axis) for axis in ("pp", "dp", "tp") if mesh.size(axis) > 1)


def _module_groups(module: nn.Module) -> ModelGroups:
    """The ranks one module's framework spreads it over (``()``: none)."""
    if type(module).__name__ == "FlexModel":
        return _flex_model_groups(module)
    if frameworks.MEGATRON.owns(module) or frameworks.FAIRSCALE.owns(module):
        return _WORLD  # their parallel state spans the world (tp x dp x pp)
    if frameworks.DDP_.owns(module):
        return _span([module.process_group])
    if frameworks.FSDP_1.owns(module):  # HYBRID_SHARD: shard group x replica group
        replicas = getattr(module, "_inter_node_pg", None)
        return _span([module.process_group, *([] if replicas is None else [replicas])])
    from flex_surgery.parallel.mesh import parameter_root_mesh

    for param in module._parameters.values():
        if param is not None and frameworks.is_dtensor(param):
            mesh = parameter_root_mesh(module, param)
            if mesh.size() == dist.get_world_size():
                return _WORLD
            return _span(mesh.get_group(dim) for dim in range(mesh.ndim))
    return ()


def model_groups(modules: Iterable[nn.Module]) -> ModelGroups:
    """The process groups spanning the ranks that share the model of ``modules`` (wrappers
    included), read from the modules alone -- no collective, the same answer on every rank.

    ``()`` when there is no process group of more than one rank, or no module says it is
    distributed (a plain model: one process, or a copy per rank nothing ties together).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ()
    found: list[Group] = []
    for module in modules:
        groups = _module_groups(module)
        if groups == _WORLD:
            return _WORLD
        found.extend(g for g in groups if not any(g is f for f in found))
    return tuple(found)


def _device(group: Group) -> torch.device:
    """Where a tensor for a collective over ``group`` must live: the backend follows the device
    (gloo moves CPU tensors; an NCCL-only group, CUDA ones)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree_on_seed(seed: int, groups: ModelGroups) -> int:
    """The draw of the model's first rank (group rank 0 of every group: the grid's origin);
    ``seed`` is this rank's own draw (>= 0). Raises :class:`AgreedFailure` if another rank
    failed entering before this point.

    An agreement of the same shape as every other (:func:`_agree`): the origin contributes its
    draw and every other rank 0 to a maximum, so a rank that failed earlier (and agrees on its
    failure once) meets the others here instead of waiting in a broadcast they never join."""
    origin = all(dist.get_rank(group) == 0 for group in groups)
    failure, _, agreed = _agree(None, groups, _ENTERING, seed=seed if origin else 0)
    if failure is not None:
        raise AgreedFailure(failure)
    return agreed


def agree_on_outcome(error: BaseException | None, groups: ModelGroups,
                     what: str) -> BaseException | None:
    """Every rank ran ``what``; ``error`` is how it failed here (``None``: it worked). Returns
    what this rank must raise -- its own error if it failed, else a :class:`RemoteEditError`
    naming the (highest) failed rank and, over one group, its error -- or ``None`` if every rank
    succeeded.

    One all-reduce of three integers per group on success (the failed global rank + 1,
    :func:`check_peers`' count and :func:`agree_on_seed`'s seed, maximised); on failure one
    broadcast more carries the failed rank's message (over one group only: in a grid that rank
    is not the source of every group). A lost peer raises
    :class:`~flex_surgery.parallel.failures.LostRankError`.
    """
    return _agree(error, groups, what)[0]


def _agree(error: BaseException | None, groups: ModelGroups, what: str,
           count: int = 0, seed: int = 0) -> tuple[BaseException | None, int, int]:
    """:func:`agree_on_outcome`, the largest ``count`` and the largest ``seed`` of any rank.
    Every agreement has this one shape (one all-reduce of three integers per group), so that a
    rank that failed (and agrees once) meets the others in whichever agreement they are at --
    the seed's included."""
    me = dist.get_rank()
    buf = torch.tensor([me + 1 if error is not None else 0, count, seed], dtype=torch.int64)
    for group in groups:
        buf = buf.to(_device(group))
        with naming_lost_ranks(group, what):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    failed, most, seed = (int(v) for v in buf.tolist())
    failed -= 1
    if failed < 0:
        return None, most, seed
    why = " (its own error says why)"
    if len(groups) == 1:
        group = groups[0]
        src = failed if group is None else dist.get_group_rank(group, failed)
        text = f"{type(error).__name__}: {error}" if me == failed else None
        try:
            broadcast_status(text, group, src, device=_device(group))
        except RemoteEditError as err:
            why = f": {err}"
    if error is not None:
        return error, most, seed
    return RemoteEditError(f"rank {me}: {what} failed on rank {failed}{why}"), most, seed


class AgreedFailure(Exception):
    """Another rank failed, and every rank already knows: ``error`` is what this rank raises,
    without agreeing again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_ENTERING, _RESTORING = "entering a SurgicalTheater", "putting a SurgicalTheater's weights back"


def check_peers(groups: ModelGroups, count: int = 0) -> int:
    """Every rank has entered so far without error, else raise :class:`AgreedFailure`.

    Returns the largest ``count`` of any rank: with it, ranks whose number of gathers differs
    (pipeline stages hold different blocks) agree before each of theirs and then as many times
    more as the others still will, so that every rank runs the same number of agreements.
    """
    failure, most, _ = _agree(None, groups, _ENTERING, count)
    if failure is not None:
        raise AgreedFailure(failure)
    return most


def settle_failed_entry(exc: BaseException, groups: ModelGroups,
                        restore_weights: Callable[[], RestoreError | None],
                        ) -> tuple[BaseException, RestoreError | None]:
    """After ``exc`` broke an entry on this rank: agree that it failed (unless already agreed),
    put this rank's weights back, agree on that. Returns what to raise, and the restore error
    every rank raises instead if any rank could not put its weights back (the theater then
    stays active everywhere, so that ``restore()`` is retried by every rank together).

    A rank that cannot reach a peer (:class:`LostRankError`) settles on its own.
    """
    agreed = isinstance(exc, AgreedFailure)
    exc = exc.error if isinstance(exc, AgreedFailure) else exc
    if isinstance(exc, LostRankError):
        groups = ()
    if groups and not agreed:
        try:
            exc = agree_on_outcome(exc, groups, _ENTERING) or exc
        except LostRankError:
            groups = ()
    error = restore_weights()
    if groups:
        try:
            error = agree_on_restore(error, groups)
        except LostRankError:
            pass  # this rank's own verdict stands
    return exc, error


def agree_on_restore(error: RestoreError | None, groups: ModelGroups) -> RestoreError | None:
    """Every rank's verdict on putting its weights back: a peer's failure is this rank's
    :class:`RestoreError` too (every rank stays active and retries together)."""
    outcome = agree_on_outcome(error, groups, _RESTORING)
    if outcome is None or isinstance(outcome, RestoreError):
        return outcome
    failure = RestoreError(f"{outcome}; this rank's weights are back, but every rank keeps its "
                           "theater active with its snapshots: call restore() on every rank to "
                           "retry")
    failure.__cause__ = outcome
    return failure
