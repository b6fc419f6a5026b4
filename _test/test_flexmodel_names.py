"""Names to modules: registration does not walk the model per hook, and never hooks a module
that surgery took out of it; ``hooks`` does not import ``viz``."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from flexmodel_helpers import make
from torch import nn

from flex_surgery.hooks import FlexModel, HookFunction, UnknownNameError
from flex_surgery.hooks.groups import HookGroups
from flex_surgery.surgery import delete_blocks, permute_blocks


@pytest.fixture
def count_walks(monkeypatch):
    """Count walks of a model from its root: ``named_modules`` calls that are not the
    recursion into a child (those pass a ``prefix``)."""
    calls = []
    original = nn.Module.named_modules

    def counting(self, memo=None, prefix="", *args, **kwargs):
        if not prefix:
            calls.append(type(self).__name__)
        return original(self, memo, prefix, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return calls


def _forward_hooks(module: nn.Module) -> int:
    return len(module._forward_hooks)


def test_registering_on_every_module_walks_the_model_at_most_once(count_walks):
    model, _ = make("llama")
    names = [n for n, _ in nn.Module.named_modules(model) if n]
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    flex = FlexModel(model, {})
    count_walks.clear()
    for name in names:
        flex.register_forward_hook(HookFunction(name))
        flex.register_forward_pre_hook(HookFunction(name))
    for name in params:
        flex.register_hook(HookFunction(name))
    assert len(names) > 20 and len(count_walks) <= 1, count_walks  # not one walk per hook
    assert flex._names.builds <= 1
    assert all(_forward_hooks(model.get_submodule(n)) == 1 for n in names)
    flex.restore()


def test_a_name_whose_module_surgery_replaced_resolves_to_the_new_one():
    model, inputs = make("llama")
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("model.layers.0.mlp"))  # builds the table
    old0, old1 = model.model.layers[0], model.model.layers[1]
    with permute_blocks(model, [1, 0]):
        hf = HookFunction("model.layers.0.mlp")
        flex.register_forward_hook(hf)
        assert hf._site.module is old1.mlp  # what runs first now, not the table's old entry
        assert _forward_hooks(old1.mlp) == 1 and _forward_hooks(old0.mlp) == 1
        flex.remove_hook_function(hf)
    with delete_blocks(model, [0]):
        with pytest.raises(UnknownNameError):
            flex.register_forward_hook(HookFunction("model.layers.1.mlp"))  # gone
        with pytest.raises(UnknownNameError):
            flex.register_hook(HookFunction("model.layers.1.mlp.up_proj.weight"))
        hf = HookFunction("model.layers.0.mlp")
        flex.register_forward_hook(hf)
        assert hf._site.module is old1.mlp
        flex.remove_hook_function(hf)
    assert flex.get_module_parameter("model.layers.1.mlp.up_proj.weight").shape == \
        old1.mlp.up_proj.weight.shape  # the original blocks are back and found again
    flex.restore()


def test_a_replaced_parameter_is_found_not_the_stale_one():
    model, _ = make("llama")
    flex = FlexModel(model, {})
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(flex.get_module_parameter(name), model.get_parameter(name).detach())
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = nn.Parameter(torch.full_like(mlp.up_proj.weight, 3.0))
    assert torch.equal(flex.get_module_parameter(name), torch.full_like(mlp.up_proj.weight, 3.0))
    hf = HookFunction(name)
    flex.register_hook(hf)
    assert hf._site.parameter is mlp.up_proj.weight
    flex.restore()


def test_repeating_a_choice_of_groups_does_not_recompute_it(monkeypatch):
    model, inputs = make("llama")
    flex = FlexModel(model, {})
    flex.create_hook_group("mlps", "*.mlp")
    flex.create_hook_group("attn", "*.self_attn")
    calls = []
    original = HookGroups.select
    monkeypatch.setattr(HookGroups, "select",
                        lambda self, *a: calls.append(a) or original(self, *a))
    with torch.no_grad():
        for _ in range(3):
            flex(**inputs, groups="mlps")
        assert len(calls) == 1
        flex(**inputs, groups="attn")
        flex.update_hook_groups("layers.0.mlp", "attn")  # a group change: chosen again
        flex(**inputs, groups="attn")
    assert len(calls) == 3
    flex.restore()


def test_hooks_never_import_viz():
    """``viz`` reads from ``hooks``; the reverse would be an import cycle."""
    hooks_dir = pathlib.Path(__file__).resolve().parents[1] / "flex_surgery" / "hooks"
    offenders = []
    for path in sorted(hooks_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = {a.name for a in node.names}
                if module.startswith("flex_surgery.viz") or \
                        (module == "flex_surgery" and "viz" in names):
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import):
                if any(a.name.startswith("flex_surgery.viz") for a in node.names):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    assert not hasattr(FlexModel, "hook_map")  # flex_surgery.viz.hook_map(flex) draws it
