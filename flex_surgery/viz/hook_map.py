"""The hook map: a model's module tree with what can be hooked, what is hooked, and the sharding.

:func:`hook_map` reads a plain ``nn.Module`` or a :class:`~flex_surgery.hooks.FlexModel` (then
its registered hooks, their kinds and groups, and its parallel mesh are shown too) and returns a
:class:`HookMap`, which renders as

* a compact terminal tree (:meth:`HookMap.text`): repeated identical blocks collapse into one
  line (``layers.0..29 x30``), so a 30-block model fits on a screen;
* a standalone HTML page (:meth:`HookMap.html`): inline CSS, inline SVG pictures of how each
  sharded weight is split and which piece this rank holds, no scripts and no network.

Sharding is read from where the model keeps it, through
:func:`~flex_surgery.surgery.shards.local_shards` (the same per-parameter view surgery edits):
DTensor placements (DTensor TP, HF TP plans, FSDP2), fairscale's and Megatron-core's partition
dims, FSDP1 flat shards -- each answered by its framework's module in
:mod:`flex_surgery.parallel.frameworks`; wrappers (FSDP1 units, FSDP2 modules, DDP, activation
checkpointing) are shown on the module they wrap. The map describes *this rank*: under pipeline
parallelism a rank holds only its stage's modules, and the header says which stage that is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from flex_surgery.hooks import FlexModel
from flex_surgery.naming import (
    WRAPPER_ATTRS,
    StageBlockNames,
    class_name,
    clean_name,
    join_name,
)
from flex_surgery.parallel import frameworks
from flex_surgery.surgery.shards import LocalShard, local_shards

__all__ = ["HookInfo", "HookMap", "ModuleNode", "ParamInfo", "hook_map"]

MODULE_HOOK_KINDS = ("forward", "forward_pre", "full_backward", "full_backward_pre")
_SHORT_KIND = {"forward": "fwd", "forward_pre": "pre", "full_backward": "bwd",
               "full_backward_pre": "bwd_pre", "tensor": "grad"}


@dataclass(frozen=True)
class HookInfo:
    """One registered FlexModel hook: its kind, groups (besides ``"all"``) and what it does."""

    kind: str
    groups: tuple[str, ...]
    edits: bool
    key: str | None = None
    parameter: str | None = None  # leaf name, for gradient hooks on a parameter

    def label(self) -> str:
        what = "edit" if self.edits else "read"
        on = f".{self.parameter}" if self.parameter else ""
        groups = ",".join(self.groups) if self.groups else "all"
        return f"{_SHORT_KIND[self.kind]}{on}:{what}[{groups}]"


@dataclass(frozen=True)
class ParamInfo:
    """How one parameter is stored on this rank."""

    name: str
    full_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    scheme: str  # the framework: "plain", "dtensor", "fairscale", "megatron", "fsdp1"
    placement: str  # e.g. "tp:Shard(0)", "fsdp1 flat", "" when whole
    shard_dim: int | None = None  # the dim split over ranks, if one is
    shard_index: int = 0
    num_shards: int = 1

    @property
    def sharded(self) -> bool:
        return self.full_shape != self.local_shape or self.scheme == "fsdp1"

    def label(self) -> str:
        full = "x".join(map(str, self.full_shape)) or "scalar"
        if not self.sharded:
            return f"{self.name} {full}"
        local = "x".join(map(str, self.local_shape)) or "scalar"
        return f"{self.name} {full} {self.placement}->{local}"


@dataclass
class ModuleNode:
    """One module of the tree (wrappers folded into the module they wrap)."""

    name: str
    leaf: str
    type_name: str
    params: list[ParamInfo] = field(default_factory=list)
    hooks: list[HookInfo] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)
    integer_input: bool = False
    children: list[ModuleNode] = field(default_factory=list)

    @property
    def hookable(self) -> tuple[str, ...]:
        """Hook kinds that apply: every module hook, except a backward hook on a module whose
        inputs are integer ids (an embedding has no input gradient); ``tensor`` if the module
        owns parameters."""
        kinds = [k for k in MODULE_HOOK_KINDS
                 if not (k == "full_backward" and self.integer_input)]
        if self.params:
            kinds.append("tensor")
        return tuple(kinds)

    def signature(self) -> tuple:
        """Everything shown for this subtree except its own name: equal signatures collapse."""
        return (self.type_name, tuple(self.params), tuple((h.kind, h.groups, h.edits,
                                                          h.parameter) for h in self.hooks),
                tuple(self.wrappers), self.integer_input,
                tuple((c.leaf, c.signature()) for c in self.children))

    def walk(self) -> Iterator[ModuleNode]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class HookMap:
    """The tree plus a few header lines (mesh, rank, counts); render with text() or html()."""

    root: ModuleNode
    title: str
    header: list[str]

    @property
    def hooks(self) -> list[tuple[str, HookInfo]]:
        return [(n.name, h) for n in self.root.walk() for h in n.hooks]

    def text(self, collapse: bool = True, max_depth: int | None = None) -> str:
        """The terminal tree. ``collapse`` merges runs of identical numbered siblings."""
        lines = [self.title, *self.header, _LEGEND]
        lines.append(_node_line(self.root, "", ""))
        _text_children(self.root, "", lines, collapse, max_depth, depth=1)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def html(self, collapse: bool = True) -> str:
        """A standalone HTML page of the same tree (inline CSS and SVG, nothing fetched)."""
        from flex_surgery.viz.html import render_html

        return render_html(self, collapse=collapse)

    def save_html(self, path: str | Path, collapse: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(collapse=collapse), encoding="utf-8")
        return path


_LEGEND = ("hookable: every module fwd, pre, bwd_pre, and bwd unless marked no-bwd; "
           "parameters grad\n"
           "shown: 'param full placement->local' for this rank's shards, "
           "'<= kind:read|edit[groups]' for FlexModel hooks")


# -- building the tree ---------------------------------------------------------------------------
def hook_map(model: nn.Module, title: str | None = None) -> HookMap:
    """The hook map of ``model`` (a plain module or a FlexModel) on this rank."""
    flex = _as_flex_model(model)
    root_module = flex.module if flex is not None else model
    shards_by_module = _shards_by_module(root_module)
    root = _build(root_module, "", "", shards_by_module)
    whole = StageBlockNames(root_module)  # a pipeline stage's blocks by whole-model names
    by_name = {}
    for node in root.walk():
        node.name = whole(node.name)
        by_name[node.name] = node
    if flex is not None:
        for hf, groups in flex.get_hook_function_groups().items():
            if not hf.is_remote:  # a module of another pipeline stage: drawn on its map
                _attach_hook(by_name, hf, groups)
    title = title or f"hook map of {class_name(root_module)}"
    return HookMap(root, title, _header(root, flex, root_module))


def _as_flex_model(model: nn.Module) -> FlexModel | None:
    return model if isinstance(model, FlexModel) else None


def _shards_by_module(root: nn.Module) -> dict[int, list[LocalShard]]:
    table: dict[int, list[LocalShard]] = {}
    for shard in local_shards(root):
        table.setdefault(id(shard.module), []).append(shard)
    return table


def _build(module: nn.Module, name: str, leaf: str,
           shards: dict[int, list[LocalShard]]) -> ModuleNode:
    wrappers = []
    while True:  # fold wrappers into the module they wrap
        kind = _wrapper_kind(module)
        inner = next((getattr(module, c) for c in WRAPPER_ATTRS
                      if isinstance(getattr(module, c, None), nn.Module)), None)
        if kind:
            wrappers.append(kind)
        if inner is None:
            break
        module = inner
    node = ModuleNode(name=name, leaf=leaf, type_name=class_name(module),
                      wrappers=wrappers, integer_input=_takes_integer_ids(module))
    node.params = [_param_info(s) for s in shards.get(id(module), [])]
    for child_leaf, child in module.named_children():
        if child_leaf in WRAPPER_ATTRS:
            continue
        child_name = clean_name(join_name(name, child_leaf))
        node.children.append(_build(child, child_name, child_leaf, shards))
    return node


def _wrapper_kind(module: nn.Module) -> str | None:
    kind = frameworks.wrapper_kind(module)  # DDP, FSDP1 unit, FSDP2
    if kind is not None:
        return kind
    if type(module).__name__ == "CheckpointWrapper":
        return "checkpoint"
    if type(module).__name__ == "OptimizedModule":
        return "compiled"
    return None


def _takes_integer_ids(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return True
    return type(module).__name__ in ("VocabParallelEmbedding", "ParallelEmbedding")


def _param_info(shard: LocalShard) -> ParamInfo:
    full = tuple(shard.full_shape)
    local = tuple(shard.local.shape)
    if shard.kind == "fsdp1":
        start, stop = shard.region.start, shard.region.stop
        where = f"flat[{start}:{stop}]" if stop > start else "flat, none here"
        return ParamInfo(shard.param_name, full, local, "fsdp1", f"fsdp1 {where}")
    if shard.kind == "dtensor":
        param = shard.owners[0]
        names = param.device_mesh.mesh_dim_names or tuple(
            f"mesh{i}" for i in range(param.device_mesh.ndim))
        parts = [f"{n}:{_placement_str(p)}" for n, p in zip(names, param.placements)
                 if not p.is_replicate()]
        shard_dim, index, count = None, 0, 1
        for i, p in enumerate(param.placements):
            if p.is_shard():
                shard_dim = p.dim
                index = param.device_mesh.get_local_rank(i)
                count = param.device_mesh.size(i)
        return ParamInfo(shard.param_name, full, local, "dtensor", " ".join(parts) or
                         "replicated", shard_dim, index, count)
    if shard.partition_dim is not None and full != local:  # fairscale, Megatron: one dim
        d = shard.partition_dim
        count = full[d] // max(local[d], 1)
        index = shard.region.offsets[d] // max(local[d], 1)
        return ParamInfo(shard.param_name, full, local, shard.kind, f"tp:Shard({d})", d,
                         index, count)
    return ParamInfo(shard.param_name, full, local, shard.kind, "")


def _placement_str(p: Any) -> str:
    if type(p).__name__ == "Shard":  # str() abbreviates to "S(0)" in recent torch
        return f"Shard({p.dim})"
    if p.is_partial():
        return "Partial"
    return str(p)


def _attach_hook(by_name: dict[str, ModuleNode], hf: Any, groups: set[str]) -> None:
    name = clean_name(hf.module_name)
    parameter = None
    if hf.hook_type == "tensor":
        name, _, parameter = name.rpartition(".")
    node = by_name.get(name)
    if node is None:  # registered on a name the tree folds (should not happen): keep it visible
        node = by_name[""]
    node.hooks.append(HookInfo(hf.hook_type, tuple(sorted(g for g in groups if g != "all")),
                               hf.editing_function is not None, hf.output_key, parameter))


def _header(root: ModuleNode, flex: Any, module: nn.Module) -> list[str]:
    lines = []
    mesh = getattr(getattr(flex, "runtime", None), "mesh", None)
    if mesh is not None:
        sizes = " ".join(f"{a}={mesh.size(a)}" for a in ("dp", "tp", "pp"))
        coords = " ".join(f"{a}={mesh.rank(a)}" for a in ("dp", "tp", "pp"))
        stage = f", pipeline stage {mesh.stage} of {mesh.pp_size}" if mesh.pp_size > 1 else ""
        lines.append(f"mesh: {sizes} (from {mesh.source}); this rank: {coords}{stage}")
    elif dist.is_available() and dist.is_initialized():
        lines.append(f"rank {dist.get_rank()} of {dist.get_world_size()}")
    tp_plan = getattr(module, "_tp_plan", None) or getattr(module, "tp_plan", None)
    if dist.is_available() and dist.is_initialized() and tp_plan:
        lines.append(f"HF tensor-parallel plan with {len(tp_plan)} rules")
    nodes = list(root.walk())
    params = [p for n in nodes for p in n.params]
    sharded = sum(p.sharded for p in params)
    n_hooks = sum(len(n.hooks) for n in nodes)
    groups = sorted({g for n in nodes for h in n.hooks for g in h.groups})
    line = f"{len(nodes)} modules, {len(params)} parameters ({sharded} sharded on this rank)"
    if flex is not None:
        line += f", {n_hooks} FlexModel hooks, groups: {', '.join(['all', *groups])}"
    lines.append(line)
    return lines


# -- text rendering ------------------------------------------------------------------------------
def collapsed_children(node: ModuleNode, collapse: bool = True
                       ) -> list[tuple[ModuleNode, str, int]]:
    """Children as ``(representative, label, count)``; runs of numbered siblings with equal
    signatures become one entry labelled ``first..last``."""
    out: list[tuple[ModuleNode, str, int]] = []
    children = node.children
    i = 0
    while i < len(children):
        child = children[i]
        j = i + 1
        if collapse and child.leaf.isdigit():
            sig = child.signature()
            while (j < len(children) and children[j].leaf.isdigit()
                   and int(children[j].leaf) == int(children[j - 1].leaf) + 1
                   and children[j].signature() == sig):
                j += 1
        count = j - i
        label = child.leaf if count == 1 else f"{child.leaf}..{children[j - 1].leaf}"
        out.append((child, label, count))
        i = j
    return out


def _node_line(node: ModuleNode, label: str, prefix: str, count: int = 1) -> str:
    parts = [f"{prefix}{label}"] if label else []
    if count > 1:
        parts.append(f"x{count}")
    parts.append(node.type_name)
    if node.wrappers:
        parts.append("<" + ",".join(node.wrappers) + ">")
    if node.integer_input:
        parts.append("no-bwd")
    parts.extend(f"| {p.label()}" for p in node.params if p.sharded)
    if node.hooks:
        parts.append("<= " + " ".join(h.label() for h in node.hooks))
    return " ".join(parts)


def _text_children(node: ModuleNode, indent: str, lines: list[str], collapse: bool,
                   max_depth: int | None, depth: int) -> None:
    entries = collapsed_children(node, collapse)
    for k, (child, label, count) in enumerate(entries):
        last = k == len(entries) - 1
        lines.append(_node_line(child, label, indent + ("`- " if last else "|- "), count))
        if max_depth is not None and depth >= max_depth:
            continue
        _text_children(child, indent + ("   " if last else "|  "), lines, collapse,
                       max_depth, depth + 1)
