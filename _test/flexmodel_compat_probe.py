"""What a FlexModel user sees in ``output_dict``, and on the model after dropping the wrapper.

Run as ``python flexmodel_compat_probe.py flex_model|flex_surgery`` (FlexModel 0.1.0 on
``PYTHONPATH`` for the first); prints one JSON object. ``test_flexmodel_compat.py`` runs it
against both and requires the same output: the keys, the type of each value, every stored
tensor in order (a module called twice per forward, several hook kinds on one module, a
parameter gradient, an editing hook), and that no hook is left once the wrapper is dropped.
Both run in a one-rank process group on the device's backend, as FlexModel needs one.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def _start_world_of_one(target: str) -> None:
    from flex_surgery.parallel.backend import backend_for_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29561"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend_for_device())
    if target == "flex_model":  # FlexModel 0.1.0 creates its groups with backend="nccl"
        new_group = dist.new_group
        dist.new_group = lambda *a, backend=None, **k: new_group(*a, backend=backend_for_device(),
                                                                 **k)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.other = nn.Linear(4, 3)

    def forward(self, x):
        return self.other(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _hooks_left(model: nn.Module) -> int:
    count = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(getattr(m, "_backward_pre_hooks", ())) for m in model.modules())
    return count + sum(len(p._backward_hooks or {}) for p in model.parameters())


def main(target: str) -> dict:
    _start_world_of_one(target)
    if target == "flex_model":
        from flex_model.core import FlexModel, HookFunction
    else:
        from flex_surgery.hooks import FlexModel, HookFunction

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4, requires_grad=True)
    plain = model(x).detach()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    flex.register_forward_hook(HookFunction("shared"))  # runs twice per forward
    flex.register_forward_pre_hook(HookFunction("other"))
    flex.register_full_backward_hook(HookFunction("other"))
    flex.register_full_backward_pre_hook(
        HookFunction("other", editing_function=lambda m, g, ctx, mods: g * 3))
    flex.register_hook(HookFunction("other.weight"))
    flex(x).pow(2).sum().backward()
    flex(x)  # a second forward, without backward
    stored = {key: {"type": type(value).__name__,
                    "values": [t.tolist() for t in value] if isinstance(value, list)
                    else value.tolist()}
              for key, value in sorted(output_dict.items())}
    hooks_while_wrapped = _hooks_left(model)
    flex = flex.module  # drop the wrapper, as FlexModel's tests do: its finalizer removes hooks
    result = {"stored": stored, "hooks_while_wrapped": hooks_while_wrapped,
              "hooks_left_after_drop": _hooks_left(flex),
              "plain_forward_after_drop": torch.equal(flex(x).detach(), plain)}
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
