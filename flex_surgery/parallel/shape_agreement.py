"""The ranks agree on the whole shape of a hooked tensor before anything is gathered.

Each rank infers the layout of its own piece from what it sees. Before a hook with
``expected_shape`` walks into collectives that depend on that layout, the ranks of the stage
exchange what they found (one small all-gather of a fixed-size row), so that a rank that cannot
tell, ranks that disagree, or pieces that cannot form one tensor raise on every rank at the same
call -- never a hang, never rank 0's piece stored as the whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.failures import naming_lost_ranks
from flex_surgery.parallel.layout import (
    ACTIVATION_ROLES,
    GATHER_ORDER,
    Layout,
    LayoutError,
    ShardSpec,
)
from flex_surgery.parallel.layout_specs import Doubt
from flex_surgery.parallel.mesh import ParallelMesh
from flex_surgery.parallel.runtime import HookSite
from flex_surgery.parallel.site_tags import check_same_site

__all__ = ["agree_on_doubt", "agree_on_whole_shape"]


def agree_on_whole_shape(mesh: ParallelMesh, plain: torch.Tensor, layout: Layout | None,
                         failure: Exception | None, site: HookSite,
                         stamped: int, doubt: Doubt | None = None) -> tuple[int, ...]:
    """The shape of the whole tensor, agreed by every rank of the stage before anything is
    gathered: one small all-gather over the stage group.

    Each rank infers the layout of its own piece from what it sees; the ranks exchange what
    they found and their local shapes. A rank that cannot tell, ranks that disagree (uneven
    data-parallel batches where one rank's batch happens to equal ``expected_shape`` and the
    other's does not), or pieces that cannot be put together raise :class:`LayoutError` on
    every rank, at this call, instead of walking into different collectives. The whole shape
    is computed on every rank from the exchanged shapes, so a check against
    ``expected_shape`` fails on every rank at the call whose tensor does not match.
    ``stamped``: the site's stamp in this forward (:mod:`~flex_surgery.parallel.site_tags`).
    ``doubt``: what this rank can say of a sequence split it inherited, settled here per
    tensor-parallel group (:class:`~flex_surgery.parallel.layout_specs.Doubt`).
    """
    table, ranks, where = _exchange(mesh, _describe(mesh, plain, layout, failure is not None,
                                                    stamped, doubt), site)
    failed = [ranks[i] for i, r in enumerate(table) if r[0]]
    if failure is not None:
        raise failure
    if failed:
        raise LayoutError(f"{where}: rank(s) {failed} could not tell how the tensor is split "
                          "(their error says why); every rank stops at this call")
    if doubt is not None:
        _settle(doubt, table, ranks)
    signatures = {tuple(r[3:8]) for r in table}
    if len(signatures) > 1:
        seen = "; ".join(f"rank {ranks[i]}: {_signature_text(r)}"
                         for i, r in enumerate(table))
        raise LayoutError(f"{where}: the ranks disagree on how the tensor is split ({seen}); "
                          "give expected_shape with None for the dims that vary (e.g. the "
                          "batch dim of uneven data-parallel batches)")
    shape = _whole_shape(table, ranks, where)
    _check_same_over_dp(mesh, plain, layout, site, where)
    return shape


def agree_on_doubt(mesh: ParallelMesh, plain: torch.Tensor, doubt: Doubt, site: HookSite,
                   stamped: int) -> None:
    """Settle, on every rank of the stage, what each rank can say of a sequence split it
    inherited (:class:`~flex_surgery.parallel.layout_specs.Doubt`: every rank has one, the
    same split), for a hook without ``expected_shape``: the same small all-gather over the
    stage as :func:`agree_on_whole_shape`, so that a refusal in one replica's tensor-parallel
    group (its sequence a token per rank, another replica's longer) is raised in every
    replica too, never leaving them in the gather that follows."""
    table, ranks, _ = _exchange(mesh, _describe(mesh, plain, None, False, stamped, doubt), site)
    _settle(doubt, table, ranks)


def _exchange(mesh: ParallelMesh, row: torch.Tensor,
              site: HookSite) -> tuple[list[list[int]], list[int], str]:
    """Every rank's row of the stage (one all-gather), checked for the same hook site: (the
    rows, the ranks' global ranks, the site's name for errors)."""
    group = mesh.stage_group
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    with naming_lost_ranks(group, "layout agreement"):
        dist.all_gather(rows, row, group=group)
    table = [r.tolist() for r in rows]
    ranks = dist.get_process_group_ranks(group) if group is not None else \
        list(range(dist.get_world_size()))
    where = f"{site.module_name!r} ({site.role} of a {site.hook_type} hook)"
    check_same_site({ranks[i]: r[_SITE] for i, r in enumerate(table)}, where)
    return table, ranks, where


def _settle(doubt: Doubt, table: list[list[int]], ranks: list[int]) -> None:
    """Settle the doubt per replica's tensor-parallel group (the rows' dp coordinate)."""
    groups: dict[int, dict[int, int]] = {}
    for i, r in enumerate(table):
        groups.setdefault(r[2], {})[ranks[i]] = r[_DOUBT]
    doubt.settle(list(groups.values()))


def _check_same_over_dp(mesh: ParallelMesh, plain: torch.Tensor, layout: Layout,
                        site: HookSite, where: str) -> None:
    """An activation the hint leaves whole over ``dp`` (its batch dim is the local size)
    must *be* the same on every data-parallel rank: a batch on another dim than
    ``batch_dim`` (which the hint would then cut over ``tp``) or a per-rank value (a loss)
    is an error, not rank 0's piece. One small all-gather over ``dp``; every rank of the
    stage agreed on ``layout`` above, so all take this path."""
    if mesh.dp_size == 1 or site.role not in ACTIVATION_ROLES or \
            layout.spec_for("dp") is not None:
        return
    if frameworks.differs_across([plain.detach()], mesh.group("dp"))[0]:
        raise LayoutError(
            f"{where}: expected_shape {site.expected_shape} leaves the tensor whole on every "
            f"data-parallel rank (the dim data parallelism splits has the local size), but "
            f"the data-parallel ranks hold different values: its batch is on another "
            f"dim (pass FlexModel's batch_dim, or give that dim as None), or it is a "
            f"per-rank value that cannot be stored as one tensor")


def _describe(mesh: ParallelMesh, plain: torch.Tensor, layout: Layout | None,
              failed: bool, site: int, doubt: Doubt | None) -> torch.Tensor:
    """One rank's row of :func:`agree_on_whole_shape`'s exchange: ``[failed, tp coordinate, dp
    coordinate, ndim, tp kind, tp dim, dp kind, dp dim, hook site, doubt, shape...]`` (the
    site: see :mod:`~flex_surgery.parallel.site_tags`; the doubt's level, -1 for none)."""
    row = torch.full((_ROW,), -1, dtype=torch.int64)
    row[0] = int(failed or plain.ndim > _ROW - _HEAD)
    row[1], row[2] = mesh.rank("tp"), mesh.rank("dp")
    row[_SITE] = site
    if doubt is not None:
        row[_DOUBT] = doubt.level
    if layout is not None and not row[0]:
        row[3] = plain.ndim
        for i, axis in enumerate(GATHER_ORDER):
            spec = layout.spec_for(axis)
            kind = 0 if spec is None else 1 if isinstance(spec, ShardSpec) else \
                3 if spec.op == "avg" else 2
            row[4 + 2 * i] = kind
            row[5 + 2 * i] = spec.dim if isinstance(spec, ShardSpec) else -1
        row[_HEAD:_HEAD + plain.ndim] = torch.tensor(plain.shape, dtype=torch.int64)
    return row.to(plain.device)


# whole_shape's exchange: 10 header entries, then up to 16 dims
_SITE, _DOUBT, _HEAD, _ROW = 8, 9, 10, 26

_KINDS = {0: "replicated", 1: "sharded", 2: "partial sum", 3: "partial average"}


def _signature_text(row: list[int]) -> str:
    parts = []
    for i, axis in enumerate(GATHER_ORDER):
        kind, dim = row[4 + 2 * i], row[5 + 2 * i]
        parts.append(f"{axis} {_KINDS.get(kind, '?')}" + (f" on dim {dim}" if kind == 1 else ""))
    return ", ".join(parts) + f", local shape {tuple(row[_HEAD:_HEAD + row[3]])}"


def _whole_shape(table: list[list[int]], ranks: list[int], where: str) -> tuple[int, ...]:
    """The whole shape from every rank's row (see ``DistributedRuntime.whole_shape``): a dim
    sharded over an axis is the sum of the pieces along that axis (the ranks that are first on
    the other axis); every other dim must be the same on every rank."""
    ndim = table[0][3]
    shape = [table[0][_HEAD + d] for d in range(ndim)]
    sharded = {}
    for i in range(len(GATHER_ORDER)):
        if table[0][4 + 2 * i] == 1:
            sharded[table[0][5 + 2 * i]] = i
    for d in range(ndim):
        if d in sharded:
            i = sharded[d]
            other = 2 if i == 0 else 1  # the row column of the other axis' coordinate
            shape[d] = sum(r[_HEAD + d] for r in table if r[other] == 0)
            continue
        sizes = {r[_HEAD + d] for r in table}
        if len(sizes) > 1:
            seen = ", ".join(f"rank {ranks[k]}: {r[_HEAD + d]}" for k, r in enumerate(table))
            raise LayoutError(f"{where}: dim {d} is not split, yet its size differs between "
                              f"ranks ({seen}); the pieces cannot form one tensor")
    return tuple(shape)
