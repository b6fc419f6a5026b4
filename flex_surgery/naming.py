"""One spelling of module and parameter names, whatever wrappers the model is in.

Two kinds of wrapper change the names PyTorch reports, and users name things as in the
unwrapped model, so every part of flex_surgery (hooks, surgery, export, the anatomy table, the
hook map) compares names through this module and spells no wrapper itself:

* wrappers *inside* the tree -- FSDP1 units, activation checkpointing and ``torch.compile`` --
  insert path components (:data:`WRAPPER_ATTRS`) into ``named_modules()`` /
  ``named_parameters()``; :func:`clean_name` removes them;
* wrappers *around* the model -- DDP and FlexModel -- put ``module.`` in front of every name;
  :func:`unwrap_model` peels them.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["WRAPPER_ATTRS", "StageBlockNames", "StageNamesError", "class_name", "clean_name",
           "join_name",
           "layer_number", "modules_by_clean_name", "num_layers", "numbered_as_the_whole_model",
           "stage_of_a_pipeline", "unwrap_model"]

#: The attribute under which FSDP1, activation checkpointing and ``torch.compile`` keep the
#: module they wrap: a path component that :func:`clean_name` removes.
WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

_WRAPPER_TOKENS = tuple(f"{attr}." for attr in WRAPPER_ATTRS)


def clean_name(name: str) -> str:
    """The module/parameter name with FSDP1, activation-checkpoint and compile wrappers removed."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    for leaf in WRAPPER_ATTRS:
        if name == leaf:
            return ""
        if name.endswith("." + leaf):
            name = name[: -len(leaf) - 1]
    return name


def class_name(module: nn.Module) -> str:
    """The name of ``module``'s class as written. FSDP2's ``fully_shard`` swaps in a subclass
    named ``FSDP<Class>`` (bases ``FSDPModule`` and the class), so tables keyed by class name
    (the anatomy table, the hook map) would not know a sharded model."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and any(
            b.__name__ == "FSDPModule" for b in cls.__mro__[1:]):
        cls = next((b for b in cls.__bases__ if not b.__name__.startswith("FSDP")), cls)
    return cls.__name__


def join_name(*parts: str) -> str:
    """Dotted name of the non-empty ``parts`` (the root module's name is ``""``)."""
    return ".".join(p for p in parts if p)


def layer_number(block: nn.Module) -> int | None:
    """The 1-based index of ``block`` in the whole model where the block keeps one itself
    (Megatron-core's ``TransformerLayer.layer_number``), else ``None``."""
    number = getattr(block, "layer_number", None)
    if type(block).__module__.startswith("megatron.") and isinstance(number, int):
        return number
    return None


def num_layers(blocks: Iterable[nn.Module]) -> int | None:
    """How many blocks the whole model has, where a block that keeps its
    :func:`layer_number` says it too (Megatron-core's ``config.num_layers``), else ``None``."""
    return next((getattr(getattr(b, "config", None), "num_layers", None) for b in blocks
                 if layer_number(b) is not None), None)


def numbered_as_the_whole_model(numbers: list[int | None], total: int | None) -> bool:
    """Whether blocks whose :func:`layer_number` are ``numbers`` (in order) are the whole
    model's blocks, ``1..total`` (``total`` unknown: as many as there are); ``True`` when a
    block does not say its number (nothing to check)."""
    if not numbers or any(n is None for n in numbers):
        return True
    return numbers == list(range(1, (total or len(numbers)) + 1))


class StageNamesError(ValueError):
    """The whole-model names of a pipeline stage's blocks cannot be told (layer surgery is
    reordering them, or a block that does not say its place stands among them)."""


def stage_of_a_pipeline(blocks: Iterable[nn.Module]) -> bool:
    """Whether ``blocks`` say they are part of a pipeline-parallel model (Megatron-core's
    ``config.pipeline_model_parallel_size`` or a virtual pipeline), so their positions here are
    not their places in the whole model."""
    for block in blocks:
        if layer_number(block) is None:
            continue
        config = getattr(block, "config", None)
        pp = getattr(config, "pipeline_model_parallel_size", 1) or 1
        vp = getattr(config, "virtual_pipeline_model_parallel_size", None) or 1
        return pp * vp > 1
    return False


_LAYER_SURGERY = "_flex_surgery_replaced"  # set by surgery.layers.LayerSurgery on its lists


class StageBlockNames:
    """Whole-model names for the blocks of a pipeline stage that numbers them from 0.

    A Megatron-core pipeline stage (or virtual-pipeline chunk) holds global blocks 2 and 3 as
    ``decoder.layers.0`` and ``.1``; each block says its global place (:func:`layer_number`).
    Users name modules as in the whole model, so every name table of flex_surgery spells a
    block's modules and parameters with the global index (``decoder.layers.2.mlp``); what is
    looked up then is the module that stage really holds. A model that is not split into
    pipeline stages keeps torch's (positional) names, whatever its blocks say.

    Raises :class:`StageNamesError` for a stage whose blocks' whole-model names cannot be told:
    while layer surgery has reordered, removed or replaced them (in the whole model the names of
    every later block would move; other stages cannot see that), or when a block that does not
    keep a ``layer_number`` stands among them.
    """

    def __init__(self, root: nn.Module | Iterable[tuple[str, nn.Module]]) -> None:
        """``root``: the model, or its ``named_modules()`` already walked."""
        self._renames: dict[str, str] = {}
        self._depths: set[int] = set()
        walked = root.named_modules() if isinstance(root, nn.Module) else root
        for name, module in walked:
            if not isinstance(module, nn.ModuleList) or not stage_of_a_pipeline(module):
                continue
            container = clean_name(name)
            numbers = [layer_number(block) for block in module]
            first = min((n for n in numbers if n is not None), default=1)
            if _LAYER_SURGERY in vars(module):
                why = "are under layer surgery (reordered, removed or replaced)"
            elif numbers != list(range(first, first + len(numbers))):
                why = f"are not consecutive blocks of the whole model (layer_number {numbers})"
            else:
                why = None
            if why is not None:
                raise StageNamesError(
                    f"the blocks of {container!r} on this pipeline stage {why}, so their "
                    "whole-model names cannot be told; name modules (hooks, surgery, export) "
                    "outside of layer surgery, or use ModelSurgery's global block indices")
            for local in range(len(numbers)):
                if first - 1:
                    self._renames[join_name(container, str(local))] = \
                        join_name(container, str(first - 1 + local))
            self._depths.add(len(container.split(".")) + 1 if container else 1)

    def __bool__(self) -> bool:
        return bool(self._renames)

    def __call__(self, name: str) -> str:
        """``name`` (clean, stage-local) as the whole model spells it."""
        if not self._renames:
            return name
        parts = name.split(".")
        for depth in self._depths:
            head = ".".join(parts[:depth])
            if len(parts) >= depth and head in self._renames:
                return ".".join([self._renames[head], *parts[depth:]])
        return name


def modules_by_clean_name(root: nn.Module, *, outermost: bool = False) -> dict[str, nn.Module]:
    """Every module of ``root`` by clean name, in model order (a pipeline stage's blocks by
    their whole-model names, :class:`StageBlockNames`).

    A wrapper and the module it wraps share a clean name: ``outermost=False`` (what hooks use)
    gives the wrapped module, where activations are seen as written; ``outermost=True`` gives
    the wrapper, which owns the module's place in its parent. A module shared under two names
    is found under both.
    """
    table: dict[str, nn.Module] = {}
    walked = list(root.named_modules(remove_duplicate=False))
    whole = StageBlockNames(walked)
    for name, module in walked:
        if outermost:
            table.setdefault(whole(clean_name(name)), module)
        else:
            table[whole(clean_name(name))] = module  # named_modules lists a wrapper first
    return table


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel wrappers that add a name prefix (DDP's ``module.``, FlexModel's ``module.``), so
    that parameter names -- and with them seeded noise -- are the same with or without them."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "FlexModel" and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
