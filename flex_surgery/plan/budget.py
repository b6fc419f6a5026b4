"""``FlexModel(..., memory_budget=...)``: refuse, before the first hooked forward, a plan whose
storing ranks would need more host memory than the budget.

The decision must be the same on every rank (a rank that raises while the others enter a
gather would leave them waiting), so it is computed from what all ranks share -- the model's
config, the mesh sizes, the registered hooks -- and the two things that may differ per rank,
the batch shape and an ``"auto"`` budget read from this host, are agreed first with one small
all-reduce (the largest batch, the smallest budget).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

from flex_surgery.plan.errors import PlanError
from flex_surgery.plan.mesh import MeshSizes, parse_bytes
from flex_surgery.plan.planner import Plan, place_hooks, plan_hooks
from flex_surgery.plan.shapes import hook_shapes


def available_host_memory() -> int:
    """Bytes this host can still give (psutil if installed, else ``/proc/meminfo``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise PlanError("memory_budget='auto' cannot read the available host memory (no psutil, "
                    "no /proc/meminfo); give the budget in bytes")


def resolve_budget(budget: int | str) -> int:
    if isinstance(budget, str) and budget == "auto":
        return available_host_memory()
    if isinstance(budget, bool) or (isinstance(budget, int) and budget <= 0):
        raise PlanError(f"memory_budget must be a positive number of bytes, a size such as "
                        f"'64GiB', or 'auto'; got {budget!r}")
    return parse_bytes(budget)


def _token_shape(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise PlanError("memory_budget plans from the token ids (input_ids of shape "
                        "[batch, sequence]); this forward was given none")
    return int(ids.shape[0]), int(ids.shape[1])


def _agree(values: list[int], ops: list[str], group, distributed: bool) -> list[int]:
    """One all-reduce: the max of the values marked "max", the min of those marked "min"."""
    if not distributed or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor([v if op == "max" else -v for v, op in zip(values, ops)], dtype=torch.int64)
    from flex_surgery.parallel.backend import default_device

    t = t.to(default_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) if op == "max" else -int(v) for v, op in zip(t.tolist(), ops)]


def check_memory_budget(module: torch.nn.Module, hook_names: list[str], mesh: Any,
                        args: tuple, kwargs: dict[str, Any], budget: int | str,
                        group=None) -> Plan:
    """Plan the forward hooks ``hook_names`` of ``module`` for this forward's tokens and raise
    :class:`PlanError` on every rank if a storing rank's peak exceeds ``budget``.

    ``mesh``: the runtime's :class:`~flex_surgery.parallel.mesh.ParallelMesh` (``None`` in one
    process); ``group``: the ranks running the model (``None``: the world)."""
    config = getattr(module, "config", None)
    failure: PlanError | None = None
    batch = seq = limit = 0
    try:  # what this rank sees; a rank that cannot plan must not leave the others waiting
        if config is None:
            raise PlanError(f"memory_budget plans from a transformers config; "
                            f"{type(module).__name__} has no .config")
        batch, seq = _token_shape(args, kwargs)
        limit = resolve_budget(budget)
    except PlanError as exc:
        failure = exc
    sizes = MeshSizes(*(getattr(mesh, f"{a}_size", 1) for a in ("tp", "pp", "dp"))) \
        if mesh is not None else MeshSizes()
    batch, seq, limit, failed = _agree([batch, seq, limit, int(failure is not None)],
                                       ["max", "max", "min", "max"], group, mesh is not None)
    if failure is not None:
        raise failure
    if failed:
        raise PlanError("memory_budget: another rank could not plan this forward (its error "
                        "says why; under pipelining a later stage sees hidden states, not "
                        "input_ids, so the budget check needs every stage to see the tokens)")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    patterns = ["re:" + re.escape(n) for n in hook_names]
    shapes = hook_shapes(config, batch, seq, dtype, patterns) if patterns else []
    result = plan_hooks(place_hooks(config, shapes, sizes), sizes, batch, seq, dtype,
                        model=type(module).__name__)
    result.check_budget(limit)
    return result
