"""Shared pieces of the FlexModel tests: hook points per architecture and raw PyTorch hooks.

Every FlexModel hook is checked against the plain PyTorch hook that does the same thing by
hand (no pytree, no runtime), on the same model and inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flex_surgery.hooks import FlexModel
from flex_surgery.models import example_inputs, tiny_hf_model

# For each tiny architecture: a module returning a tuple (attention), a module taking and
# returning one tensor (MLP-ish), a later block to observe, and a weight whose gradient to hook.
POINTS = {
    "llama": dict(attn="model.layers.0.self_attn", mlp="model.layers.0.mlp",
                  later="model.layers.1", param="model.layers.0.mlp.up_proj.weight"),
    "gpt2": dict(attn="transformer.h.0.attn", mlp="transformer.h.0.mlp",
                 later="transformer.h.1", param="transformer.h.0.mlp.c_fc.weight"),
    "opt": dict(attn="model.decoder.layers.0.self_attn", mlp="model.decoder.layers.0.fc1",
                later="model.decoder.layers.1", param="model.decoder.layers.0.fc1.weight"),
    "bert": dict(attn="encoder.layer.0.attention", mlp="encoder.layer.0.intermediate",
                 later="encoder.layer.1", param="encoder.layer.0.intermediate.dense.weight"),
    "vit": dict(attn="layers.0.attention", mlp="layers.0.mlp", later="layers.1",
                param="layers.0.mlp.fc1.weight"),
}

# Which hook point each kind is tested on.
KIND_POINT = {"forward": "attn", "forward_pre": "mlp", "full_backward": "mlp",
              "full_backward_pre": "mlp", "tensor": "param"}

KINDS = tuple(KIND_POINT)


def first_tensor(value):
    return value if isinstance(value, torch.Tensor) else value[0]


def raw_hook(model: nn.Module, kind: str, name: str,
             transform: Callable[[torch.Tensor], torch.Tensor] | None,
             seen: list[torch.Tensor]):
    """The plain PyTorch hook of ``kind``: record the first tensor, replace it by transform(it)."""
    def on_first(value):
        tensor = first_tensor(value)
        seen.append(tensor.detach().clone())
        if transform is None:
            return None
        if isinstance(value, torch.Tensor):
            return transform(value)
        return (transform(value[0]),) + tuple(value[1:])

    if kind == "tensor":
        return model.get_parameter(name).register_hook(on_first)
    module = model.get_submodule(name)
    if kind == "forward":
        return module.register_forward_hook(lambda m, args, out: on_first(out))
    if kind == "forward_pre":
        return module.register_forward_pre_hook(lambda m, args: on_first(args))
    if kind == "full_backward":
        return module.register_full_backward_hook(lambda m, gin, gout: on_first(gin))
    if kind == "full_backward_pre":
        return module.register_full_backward_pre_hook(lambda m, gout: on_first(gout))
    raise ValueError(kind)


def register(flex: FlexModel, kind: str):
    return {"forward": flex.register_forward_hook,
            "forward_pre": flex.register_forward_pre_hook,
            "full_backward": flex.register_full_backward_hook,
            "full_backward_pre": flex.register_full_backward_pre_hook,
            "tensor": flex.register_hook}[kind]


def make(arch: str):
    model = tiny_hf_model(arch)
    return model, example_inputs(arch)


def run(call: Callable[[], object], model: nn.Module, later: str):
    """Forward + backward: (main output, output of block ``later``, parameter gradients)."""
    observed: list[torch.Tensor] = []
    handle = model.get_submodule(later).register_forward_hook(
        lambda m, a, out: observed.append(first_tensor(out).detach().clone()))
    model.zero_grad(set_to_none=True)
    try:
        main = call()[0]  # logits / last_hidden_state
        weights = torch.randn(main.shape, generator=torch.Generator().manual_seed(1))
        (main * weights).sum().backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return main.detach(), observed, grads


def assert_runs_equal(a, b) -> None:
    main_a, obs_a, grads_a = a
    main_b, obs_b, grads_b = b
    assert torch.equal(main_a, main_b)
    assert len(obs_a) == len(obs_b) and all(torch.equal(x, y) for x, y in zip(obs_a, obs_b))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def runs_differ(a, b) -> bool:
    main_a, _, grads_a = a
    main_b, _, grads_b = b
    return not torch.equal(main_a, main_b) or any(
        not torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def hooks_left(model: nn.Module) -> list[tuple[str, str]]:
    """Every hook (and hook-related flag) PyTorch still holds on the model."""
    left = []
    for name, sub in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if getattr(sub, attr):
                left.append((name, attr))
        if sub._is_full_backward_hook is not None:
            left.append((name, "_is_full_backward_hook"))
    for name, parameter in model.named_parameters():
        if parameter._backward_hooks is not None:
            left.append((name, "tensor _backward_hooks"))
    return left
