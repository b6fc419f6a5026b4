"""Which local views a theater writes: ``layers`` and ``params`` resolved to :class:`Edit`\\ s.

Names are those of the unwrapped model (:func:`~flex_surgery.naming.clean_name`; DDP, FlexModel
and PEFT wrappers peeled by the theater). ``layers`` entries are block indices (through
:mod:`flex_surgery.anatomy`), module or parameter names, or glob patterns over them; ``params``
says which parameters under a selected module are kept. A parameter named exactly is always a
raw edit of that parameter. A PEFT LoRA layer counts as one linear (:mod:`.lora`): selecting it,
or anything above it, edits its effective weight -- the base weight plus, for ``scale`` and
``disable``, the adapters' ``B`` factors -- under the name it has after merging; its adapter
parameters are never selected on their own.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from flex_surgery.naming import (
    layer_number,
    modules_by_clean_name,
    num_layers,
    numbered_as_the_whole_model,
)
from flex_surgery.surgery.lora import LoraLinear, lora_layers
from flex_surgery.surgery.shards import LocalShard

__all__ = ["PARAMETER_SELECTIONS", "Edit", "LayerSpec", "ParamFilter", "param_filter",
           "resolve_edits"]

PARAMETER_SELECTIONS = ("linear", "weights", "all")

ParamFilter = Callable[[str, nn.Module, str], bool]
LayerSpec = int | str


@dataclass
class Edit:
    """One modification as the user sees it: ``shard`` holds the values the modification is
    defined on, ``name`` is the name the user knows it by (noise seeds, messages). For a PEFT
    LoRA layer, ``shard`` is the base weight, ``name`` the effective weight's name, ``factors``
    the adapters' ``B`` weights scaled or zeroed with it, and ``lora`` the layer."""

    shard: LocalShard
    name: str
    factors: tuple[LocalShard, ...] = ()
    lora: LoraLinear | None = None

    @property
    def shards(self) -> tuple[LocalShard, ...]:
        """Every local view this edit writes."""
        return (self.shard, *self.factors)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    name = type(module).__name__
    # transformers' GPT-2 Conv1D is a transposed Linear; fairscale's parallel linears.
    return name in ("Conv1D", "ColumnParallelLinear", "RowParallelLinear")


def param_filter(params: str | ParamFilter) -> ParamFilter:
    """The ``(name, module, param_name) -> bool`` test of a ``params`` argument."""
    if callable(params):
        return params
    if params == "all":
        return lambda name, module, pname: True
    if params == "weights":
        return lambda name, module, pname: pname == "weight"
    if params == "linear":
        return lambda name, module, pname: pname == "weight" and _is_linear(module)
    raise ValueError(f"params must be one of {PARAMETER_SELECTIONS} or a callable, got {params!r}")


def resolve_edits(root: nn.Module, shards: list[LocalShard],
                  layers: LayerSpec | Sequence[LayerSpec] | None, params: str | ParamFilter,
                  shard_at: dict[tuple[int, str], LocalShard],
                  with_factors: bool) -> list[Edit]:
    """The edits selected by ``layers`` and ``params`` among ``shards``, in model order.

    ``shard_at`` maps ``(id(module), param_name)`` to its shard; ``with_factors``: the
    modification is linear in the weight (``scale``, ``disable``), so LoRA ``B`` factors are
    written with the base weight.
    """
    keep = param_filter(params)
    # Every parameter takes part in the selection; one that is selected but not floating point
    # (an int8 / 4-bit quantized weight, QLoRA's base layer) cannot be scaled or perturbed in
    # place, and skipping it would leave a "modified" layer untouched without a word.
    candidates = list(shards)
    loras = lora_layers(root)
    inside = {mid: lora for lora in loras.values() for mid in lora.internals}
    module_names = set(modules_by_clean_name(root))
    param_names = {n for s in candidates for n in s.names}
    param_names |= {loras[id(s.module)].effective_name(s.param_name)
                    for s in candidates if id(s.module) in loras}
    prefixes: set[str] = set()
    exact: set[str] = set()
    if layers is None:
        prefixes.add("")  # the whole model
    specs = () if layers is None else layers if isinstance(layers, (list, tuple)) else [layers]
    # A pipeline stage: names held by the other stages (exchanged when its FlexModel was
    # built, the same answer on every rank) are selected there, not here.
    from flex_surgery.anatomy import pipeline_flexmodel

    stage = pipeline_flexmodel(root)
    remote: frozenset[str] | None = None if stage is None else stage._remote_names
    elsewhere = False  # something selected lives on another stage
    for spec in specs:
        if stage is not None:
            _refuse_shared_name(spec, stage._stages.names_by_stage)
        names, away = _expand(root, spec, module_names, param_names, remote)
        elsewhere |= away
        for name in names:
            (exact if name in param_names else prefixes).add(name)

    def under(name: str, within: str | None = None) -> bool:
        """Selected by a prefix (one below the LoRA layer ``within``, if given)."""
        return any((p == "" or name.startswith(p + "."))
                   and (within is None or p.startswith(within + "."))
                   for p in prefixes)

    edits: list[Edit] = []
    for s in candidates:
        lora = loras.get(id(s.module))
        owner = inside.get(id(s.module))
        if any(n in exact for n in s.names):
            edits.append(Edit(s, s.name))
        elif lora is not None:
            effective = lora.effective_name(s.param_name)
            if effective in exact or (under(effective) and not under(effective, lora.name)
                                      and keep(effective, lora.base, s.param_name)):
                edits.append(_lora_edit(s, lora, effective, shard_at, with_factors))
            elif any(under(n, lora.name) for n in s.names) and keep(s.name, s.module,
                                                                    s.param_name):
                edits.append(Edit(s, s.name))
        elif owner is not None:  # an adapter's own parameter: only from below the layer
            if any(under(n, owner.name) for n in s.names) and keep(s.name, s.module,
                                                                   s.param_name):
                edits.append(Edit(s, s.name))
        elif any(under(n) for n in s.names) and keep(s.name, s.module, s.param_name):
            edits.append(Edit(s, s.name))
    quantized = [s.name for e in edits for s in e.shards if not s.local.is_floating_point()]
    if quantized:
        raise TypeError(
            f"layers={layers!r} with params={params!r} selects parameters that are not floating "
            f"point: {quantized[:5]}{' ...' if len(quantized) > 5 else ''}; surgery cannot "
            "modify them in place (a quantized weight?). Select the floating-point parameters "
            "only (a params callable, or names)")
    if not edits and layers is not None and not elsewhere:
        raise ValueError(
            f"layers={layers!r} with params={params!r} selects no parameter; "
            "use params='weights' or 'all' to include norms, biases and embeddings"
        )
    seen: dict[int, str] = {}
    for e in edits:
        for s in e.shards:
            if id(s) in seen:
                raise ValueError(f"{s.name} is selected twice ({seen[id(s)]} and {e.name}); "
                                 "name either the LoRA layer or its parameters, not both")
            seen[id(s)] = e.name
    return edits


def _lora_edit(shard: LocalShard, lora: LoraLinear, effective: str,
               shard_at: dict[tuple[int, str], LocalShard], with_factors: bool) -> Edit:
    lora.check_editable(shard.param_name)
    if shard.param_name != "weight":  # LoRA adds nothing to the base layer's bias
        return Edit(shard, effective)
    factors: tuple[LocalShard, ...] = ()
    if with_factors:  # W + BA*s -> f*W + (f*B)A*s
        factors = tuple(shard_at[place] for place in lora.factor_places())
    return Edit(shard, effective, factors, lora)


def _refuse_shared_name(spec: LayerSpec, names_by_stage: tuple[frozenset[str], ...]) -> None:
    """An exact name that several pipeline stages hold (``blocks.1`` of stages that each number
    their blocks from 0) names a different block on each: refused on every rank (the stages'
    names were exchanged when the FlexModel was built). Patterns select on every stage that
    matches, as they mean to."""
    if not isinstance(spec, str) or any(c in spec for c in "*?["):
        return
    holders = [stage for stage, names in enumerate(names_by_stage) if spec in names]
    if len(holders) > 1:
        raise ValueError(
            f"layers entry {spec!r} is held by pipeline stages {holders}: each stage names its "
            f"own blocks from 0, so the name means a different block on each. Keep the whole "
            f"model's names on every stage (docs/pipeline.md), or use ModelSurgery for global "
            f"block indices")


def _refuse_index_on_a_stage(spec: int, blocks: nn.ModuleList) -> None:
    """A block index on blocks that say they are part of a larger model (Megatron-core's
    ``layer_number`` and ``config.num_layers``: a pipeline stage or chunk, here without a
    FlexModel to tell the other stages' blocks) would mean another block on each stage:
    refused, alike on every stage (each holds only part of the blocks)."""
    numbers = [layer_number(b) for b in blocks]
    total = num_layers(blocks)
    if not numbered_as_the_whole_model(numbers, total):
        raise ValueError(
            f"layers entry {spec}: this model holds blocks {numbers} (1-based) of "
            f"{total if total is not None else 'more'}, a pipeline stage: a block index would "
            "mean another block on each stage; name the blocks as the whole model does "
            "(decoder.layers.<i>: every stage knows its blocks' whole-model names) or use "
            "ModelSurgery for global block indices")


def _expand(root: nn.Module, spec: LayerSpec, module_names: set[str],
            param_names: set[str], remote: frozenset[str] | None = None,
            ) -> tuple[list[str], bool]:
    """The local names ``spec`` selects, and whether it selects names of another pipeline
    stage (``remote``: the names only the other stages hold; ``None``: not a pipeline stage).
    A name no stage holds is an error on every stage alike: each knows every stage's names."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TypeError(f"layers entries are block indices (int) or names (str), got {spec!r}")
    if isinstance(spec, int):
        from flex_surgery.anatomy import locate

        if remote is not None:
            raise ValueError(
                f"layers entry {spec}: a block index is ambiguous on a pipeline stage (a stage "
                "holds some of the blocks, numbered from 0 or by their index in the whole "
                "model, and cannot tell which from its own modules); name the blocks instead "
                "(with stages that keep the whole model's names, as docs/pipeline.md "
                "recommends, a name means the same block on every stage and a name held by "
                "another stage is modified there), or use ModelSurgery for global block "
                "indices")
        located = locate(root)
        _refuse_index_on_a_stage(spec, located.blocks)
        return [located.block_name(spec)], False
    names = module_names | param_names
    others = remote or frozenset()
    if any(c in spec for c in "*?["):
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, spec))
        away = any(fnmatch.fnmatchcase(n, spec) for n in others)
        if not hits and not away:
            raise ValueError(f"pattern {spec!r} matches no module or parameter"
                             f"{' on any pipeline stage' if remote is not None else ''}; "
                             f"e.g. {sorted(names)[:5]}")
        return hits, away
    if spec in names:
        return [spec], False
    if spec in others:
        return [], True
    close = difflib.get_close_matches(spec, sorted(names | others), n=5)
    raise ValueError(f"no module or parameter named {spec!r}"
                     f"{' on any pipeline stage' if remote is not None else ''}; "
                     f"close matches: {close}")
