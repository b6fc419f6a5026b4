"""Weight files that travel apart from the exported program: safetensors or ``torch.save``.

The suffix picks the format: ``.safetensors`` uses safetensors (no pickle, memory-mapped
loading); anything else uses ``torch.save`` and is read back with ``weights_only=True``. Files
hold one entry per tensor -- tied aliases are written once under their canonical name, as
``save_pretrained`` does, because safetensors refuses shared storage and the reader fills every
alias from that one entry anyway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from flex_surgery.files import write_atomically

__all__ = ["load_weight_file", "save_weight_file"]

PathLike = str | os.PathLike


def _is_safetensors(path: PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def save_weight_file(weights: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Write ``weights`` (name -> tensor) to ``path``.

    Tensors that share memory (tied weights: ``lm_head.weight`` is ``embed.weight``) are each
    written whole under their own name; safetensors refuses shared memory, and a reader then
    gets one tensor per name, as :func:`~flex_surgery.export.full_weights` hands them out.
    Written to a temporary file next to ``path`` and renamed into place: a write that fails
    (a full disk) leaves no half-written file, and whatever ``path`` held before intact.
    """
    write_atomically(path, lambda tmp: _save(weights, path, tmp))


def _save(weights: Mapping[str, torch.Tensor], path: PathLike, tmp: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in weights.items():
        t = value.detach().contiguous()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        # the second name of a tied weight (or any view into memory already written) is copied
        tensors[name] = t.clone() if key in seen and storage.nbytes() else t
        seen.add(key)
    if _is_safetensors(path):
        from safetensors.torch import save_file

        save_file(tensors, tmp)
    else:
        torch.save(tensors, tmp)


def load_weight_file(path: PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_weight_file` (or any flat safetensors / torch file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weight file at {os.fspath(path)!r}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(os.fspath(path), device=str(device))
    loaded = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(loaded).__name__}, not a "
                         f"name -> tensor mapping")
    return dict(loaded)
