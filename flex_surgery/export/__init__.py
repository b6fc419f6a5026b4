"""Export a model once with ``torch.export``; run it with new or surgically modified weights.

``inject_weights(program, state_dict)`` writes new weights into a program exported with plain
``torch.export.export``, leaving the eager model alone. ``ExportedModel.export(model, ...)``
exports a private copy of ``model``; ``inject`` copies a checkpoint (state dict, module or file)
into the program in place and ``weights`` swaps one in for a ``with`` block, restoring
bit-exactly. See docs/export.md.
"""

from flex_surgery.export.exported import ExportedModel, WeightSource, live_weights
from flex_surgery.export.gather import full_weights
from flex_surgery.export.inject import inject_weights, owns_weights
from flex_surgery.export.layout import WeightLayout, WeightMismatchError, WeightSlot
from flex_surgery.export.program import OutputSelector, export_private_copy
from flex_surgery.export.weight_files import load_weight_file, save_weight_file

__all__ = [
    "ExportedModel",
    "OutputSelector",
    "WeightLayout",
    "WeightMismatchError",
    "WeightSlot",
    "WeightSource",
    "export_private_copy",
    "full_weights",
    "inject_weights",
    "live_weights",
    "load_weight_file",
    "owns_weights",
    "save_weight_file",
]
