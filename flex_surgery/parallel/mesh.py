"""ParallelMesh: the data-, tensor- and pipeline-parallel groups this rank belongs to.

A hook that wants the whole of a sharded tensor needs to know *over which ranks* each dimension
is split. That knowledge already exists in whatever framework runs the model -- Megatron-core's
``parallel_state``, fairscale's model-parallel state, a torch ``DeviceMesh`` (DTensor TP, FSDP2),
HF transformers' TP mesh, the process group of DDP / FSDP1; each framework's module in
:mod:`flex_surgery.parallel.frameworks` reads its own -- so the mesh adopts those groups rather
than building parallel ones that could order ranks differently (fairscale orders ranks
``(dp, pp, tp)``, Megatron and FlexModel ``(pp, dp, tp)``: they disagree as soon as pp > 1 and
dp > 1). Only when nothing runs yet does :meth:`ParallelMesh.build` create groups, in
FlexModel's ``(pp, dp, tp)`` order.

An axis of size 1 has no group (``None``): collectives over it are skipped.

The *stage group* holds the ranks of this rank's pipeline stage (all its dp x tp ranks); an
editing function runs on the stage's first rank and reports success or failure over it. With
pp == 1 the stage group is the whole world (``None`` means the default group).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AXES", "ParallelMesh", "MeshSizeError"]

AXES = ("dp", "tp", "pp")
# DeviceMesh dim names taken as our axes (HF transformers names its mesh (pp, fsdp, tp)).
AXIS_NAMES = {"dp": ("dp", "fsdp", "data_parallel"), "tp": ("tp", "tensor_parallel"),
              "pp": ("pp", "pipeline_parallel")}
# Dims that together make our dp axis, slowest first: HSDP's replicas of sharded groups, as
# torchtitan names them. They are flattened into one dp group (torchtitan's own ``dp`` mesh is
# the same flattening), so a dp rank is ``replicate_rank * shard_size + shard_rank``.
DP_DIM_GROUPS = (("dp_replicate", "dp_shard"),)


class MeshSizeError(ValueError):
    """The requested parallel sizes do not multiply to the number of ranks, or contradict the
    groups that are already running."""


@dataclass
class ParallelMesh:
    """Groups, sizes and this rank's coordinate for the ``dp``, ``tp`` and ``pp`` axes."""

    groups: dict[str, dist.ProcessGroup | None]
    sizes: dict[str, int]
    coords: dict[str, int]
    stage_group: dist.ProcessGroup | None = None
    source: str = "built"
    device_mesh: object | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict) -> ParallelMesh:
        """Refused with a message that says what to do. A deep copy of a model a distributed
        FlexModel hooks reaches its mesh through the hooks; a copied process group would not
        be a group the other ranks know (torch refuses with "cannot pickle ProcessGroup")."""
        raise TypeError(
            "a model hooked by a distributed FlexModel cannot be deep-copied with its hooks: "
            "they hold the FlexModel's process groups, which cannot be copied. Deep-copy the "
            "model before wrapping it, or close() the FlexModel first (its hooks leave the "
            "model)")

    # -- queries ---------------------------------------------------------------------------
    def size(self, axis: str) -> int:
        return self.sizes[axis]

    def rank(self, axis: str) -> int:
        return self.coords[axis]

    def group(self, axis: str) -> dist.ProcessGroup | None:
        return self.groups[axis]

    @property
    def dp_size(self) -> int:
        return self.sizes["dp"]

    @property
    def tp_size(self) -> int:
        return self.sizes["tp"]

    @property
    def pp_size(self) -> int:
        return self.sizes["pp"]

    @property
    def stage(self) -> int:
        """This rank's pipeline stage (its ``pp`` coordinate)."""
        return self.coords["pp"]

    @property
    def world_size(self) -> int:
        return self.sizes["dp"] * self.sizes["tp"] * self.sizes["pp"]

    def stage_leader(self) -> int:
        """Global rank of the first rank (dp == tp == 0) of this rank's pipeline stage."""
        group = self.stage_group
        return dist.get_global_rank(group, 0) if group is not None else 0

    def created_groups(self) -> list[dist.ProcessGroup]:
        """The groups this mesh created itself, which its owner frees
        (:mod:`flex_surgery.parallel.group_lifetime`): every group of a built mesh; of an
        adopted one only the stage group (the frameworks have none; their groups are theirs)."""
        if getattr(self, "_kept_for_reuse", False):
            return []  # shared by every mesh of this shape over this sub-group (see build)
        made = [*self.groups.values(), self.stage_group] if self.source == "built" else \
            [self.stage_group]
        world = dist.group.WORLD
        return [g for g in made if g is not None and g is not world]

    def is_stage_leader(self) -> bool:
        return self.coords["dp"] == 0 and self.coords["tp"] == 0

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None,
              group: dist.ProcessGroup | None = None) -> ParallelMesh:
        """Create groups for ``tp x pp x dp`` ranks, ordered ``(pp, dp, tp)`` (tp fastest).

        Collective: every rank of ``group`` (default: the world) must call it with the same
        sizes; with a ``group``, only its ranks take part. ``dp`` defaults to whatever ``tp``
        and ``pp`` leave over.
        """
        ranks = list(range(dist.get_world_size())) if group is None else \
            dist.get_process_group_ranks(group)
        world = len(ranks)
        if dp is None:
            if world % (tp * pp):
                raise MeshSizeError(f"tp={tp} x pp={pp} does not divide the {world} ranks")
            dp = world // (tp * pp)
        _check_sizes(dict(dp=dp, tp=tp, pp=pp), world)
        grid = torch.tensor(ranks).reshape(pp, dp, tp)
        me = dist.get_rank()
        pos = (grid == me).nonzero()
        if pos.numel() == 0:
            raise MeshSizeError(f"rank {me} is not part of the group the mesh is built on")
        p, d, t = (int(x) for x in pos[0])
        key = (tuple(ranks), pp, dp, tp)
        if group is not None and key in _SUBGROUP_MESHES:
            groups, stage_group = _SUBGROUP_MESHES[key]
            mesh = cls(dict(groups), dict(dp=dp, tp=tp, pp=pp), dict(dp=d, tp=t, pp=p),
                       stage_group)
            mesh._kept_for_reuse = True
            return mesh
        sizes = dict(dp=dp, tp=tp, pp=pp)
        if group is None:
            device_mesh = _world_device_mesh(sizes)
            groups = {a: device_mesh.get_group(a) if sizes[a] > 1 else None for a in AXES}
            stage_group = _stage_group(device_mesh, sizes) if device_mesh is not None else None
            return cls(groups, sizes, dict(dp=d, tp=t, pp=p), stage_group,
                       device_mesh=device_mesh)
        # Inside a sub-group of the world: torch's DeviceMesh creates its groups with
        # collectives over the whole world, which the ranks outside the sub-group never enter;
        # these groups synchronise among their own members (see docs/parallel.md).
        groups = {}
        # dim of the grid that varies along each axis; the others enumerate the groups.
        for axis, dim in (("tp", 2), ("dp", 1), ("pp", 0)):
            groups[axis] = (_new_groups_along(grid, dim, me, local=True, parent=group)
                            if grid.shape[dim] > 1 else None)
        stage_group = _new_groups_along(grid.reshape(pp, dp * tp), 1, me, local=True,
                                        parent=group)
        mesh = cls(groups, sizes, dict(dp=d, tp=t, pp=p), stage_group)
        # Groups created inside a sub-group synchronise among their members only, so torch
        # names them from their ranks: a group destroyed and created again over the same
        # ranks would take the old name and meet the old group's keys in the store (gloo
        # then fails to connect). Such groups are kept and reused by every later mesh of the
        # same shape over the same ranks instead of being destroyed: one set per shape.
        _SUBGROUP_MESHES[key] = (dict(groups), stage_group)
        mesh._kept_for_reuse = True
        return mesh

    @classmethod
    def from_fairscale(cls) -> ParallelMesh:
        """Adopt fairscale's model-parallel state (``initialize_model_parallel``); see
        :mod:`flex_surgery.parallel.frameworks.fairscale`."""
        from flex_surgery.parallel.frameworks.fairscale import fairscale_mesh

        return fairscale_mesh()

    @classmethod
    def from_device_mesh(cls, device_mesh,
                         dim_names: Mapping[str, str | tuple[str, ...] | None] | None = None,
                         ) -> ParallelMesh:
        """Adopt a torch ``DeviceMesh``.

        ``dim_names`` maps our axes to the mesh's dim names (default: dims named ``dp``/``tp``/
        ``pp``, or an alias from :data:`AXIS_NAMES` such as HF's ``fsdp``; HSDP's
        ``("dp_replicate", "dp_shard")`` together as ``dp``, :data:`DP_DIM_GROUPS`). A tuple of
        names is one axis over those dims, flattened (a new group, collective over the mesh's
        ranks). An unnamed 1-D mesh is taken as ``tp`` unless ``dim_names`` names the axis
        (``{"dp": None}``).
        """
        names = device_mesh.mesh_dim_names
        if names is None:
            if device_mesh.ndim != 1:
                raise ValueError("an unnamed multi-dimensional DeviceMesh is ambiguous; "
                                 "name its dims (mesh_dim_names=('dp', 'tp'))")
            axis = next(iter(dim_names)) if dim_names else "tp"
            mapping: dict[str, str | tuple[str, ...] | None] = {axis: None}
        else:
            mapping = dict(dim_names) if dim_names else _default_mapping(names)
            mapped = {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}
            unknown = [n for n in names if n not in mapped]
            if unknown:
                raise ValueError(
                    f"DeviceMesh dims {unknown} are not mapped to any of {AXES}: name them "
                    f"{AXIS_NAMES} (or {DP_DIM_GROUPS[0]} for HSDP), or pass process_group / "
                    "sizes to FlexModel")
        groups: dict[str, dist.ProcessGroup | None] = {a: None for a in AXES}
        sizes = {a: 1 for a in AXES}
        coords = {a: 0 for a in AXES}
        for axis, name in mapping.items():
            if isinstance(name, tuple):
                _check_flattened_order(device_mesh, name)
                axis_mesh = device_mesh[name]._flatten(
                    "_".join(name) + "_flat", backend_override=_group_options())
                dim = 0
            else:
                axis_mesh, dim = device_mesh, (0 if name is None else names.index(name))
            sizes[axis] = axis_mesh.size(dim)
            coords[axis] = axis_mesh.get_local_rank(dim)
            if sizes[axis] > 1:
                groups[axis] = axis_mesh.get_group(dim)
        mesh_ranks = device_mesh.mesh.numel()
        _check_sizes(sizes, mesh_ranks)
        if mesh_ranks != dist.get_world_size():
            raise MeshSizeError(f"the DeviceMesh covers {mesh_ranks} of {dist.get_world_size()} "
                                "ranks; give it a dim for the rest (e.g. 'dp')")
        if sizes["pp"] > 1:
            raise NotImplementedError("pipeline stages from a DeviceMesh are not supported yet")
        return cls(groups, sizes, coords, None, source="device_mesh",
                   device_mesh=device_mesh)

    @classmethod
    def adopt(cls, module: nn.Module | None = None, tp: int | None = None,
              pp: int | None = None, dp: int | None = None,
              group: dist.ProcessGroup | None = None) -> ParallelMesh:
        """The mesh of whatever already runs ``module``; built from the sizes otherwise.

        The running groups are asked of the framework registry
        (:func:`flex_surgery.parallel.frameworks.adopt_groups`), in order: HF transformers' TP
        mesh (``module.device_mesh``), the ``DeviceMesh`` of DTensor parameters (DTensor TP,
        FSDP2, both on a 2-D mesh), Megatron-core's ``parallel_state``, fairscale's
        model-parallel state, and the process group of a DDP / FSDP1 wrapper (taken as ``dp``).
        Sizes that are given must match what is adopted.
        """
        from flex_surgery.parallel import frameworks

        found = frameworks.adopt_groups(module)
        if found is None:
            return cls.build(tp=tp or 1, pp=pp or 1, dp=dp, group=group)
        wanted = {"tp": tp, "pp": pp, "dp": dp}
        for axis, size in wanted.items():
            if size not in (None, 1) and size != found.sizes[axis]:
                raise MeshSizeError(
                    f"{axis} size {size} was requested but the running {found.source} groups "
                    f"have {axis}={found.sizes[axis]}")
        return found


# -- helpers ---------------------------------------------------------------------------------
def _check_flattened_order(device_mesh, dims: tuple[str, ...]) -> None:
    """Refuse (the same on every rank: the mesh is) dims whose ranks, read in mesh order, are
    not increasing: a flattened group orders its ranks by global rank, so the dp index would
    not be ``replicate_rank * shard_size + shard_rank`` (a hand-permuted mesh)."""
    names = list(device_mesh.mesh_dim_names)
    order = [names.index(d) for d in dims]
    grid = device_mesh.mesh.permute(*[i for i in range(len(names)) if i not in order], *order)
    lines = grid.reshape(-1, grid.shape[-len(order):].numel())
    if not bool((lines[:, 1:] > lines[:, :-1]).all()):
        raise MeshSizeError(
            f"the ranks along DeviceMesh dims {dims} are not in increasing order "
            f"({device_mesh.mesh.tolist()}): their flattened dp group would number them "
            f"otherwise than {' * '.join(dims)} order; build the mesh with init_device_mesh, "
            "or pass process_group / sizes to FlexModel")


def _default_mapping(names) -> dict[str, str | tuple[str, ...]]:
    """Our axes to ``names``' dims: an alias from :data:`AXIS_NAMES`, else for dp a group
    from :data:`DP_DIM_GROUPS` all of whose dims are there."""
    mapping: dict[str, str | tuple[str, ...]] = {
        a: n for a in AXES for n in AXIS_NAMES[a] if n in names}
    if "dp" not in mapping:
        group = next((g for g in DP_DIM_GROUPS if set(g) <= set(names)), None)
        if group is not None:
            mapping["dp"] = group
    return mapping


def _check_sizes(sizes: Mapping[str, int], world: int) -> None:
    if any(s < 1 for s in sizes.values()):
        raise MeshSizeError(f"parallel sizes must be >= 1, got {dict(sizes)}")
    prod = sizes["dp"] * sizes["tp"] * sizes["pp"]
    if prod != world:
        raise MeshSizeError(
            f"dp={sizes['dp']} x tp={sizes['tp']} x pp={sizes['pp']} = {prod} does not match "
            f"the world size {world}")


def _drop_trivial(groups: dict[str, dist.ProcessGroup | None],
                  sizes: Mapping[str, int]) -> dict[str, dist.ProcessGroup | None]:
    return {a: (g if sizes[a] > 1 else None) for a, g in groups.items()}


def _group_options(parent: dist.ProcessGroup | None = None):
    """Backend options that carry ``parent``'s timeout (default: the world's) into the groups a
    ``DeviceMesh`` creates: like ``dist.new_group``, it would otherwise fall back to 30 minutes
    (:func:`~flex_surgery.parallel.group_lifetime.group_timeout`). ``None`` if unreadable.

    With an override, torch also creates a group of its own where one dim spans the whole world
    instead of handing out the default group, which a mesh's owner must never destroy."""
    from flex_surgery.parallel.group_lifetime import group_timeout

    timeout = group_timeout(parent)
    if timeout is None:
        return None
    if "nccl" in dist.get_backend():
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False  # what dist.new_group uses by default
    else:
        options = dist.ProcessGroupGloo._Options()  # gloo reads only the timeout from it
    options._timeout = timeout
    return options


def _device_type() -> str:
    from flex_surgery.parallel.backend import default_device

    return default_device().type


def _world_device_mesh(sizes: Mapping[str, int]):  # -> DeviceMesh | None
    """``init_device_mesh`` over the world, ordered ``(pp, dp, tp)``, with a dim for each axis
    of more than one rank (a size-1 dim would cost one group per rank for nothing) -- plus a
    size-1 ``stage`` dim when the pipeline stages are single ranks, whose stage groups are then
    the mesh's own (see :func:`_stage_group`)."""
    from torch.distributed.device_mesh import init_device_mesh

    dims = [(a, sizes[a]) for a in ("pp", "dp", "tp") if sizes[a] > 1]
    if sizes["pp"] > 1 and sizes["dp"] * sizes["tp"] == 1:
        dims.append(("stage", 1))
    if not dims:  # a world of one rank: no group to make
        return None
    names = tuple(n for n, _ in dims)
    options = _group_options()
    override = None if options is None else {n: options for n in names}
    return init_device_mesh(_device_type(), tuple(n for _, n in dims), mesh_dim_names=names,
                            backend_override=override)


def _stage_group(device_mesh, sizes: Mapping[str, int]) -> dist.ProcessGroup | None:
    """This rank's stage group (its stage's dp x tp ranks) from a world ``device_mesh`` whose
    dims are named by axis: the ``dp`` and ``tp`` dims flattened into new groups
    (``DeviceMesh._flatten``, one collective over the world). ``None`` without pipelining (the
    stage is the world)."""
    if sizes["pp"] == 1:
        return None
    names = device_mesh.mesh_dim_names
    if "stage" in names:  # single-rank stages: the mesh's own size-1 dim
        return device_mesh.get_group("stage")
    inner = tuple(a for a in ("dp", "tp") if a in names)
    options = _group_options()
    return device_mesh[inner]._flatten("stage", backend_override=options).get_group()


def adopted_stage_group(groups: Mapping[str, dist.ProcessGroup | None],
                        sizes: Mapping[str, int], order: tuple[str, ...],
                        ) -> tuple[dist.ProcessGroup | None, object]:
    """A stage group for a framework that has none (fairscale, Megatron-core), and a
    ``DeviceMesh`` over the framework's own groups.

    ``order``: the framework's rank order, slowest axis first (fairscale ``("dp", "pp",
    "tp")``, Megatron ``("pp", "dp", "tp")``). The mesh is ``DeviceMesh.from_group`` of the
    framework's groups -- they stay the framework's: nothing here creates or frees them -- and
    the stage group is its ``dp`` and ``tp`` dims flattened (a new group per stage, one
    collective over the world). Single-rank stages are made directly (no dim to flatten).
    """
    from torch.distributed.device_mesh import DeviceMesh

    kept = [a for a in order if sizes[a] > 1]
    grid = torch.arange(dist.get_world_size()).reshape([sizes[a] for a in order])
    grid = grid.reshape([sizes[a] for a in kept]) if kept else grid.reshape(-1)
    device_mesh = None
    if kept:
        device_mesh = DeviceMesh.from_group([groups[a] for a in kept], _device_type(),
                                            mesh=grid, mesh_dim_names=tuple(kept))
    if sizes["pp"] == 1:
        return None, device_mesh
    if sizes["dp"] * sizes["tp"] == 1:
        return _new_groups_along(torch.arange(dist.get_world_size()).reshape(-1, 1), 1,
                                 dist.get_rank()), device_mesh
    inner = tuple(a for a in ("dp", "tp") if a in kept)  # dp before tp in both orders
    stage = device_mesh[inner]._flatten("stage", backend_override=_group_options())
    return stage.get_group(), device_mesh


# (ranks of the sub-group, pp, dp, tp) -> the groups a mesh built inside that sub-group uses.
_SUBGROUP_MESHES: dict[tuple, tuple[dict[str, dist.ProcessGroup | None],
                                    dist.ProcessGroup | None]] = {}


def _new_groups_along(grid: torch.Tensor, dim: int, me: int, local: bool = False,
                      parent: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """Create one group per line of ``grid`` along ``dim`` (collective); return ``me``'s.

    ``local``: only the ranks of ``grid`` call this (a mesh inside a sub-group of the world),
    so the groups synchronise among their own members only. The groups wait as long as
    ``parent`` (default: the world) does: ``new_group`` alone would not inherit its timeout.
    """
    from flex_surgery.parallel.group_lifetime import group_timeout

    timeout = group_timeout(parent)
    lines = grid.movedim(dim, -1).reshape(-1, grid.shape[dim])
    mine = None
    for line in lines.tolist():
        g = dist.new_group(line, use_local_synchronization=local, timeout=timeout)
        if me in line:
            mine = g
    assert mine is not None
    return mine


def dtensor_root_meshes(model: nn.Module) -> list:
    """The root mesh (:func:`_root_mesh`) of each DTensor parameter of ``model``, in
    ``parameters()`` order, read from the mesh the model was distributed with.

    A DTensor parameter may not hold that mesh: torch's sharding-propagation cache is keyed by
    equality, so ``parallelize_module`` -- or ``nn.Parameter(distribute_tensor(...))`` -- can
    hand a parameter an *equal* mesh object left by an earlier model, and that object's root is
    the earlier model's (an earlier ``("dp", "tp")`` mesh, where this model's TP mesh was cut
    from a ``("rep", "tp")`` one: its replicas would be taken for data parallel and their
    batches joined). ``distribute_module`` keeps the mesh it was given in the hooks it
    installs (on the module or a parent of it); where one equals the parameter's mesh, its
    root is used. FSDP2 builds its parameters' DTensors from the mesh it was given (no cache),
    so their meshes are taken as they are, with their roots (torchtitan shards over
    ``mesh["dp_replicate", "dp_shard_cp"]``). Any other parameter's mesh is used as it is,
    never its root: a slice of a larger mesh then covers only part of the world and is
    refused unless the sizes are given.
    """
    from flex_surgery.parallel.frameworks import is_dtensor
    from flex_surgery.parallel.frameworks.fsdp import FSDP2

    fsdp2 = FSDP2()
    declared = [m for module in model.modules() for m in _distributed_with(module)]
    sharded = {id(p) for module in model.modules() if fsdp2.owns(module)
               for p in module.parameters()}
    return [_root_mesh(param.device_mesh) if id(param) in sharded
            else _vouched_root(param.device_mesh, declared) for module in model.modules()
            for param in module._parameters.values() if param is not None and is_dtensor(param)]


def parameter_root_mesh(module: nn.Module, param):
    """The root mesh of DTensor ``param`` of ``module`` (preferring the mesh ``module``'s own
    hooks hold), for the *ranks* it spans: an earlier model's equal mesh, which
    :func:`dtensor_root_meshes` guards against for the dims' names, has a root over the same
    ranks in the same shape."""
    mesh = param.device_mesh
    return _root_mesh(next((m for m in _distributed_with(module) if m == mesh), mesh))


def _vouched_root(mesh, declared: list):
    """The root of the mesh in ``declared`` equal to ``mesh``; ``mesh`` itself when none is."""
    given = next((m for m in declared if m == mesh), None)
    return mesh if given is None else _root_mesh(given)


def _distributed_with(module: nn.Module) -> list:
    """The ``DeviceMesh`` objects ``distribute_module`` registered ``module``'s input / output
    hooks with (``parallelize_module`` goes through it): they are the closures' ``device_mesh``."""
    from torch.distributed.device_mesh import DeviceMesh

    from flex_surgery.parallel.frameworks.base import closure_value

    found = []
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        value = closure_value(hook, "device_mesh")
        if isinstance(value, DeviceMesh) and all(value is not m for m in found):
            found.append(value)
    return found


def _root_mesh(device_mesh):
    """The mesh ``device_mesh`` was sliced from (a TP mesh cut from a ``("dp", "tp")`` mesh
    tells the DP axis too), when that mesh's dims are all axes we know.

    torch's root-mesh registry is process-global and keyed by equality, so it can also answer
    with a mesh an unrelated, earlier model was sliced from (say an HSDP ``dp_replicate`` mesh);
    such a root is ignored and the parameter's own mesh is used.
    """
    root = device_mesh._get_root_mesh() if hasattr(device_mesh, "_get_root_mesh") else None
    if root is None or root is device_mesh or root.mesh_dim_names is None:
        return device_mesh
    known = {n for names in (*AXIS_NAMES.values(), *DP_DIM_GROUPS) for n in names}
    return root if set(root.mesh_dim_names) <= known else device_mesh


def _without_trivial_dims(device_mesh):
    """The sub-mesh of the dims with more than one rank.

    transformers >= 5.2 keeps a 3-D ``(pp, fsdp, tp)`` mesh even for TP alone; its size-1 dims
    carry no sharding and have names our axes do not know.
    """
    names = device_mesh.mesh_dim_names
    if names is None or device_mesh.ndim == 1:
        return device_mesh
    kept = tuple(n for i, n in enumerate(names) if device_mesh.size(i) > 1)
    if not kept or kept == tuple(names):
        return device_mesh
    return device_mesh[kept]
