"""Run ``torch.export`` on a private copy of a module, optionally keeping one output only.

Two facts about ``torch.export`` shape this module:

* The program's ``state_dict`` tensors *alias* the exported module's parameters. Injecting new
  weights into the program would silently rewrite the user's eager model (and surgery on the
  eager model would leak into the program). Exporting a ``copy.deepcopy`` of the module gives
  the program weights of its own; ``deepcopy`` keeps tied parameters tied.
* Hugging Face models return a ``ModelOutput``. Deployments usually want one tensor, and a
  graph that returns only that tensor drops whatever else the model computes for its other
  outputs, and loads without ``transformers`` having registered its output classes. The
  :class:`OutputSelector` wrapper picks ``out[output]`` inside the graph; it forwards the wrapped
  module's signature so ``dynamic_shapes`` is keyed by the same argument names as for the
  module itself. Its only cost is the ``module.`` prefix on program keys, which
  :class:`~flex_surgery.export.layout.WeightLayout` strips.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from flex_surgery.export.inject import declare_owner

__all__ = ["OutputSelector", "export_private_copy", "with_state"]

OutputKey = Union[str, int, None]

#: Prefix :class:`OutputSelector` puts in front of every eager name.
SELECTOR_PREFIX = "module."


class OutputSelector(nn.Module):
    """Call ``module`` and return only ``out[output]`` (an attribute/key name, or an index)."""

    def __init__(self, module: nn.Module, output: str | int):
        super().__init__()
        self.module = module
        self.output = output
        # torch.export reads argument names from ``inspect.signature(self.forward)``; expose the
        # wrapped module's so callers key ``dynamic_shapes`` exactly as for the bare module.
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.module(*args, **kwargs)[self.output]

        forward.__signature__ = inspect.signature(module.forward)
        self.forward = forward


def export_private_copy(module: nn.Module, example_args: tuple = (),
                        example_kwargs: Mapping[str, Any] | None = None,
                        dynamic_shapes: Any = None, output: OutputKey = "logits",
                        strict: bool = False) -> tuple[torch.export.ExportedProgram, str]:
    """Export a deep copy of ``module``; return the program and the prefix of its weight keys.

    The eager ``module`` is neither modified nor aliased by the result. Peak memory during the
    call is about twice the module's weights.
    """
    private = copy.deepcopy(module)
    root: nn.Module = private if output is None else OutputSelector(private, output)
    prefix = "" if output is None else SELECTOR_PREFIX
    program = torch.export.export(root, tuple(example_args), kwargs=dict(example_kwargs or {}),
                                  dynamic_shapes=dynamic_shapes, strict=strict)
    declare_owner(program)
    return program, prefix


def with_state(program: torch.export.ExportedProgram,
               state: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The same graph over other state tensors (same keys, shapes and dtypes).

    Used to save a program without its weights (``state`` of meta tensors) and to give a program
    loaded that way real storage again. Entries are wrapped as ``nn.Parameter`` where the
    program's were. Constants (non-persistent buffers, lifted tensors) are kept: they are fixed
    at export and usually tiny.
    """
    wrapped: dict[int, torch.Tensor] = {}
    new_state = {}
    for key, old in program.state_dict.items():
        new = state[key]
        if isinstance(old, nn.Parameter) and not isinstance(new, nn.Parameter):
            if id(new) not in wrapped:  # one Parameter per tensor keeps tied entries tied
                wrapped[id(new)] = nn.Parameter(new, requires_grad=old.requires_grad)
            new = wrapped[id(new)]
        new_state[key] = new
    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict=new_state, range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph, example_inputs=None,
        constants=program.constants, verifiers=program.verifiers)
