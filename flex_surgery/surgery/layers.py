"""Temporary layer surgery: delete, reorder or replace transformer blocks inside a context.

The live ``nn.ModuleList`` is never edited. Entering builds a *new* container from the chosen
blocks (the block modules themselves are shared, not copied) and installs it in the parent
module; leaving reinstalls the original container object in ``finally``. So the model after the
context is the same object graph as before -- same container, same blocks, same parameters --
whatever happened inside, and contexts nest LIFO by construction.

Block indices follow :mod:`flex_surgery.anatomy`; other ``ModuleList``\\ s can be named with
``container="..."``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from flex_surgery.naming import clean_name, join_name, unwrap_model
from flex_surgery.surgery.theater import SurgeryError

__all__ = ["LayerSurgery", "PassThrough", "delete_blocks", "permute_blocks", "replace_blocks"]


class PassThrough(nn.Module):
    """A block that returns its hidden states unchanged: the residual stream skips it.

    Decoder blocks are called with extra keyword arguments (masks, position embeddings) and
    in transformers 5 return the hidden states tensor; this accepts and ignores the extras.
    """

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden_states


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Parent module and attribute of the module with clean name ``name`` (FSDP-aware)."""
    for mname, module in root.named_modules():
        for child_name, child in module.named_children():
            full = join_name(mname, child_name)
            if clean_name(full) == name and isinstance(child, nn.ModuleList):
                return module, child_name
    raise ValueError(f"no nn.ModuleList named {name!r}")


def as_block_index(i: Any) -> Any:
    """``i`` as a Python ``int`` when it is an integer of any kind (numpy's, a 0-d torch
    tensor's: ``list(np.random.permutation(n))`` is a list of them), else ``i`` unchanged (to be
    refused). ``True``/``False`` stay as they are: a bool is not a block index."""
    if isinstance(i, bool):
        return i
    try:
        return operator.index(i)
    except TypeError:
        return i


def refuse_more_blocks(requested: int, n: int, container: str) -> None:
    """More blocks than the container holds is an error: transformers models run only the
    first ``config.num_hidden_layers`` blocks, so the extra ones would be skipped silently."""
    if requested > n:
        raise ValueError(
            f"{requested} blocks requested but {container} has {n}: transformers models run "
            "only the first config.num_hidden_layers blocks, so extra ones would be skipped "
            "silently")


class LayerSurgery:
    """Context manager: run the model with a different list of blocks, then put the old back.

    Args:
        model: the model (wrappers are looked through like in :class:`SurgicalTheater`).
        order: the new sequence of block indices, e.g. ``[0, 2, 1, 3]`` (permute) or
            ``[0, 1, 3]`` (delete block 2); repeats are allowed (``[0, 0, 1]`` runs block 0
            twice) but not more blocks than the container has.
        replace: ``{index: module}`` substitutions applied after ``order`` is taken from the
            original indices (``{2: PassThrough()}`` skips block 2 but keeps the count).
        container: name of the ``ModuleList`` to operate on; default: the architecture's
            blocks via :mod:`flex_surgery.anatomy`.
    """

    def __init__(self, model: nn.Module, order: Sequence[int] | None = None,
                 replace: Mapping[int, nn.Module] | None = None,
                 container: str | None = None, *, _stage_local: bool = False) -> None:
        if not _stage_local:  # ModelSurgery passes this stage's own positions
            _refuse_pipeline_stage(model)
        self.root = unwrap_model(model)
        if container is None:
            from flex_surgery.anatomy import locate

            container = locate(self.root).name("blocks")
        self.container = container
        self.order = [as_block_index(i) for i in order] if order is not None else None
        self.replace = {as_block_index(i): m for i, m in (replace or {}).items()}
        self._parent: nn.Module | None = None
        self._original: nn.ModuleList | None = None
        self._installed: nn.ModuleList | None = None

    def __enter__(self) -> nn.ModuleList:
        if self._installed is not None:
            raise SurgeryError("this LayerSurgery is already active")
        parent, attr = _parent_and_attr(self.root, self.container)
        original = getattr(parent, attr)
        n = len(original)
        order = list(range(n)) if self.order is None else self.order
        for i in [*order, *self.replace]:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise IndexError(f"{self.container} has {n} blocks (0..{n - 1}); got {i!r}")
        refuse_more_blocks(len(order), n, self.container)
        replace = {i % n: m for i, m in self.replace.items()}
        blocks = [replace.get(i % n, original[i % n]) for i in order]
        new = nn.ModuleList(blocks)
        # What ``new`` stands in for, kept off the module tree (not a submodule): an exit out
        # of order follows these links down to the model's own container.
        object.__setattr__(new, _REPLACED, original)
        setattr(parent, attr, new)
        self._parent, self._attr, self._original, self._installed = parent, attr, original, new
        return new

    def __exit__(self, *exc: Any) -> bool:
        if self._installed is None:
            raise SurgeryError("exit of a LayerSurgery that is not active")
        original = self._original
        try:
            current = getattr(self._parent, self._attr)
            if current is not self._installed:
                # Out of order: our original may be another surgery's list; the model's own
                # container is at the end of the chain of what each list stood in for.
                while _REPLACED in vars(original):
                    original = vars(original)[_REPLACED]
                raise SurgeryError(
                    f"{self.container} was replaced while this LayerSurgery was active (a "
                    "nested surgery exited out of order?); the original was reinstalled"
                )
        finally:
            setattr(self._parent, self._attr, original)
            self._installed = None
        return False


_REPLACED = "_flex_surgery_replaced"


def _refuse_pipeline_stage(model: nn.Module) -> None:
    """Block indices of a pipeline stage (a model a FlexModel over pipeline stages wraps, or
    whose blocks say they belong to a pipeline) are positions in this stage's own list: ``[1]``
    would take block 1 out of every stage. Every rank raises alike (the pipeline size is the
    same on every rank)."""
    from flex_surgery.anatomy import locate, pipeline_flexmodel
    from flex_surgery.naming import stage_of_a_pipeline

    try:  # a bare stage whose blocks say they are part of a pipeline (Megatron-core's config)
        bare_stage = stage_of_a_pipeline(locate(unwrap_model(model)).blocks)
    except Exception:  # noqa: BLE001 - no known blocks: the usual errors come later
        bare_stage = False
    if pipeline_flexmodel(model) is not None or bare_stage:
        raise SurgeryError(
            "layer surgery by block index on a pipeline stage would apply the same positions "
            "on every stage (each holds some of the blocks); use "
            "flex_surgery.ModelSurgery(model) -- global block indices, each stage applying its "
            "part -- on every rank")


def delete_blocks(model: nn.Module, indices: Sequence[int], **kw: Any) -> LayerSurgery:
    """Run without the blocks at ``indices`` (the remaining ones keep their order)."""
    from flex_surgery.anatomy import locate

    _refuse_pipeline_stage(model)
    root = unwrap_model(model)
    container = kw.pop("container", None) or locate(root).name("blocks")
    n = len(getattr(*_parent_and_attr(root, container)))
    indices = [as_block_index(i) for i in indices]
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"{container} has {n} blocks (0..{n - 1}); got {i!r}")
    drop = {i % n for i in indices}
    return LayerSurgery(model, [i for i in range(n) if i not in drop], container=container, **kw)


def permute_blocks(model: nn.Module, order: Sequence[int], **kw: Any) -> LayerSurgery:
    """Run the blocks in ``order`` (any sequence of indices; repeats allowed)."""
    return LayerSurgery(model, order=order, **kw)


def replace_blocks(model: nn.Module, replacements: Mapping[int, nn.Module],
                   **kw: Any) -> LayerSurgery:
    """Run with ``replacements[i]`` in place of block ``i``."""
    return LayerSurgery(model, replace=replacements, **kw)
