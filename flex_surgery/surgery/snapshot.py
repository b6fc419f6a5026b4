"""Exact copies of the elements surgery modifies, and how to put them back bit for bit.

Restoring by subtracting the applied delta is wrong in floating point (``(w + d) - d != w``);
restoring by copying the saved elements back is exact for every dtype, including ``-0.0``,
infinities and NaN payloads, because ``copy_`` between tensors of the same dtype moves bits.
The copy goes back into the *same* storage, so ``data_ptr()`` and every view (FSDP's original
parameter views, optimizer state keyed by parameter) stay valid.

A snapshot can be taken *into* a buffer kept from an earlier one (``reuse``): entering the same
theater, or swapping an exported program's weights, again and again then costs copies only --
no allocation, and none of the page faults a fresh host allocation of that size pays on first
touch (on the CPU, large allocations are fresh mappings returned to the system on free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Snapshot", "reusable", "take_snapshot"]


@dataclass
class Snapshot:
    """The saved elements of one local view (``backup`` lives on the device or on the CPU)."""

    local: torch.Tensor
    backup: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.backup.numel() * self.backup.element_size()

    def restore(self) -> None:
        """Copy the saved bits back into the live storage, in place."""
        self.local.copy_(self.backup, non_blocking=self.backup.device != self.local.device)


def reusable(buffer: torch.Tensor | None, local: torch.Tensor, backup: str) -> bool:
    """Whether ``buffer`` can hold a snapshot of ``local`` (same shape, dtype and, for
    ``backup``, device; contiguous; pinned when a CPU backup of a CUDA tensor)."""
    if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
        return False
    if not buffer.is_contiguous():
        return False
    if backup == "device":
        return buffer.device == local.device
    return buffer.device.type == "cpu" and (not local.is_cuda or buffer.is_pinned())


def take_snapshot(local: torch.Tensor, backup: str = "device",
                  reuse: torch.Tensor | None = None) -> Snapshot:
    """Save ``local``'s elements: ``backup="device"`` clones next to it, ``"cpu"`` to host memory
    (pinned when the source is on CUDA, so the copy can overlap). ``reuse``: a buffer from an
    earlier snapshot, overwritten instead of allocating when :func:`reusable` (otherwise
    ignored)."""
    if backup not in ("device", "cpu"):
        raise ValueError(f"backup must be 'device' or 'cpu', got {backup!r}")
    if reusable(reuse, local, backup):
        reuse.copy_(local, non_blocking=local.device != reuse.device)
        return Snapshot(local, reuse)
    if backup == "device":
        saved = local.clone(memory_format=torch.contiguous_format)
    else:
        saved = torch.empty(local.shape, dtype=local.dtype, device="cpu",
                            pin_memory=local.is_cuda)
        saved.copy_(local, non_blocking=local.is_cuda)
    return Snapshot(local, saved)
