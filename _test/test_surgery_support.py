"""Helpers shared by the surgery tests: raw-byte views of every parameter and buffer.

Bit-exact restoration is checked on raw bytes (``view(torch.uint8)``), never with ``==``:
``-0.0 == 0.0`` and ``nan != nan`` would hide exactly the differences that matter.
"""

from __future__ import annotations

import torch
from torch import nn

from flex_surgery.surgery.shards import reshard_for_surgery


def raw(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s bytes (the local shard of a DTensor)."""
    t = getattr(t, "_local_tensor", t).detach()
    return t.reshape(-1).clone().view(torch.uint8)


def raw_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Bytes and ``data_ptr`` of every local parameter and buffer of ``model``."""
    reshard_for_surgery(model)  # FSDP: read the shards, not a leftover gathered copy
    out = {}
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        local = getattr(t, "_local_tensor", t)
        out[name] = (raw(t), local.data_ptr())
    return out


def differing_bytes(before: dict, after: dict) -> int:
    """Number of differing bytes (plus a large penalty for moved storage or missing tensors)."""
    assert before.keys() == after.keys()
    diff = 0
    for name, (b, ptr) in before.items():
        a, ptr_after = after[name]
        diff += int((a != b).sum()) if a.shape == b.shape else 10**9
        diff += 0 if ptr == ptr_after else 10**9
    return diff


def special_values(model: nn.Module, seed: int = 0) -> None:
    """Plant -0.0, +-inf and NaNs with distinct payloads in every floating parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or p.numel() < 8:
                continue
            flat = p.view(-1)
            idx = torch.randperm(p.numel(), generator=gen)[:6]
            flat[idx[0]] = -0.0
            flat[idx[1]] = float("inf")
            flat[idx[2]] = float("-inf")
            bits = flat.view({4: torch.int32, 2: torch.int16}[p.element_size()])
            nan = {4: 0x7FC00000 | 0x1234, 2: 0x7E00 | 0x55}[p.element_size()]
            if p.dtype == torch.bfloat16:
                nan = 0x7FC0 | 0x2B
            bits[idx[3]] = nan
            bits[idx[4]] = nan | 0x3  # another payload
            bits[idx[5]] = -1  # all ones: a negative NaN


def test_raw_state_detects_a_sign_flip_of_zero():
    m = nn.Linear(4, 4)
    with torch.no_grad():
        m.weight[0, 0] = 0.0
    before = raw_state(m)
    with torch.no_grad():
        m.weight[0, 0] = -0.0
    assert differing_bytes(before, raw_state(m)) == 1
