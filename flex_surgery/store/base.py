"""The :class:`Store` protocol: what a hook hands over, and what a store must answer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class StoreError(RuntimeError):
    """A store cannot accept, keep or give back what it was asked to (see the message)."""


@dataclass(frozen=True)
class WriteMeta:
    """Where one stored tensor sits in the logical dataset.

    ``step`` counts the calls of the hook (the position ``output_dict[name]`` would give it);
    ``batch_start``/``batch_stop`` the rows of the global batch it holds along ``batch_dim``
    (the whole tensor when ``batch_stop`` is -1; a data-parallel replica's slice otherwise);
    ``batch_total`` the size of the global batch a slice is part of, so that a read can check
    that the slices of a step tile ``[0, batch_total)`` exactly (-1: a whole tensor, or a piece
    written before totals were recorded); ``writer`` the global rank that wrote it; ``kind`` is
    ``"tensor"``, or ``"sum"``/``"count"`` for the parts of a mean combined on read;
    ``mean_dtype`` (a ``sum`` only) the dtype the mean is given back in, when the sum was kept
    in a wider one (``""``: the sum's own).
    """

    step: int
    micro_batch: int = 0
    batch_start: int = 0
    batch_stop: int = -1
    batch_dim: int = 0
    writer: int = 0
    kind: str = "tensor"
    batch_total: int = -1
    mean_dtype: str = ""


@runtime_checkable
class Store(Protocol):
    """What FlexModel needs of a store.

    ``put`` is called on the storing rank(s) once per hook call with a detached CPU tensor that
    nothing else references; ``host_bytes`` is the tensor bytes the store holds in host memory
    right now (a planner's notion of what a storing rank keeps).
    """

    host_bytes: int

    def put(self, name: str, tensor: torch.Tensor, meta: WriteMeta) -> None: ...

    def read(self, name: str, step: int = 0, batch: slice | None = None) -> torch.Tensor: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def attach(self, fingerprint: dict[str, Any]) -> None: ...


def model_fingerprint(module: nn.Module, mesh_sizes: dict[str, int]) -> dict[str, Any]:
    """What identifies a run for a store: the model's class and parameter names, and the mesh.

    Parameter *names* only: under tensor parallelism or FSDP each rank's local shapes differ,
    while names are the same on every rank, so every writer of one run records the same value.
    """
    names = sorted(name for name, _ in module.named_parameters())
    digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return {"model": type(module).__name__, "parameters": digest,
            "mesh": {k: int(v) for k, v in sorted(mesh_sizes.items())}}
