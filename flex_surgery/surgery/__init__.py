"""Temporary model surgery: in-place weight edits restored bit-exactly, temporary layer edits."""

from flex_surgery.surgery.layers import (
    LayerSurgery,
    PassThrough,
    delete_blocks,
    permute_blocks,
    replace_blocks,
)
from flex_surgery.surgery.masks import MaskTheater, continuous_mask, hard_mask
from flex_surgery.surgery.shards import LocalShard, local_shards
from flex_surgery.surgery.theater import (
    RestoreError,
    SurgeryError,
    SurgicalTheater,
    active_theaters,
    noise_seed,
    surgical_theater,
)

__all__ = [
    "LayerSurgery",
    "LocalShard",
    "MaskTheater",
    "PassThrough",
    "RestoreError",
    "SurgeryError",
    "SurgicalTheater",
    "active_theaters",
    "continuous_mask",
    "delete_blocks",
    "hard_mask",
    "local_shards",
    "noise_seed",
    "permute_blocks",
    "replace_blocks",
    "surgical_theater",
]
