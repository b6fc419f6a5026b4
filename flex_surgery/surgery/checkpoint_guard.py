"""``state_dict()`` inside a theater returns the original weights, and never touches the live ones.

A checkpoint written during validation must hold the trained weights, not the modified ones.
The guard is a set of ``state_dict`` *post*-hooks that replace, in the dictionary being
returned, every entry that holds modified values by a new tensor holding the originals (built
from the theater's snapshots). The live parameters are never written, so there is nothing to
undo: a ``state_dict()`` that raises anywhere (a user's checkpoint hook, FSDP, a full disk
during ``torch.save``) leaves the model exactly as the theater left it, and the next call is
guarded the same way. All state lives in the hooks' closures, i.e. on the theater that
installed them.

Which entries hold modified values:

- plain, DDP, fairscale / Megatron TP, DTensor (FSDP2, DTensor TP, FSDP2 x TP), FSDP1 with
  ``use_orig_params=True`` when a module inside a unit is asked directly: the entry *aliases*
  a modified local view (same storage, same offset). It is replaced by a copy of the value with
  the snapshot written over this rank's elements -- a DTensor stays a DTensor with the same
  placements. These hooks sit on the modules that own modified parameters.
- FSDP1 ``FULL_STATE_DICT`` (FSDP1's default) and ``SHARDED_STATE_DICT``: FSDP gathers the
  flat parameter and returns clones (or chunks) of the full, modified parameters. A hook on the
  FSDP unit, registered after FSDP's own post-hook and so running after it, gathers the
  *original* flat parameter (a copy of this rank's local shard with the snapshots written in;
  one all-gather per unit and call, on every rank, like FSDP's own) and replaces the unit's
  modified entries with their originals, cut as FSDP cuts them for ``SHARDED_STATE_DICT``.
  ``LOCAL_STATE_DICT`` inside a theater raises
  :class:`~flex_surgery.surgery.guard.SurgeryError`.

Nested theaters: every theater installs its own hooks, outermost first, and hooks run in the
order they were registered; the outermost theater's snapshot holds the true original, so it
replaces an entry first and marks the new tensor; inner theaters skip marked entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from flex_surgery.surgery.shards import LocalShard, fsdp1_param_offsets
from flex_surgery.surgery.snapshot import Snapshot

__all__ = ["ORIGINAL_MARK", "install_checkpoint_guard", "state_dict_is_guarded"]

# Attribute set on every tensor the guard puts into a state_dict (as FSDP marks its clones with
# ``_has_been_cloned``): an inner theater must not replace what an outer one already restored.
ORIGINAL_MARK = "_surgery_original"


def install_checkpoint_guard(
    modules: Sequence[nn.Module], targets: Sequence[LocalShard], snapshots: Sequence[Snapshot],
    error: type[Exception],
) -> list[RemovableHandle]:
    """Register the post-hooks on ``modules`` (every module of the model, outermost first) for
    the modified ``targets`` and their ``snapshots``; returns the handles to remove on exit.

    ``error`` is the exception raised for state_dict types the guard cannot serve.
    """
    handles: list[RemovableHandle] = []
    by_owner: dict[int, Snapshot] = {}
    for shard, snap in zip(targets, snapshots):
        for owner in shard.owners:
            if type(owner).__name__ != "FlatParameter":  # FSDP1 units are handled below
                by_owner.setdefault(id(owner), snap)
    fsdp1 = [(s, snap) for s, snap in zip(targets, snapshots) if s.kind == "fsdp1"]
    try:
        for module in modules:
            own = [(pname, by_owner[id(p)]) for pname, p in module._parameters.items()
                   if p is not None and id(p) in by_owner]
            if own:
                handles.append(module.register_state_dict_post_hook(
                    _marked(_aliasing_hook(own))))
            unit = _fsdp1_unit_targets(module, fsdp1)
            if unit:
                handles.append(module.register_state_dict_post_hook(
                    _marked(_fsdp1_unit_hook(module, unit, error))))
    except BaseException:
        for h in handles:  # a registration that fails part-way leaves no hook bound
            h.remove()
        raise
    return handles


def _mark(t: torch.Tensor) -> torch.Tensor:
    setattr(t, ORIGINAL_MARK, True)
    return t


def _is_marked(t: Any) -> bool:
    return getattr(t, ORIGINAL_MARK, False)


def _aliases(t: torch.Tensor, local: torch.Tensor) -> bool:
    """``t`` starts where ``local`` does in the same storage: ``local`` may be ``t`` without
    its padding (FSDP2 local shards), or the same elements in another shape (FSDP1 with
    ``NO_SHARD`` and ``use_orig_params``: the parameter is a view of the flat parameter in its
    own shape, the theater's shard a flat slice of it)."""
    if t.untyped_storage().data_ptr() != local.untyped_storage().data_ptr() or \
            t.storage_offset() != local.storage_offset():
        return False
    return t.dim() == local.dim() or _same_elements_reshaped(t, local)


def _same_elements_reshaped(t: torch.Tensor, local: torch.Tensor) -> bool:
    return t.numel() == local.numel() and t.is_contiguous() and local.is_contiguous()


def _with_originals(value: torch.Tensor, snap: Snapshot) -> torch.Tensor:
    """A new tensor like the state_dict entry ``value`` whose elements aliasing ``snap.local``
    hold the snapshot instead (a Parameter stays a Parameter, a DTensor a DTensor)."""
    base = value.detach()
    local = getattr(base, "_local_tensor", base)
    if local is base and local.shape == snap.local.shape:
        new = snap.backup.to(local.device, copy=True)
    elif local is base and local.dim() != snap.local.dim() and \
            _same_elements_reshaped(local, snap.local):
        new = snap.backup.to(local.device, copy=True).reshape(local.shape)
    else:
        new = base.clone()
        new_local = getattr(new, "_local_tensor", new)
        new_local[tuple(slice(0, s) for s in snap.local.shape)].copy_(snap.backup)
    if isinstance(value, nn.Parameter):
        new = nn.Parameter(new, requires_grad=value.requires_grad)
    return _mark(new)


_GUARD_HOOK = "_flex_surgery_checkpoint_guard"


def _marked(hook: Callable[..., None]) -> Callable[..., None]:
    setattr(hook, _GUARD_HOOK, True)
    return hook


def state_dict_is_guarded(model: nn.Module) -> bool:
    """Whether a theater's checkpoint guard is on ``model``: its ``state_dict()`` then gives
    the original weights, not the live (modified) ones. The same on every rank (theaters are
    entered on every rank)."""
    return any(getattr(hook, _GUARD_HOOK, False) for m in model.modules()
               for hook in m._state_dict_hooks.values())


def _aliasing_hook(own: list[tuple[str, Snapshot]]) -> Callable[..., None]:
    def post(module: nn.Module, state_dict: dict[str, Any], prefix: str,
             local_metadata: Any) -> None:
        for pname, snap in own:
            key = prefix + pname
            value = state_dict.get(key)
            if not isinstance(value, torch.Tensor) or _is_marked(value):
                continue
            local = getattr(value, "_local_tensor", value)
            if _aliases(local, snap.local):
                state_dict[key] = _with_originals(value, snap)

    return post


def _fsdp1_unit_targets(module: nn.Module,
                        fsdp1: list[tuple[LocalShard, Snapshot]]) -> list[tuple[int, Snapshot]]:
    """``[(index in the unit's FlatParameter, snapshot)]`` of the modified parameters that the
    FSDP1 unit ``module`` owns (empty for any other module)."""
    if not fsdp1 or type(module).__name__ != "FullyShardedDataParallel":
        return []
    handle = getattr(module, "_handle", None)
    if handle is None:
        return []
    fp = handle.flat_param
    index = {(id(pi.module), pi.param_name): i for i, pi in enumerate(fp._param_infos)}
    out = []
    for shard, snap in fsdp1:
        i = index.get((id(shard.module), shard.param_name))
        if i is not None and any(o is fp for o in shard.owners):
            out.append((i, snap))
    return out


def _original_flat(unit: nn.Module, items: list[tuple[int, Snapshot]]) -> torch.Tensor:
    """The unit's unsharded (padded) flat parameter with original values: a copy of this rank's
    local shard with the snapshots written in, all-gathered over the unit's group."""
    handle = unit._handle
    fp = handle.flat_param
    sharded = handle.uses_sharded_strategy
    local_flat = getattr(fp, "_local_shard", fp.data) if sharded else fp.data
    orig = local_flat.detach().clone()
    for _, snap in items:
        n = snap.local.numel()
        if n:
            start = snap.local.storage_offset() - local_flat.storage_offset()
            orig[start: start + n].copy_(snap.backup.reshape(-1))
    if not sharded:
        return orig
    group = unit.process_group
    out = torch.empty(orig.numel() * dist.get_world_size(group), dtype=orig.dtype,
                      device=orig.device)
    dist.all_gather_into_tensor(out, orig, group=group)
    return out


def _fsdp1_unit_hook(unit: nn.Module, items: list[tuple[int, Snapshot]],
                     error: type[Exception]) -> Callable[..., None]:
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp._state_dict_utils import _param_name_infos

    modified = {i for i, _ in items}

    def post(module: nn.Module, state_dict: dict[str, Any], prefix: str,
             local_metadata: Any) -> None:
        kind = getattr(unit, "_state_dict_type", StateDictType.FULL_STATE_DICT)
        if kind not in (StateDictType.FULL_STATE_DICT, StateDictType.SHARDED_STATE_DICT):
            # Same on every rank; LOCAL_STATE_DICT opens no FSDP context, so raising is clean.
            raise error(
                f"state_dict() inside an active SurgicalTheater supports FSDP1's "
                f"FULL_STATE_DICT and SHARDED_STATE_DICT, not {kind.name}: the checkpoint would "
                "hold modified weights. Write it after the theater exits."
            )
        fp = unit._handle.flat_param
        full = _original_flat(unit, items)  # a collective: every rank, whatever it returns
        offsets = fsdp1_param_offsets(fp)
        infos = fp._param_infos
        prim = {(id(pi.module), pi.param_name): i for i, pi in enumerate(infos)}
        indices = list(range(len(infos))) + [
            prim[(id(spi.prim_module), spi.prim_param_name)] for spi in fp._shared_param_infos]
        for (fqn, _, _), i in zip(_param_name_infos(unit, unit), indices):
            key = prefix + fqn
            value = state_dict.get(key)
            if i not in modified or value is None or _is_marked(value):
                continue
            original = full[offsets[i]: offsets[i] + fp._numels[i]].view(fp._shapes[i])
            if kind == StateDictType.SHARDED_STATE_DICT:
                state_dict[key] = _mark(_fsdp1_chunk(unit, original))
                continue
            if value.dtype != original.dtype or value.shape != original.shape:
                raise error(f"state_dict entry {key} is {value.dtype} {tuple(value.shape)}, "
                            f"the parameter {original.dtype} {tuple(original.shape)}: FSDP1 "
                            "mixed precision is not supported inside a SurgicalTheater")
            state_dict[key] = _mark(original.to(value.device, copy=True))

    return post


def _fsdp1_chunk(unit: nn.Module, full: torch.Tensor) -> Any:
    """``full`` cut the way FSDP1's SHARDED_STATE_DICT cuts a parameter (its own function, with
    its own arguments; no communication)."""
    from torch.distributed.fsdp._fsdp_extensions import _ext_chunk_dtensor, _ext_chunk_tensor

    config = unit._state_dict_config
    if not config._use_dtensor:
        out = _ext_chunk_tensor(
            tensor=full, rank=unit.rank, world_size=unit.world_size,
            num_devices_per_node=unit._device_handle.device_count(), pg=unit.process_group,
            fsdp_extension=unit._fsdp_extension,
        )
    else:
        out = _ext_chunk_dtensor(tensor=full, rank=unit.rank, device_mesh=unit._device_mesh,
                                 fsdp_extension=unit._fsdp_extension)
    return out.cpu() if config.offload_to_cpu else out
