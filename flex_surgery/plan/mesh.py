"""Parsing the planner's inputs: ``tp=8,pp=4,dp=8``, ``8x4096``, ``bf16``, ``64GiB``."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flex_surgery.plan.errors import PlanError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class MeshSizes:
    """Sizes of the parallel axes; the world is their product."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def parse_mesh(text: str) -> MeshSizes:
    """``"tp=8,pp=4,dp=8"`` (any subset, any order; missing axes are 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = part.partition("=")
        axis = axis.strip().lower()
        if not sep or axis not in ("tp", "pp", "dp") or not value.strip().isdigit():
            raise PlanError(f"--mesh takes axis=size pairs over tp, pp, dp such as "
                            f"'tp=8,pp=4,dp=8'; cannot read {part!r} in {text!r}")
        if axis in sizes:
            raise PlanError(f"--mesh names {axis} twice in {text!r}")
        sizes[axis] = int(value)
        if sizes[axis] < 1:
            raise PlanError(f"--mesh: {axis} must be >= 1, got {sizes[axis]}")
    return MeshSizes(**sizes)


def parse_tokens(text: str) -> tuple[int, int]:
    """``"8x4096"``: (batch, sequence length) per data-parallel replica."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise PlanError(f"--tokens takes BATCHxSEQUENCE per data-parallel replica, such as "
                        f"'8x4096', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {text!r}; choose from {sorted(DTYPES)}") from None


def parse_bytes(text: str | int) -> int:
    """``64GiB``, ``500MB``, ``1e9`` or a plain integer, as bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise PlanError(f"cannot read {text!r} as a size; write e.g. 64GiB, 500MB or 1e9")
    try:
        return int(float(match.group(1)) * _UNITS[unit])
    except ValueError:
        raise PlanError(f"cannot read {text!r} as a size; write e.g. 64GiB") from None


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
