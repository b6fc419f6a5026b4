"""What retrieving hooked activations gathers, moves and stores, per hook and per rank.

The numbers follow the runtime (:mod:`flex_surgery.parallel.distributed_runtime`,
:mod:`flex_surgery.parallel.pipeline`), for one forward, ranks ordered ``(pp, dp, tp)``:

* **tp**: an activation sharded over tp (the output of a column-parallel layer in the model's
  tensor-parallel plan) is gathered to the first tp rank: ``full - local`` bytes cross the
  network per replica. A replicated one (block outputs, row-parallel outputs after their
  all-reduce) moves nothing: the first tp rank's copy stands for all.
* **dp**: ``store="memory"`` (``store_on="rank0"``) gathers every replica's batch to the stage
  leader (dp == tp == 0): ``(dp - 1)`` replica slices move.
* **pp**: each stage leader keeps its stage's entries until ``sync_pipeline_outputs`` sends them
  to global rank 0: every stage but the first moves its whole stage.
* ``store="replica_leaders"`` keeps each replica's slice on that replica's leader of each stage:
  only the tp step moves anything. That is the run with a store (``store=``) on every replica
  leader; with output dicts instead, ``sync_pipeline_outputs`` then moves the later stages'
  slices to each replica's first-stage leader (a note of the plan says so).
* ``store="disk"`` gathers as ``memory`` does, and holds at most its buffer in host memory.

Bytes of a hook are ``numel x dtype size`` of the tensor as one process would hold it, summed
over the module's calls in one forward. The peak host memory of a storing rank is what it keeps
plus the receive buffers of the largest single gather (the pieces before they are joined).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flex_surgery.plan.configs import load_config
from flex_surgery.plan.errors import PlanError
from flex_surgery.plan.mesh import MeshSizes, format_bytes
from flex_surgery.plan.shapes import HookShape, hook_shapes, tp_plan_style

STORES = ("memory", "replica_leaders", "disk")
DEFAULT_DISK_BUFFER = 1 << 30
REDUCES = ("last_token", "mean_over_batch")


@dataclass(frozen=True)
class HookPlan:
    """One hook's bytes per forward (all replicas, all calls)."""

    name: str
    shape: tuple[int, ...]  # one call, one replica, unsharded
    dtype: torch.dtype
    calls: int
    stage: int
    tp_sharded: bool
    replica_bytes: int  # one replica's batch, all calls
    gathered: int  # bytes arriving at storing ranks, all of them together
    moved: int  # bytes over the network: tp + dp + pp steps
    stored: int  # bytes kept, all storing ranks together


@dataclass
class Plan:
    """The whole plan: per hook, per storing rank, and the peak host memory of each."""

    model: str
    mesh: MeshSizes
    batch: int
    seq: int
    dtype: torch.dtype
    store: str
    hooks: list[HookPlan]
    stored_per_rank: dict[int, int]  # global rank -> bytes kept after the forward (and sync)
    peak_per_rank: dict[int, int]  # global rank -> peak host bytes
    placed: list[PlacedHook]
    disk_buffer: int = DEFAULT_DISK_BUFFER
    notes: list[str] = field(default_factory=list)

    @property
    def gathered(self) -> int:
        return sum(h.gathered for h in self.hooks)

    @property
    def moved(self) -> int:
        return sum(h.moved for h in self.hooks)

    @property
    def stored(self) -> int:
        return sum(h.stored for h in self.hooks)

    @property
    def peak(self) -> int:
        return max(self.peak_per_rank.values(), default=0)

    def table(self) -> str:
        """The plan as text: one row per hook, the totals, then one row per storing rank."""
        m = self.mesh
        lines = [f"plan for {self.model}: tp={m.tp} pp={m.pp} dp={m.dp} ({m.world} ranks), "
                 f"{self.batch}x{self.seq} tokens per replica, {str(self.dtype)[6:]}, "
                 f"store={self.store}", ""]
        width = max([len(h.name) for h in self.hooks] + [4])
        head = (f"{'hook':<{width}}  {'shape (one replica)':<22} stage  {'tp':<5} "
                f"{'gathered':>12} {'moved':>12} {'stored':>12}")
        lines += [head, "-" * len(head)]
        for h in self.hooks:
            shape = "x".join(map(str, h.shape)) + (f" (x{h.calls})" if h.calls > 1 else "")
            lines.append(f"{h.name:<{width}}  {shape:<22} {h.stage:>5}  "
                         f"{'shard' if h.tp_sharded else 'repl':<5} {format_bytes(h.gathered):>12}"
                         f" {format_bytes(h.moved):>12} {format_bytes(h.stored):>12}")
        lines.append("-" * len(head))
        lines.append(f"{f'total ({len(self.hooks)} hooks)':<{width}}  {'':<22} {'':>5}  "
                     f"{'':<5} {format_bytes(self.gathered):>12} {format_bytes(self.moved):>12} "
                     f"{format_bytes(self.stored):>12}")
        lines += ["", f"storing ranks ({len(self.stored_per_rank)}), bytes kept per forward "
                      "and peak host memory:"]
        alike: dict[tuple[int, int], list[int]] = {}
        for rank in sorted(self.stored_per_rank):
            alike.setdefault((self.stored_per_rank[rank], self.peak_per_rank[rank]),
                             []).append(rank)
        for (kept, peak), ranks in alike.items():
            who = f"rank {ranks[0]:>5}  {self._coords(ranks[0]):<16}" if len(ranks) == 1 else \
                f"{len(ranks)} ranks ({_rank_list(ranks)})"
            lines.append(f"  {who:<30} each keeps {format_bytes(kept):>12}   peak "
                         f"{format_bytes(peak):>12}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _coords(self, rank: int) -> str:
        m = self.mesh
        return f"(pp={rank // (m.dp * m.tp)}, dp={rank // m.tp % m.dp})"

    def check_budget(self, budget: int) -> None:
        """Raise :class:`PlanError` if a storing rank's peak host memory exceeds ``budget``,
        naming the largest hooks and the stores or reductions that would fit."""
        over = {r: p for r, p in self.peak_per_rank.items() if p > budget}
        if not over:
            return
        rank = max(over, key=over.get)
        biggest = sorted(self.hooks, key=lambda h: -h.stored)[:5]
        hooks = ", ".join(f"{h.name} ({format_bytes(h.stored)})" for h in biggest)
        more = f" and {len(self.hooks) - len(biggest)} more" if len(self.hooks) > 5 else ""
        raise PlanError(
            f"the hooks would need {format_bytes(over[rank])} of host memory on rank {rank} "
            f"{self._coords(rank)} per forward (store={self.store}), over the budget of "
            f"{format_bytes(budget)}; {len(over)} storing rank(s) over it. Largest hooks: "
            f"{hooks}{more}. {self._what_fits(budget)}")

    def _what_fits(self, budget: int) -> str:
        fits = [s for s in STORES if s != self.store and replan(self, store=s).peak <= budget]
        options = [f"store={s!r}" for s in fits]
        for reduce, factor in (("last_token", self.seq), ("mean_over_batch", self.batch)):
            if _reduced_peak(self, factor) <= budget:
                options.append(f"reduce={reduce!r}")
        if not options:
            return ("No store or reduce fits: hook fewer modules, or use fewer tokens per "
                    "forward.")
        return "These would fit: " + ", ".join(options) + "."


def _rank_list(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 4 else \
        f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}"


def _reduced_peak(plan: Plan, factor: int) -> int:
    """Peak if every stored tensor shrank by ``factor`` on the device before transfer."""
    return max((p + factor - 1) // factor for p in plan.peak_per_rank.values())


def tp_sharded(config, name: str, after_colwise: bool = False) -> bool:
    """Whether the output of module ``name`` is split over tp under the model's TP plan.

    Column-parallel layers leave their output split along the last dim; row-parallel layers
    all-reduce, so their output is replicated. A module outside the plan is split when its
    output comes after a column layer of that width with no row layer between
    (``after_colwise``, from :func:`~flex_surgery.plan.shapes.hook_shapes`: an MLP's
    activation), as the runtime reads it; else replicated. A model without a plan, or a style
    the planner does not know, is refused rather than guessed.
    """
    if not (getattr(config, "base_model_tp_plan", None) or {}):
        raise PlanError(f"{type(config).__name__} has no tensor-parallel plan "
                        "(base_model_tp_plan): the planner cannot tell what tp splits; plan it "
                        "with tp=1")
    style = tp_plan_style(config, name)
    if style is None:
        return after_colwise
    if style in ("colwise", "rowwise"):
        return style == "colwise"
    raise PlanError(f"{name!r}: tensor-parallel style {style!r} is not one the planner "
                    "knows how the runtime gathers (colwise, rowwise)")


def check_divides(config, mesh: MeshSizes) -> None:
    """Refuse a mesh that does not divide the model's heads, MLP or blocks."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    layers = getattr(config, "num_hidden_layers", None)
    mlp = getattr(config, "intermediate_size", None)
    problems = []
    if mesh.tp > 1:
        if heads is not None and heads % mesh.tp:
            problems.append(f"tp={mesh.tp} does not divide the {heads} attention heads")
        if kv is not None and kv % mesh.tp:
            problems.append(f"tp={mesh.tp} does not divide the {kv} key/value heads")
        if mlp is not None and mlp % mesh.tp:
            problems.append(f"tp={mesh.tp} does not divide the MLP width {mlp}")
    if mesh.pp > 1 and layers is not None and layers % mesh.pp:
        problems.append(f"pp={mesh.pp} does not divide the {layers} blocks")
    if problems:
        raise PlanError("the mesh does not fit the model: " + "; ".join(problems))


def stage_of(shape: HookShape, layers: int, pp: int) -> int:
    """Blocks split evenly and in order over the stages; what runs before the first block is
    on the first stage, what runs after the last block on the last."""
    if shape.block is not None:
        return shape.block * pp // layers
    return 0 if shape.before_blocks else pp - 1


@dataclass(frozen=True)
class PlacedHook:
    """A hook's shape with its pipeline stage and whether tp splits it."""

    shape: HookShape
    stage: int
    tp_sharded: bool


def place_hooks(config, shapes: list[HookShape], mesh: MeshSizes) -> list[PlacedHook]:
    """Stage and tp layout of each hook (see :func:`stage_of`, :func:`tp_sharded`)."""
    check_divides(config, mesh)
    layers = getattr(config, "num_hidden_layers", 1) or 1
    return [PlacedHook(s, stage_of(s, layers, mesh.pp),
                       mesh.tp > 1 and tp_sharded(config, s.name, s.after_colwise))
            for s in shapes]


def plan_hooks(placed: list[PlacedHook], mesh: MeshSizes, batch: int, seq: int,
               dtype: torch.dtype, store: str = "memory", model: str = "model",
               disk_buffer: int = DEFAULT_DISK_BUFFER) -> Plan:
    """The plan for placed hooks (see :func:`place_hooks`) with ``store``."""
    if store not in STORES:
        raise PlanError(f"unknown store {store!r}; choose from {STORES}")
    tp, dp = mesh.tp, mesh.dp
    hooks: list[HookPlan] = []
    stored_per_rank: dict[int, int] = {}
    largest: dict[int, int] = {}  # storing rank -> largest single gathered tensor
    staged: dict[int, int] = {}  # stage leader -> bytes held until the pipeline sync
    for p in placed:
        s, stage = p.shape, p.stage
        rb = s.nbytes
        tp_moved = dp * (rb - rb // tp) if p.tp_sharded else 0
        one_call = rb // s.calls
        if store == "replica_leaders":
            moved = tp_moved
            for d in range(dp):
                r = (stage * dp + d) * tp
                stored_per_rank[r] = stored_per_rank.get(r, 0) + rb
                largest[r] = max(largest.get(r, 0), one_call)
        else:
            moved = tp_moved + (dp - 1) * rb + (dp * rb if stage > 0 else 0)
            stored_per_rank[0] = stored_per_rank.get(0, 0) + dp * rb
            largest[0] = max(largest.get(0, 0), dp * one_call)
            if stage > 0:
                lead = stage * dp * tp
                staged[lead] = staged.get(lead, 0) + dp * rb
                largest[lead] = max(largest.get(lead, 0), dp * one_call)
        hooks.append(HookPlan(s.name, s.shape, s.dtype, s.calls, stage, p.tp_sharded, rb,
                              dp * rb, moved, dp * rb))
    peak = {}
    for r in set(stored_per_rank) | set(staged):
        held = stored_per_rank.get(r, 0) + staged.get(r, 0)
        peak[r] = (min(held, disk_buffer) if store == "disk" else held) + largest.get(r, 0)
        stored_per_rank.setdefault(r, 0)
    notes = []
    if staged:
        notes.append("the leaders of later pipeline stages hold their stage until "
                     "sync_pipeline_outputs sends it to rank 0 (they keep nothing after it)")
    if store == "replica_leaders" and mesh.pp > 1:
        notes.append("replica_leaders: planned with a store on every replica leader; with "
                     "output dicts, sync_pipeline_outputs also moves each later stage's slices "
                     "to its replica's first-stage leader")
    if store == "disk":
        notes.append(f"disk: {format_bytes(sum(stored_per_rank.values()))} written per forward; "
                     f"host memory bounded by a {format_bytes(disk_buffer)} buffer")
    return Plan(model, mesh, batch, seq, dtype, store, hooks, stored_per_rank, peak, placed,
                disk_buffer, notes)


def replan(plan: Plan, store: str) -> Plan:
    """The same hooks and mesh with another store."""
    return plan_hooks(plan.placed, plan.mesh, plan.batch, plan.seq, plan.dtype, store,
                      plan.model, plan.disk_buffer)


def plan(model: str, mesh: MeshSizes, batch: int, seq: int, dtype: torch.dtype,
         hooks: list[str], store: str = "memory",
         disk_buffer: int = DEFAULT_DISK_BUFFER) -> Plan:
    """Plan retrieving ``hooks`` of ``model`` (a built-in name or a config.json) on ``mesh``
    with ``batch x seq`` tokens per data-parallel replica, without building any weights."""
    config = load_config(model)
    check_divides(config, mesh)
    placed = place_hooks(config, hook_shapes(config, batch, seq, dtype, hooks), mesh)
    return plan_hooks(placed, mesh, batch, seq, dtype, store, model, disk_buffer)
