"""ModelSurgery: the Arrakis / tuned-lens layer-surgery API over flex_surgery's one layer path.

Arrakis (``arrakis.src.core_arrakis.model_surgery.ModelSurgery``) and tuned-lens
(``tuned_lens.model_surgery``) expose getters for a transformer's parts and context managers
that delete, permute or replace its layers. This class has the same names and semantics, so code
written for them switches by changing the import -- but every getter answers from
:mod:`flex_surgery.anatomy` (a table, not a heuristic: unknown architectures are an error) and
every context manager is a :class:`~flex_surgery.surgery.layers.LayerSurgery` (the original
container object is reinstalled on exit, whatever happens inside).

Pipeline parallelism: each stage holds a contiguous run of the blocks, in an ``nn.ModuleList``
of its own. Indices given to this class are *global* block indices; the stages agree once, at
construction, on how many blocks each holds (one ``all_gather_object`` over the pipeline group),
and each stage then applies only what concerns its own blocks. Deleting every block of a stage
and permutations that would move a block to another stage are errors (a block's weights live on
its stage), raised on every rank before anything is changed.

Tensor parallelism: a replacement block must run on this rank's shard the way the block it
replaces does. It must be parameter-free (e.g. :class:`~flex_surgery.surgery.layers.PassThrough`)
or have the block's parameters with the same names and shard views (the framework registry's
:func:`~flex_surgery.parallel.frameworks.parameter_view`: local and full shape, framework,
partition dim); anything else is an error naming the parameter. Only the ranks holding a block
can check its replacement, so the ranks share their findings before anything changes and all
raise together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, Union

import torch.distributed as dist
from torch import nn

from flex_surgery.anatomy import locate
from flex_surgery.naming import (
    join_name,
    layer_number,
    num_layers,
    numbered_as_the_whole_model,
    unwrap_model,
)
from flex_surgery.parallel.frameworks.base import LayoutError
from flex_surgery.surgery.layers import (
    LayerSurgery,
    _parent_and_attr,
    as_block_index,
    refuse_more_blocks,
)
from flex_surgery.surgery.theater import SurgeryError

__all__ = ["ModelSurgery", "Norm", "ShardingMismatchError", "assign_key_path", "delete_layers",
           "get_final_norm", "get_key_path", "get_transformer_layers", "get_unembedding_matrix",
           "permute_layers", "permute_layers_", "replace_layers", "set_key_path_"]


class ShardingMismatchError(SurgeryError):
    """A replacement block is not sharded like the tensor-parallel block it replaces."""


def _layer_numbers(blocks: nn.ModuleList) -> tuple[list[int | None], int | None]:
    """Each block's own 1-based global index where it keeps one (else ``None``), and how many
    blocks the whole model has where a block says it (Megatron's ``config.num_layers``)."""
    return [layer_number(block) for block in blocks], num_layers(blocks)


def _check_layer_numbers(stages: list[list[int | None]], total: int | None) -> None:
    """Blocks are numbered globally by stage order (stage 0's first, then stage 1's, ...). Where
    the blocks say their own numbers, they must agree: a chunk of an interleaved (virtual)
    pipeline, or one stage given without its pipeline group, holds blocks that are not the
    next ones in that order, and numbering them so would put every block of the lens or of
    layer surgery in the wrong place. Same answer on every stage (all stages' numbers)."""
    numbers = [n for stage in stages for n in stage]
    if not numbered_as_the_whole_model(numbers, total):
        raise SurgeryError(
            f"ModelSurgery: the blocks' own layer_number, stage by stage, are {numbers}, not "
            f"1..{total or len(numbers)}: blocks are numbered by stage order, so each stage "
            "must hold the next blocks (no interleaved/virtual pipeline chunks) and the "
            "pipeline group must hold every stage (pass pipeline_group / "
            "pipeline_parallel_size)")


def _pipeline_group_of(model: nn.Module) -> dist.ProcessGroup | None:
    """The pipeline group of the FlexModel over pipeline stages that ``model`` is or that wraps
    it (``None`` without pipelining)."""
    from flex_surgery.anatomy import pipeline_flexmodel

    flex = pipeline_flexmodel(model)
    return None if flex is None else flex.runtime.mesh.group("pp")


class ModelSurgery:
    """Getters for a model's parts and temporary layer surgery, with global block indices.

    Args:
        model: the model, or this pipeline stage of it (wrappers -- DDP, FSDP, FlexModel --
            are looked through).
        pipeline_group: the process group of this rank's pipeline line (one rank per stage,
            in stage order). Default: the pipeline group of a FlexModel passed as ``model``
            or wrapping it, else none (the model holds every block). Collective over that group.
        container: the ``nn.ModuleList`` of blocks, by clean name; default: the architecture's
            blocks from :mod:`flex_surgery.anatomy`.

    Raises :class:`~flex_surgery.anatomy.UnknownArchitecture` when the model's class is not in
    the anatomy table and no ``container`` is given.
    """

    def __init__(self, model: nn.Module, pipeline_group: dist.ProcessGroup | None = None,
                 container: str | None = None) -> None:
        self.model = model
        self.root = unwrap_model(model)
        self.pipeline_group = pipeline_group if pipeline_group is not None else \
            _pipeline_group_of(model)
        failure: Exception | None = None
        local: Any = None
        try:  # a stage that cannot find its blocks still takes part in the exchange below
            self.located = locate(self.root) if container is None else None
            self.container = container if container is not None else \
                self.located.name("blocks")
            local = _layer_numbers(self._layers())
        except Exception as exc:
            failure = exc
        if self.pipeline_group is None or dist.get_world_size(self.pipeline_group) == 1:
            if failure is not None:
                raise failure
            stages: list[Any] = [local]
            self.stage = 0
        else:
            stages = [None] * dist.get_world_size(self.pipeline_group)
            mine = local if failure is None else f"{type(failure).__name__}: {failure}"
            dist.all_gather_object(stages, mine, group=self.pipeline_group)
            if failure is not None:
                raise failure
            failed = {stage: s for stage, s in enumerate(stages) if isinstance(s, str)}
            if failed:
                raise SurgeryError(f"ModelSurgery: pipeline stage(s) {sorted(failed)} cannot "
                                   f"find their blocks ({next(iter(failed.values()))}); every "
                                   "stage raises")
            self.stage = dist.get_rank(self.pipeline_group)
        self.stage_sizes: list[int] = [len(numbers) for numbers, _ in stages]
        _check_layer_numbers([numbers for numbers, _ in stages],
                             next((total for _, total in stages if total is not None), None))
        self.offset = sum(self.stage_sizes[:self.stage])

    # -- where things are ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Blocks of the whole model (every stage)."""
        return sum(self.stage_sizes)

    @property
    def block_indices(self) -> range:
        """Global indices of the blocks this stage holds."""
        return range(self.offset, self.offset + self.stage_sizes[self.stage])

    def stage_of(self, index: int) -> int:
        """The pipeline stage holding global block ``index``."""
        self._check_index(index)
        index %= self.num_layers
        start = 0
        for stage, size in enumerate(self.stage_sizes):
            if index < start + size:
                return stage
            start += size
        raise AssertionError("unreachable")

    def _layers(self) -> nn.ModuleList:
        parent, attr = _parent_and_attr(self.root, self.container)
        return getattr(parent, attr)

    # -- getters (Arrakis / tuned-lens names) ------------------------------------------------
    def get_model(self) -> nn.Module:
        """The model given to the constructor (Arrakis)."""
        return self.model

    def get_transformer_layers(self) -> tuple[str, nn.ModuleList]:
        """``(path, layers)``: the clean name of the blocks' ``ModuleList`` and the list itself
        (tuned-lens's return value; under pipelining, this stage's blocks)."""
        return self.container, self._layers()

    def get_final_norm(self) -> nn.Module:
        """The final norm (:class:`~flex_surgery.anatomy.MissingPart` if the architecture has
        none, or this pipeline stage does not hold it)."""
        return self._part("final_norm")

    def get_unembedding(self) -> nn.Module:
        """The unembedding (LM head) module; tuned-lens calls it ``get_unembedding_matrix``."""
        return self._part("unembed")

    def _part(self, part: str) -> nn.Module:
        if self.located is None:
            self.located = locate(self.root)
        return self.located.module(part)

    # -- checks --------------------------------------------------------------------------------
    def _check_index(self, index: Any) -> None:
        n = self.num_layers
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise IndexError(f"{self.container} has {n} blocks (indices 0..{n - 1}, or -{n}..-1 "
                             f"from the end); got {index!r}")

    def _local(self, index: int) -> int | None:
        """This stage's position of global block ``index`` (``None``: another stage's)."""
        index %= self.num_layers
        return index - self.offset if index in self.block_indices else None

    # -- context managers ------------------------------------------------------------------------
    @contextlib.contextmanager
    def delete_layers(self, indices: Sequence[int]) -> Iterator[nn.Module]:
        """Run without the blocks at ``indices`` (global; the others keep their order).

        Yields the model, as Arrakis does. Deleting every block of a pipeline stage is an error.
        """
        indices = [as_block_index(i) for i in indices]
        for i in indices:
            self._check_index(i)
        drop = {i % self.num_layers for i in indices}
        for stage, size in enumerate(self.stage_sizes):
            start = sum(self.stage_sizes[:stage])
            if size and set(range(start, start + size)) <= drop:
                where = f"pipeline stage {stage} (blocks {start}..{start + size - 1})" \
                    if len(self.stage_sizes) > 1 else "the model"
                raise SurgeryError(
                    f"deleting blocks {sorted(drop)} would leave {where} without blocks; "
                    "keep at least one block per stage (or replace blocks with PassThrough())")
        keep = [j for j in range(self.stage_sizes[self.stage])
                if self.offset + j not in drop]
        with LayerSurgery(self.model, order=keep, container=self.container,
                          _stage_local=True):
            yield self.model

    @contextlib.contextmanager
    def permute_layers(self, order: Sequence[int]) -> Iterator[nn.Module]:
        """Run the blocks in ``order``: a permutation of all global block indices (position
        ``p`` runs block ``order[p]``). Yields the model.

        Unlike tuned-lens's ``permute_layers``, dropping or repeating blocks is an error here
        (use :meth:`delete_layers`, or :func:`~flex_surgery.surgery.permute_blocks` which
        allows repeats). Under pipelining a block stays on its stage: ``order`` may only
        reorder blocks within each stage.
        """
        order = [as_block_index(i) for i in order]
        n = self.num_layers
        if len(order) != n:
            raise ValueError(f"permute_layers needs a permutation of all {n} block indices "
                             f"(0..{n - 1}); got {len(order)} indices: {order}")
        for i in order:
            self._check_index(i)
        normal = [i % n for i in order]
        if sorted(normal) != list(range(n)):
            missing = sorted(set(range(n)) - set(normal))
            repeated = sorted({i for i in normal if normal.count(i) > 1})
            raise ValueError(f"permute_layers needs each of the {n} block indices exactly once; "
                             f"missing {missing}, repeated {repeated}")
        for position, block in enumerate(normal):
            if self.stage_of(position) != self.stage_of(block):
                raise SurgeryError(
                    f"permutation moves block {block} from pipeline stage "
                    f"{self.stage_of(block)} to position {position} on stage "
                    f"{self.stage_of(position)}: a block's weights live on its stage, so "
                    "blocks may only be reordered within a stage")
        local = [normal[self.offset + j] - self.offset
                 for j in range(self.stage_sizes[self.stage])]
        with LayerSurgery(self.model, order=local, container=self.container,
                          _stage_local=True):
            yield self.model

    @contextlib.contextmanager
    def replace_layers(self, indices: Sequence[int],
                       replacements: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """Run with ``replacements[k]`` in place of block ``indices[k]`` (global). Yields the
        model.

        Every rank passes the same lists; a stage uses the replacements of its own blocks.
        Under tensor parallelism each replacement is checked against the block it replaces
        (see the module docstring) and :class:`ShardingMismatchError` names what differs.
        """
        indices, replacements = [as_block_index(i) for i in indices], list(replacements)
        if len(indices) != len(replacements):
            raise ValueError(f"replace_layers got {len(indices)} indices but "
                             f"{len(replacements)} replacements; give one module per index")
        for i in indices:
            self._check_index(i)
        normal = [i % self.num_layers for i in indices]
        if len(set(normal)) != len(normal):
            raise ValueError(f"replace_layers got block indices {indices} with repeats")
        for r in replacements:
            if not isinstance(r, nn.Module):
                raise TypeError(f"a replacement is an nn.Module, got {type(r).__name__}")
        layers = self._layers()
        mine, problems = {}, []
        for g, r in zip(normal, replacements):
            j = self._local(g)
            if j is not None:
                try:
                    problems += sharding_problems(layers[j], r, f"block {g}")
                except Exception as exc:  # agreed below like a mismatch: no rank goes on alone
                    problems.append(f"block {g}: checking its replacement raised "
                                    f"{type(exc).__name__}: {exc}")
                mine[j] = r
        # Only the stage holding a block (and, with uneven shards, only some tensor-parallel
        # ranks) can see a mismatch; the ranks agree before anyone runs, so all raise together.
        problems = self._agree(problems)
        if problems:
            raise ShardingMismatchError("; ".join(problems) + _HOW_TO_REPLACE)
        with LayerSurgery(self.model, replace=mine, container=self.container,
                          _stage_local=True):
            yield self.model

    def _agreement_groups(self) -> list[dist.ProcessGroup]:
        """The groups over which a check only some ranks can make is shared, so that all the
        model's ranks hear it: tensor (and data) parallel, then pipeline. Gathering over each
        in turn reaches every rank of the grid. Taken from the FlexModel's mesh, else from the
        running frameworks (fairscale / Megatron state, the DeviceMesh of DTensor parameters);
        no collective is needed to find them."""
        from flex_surgery.parallel import frameworks
        from flex_surgery.parallel.mesh import dtensor_root_meshes

        groups: list[dist.ProcessGroup | None] = []
        mesh = getattr(getattr(self.model, "runtime", None), "mesh", None)
        if mesh is not None:
            groups += [mesh.group(axis) for axis in ("tp", "dp") if mesh.size(axis) > 1]
        else:
            groups.append(frameworks.tensor_parallel_group())
            device_mesh = next(iter(dtensor_root_meshes(self.root)), None)
            if device_mesh is not None:
                groups += [device_mesh.get_group(d) for d in range(device_mesh.ndim)
                           if device_mesh.size(d) > 1]
        groups.append(self.pipeline_group)
        unique: list[dist.ProcessGroup] = []
        for g in groups:
            if g is not None and dist.get_world_size(g) > 1 and all(g is not u for u in unique):
                unique.append(g)
        return unique

    def _agree(self, problems: list[str]) -> list[str]:
        """Every rank's ``problems``, on every rank, in rank order (each once, with the ranks
        that found it). Collective over :meth:`_agreement_groups` (nothing to do in one
        process)."""
        groups = self._agreement_groups()
        if not groups:
            return problems
        found: list[tuple[int, str]] = [(dist.get_rank(), p) for p in problems]
        for group in groups:
            everyone: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, found, group=group)
            found = sorted({item for part in everyone for item in part})
        ranks: dict[str, list[int]] = {}
        for rank, problem in found:
            ranks.setdefault(problem, []).append(rank)
        return [f"{p} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
                for p, r in ranks.items()]


# -- tensor-parallel compatibility of a replacement -------------------------------------------
_HOW_TO_REPLACE = (". Under tensor parallelism a replacement must be parameter-free (e.g. "
                   "PassThrough()) or shard its parameters like the block (same names, local "
                   "and full shapes, framework, partition dim and elements held per rank)")


def _partitioning(module: nn.Module) -> dict[str, tuple[tuple, str, str]]:
    """Parameter name -> (what must match, how it is split in words, the same with where this
    rank's elements start) for every parameter of ``module``, as the framework registry's shard
    view answers it (:func:`~flex_surgery.parallel.frameworks.parameter_view`): its local shape,
    full shape, framework (``"plain"`` for a parameter no tensor-parallel framework owns),
    partition dim and region.
    """
    from flex_surgery.parallel import frameworks

    table = {}
    for mname, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            name = join_name(mname, pname)
            view = frameworks.parameter_view(name, sub, pname, p)
            if view.kind == "plain":
                how = "plain"
            elif view.partition_dim is not None:
                how = f"{type(sub).__name__} ({view.kind}) split on dim {view.partition_dim}"
            elif tuple(view.local.shape) == tuple(view.full_shape):
                how = f"{type(sub).__name__} ({view.kind}) replicated"
            else:
                how = f"{type(sub).__name__} ({view.kind}) split on several dims"
            # The region (which elements of the full parameter this rank holds) tells apart
            # what kind and partition dim alone do not: a DTensor split along the same dim over
            # another mesh axis, or strided (_StridedShard) rather than in blocks.
            region = tuple(tuple(ix.tolist()) for ix in view.region.indices) \
                if isinstance(view.region, frameworks.IndexRegion) else view.region
            key = (tuple(view.local.shape), tuple(view.full_shape), view.kind,
                   view.partition_dim, region)
            shape = f"local shape {list(view.local.shape)}"
            if tuple(view.local.shape) != tuple(view.full_shape):
                shape += f" of {list(view.full_shape)}"
            held = f"starting at {list(view.region.offsets)}" \
                if isinstance(view.region, frameworks.BlockRegion) else "strided"
            table[name] = (key, f"{how}, {shape}", f"{how}, {shape}, {held}")
    return table


def sharding_problems(block: nn.Module, replacement: nn.Module, what: str) -> list[str]:
    """Why ``replacement`` cannot stand in for the tensor-parallel ``block`` on this rank
    (empty: it can; nothing to check when ``block`` is not sharded). Local: the caller shares
    the answer with the other ranks before acting on it."""
    try:
        original = _partitioning(block)
        if all(key[2] == "plain" for key, *_ in original.values()):
            return []  # not tensor-parallel: any module may replace it
        new = _partitioning(replacement)
    except (LayoutError, NotImplementedError) as err:
        return [f"{what}: {err}"]
    if not new:
        return []  # parameter-free: runs the same on every rank
    problems = []
    for name in sorted(set(original) | set(new)):
        if name not in new:
            problems.append(f"{name}: missing (the block has {original[name][1]})")
        elif name not in original:
            problems.append(f"{name}: not a parameter of the block it replaces")
        elif new[name][0] != original[name][0]:
            # The elements held only when nothing else differs (they differ on every rank).
            words = 1 if new[name][0][:-1] != original[name][0][:-1] else 2
            problems.append(f"{name}: {new[name][words]}; expected {original[name][words]}")
    if not problems:
        return []
    return [f"the replacement for {what} ({type(replacement).__name__}) is not sharded like "
            f"the tensor-parallel block it replaces ({type(block).__name__}): "
            + "; ".join(problems)]



# -- tuned-lens's module-level names (``tuned_lens.model_surgery``) ---------------------------
# ``from tuned_lens import model_surgery`` becomes ``from flex_surgery.surgery import
# model_surgery``: the same functions, each a one-call :class:`ModelSurgery` (so the parts come
# from the anatomy table, the context managers reinstall the original container, and a
# FlexModel's pipeline stages are handled as by the class).

T = TypeVar("T", bound=nn.Module)
Norm = Union[nn.LayerNorm, nn.Module]  # tuned-lens's alias: what get_final_norm returns


def get_transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the blocks (tuned-lens); ``path`` is usable with
    :func:`get_key_path`."""
    return ModelSurgery(model).get_transformer_layers()


def get_final_norm(model: nn.Module) -> nn.Module:
    """The final norm (tuned-lens). A model without one raises
    :class:`~flex_surgery.anatomy.MissingPart`, a ``ValueError`` as tuned-lens raises."""
    return ModelSurgery(model).get_final_norm()


def get_unembedding_matrix(model: nn.Module) -> nn.Linear:
    """The unembedding (tuned-lens): an ``nn.Linear``, else ``ValueError`` as tuned-lens."""
    head = ModelSurgery(model).get_unembedding()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the unembedding is a {type(head).__name__}; tuned-lens's "
                         "get_unembedding_matrix supports nn.Linear only (ModelSurgery."
                         "get_unembedding returns any module)")
    return head


def delete_layers(model: T, indices: Sequence[int]) -> contextlib.AbstractContextManager[T]:
    """Run without the blocks at ``indices`` while in the context; yields the model."""
    return ModelSurgery(model).delete_layers(indices)


@contextlib.contextmanager
def permute_layers(model: T, indices: Sequence[int]) -> Iterator[T]:
    """Run the blocks ``indices`` in that order while in the context; as in tuned-lens, blocks
    may be dropped or repeated (in one process: under pipelining only a permutation within
    each stage, :meth:`ModelSurgery.permute_layers`). Yields the model. Unlike tuned-lens,
    more blocks than the model has is refused: models that run only their first
    ``config.num_hidden_layers`` blocks would skip the extra ones silently."""
    surgery = ModelSurgery(model)
    indices = [as_block_index(i) for i in indices]
    n = surgery.num_layers
    permutation = len(indices) == n and all(
        isinstance(i, int) and -n <= i < n for i in indices) and \
        sorted(i % n for i in indices) == list(range(n))
    if permutation or len(surgery.stage_sizes) > 1:
        with surgery.permute_layers(indices):
            yield model
    else:
        with LayerSurgery(model, order=indices, container=surgery.container):
            yield model


def permute_layers_(model: nn.Module, indices: Sequence[int]) -> None:
    """Install the blocks ``indices`` in that order for good (tuned-lens's in-place variant;
    not restored). One process only."""
    surgery = ModelSurgery(model)
    if len(surgery.stage_sizes) > 1:
        raise SurgeryError("permute_layers_ changes the blocks for good; under pipelining use "
                           "the permute_layers context manager (blocks stay on their stage)")
    layers = surgery.get_transformer_layers()[1]
    refuse_more_blocks(len(indices), len(layers), surgery.container)
    # an IndexError names a bad index before any change
    order = [layers[as_block_index(i)] for i in indices]
    parent, attr = _parent_and_attr(surgery.root, surgery.container)
    setattr(parent, attr, nn.ModuleList(order))


def replace_layers(model: T, indices: Sequence[int],
                   replacements: Sequence[nn.Module]) -> contextlib.AbstractContextManager[T]:
    """Run with ``replacements[k]`` in place of block ``indices[k]`` while in the context;
    yields the model."""
    return ModelSurgery(model).replace_layers(indices, replacements)


def _key(obj: Any, key: str) -> Any:
    return obj[int(key)] if key.isdigit() else getattr(obj, key)


def get_key_path(model: nn.Module, key_path: str) -> Any:
    """The value at a dotted key path, e.g. ``transformer.h.0.attn`` (digits index lists)."""
    for key in key_path.split("."):
        model = _key(model, key)
    return model


def set_key_path_(model: nn.Module, key_path: str, value: Any) -> None:
    """Set the value at a dotted key path in place (tuned-lens)."""
    *path, last = key_path.split(".")
    parent = get_key_path(model, ".".join(path)) if path else model
    setattr(parent, last, value)  # as tuned-lens: a ModuleList / ModuleDict block by its name


@contextlib.contextmanager
def assign_key_path(model: T, key_path: str, value: Any) -> Iterator[T]:
    """Set the value at a dotted key path while in the context; the old value comes back on
    exit, whatever happens inside. Yields the model."""
    old = get_key_path(model, key_path)
    set_key_path_(model, key_path, value)
    try:
        yield model
    finally:
        set_key_path_(model, key_path, old)
