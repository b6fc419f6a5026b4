"""MemoryStore: the in-memory dict of ``output_dict`` behind the :class:`Store` protocol."""

from __future__ import annotations

from typing import Any

import torch

from flex_surgery.store.base import StoreError, WriteMeta
from flex_surgery.store.merge import merge_pieces


class MemoryStore:
    """Keeps every stored tensor in ``self.data[name]`` (a list, one per call), in host memory.

    ``data`` has the shape of FlexModel's ``output_dict`` with ``keep="all"`` on one rank; the
    metadata kept beside it lets :meth:`read` answer the same questions as a :class:`DiskStore`.
    """

    #: What it holds lives in this process only: under ``store_on="replica_leaders"`` with
    #: data parallelism each replica leader's MemoryStore would hold its own rows only, so
    #: FlexModel refuses that (on every rank).
    process_local = True

    def __init__(self) -> None:
        self.data: dict[str, list[torch.Tensor]] = {}
        self._entries: dict[str, list[tuple[WriteMeta, torch.Tensor]]] = {}
        self.host_bytes = 0
        self.fingerprint: dict[str, Any] | None = None

    def attach(self, fingerprint: dict[str, Any]) -> None:
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise StoreError(f"this store holds a run of {self.fingerprint}; it cannot take one "
                             f"of {fingerprint}")
        self.fingerprint = fingerprint

    def put(self, name: str, tensor: torch.Tensor, meta: WriteMeta) -> None:
        if meta.kind == "tensor":
            self.data.setdefault(name, []).append(tensor)
        self._entries.setdefault(name, []).append((meta, tensor))
        self.host_bytes += tensor.numel() * tensor.element_size()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def steps(self, name: str) -> list[int]:
        return sorted({m.step for m, _ in self._entries.get(name, ())})

    def next_steps(self) -> dict[str, int]:
        """The step a new call of each stored name gets: a later FlexModel on this store
        continues after the steps it holds (never merging two calls under one step)."""
        return {name: 1 + max(m.step for m, _ in entries)
                for name, entries in self._entries.items() if entries}

    def read(self, name: str, step: int = 0, batch: slice | None = None) -> torch.Tensor:
        if name not in self._entries:
            raise StoreError(f"nothing stored under {name!r}; stored: {self.names()}")
        pieces = [(m, t) for m, t in self._entries[name] if m.step == step]
        if not pieces:
            raise StoreError(f"{name!r} has no step {step}; stored steps: {self.steps(name)}")
        return merge_pieces(name, pieces, batch)

    def to_dict(self) -> dict[str, list[torch.Tensor]]:
        """``{name: [tensor of step 0, 1, ...]}``, replicas' pieces put together."""
        return {name: [self.read(name, step) for step in self.steps(name)]
                for name in self.names()}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
