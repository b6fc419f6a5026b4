"""flex_surgery: read, edit and temporarily modify sharded PyTorch models as if on one GPU.

The public API, by concern:

* hooks that see whole tensors -- :class:`FlexModel`, :class:`HookFunction`, :func:`pure_edit`,
  :class:`DummyModule`
* the parallel layer they stand on -- :class:`ParallelMesh`, :class:`StageLink`,
  :func:`init_distributed`
* temporary, bit-exactly restored surgery -- :class:`SurgicalTheater`, :class:`LayerSurgery`,
  :class:`MaskTheater`; trainable circuit masks -- :class:`CircuitModel`, :class:`CircuitConfig`
* weights decoupled from an exported runtime -- :class:`ExportedModel`
* launching under torchrun / SLURM -- :func:`launch`, :func:`submit`, :func:`init_from_env`
  (imported on first use: they need ``submitit``)
* the hook map of a model or a FlexModel -- :func:`hook_map` (from :mod:`flex_surgery.viz`)
* layers and the logit lens -- :class:`ModelSurgery` (Arrakis / tuned-lens names),
  :func:`logit_lens`, :class:`LogitLens`, :func:`plot_lens`
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from flex_surgery.export import ExportedModel, WeightMismatchError, full_weights, live_weights
from flex_surgery.hooks import (
    DummyModule,
    EditingFunctionError,
    FlexModel,
    FlexModelError,
    GroupError,
    HookFunction,
    HookRegistrationError,
    ShapeMismatchError,
    UnknownGroupError,
    UnknownNameError,
    UnpackError,
    pure_edit,
)
from flex_surgery.lens import LensResult, LogitLens, logit_lens, plot_lens
from flex_surgery.parallel.backend import backend_for_device, init_distributed
from flex_surgery.parallel.collectives import RemoteEditError
from flex_surgery.parallel.layout import Layout, LayoutError
from flex_surgery.parallel.mesh import MeshSizeError, ParallelMesh
from flex_surgery.parallel.pipeline import PipelineStageError, StageLink, skip_metadata_inference
from flex_surgery.parallel.site_tags import HookSiteMismatchError
from flex_surgery.surgery import (
    LayerSurgery,
    MaskTheater,
    PassThrough,
    SurgeryError,
    SurgicalTheater,
    delete_blocks,
    permute_blocks,
    replace_blocks,
    surgical_theater,
)
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel
from flex_surgery.surgery.model_surgery import ModelSurgery
from flex_surgery.viz import HookMap, hook_map

__version__ = "0.1.0"

# Launching needs submitit, an optional dependency: resolve these names on first use.
_LAZY = {
    "launch": "flex_surgery.launch",
    "submit": "flex_surgery.launch",
    "init_from_env": "flex_surgery.launch",
    "LaunchError": "flex_surgery.launch",
    "ClusterConfig": "flex_surgery.launch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flex_surgery' has no attribute {name!r}")


__all__ = [
    "CircuitConfig",
    "CircuitModel",
    "ClusterConfig",
    "DummyModule",
    "EditingFunctionError",
    "ExportedModel",
    "FlexModel",
    "FlexModelError",
    "GroupError",
    "HookFunction",
    "HookMap",
    "HookRegistrationError",
    "HookSiteMismatchError",
    "LaunchError",
    "LayerSurgery",
    "Layout",
    "LayoutError",
    "LensResult",
    "LogitLens",
    "MaskTheater",
    "MeshSizeError",
    "ModelSurgery",
    "ParallelMesh",
    "PassThrough",
    "PipelineStageError",
    "RemoteEditError",
    "ShapeMismatchError",
    "StageLink",
    "SurgeryError",
    "SurgicalTheater",
    "UnknownGroupError",
    "UnknownNameError",
    "UnpackError",
    "WeightMismatchError",
    "backend_for_device",
    "delete_blocks",
    "full_weights",
    "hook_map",
    "init_distributed",
    "init_from_env",
    "launch",
    "live_weights",
    "logit_lens",
    "permute_blocks",
    "plot_lens",
    "pure_edit",
    "replace_blocks",
    "skip_metadata_inference",
    "submit",
    "surgical_theater",
]
