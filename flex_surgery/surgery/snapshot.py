"""Exact copies of the elements surgery modifies, and how to put them back bit for bit.

Restoring by subtracting the applied delta is wrong in floating point (``(w + d) - d != w``);
restoring by copying the saved elements back is exact for every dtype, including ``-0.0``,
infinities and NaN payloads, because ``copy_`` between tensors of the same dtype moves bits.
The copy goes back into the *same* storage, so ``data_ptr()`` and every view (FSDP's original
parameter views, optimizer state keyed by parameter) stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Snapshot", "take_snapshot"]


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


def take_snapshot(local: torch.Tensor, backup: str = "device") -> Snapshot:
    """Save ``local``'s elements: ``backup="device"`` clones next to it, ``"cpu"`` to host memory
    (pinned when the source is on CUDA, so the copy can overlap)."""
    if backup == "device":
        saved = local.clone(memory_format=torch.contiguous_format)
    elif backup == "cpu":
        saved = torch.empty(local.shape, dtype=local.dtype, device="cpu",
                            pin_memory=local.is_cuda)
        saved.copy_(local, non_blocking=local.is_cuda)
    else:
        raise ValueError(f"backup must be 'device' or 'cpu', got {backup!r}")
    return Snapshot(local, saved)
