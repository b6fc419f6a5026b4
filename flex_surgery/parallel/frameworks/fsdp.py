"""Fully sharded data parallelism: FSDP1 (``FullyShardedDataParallel``) and FSDP2
(``fully_shard``).

Activations: not split by FSDP (inside forward every rank computes with whole weights on its
local batch), so only the data-parallel batch dim is sharded.

Parameters: FSDP1 keeps the original parameters of a unit in one ``FlatParameter``; this rank
holds a 1-D slice of it, so each original parameter's view is a range of its flattened
elements (``_shard_param_infos``), possibly empty. FSDP2 stores parameters as DTensors
(answered by :mod:`.dtensor`).

Both substitute parameters during forward (FSDP1 sets fresh unsharded views on the owning
module, FSDP2 swaps in unsharded parameters), so gradient hooks go on those, and both may keep
unsharded copies after a forward (:meth:`reshard` drops them).

Groups: an FSDP1 unit's ``process_group`` is the data-parallel group (when it spans the world);
FSDP2's mesh is found through its DTensor parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.naming import clean_name, join_name
from flex_surgery.parallel.frameworks.base import Framework
from flex_surgery.parallel.frameworks.views import FlatRegion, LocalShard

if TYPE_CHECKING:
    from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["FSDP1", "FSDP2", "fsdp1_gradient_accumulators", "fsdp1_param_offsets",
           "fsdp2_compute_dtypes"]


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


class FSDP1(Framework):
    name = "fsdp1"

    def owns(self, module: nn.Module) -> bool:
        cls = _fsdp1_class()
        return cls is not None and isinstance(module, cls)

    def wrapper_kind(self, module: nn.Module) -> str | None:
        return "FSDP1 unit" if self.owns(module) else None

    def substitutes_parameters(self, module: nn.Module) -> bool:
        return self.owns(module)

    def reshard(self, module: nn.Module) -> None:
        if not self.owns(module):
            return
        handle = getattr(module, "_handle", None)
        if (handle is not None and handle.uses_sharded_strategy
                and hasattr(handle.flat_param, "_local_shard")):  # lazily initialised
            handle.reshard(True)
            handle.post_reshard()

    def abandon_backward(self, module: nn.Module) -> None:
        # On the root (its end-of-backward callback finishes every unit of the tree): torch's
        # own end of backward, with the failed backward's gradients dropped first (a unit not
        # yet reduced holds this rank's unreduced gradient, one reduced holds a shard of the
        # reduction: neither is a gradient of the step) and again after (where the end of
        # backward moves a saved shard to .grad).
        if not self.owns(module) or getattr(module, "_is_root", None) is not True:
            return
        from torch.distributed.fsdp._runtime_utils import _post_backward_final_callback

        def drop_gradients() -> None:
            for state in module._all_fsdp_states:
                if state._handle is None:
                    continue
                flat_param = state._handle.flat_param
                flat_param.grad = None
                if hasattr(flat_param, "_saved_grad_shard"):
                    delattr(flat_param, "_saved_grad_shard")
                flat_param._post_backward_called = False
            module.zero_grad(set_to_none=True)  # the original parameters' views too

        drop_gradients()
        _post_backward_final_callback(module, module)  # reshard, unhook, states IDLE
        for state in module._all_fsdp_states:
            handle = state._handle
            if handle is not None and handle._use_orig_params and \
                    not handle.uses_sharded_strategy:
                # NO_SHARD: the end of backward takes its flat parameter for resharded
                # already, so the original parameters a unit's backward never finished
                # would stay the plain tensors its forward made them (not nn.Parameters:
                # named_parameters() and an optimizer would miss them)
                handle._use_sharded_views()
        drop_gradients()

    def model_shards(self, model: nn.Module) -> tuple[list[LocalShard],
                                                       set[tuple[int, str]]]:
        shards: list[LocalShard] = []
        handled: set[tuple[int, str]] = set()
        for mname, module in model.named_modules():
            if not self.owns(module) or module._handle is None:
                continue
            fp = module._handle.flat_param
            for pinfo in fp._param_infos:
                handled.add((id(pinfo.module), pinfo.param_name))
            for spi in fp._shared_param_infos:
                handled.add((id(spi.module), spi.param_name))
            handled.add((id(module), "_flat_param"))
            handled.add((id(module._fsdp_wrapped_module), "_flat_param"))
            shards.extend(_fsdp1_shards(module, join_name(mname, "_fsdp_wrapped_module")))
        return shards, handled

    def groups(self, model: nn.Module | None) -> ParallelMesh | None:
        if model is None:
            return None
        unit = next((m for m in model.modules() if self.owns(m)), None)
        if unit is None:
            return None
        return _data_parallel_mesh(unit.process_group, "data_parallel_wrapper")


def fsdp1_gradient_accumulators(units: Iterable[nn.Module]
                                ) -> Iterator[tuple[nn.Parameter, object]]:
    """``(flat_param, node)`` for each FSDP1 unit among ``units`` whose ``FlatParameter``
    FSDP1 reduce-scatters from a hook on its ``AccumulateGrad`` node (registered at the
    unit's first forward that requires grad, kept for the unit's life): the point in the
    backward where that unit's gradient collective starts. A pre-hook on ``node`` runs just
    before it."""
    for module in units:
        if not FSDP1().owns(module) or module._handle is None:
            continue
        flat_param = module._handle.flat_param
        state = getattr(flat_param, "_post_backward_hook_state", None)
        # (a unit whose parameters do not require grad keeps a multi-grad hook's handle
        # there instead: it reduces nothing)
        if state is not None and type(state[0]).__name__ == "AccumulateGrad":
            yield flat_param, state[0]


class FSDP2(Framework):
    name = "fsdp2"

    def owns(self, module: nn.Module) -> bool:
        cls = _fsdp2_class()
        return cls is not None and isinstance(module, cls)

    def wrapper_kind(self, module: nn.Module) -> str | None:
        return "FSDP2" if self.owns(module) else None

    def substitutes_parameters(self, module: nn.Module) -> bool:
        return self.owns(module)

    def reshard(self, module: nn.Module) -> None:
        if not self.owns(module):
            return
        module.reshard()
        if _fsdp2_sharded(module) is False and hasattr(module, "reset_iter_state") and \
                getattr(module._get_fsdp_state(), "_is_root", False):
            # A forward that raised mid-flight leaves the root's groups in FORWARD, where
            # reshard() does nothing when reshard_after_forward is False (the root's default):
            # its unsharded copies would stay in use, so an edit of the shards (or their
            # restoration) would not reach the next forward. reset_iter_state is torch's
            # recovery for that state (the failed iteration's gradients are lost anyway).
            module.reset_iter_state()
        if _fsdp2_sharded(module) is False:
            raise RuntimeError(
                f"FSDP2 unit {type(module).__name__} keeps unsharded parameters after "
                "reshard() (a forward or backward still in flight, or one that raised): an "
                "edit of its shards would not reach the next forward. Call reset_iter_state() "
                "on the root FSDP module after the exception, or finish the iteration first")


    def abandon_backward(self, module: nn.Module) -> None:
        # torch's recovery is reset_iter_state() on the root; it leaves the gradients a unit's
        # unsharded parameters accumulated before the failure (torch 2.13), which the next
        # backward would add to its own and reduce: dropped here. Only where every private
        # name this needs is where it looks: otherwise nothing is reset, and the next forward
        # fails in FSDP2's own state check rather than reduce a wrong gradient.
        if not self.owns(module):
            return
        try:
            state = module._get_fsdp_state()
            if state._is_root is not True:
                return
            fsdp_params = [fp for unit in state._state_ctx.all_states
                           for group in unit._fsdp_param_groups for fp in group.fsdp_params]
            if not hasattr(module, "reset_iter_state") or \
                    not all(hasattr(fp, "unsharded_accumulated_grad") for fp in fsdp_params):
                return
        except AttributeError:
            return
        module.reset_iter_state()
        for fp in fsdp_params:
            unsharded = getattr(fp, "_unsharded_param", None)  # made at the first unshard
            if unsharded is not None:
                unsharded.grad = None
            fp.unsharded_accumulated_grad = None
        module.zero_grad(set_to_none=True)


def fsdp2_compute_dtypes(model: nn.Module) -> dict[tuple[int, str], torch.dtype]:
    """``{(id(module), parameter name): dtype}`` of the parameters that FSDP2 units of ``model``
    compute with in another dtype than they store (``MixedPrecisionPolicy.param_dtype``): the
    unsharded weight a forward sees is the stored shards cast to that dtype, element by
    element. Read from FSDP2's unit state, which torch keeps private: a unit whose state is
    not where this looks raises ``UnknownLayoutError`` rather than guess the dtype."""
    from flex_surgery.parallel.frameworks.registry import UnknownLayoutError

    found: dict[tuple[int, str], torch.dtype] = {}
    fsdp2 = FSDP2()
    for name, unit in model.named_modules():
        if not fsdp2.owns(unit):
            continue
        try:
            state = unit._get_fsdp_state()
            policy_dtype = state._mp_policy.param_dtype
            params = [(fp._module_info.module, fp._module_info.param_name, fp.sharded_param)
                      for group in state._fsdp_param_groups for fp in group.fsdp_params]
        except AttributeError as exc:
            raise UnknownLayoutError(
                f"FSDP2 unit {name or '<root>'}: this torch's FSDP2 does not expose its "
                f"mixed-precision policy where flex_surgery looks ({exc}), so the dtype its "
                "forward computes with is unknown") from exc
        for module, pname, sharded in params:
            if policy_dtype is not None and policy_dtype != sharded.dtype and \
                    sharded.dtype.is_floating_point:  # FSDPParam.init_dtype_attrs's rule
                found[(id(module), pname)] = policy_dtype
    return found


def _fsdp2_sharded(module: nn.Module) -> bool | None:
    """Whether every parameter group of an FSDP2 unit is sharded; ``None`` when this torch's
    FSDP2 does not say (private state)."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
        return all(group.is_sharded for group in groups)
    except AttributeError:
        return None


def _data_parallel_mesh(group: dist.ProcessGroup, source: str):
    """A dp-only mesh over ``group`` when it spans the world (else ``None``: not adoptable)."""
    from flex_surgery.parallel.mesh import ParallelMesh

    if dist.get_world_size(group) != dist.get_world_size():
        return None
    return ParallelMesh({"dp": group, "tp": None, "pp": None},
                        {"dp": dist.get_world_size(group), "tp": 1, "pp": 1},
                        {"dp": dist.get_rank(group), "tp": 0, "pp": 0}, source=source)


def fsdp1_param_offsets(flat_param: nn.Parameter) -> list[int]:
    """Offset of each original parameter of an FSDP1 ``FlatParameter`` in the unsharded (padded)
    flat parameter, i.e. in the concatenation of every rank's local shard."""
    offsets, pos = [], 0
    for numel, is_pad in zip(flat_param._numels_with_padding, flat_param._is_padding_mask):
        if not is_pad:
            offsets.append(pos)
        pos += numel
    return offsets


def _fsdp1_shards(fsdp_module: nn.Module, prefix: str) -> Iterator[LocalShard]:
    """One :class:`LocalShard` per original parameter of an FSDP1 unit's ``FlatParameter``."""
    handle = fsdp_module._handle
    fp = handle.flat_param
    sharded = handle.uses_sharded_strategy
    # Before FSDP's lazy init (first forward) the flat parameter already holds the shard but
    # ``_local_shard`` is not set yet; afterwards it is the same storage.
    local_flat = getattr(fp, "_local_shard", fp.data) if sharded else fp.data
    group = fsdp_module.process_group
    offsets = fsdp1_param_offsets(fp)
    gathered: dict[str, torch.Tensor] = {}

    def gather_flat() -> torch.Tensor:
        if "flat" not in gathered:
            if not sharded:
                gathered["flat"] = local_flat
            else:
                world = dist.get_world_size(group)
                out = torch.empty(local_flat.numel() * world, dtype=local_flat.dtype,
                                  device=local_flat.device)
                dist.all_gather_into_tensor(out, local_flat.contiguous(), group=group)
                gathered["flat"] = out
        return gathered["flat"]

    aliases: dict[tuple[int, str], list[str]] = {}
    for spi in fp._shared_param_infos:
        key = (id(spi.prim_module), spi.prim_param_name)
        aliases.setdefault(key, []).append(
            clean_name(join_name(prefix, spi.module_name, spi.param_name)))
    for i, (pinfo, shape, numel) in enumerate(zip(fp._param_infos, fp._shapes, fp._numels)):
        name = clean_name(join_name(prefix, fp._fqns[i]))
        if sharded:
            sinfo = fp._shard_param_infos[i]
            if sinfo.in_shard:
                local = local_flat[sinfo.offset_in_shard: sinfo.offset_in_shard
                                   + sinfo.numel_in_shard]
                region = FlatRegion(sinfo.intra_param_start_idx, sinfo.intra_param_end_idx + 1)
            else:
                local = local_flat[:0]
                region = FlatRegion(0, 0)
        else:
            local = local_flat[offsets[i]: offsets[i] + numel]
            region = FlatRegion(0, numel)
        owners = [fp]
        orig = pinfo.module._parameters.get(pinfo.param_name)
        if isinstance(orig, nn.Parameter) and orig is not fp:
            owners.append(orig)

        def gather(i=i, shape=shape, numel=numel) -> torch.Tensor:
            return gather_flat()[offsets[i]: offsets[i] + numel].view(shape)

        yield LocalShard(
            name=name,
            aliases=tuple(aliases.get((id(pinfo.module), pinfo.param_name), ())),
            local=local, full_shape=torch.Size(shape), region=region, module=pinfo.module,
            param_name=pinfo.param_name, gather=gather, owners=tuple(owners), kind="fsdp1",
        )
