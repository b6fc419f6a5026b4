"""The kinds of in-place modification a :class:`~flex_surgery.surgery.SurgicalTheater` applies.

Each kind writes this rank's local view of a parameter (:mod:`.shards`) in place, and nothing
else: ``scale`` multiplies, ``disable`` zeroes, ``noise`` adds seeded Gaussian noise, ``custom``
adds the delta a user function returns. The snapshot of every view is taken by the theater
before any of these runs, so a kind never has to be undone -- only overwritten by its snapshot.

Why noise is drawn in blocks of whole rows from per-block CPU generators: a rank then generates
only the blocks that overlap its shard (transient memory is one block), and every layout of the
same parameter -- one process, DDP, FSDP, TP, CPU or CUDA -- receives the same full-weight
noise for the same seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flex_surgery.surgery.lora import adapter_delta
from flex_surgery.surgery.shards import LocalShard
from flex_surgery.surgery.targets import Edit

__all__ = ["MODIFICATION_TYPES", "NOISE_CHUNK_ELEMENTS", "Modification", "noise_seed"]

MODIFICATION_TYPES = ("scale", "disable", "noise", "custom")

# Seeded noise is generated in blocks of whole dim-0 rows of at most this many elements, each
# block from its own CPU generator seeded by (seed, parameter name, block index) and copied to
# the parameter's device.
NOISE_CHUNK_ELEMENTS = 1 << 16


def noise_seed(seed: int, name: str, chunk: int) -> int:
    """The generator seed of noise block ``chunk`` of parameter ``name`` (a stable 63-bit hash,
    the same in every process and on every run)."""
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Modification:
    """One kind of modification with its arguments (see :class:`SurgicalTheater` for their
    meaning); :meth:`apply` writes one :class:`~.targets.Edit`."""

    kind: str | None
    factor: float = 0.9
    noise_scale: float = 0.01
    fn: Callable[..., torch.Tensor] | None = None
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    full_parameter: bool = False

    @staticmethod
    def check(kind: str | None, fn: Callable[..., torch.Tensor] | None,
              fn_kwargs: dict[str, Any]) -> str | None:
        """The kind these arguments ask for (``"custom"`` when only ``fn`` is given); a
        contradictory combination is an error at construction, not on entry."""
        if kind is None and fn is not None:
            kind = "custom"
        if kind is not None and kind not in MODIFICATION_TYPES:
            raise ValueError(f"modification_type must be one of {MODIFICATION_TYPES} or None, "
                             f"got {kind!r}")
        if kind == "custom" and fn is None:
            raise ValueError("modification_type='custom' needs modification_fn")
        if fn is not None and kind != "custom":
            raise ValueError(f"modification_fn is only used with 'custom', not {kind!r}")
        if fn_kwargs and kind != "custom":
            raise TypeError(f"unexpected arguments {sorted(fn_kwargs)} (only passed to a "
                            "custom modification_fn)")
        return kind

    def apply(self, edit: Edit, base_seed: int | None,
              shard_at: dict[tuple[int, str], LocalShard]) -> None:
        """Modify every local view of ``edit`` in place (``shard_at``: LoRA factors by place)."""
        if self.kind == "scale":
            for s in edit.shards:
                s.local.mul_(self.factor)
        elif self.kind == "disable":
            for s in edit.shards:
                s.local.zero_()
        elif self.kind == "noise":
            self._add_noise(edit.shard, edit.name, base_seed)
        elif self.kind == "custom":
            self._add_custom(edit, shard_at)

    def _add_noise(self, shard: LocalShard, name: str, base_seed: int | None) -> None:
        """Add this rank's part of the full-shape noise of parameter ``name``: block ``k`` of
        whole rows drawn in fp32 by a CPU generator seeded with ``noise_seed(seed, name, k)``,
        scaled, copied to the parameter's device and added (so CPU and CUDA agree)."""
        shape = shard.full_shape
        n_rows = shape[0] if len(shape) else 1
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        rows_per_chunk = max(1, NOISE_CHUNK_ELEMENTS // max(row_numel, 1))
        first, last = shard.region.row_range(shape)
        local = shard.local
        gen = torch.Generator(device="cpu")
        for chunk in range(first // rows_per_chunk, -(-last // rows_per_chunk)):
            row0 = chunk * rows_per_chunk
            n = min(rows_per_chunk, n_rows - row0)
            gen.manual_seed(noise_seed(base_seed, name, chunk))
            rows = torch.randn((n, *shape[1:]), generator=gen, dtype=torch.float32)
            rows.mul_(self.noise_scale)
            shard.region.add_rows(local, rows.to(local.device), row0)

    def _add_custom(self, edit: Edit, shard_at: dict[tuple[int, str], LocalShard]) -> None:
        shard = edit.shard
        local = shard.local
        # The adapters' part of a LoRA layer's effective weight (gathers: before any return).
        adapters = adapter_delta(edit.lora, shard_at) if edit.lora is not None else None
        if self.full_parameter:
            arg, expected, where = shard.gather(), shard.full_shape, "the parameter"
        elif local.numel() == 0:
            return  # this rank holds none of the parameter (FSDP1 flat shards)
        else:
            arg, expected, where = local, local.shape, "the local shard it got"
        if adapters is not None:  # as PEFT merges: the delta in the weight's dtype, added
            part = adapters if self.full_parameter else shard.region.take(adapters)
            arg = arg + part.to(device=arg.device, dtype=arg.dtype)
        with torch.random.fork_rng(devices=[arg.device] if arg.is_cuda else []):
            if self.seed is not None:
                torch.manual_seed(noise_seed(self.seed, edit.name, 0))
            delta = self.fn(arg, **self.fn_kwargs)
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(expected):
            got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta)
            hint = ("" if self.full_parameter else
                    "; it got this rank's shard -- pass full_parameter=True for the whole "
                    "parameter")
            raise ValueError(f"modification_fn must return a delta of shape {tuple(expected)} "
                             f"for {edit.name}, got {got}{hint}")
        if delta.dtype != arg.dtype or delta.device != arg.device:
            raise TypeError(
                f"modification_fn for {edit.name} returned a delta of {delta.dtype} on "
                f"{delta.device}, but {where} is {arg.dtype} on {arg.device}; the theater never "
                "casts silently: return a delta like its argument (e.g. delta.to(p))"
            )
        if self.full_parameter:
            delta = shard.region.take(delta)
        local.add_(delta.detach())
