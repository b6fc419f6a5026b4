"""FlexModel's shared state, restore(), DummyModule, parameters, and every bad-input error."""

from __future__ import annotations

import pytest
import torch
from flexmodel_helpers import POINTS, hooks_left, make, run
from torch import nn

from flex_surgery.hooks import (
    DummyModule,
    EditingFunctionError,
    FlexModel,
    HookFunction,
    HookRegistrationError,
    ShapeMismatchError,
    UnknownNameError,
    UnpackError,
)

MLP0, MLP1 = "model.layers.0.mlp", "model.layers.1.mlp"


def test_save_ctx_carries_a_tensor_between_layers_and_calls():
    model, inputs = make("llama")

    raw_ctx = {}
    h0 = model.get_submodule(MLP0).register_forward_hook(
        lambda m, a, out: raw_ctx.__setitem__("h", out))
    h1 = model.get_submodule(MLP1).register_forward_hook(
        lambda m, a, out: out + raw_ctx["h"])
    raw = run(lambda: model(**inputs), model, "model.norm")
    h0.remove()
    h1.remove()

    def save(module, x, ctx, modules):
        ctx.h = x
        ctx.calls = getattr(ctx, "calls", 0) + 1
        return x

    def add_saved(module, x, ctx, modules):
        return x + ctx.h

    flex = FlexModel(model, None)
    flex.register_forward_hook(HookFunction(MLP0, editing_function=save))
    flex.register_forward_hook(HookFunction(MLP1, editing_function=add_saved))
    edited = run(lambda: flex(**inputs), model, "model.norm")
    flex(**inputs)
    assert flex.save_ctx.calls == 2
    flex.restore()

    baseline = run(lambda: model(**inputs), model, "model.norm")
    assert not torch.equal(raw[0], baseline[0])
    assert torch.equal(edited[0], raw[0]) and torch.equal(edited[1][0], raw[1][0])
    for name in raw[2]:
        assert torch.equal(edited[2][name], raw[2][name]), name


def test_trainable_module_in_editing_function_gets_gradients():
    model, inputs = make("llama")
    model.requires_grad_(False)
    probe = nn.Linear(64, 64)
    flex = FlexModel(model, {})
    flex.register_trainable_module("probe", probe)
    flex.register_forward_hook(HookFunction(
        MLP0, editing_function=lambda m, x, ctx, modules: x + modules["probe"](x)))
    flex(**inputs).logits.square().mean().backward()
    flex_grad = probe.weight.grad.clone()
    flex.restore()
    assert any(p is probe.weight for p in flex.parameters())
    assert flex_grad.abs().sum() > 0

    probe.zero_grad(set_to_none=True)
    handle = model.get_submodule(MLP0).register_forward_hook(lambda m, a, out: out + probe(out))
    model(**inputs).logits.square().mean().backward()
    handle.remove()
    assert torch.equal(flex_grad, probe.weight.grad)


def test_restore_leaves_nothing_behind():
    model, inputs = make("gpt2")
    points = POINTS["gpt2"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {n: set(vars(m)) for n, m in model.named_modules()}
    reference = run(lambda: model(**inputs), model, points["later"])
    assert hooks_left(model) == []

    flex = FlexModel(model, {})
    twice = lambda m, x, ctx, mods: x * 2  # noqa: E731
    flex.register_forward_hook(HookFunction(points["attn"], editing_function=twice))
    flex.register_forward_pre_hook(HookFunction(points["mlp"], editing_function=twice))
    flex.register_full_backward_hook(HookFunction(points["mlp"], editing_function=twice))
    flex.register_full_backward_pre_hook(HookFunction(points["mlp"]))
    flex.register_hook(HookFunction(points["param"], editing_function=twice))
    flex.create_hook_group("blocks", "*.ln_?")
    flex.register_trainable_module("probe", nn.Linear(2, 2))
    run(lambda: flex(**inputs), model, points["later"])
    assert hooks_left(model)

    restored = flex.restore()
    assert restored is model
    assert hooks_left(model) == []
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attributes
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    again = run(lambda: model(**inputs), model, points["later"])
    assert torch.equal(again[0], reference[0])
    assert all(torch.equal(again[2][n], reference[2][n]) for n in reference[2])
    with pytest.raises(RuntimeError, match="restored"):
        flex(**inputs)


def test_hook_function_can_move_to_a_new_flexmodel_after_restore():
    model, inputs = make("llama")
    hf = HookFunction(MLP0)
    first = FlexModel(model, {})
    first.register_forward_hook(hf)
    with pytest.raises(HookRegistrationError, match="already registered with this"):
        first.register_forward_pre_hook(hf)
    with pytest.raises(HookRegistrationError, match="another FlexModel"):
        FlexModel(make("llama")[0], {}).register_forward_hook(hf)
    first.restore()
    second_dict: dict = {}
    second = FlexModel(model, second_dict)
    second.register_forward_hook(hf)
    second(**inputs)
    assert len(second_dict[MLP0]) == 1
    second.remove_hook_function(hf)
    assert hooks_left(model) == [] and second.hook_functions == []
    second(**inputs)
    assert len(second_dict[MLP0]) == 1


def test_dummy_module_is_a_hook_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), DummyModule(), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    plain = model(x)
    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    flex.register_forward_hook(HookFunction("1", editing_function=lambda m, h, c, mods: -h))
    edited = flex(x)
    flex.restore()
    hidden = model[0](x)
    assert torch.equal(output_dict["1"][0], hidden)
    assert torch.equal(edited, model[3](torch.relu(-hidden)))
    assert not torch.equal(edited, plain)
    assert list(DummyModule().parameters()) == []


def test_get_module_parameter_returns_a_detached_cpu_copy():
    model, _ = make("llama")
    flex = FlexModel(model, {})
    name = "model.layers.0.mlp.up_proj.weight"
    weight = flex.get_module_parameter(name, expected_shape=(128, None))
    assert torch.equal(weight, model.get_parameter(name))
    assert not weight.requires_grad and weight.device.type == "cpu"
    weight.add_(1)
    assert not torch.equal(weight, model.get_parameter(name))
    with pytest.raises(ShapeMismatchError, match="expected_shape"):
        flex.get_module_parameter(name, expected_shape=(64, 64))
    with pytest.raises(UnknownNameError, match="did you mean"):
        flex.get_module_parameter("model.layers.0.mlp.up_proj.wieght")
    flex.restore()


# -- bad input: every one raises, naming what is wrong --------------------------------------


def test_unknown_names_suggest_the_closest():
    model, _ = make("llama")
    flex = FlexModel(model, {})
    with pytest.raises(UnknownNameError, match="did you mean 'model.layers.0.mlp'"):
        flex.register_forward_hook(HookFunction("model.layer.0.mlp"))
    with pytest.raises(UnknownNameError, match="it is a parameter: use register_hook"):
        flex.register_forward_hook(HookFunction("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(UnknownNameError, match="it is a module"):
        flex.register_hook(HookFunction("model.layers.0.mlp.up_proj"))
    with pytest.raises(UnknownNameError, match="matches no module name"):
        flex.create_hook_group("g", "*.feed_forward")
    assert flex.hook_functions == []
    flex.restore()


@pytest.mark.parametrize("result, message", [
    (lambda x: None, "returned None"),
    (lambda x: x.tolist(), "returned a list"),
    (lambda x: x[:, :1], "must keep the input's shape"),
    (lambda x: x.double(), "dtype"),
    (lambda x: x.to("meta"), "must stay on cpu"),
])
def test_bad_editing_function_results(result, message):
    model, inputs = make("llama")
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction(MLP0, editing_function=lambda m, x, c, d: result(x)))
    with pytest.raises(EditingFunctionError, match=message) as info:
        flex(**inputs)
    assert MLP0 in str(info.value)
    flex.restore()


def test_unpack_idx_out_of_range():
    model, inputs = make("llama")
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction(POINTS["llama"]["attn"], unpack_idx=2))
    with pytest.raises(UnpackError, match="unpack_idx=2 is out of range.*2 tensor"):
        flex(**inputs)
    with pytest.raises(HookRegistrationError, match="unpack_idx must be 0"):
        flex.register_hook(HookFunction("model.layers.0.mlp.up_proj.weight", unpack_idx=1))
    with pytest.raises(ValueError, match="unpack_idx"):
        HookFunction(MLP0, unpack_idx=-1)
    flex.restore()


def test_expected_shape_disagreement():
    model, inputs = make("llama")  # batch 2, seq 8, hidden 64
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction(MLP0, expected_shape=(2, None, 64)))
    flex(**inputs)
    flex.register_forward_hook(HookFunction(MLP1, expected_shape=(2, 8, 32)))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 8, 64\).*\(2, 8, 32\)"):
        flex(**inputs)
    flex.restore()

    edit_only = FlexModel(model, None)
    edit_only.register_forward_hook(HookFunction(
        MLP0, expected_shape=(2, 8), editing_function=lambda m, x, c, d: x))
    with pytest.raises(ShapeMismatchError, match=MLP0):
        edit_only(**inputs)
    edit_only.restore()


def test_other_registration_errors():
    model, _ = make("llama")
    flex = FlexModel(model, None)
    with pytest.raises(HookRegistrationError, match="would do nothing"):
        flex.register_forward_hook(HookFunction(MLP0))
    with pytest.raises(TypeError, match="did you mean 'editing_function'"):
        flex.create_hook_group("g", "*.mlp", editing_fn=lambda m, x, c, d: x)
    with pytest.raises(ValueError, match="unknown hook_type"):
        flex.create_hook_group("g", "*.mlp", hook_type="backwards")
    model.get_parameter("lm_head.weight").requires_grad_(False)
    with pytest.raises(HookRegistrationError, match="does not require grad"):
        flex.register_hook(HookFunction("lm_head.weight", editing_function=lambda *a: a[1]))
    with pytest.raises(HookRegistrationError, match="already registered as 'p'"):
        flex.register_trainable_module("p", nn.Linear(1, 1))
        flex.register_trainable_module("p", nn.Linear(1, 1))
    assert flex.hook_functions == []
    flex.restore()
    assert hooks_left(model) == []


def test_names_resolve_through_activation_checkpoint_wrappers():
    """Hooks address the model's own names; a recomputed forward stores nothing twice."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    from flex_surgery.naming import clean_name

    model, inputs = make("llama")
    handle = model.get_submodule(MLP0).register_forward_hook(lambda m, a, out: out * 2)
    raw = run(lambda: model(**inputs), model, "model.norm")
    handle.remove()

    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__.endswith("Layer"))
    assert "model.layers.0._checkpoint_wrapped_module.mlp" in dict(model.named_modules())
    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    flex.register_forward_hook(HookFunction(MLP0, editing_function=lambda m, x, c, d: x * 2))
    group = flex.create_hook_group("mlps", "*.mlp", hook_type="forward_pre")
    grads = flex.create_hook_group("grads", "*.up_proj.weight", hook_type="tensor")
    edited = run(lambda: flex(**inputs), model, "model.norm")
    flex.restore()

    assert [h.module_name for h in group] == [f"{MLP0}", f"{MLP1}"]
    assert [h.module_name for h in grads] == [f"{MLP0}.up_proj.weight", f"{MLP1}.up_proj.weight"]
    assert torch.equal(edited[0], raw[0])
    assert {clean_name(n): g for n, g in edited[2].items()}.keys() == raw[2].keys()
    for name, grad in edited[2].items():
        assert torch.equal(grad, raw[2][clean_name(name)]), name
    # Forward and forward-pre hooks on MLP0 share its key, as in FlexModel.
    assert {k: len(v) for k, v in output_dict.items()} == {
        MLP0: 2, MLP1: 1, f"{MLP0}.up_proj.weight": 1, f"{MLP1}.up_proj.weight": 1}
    assert hooks_left(model) == []


def test_docs_examples_run():
    """Every python block of docs/hooks.md runs as written (they share one namespace)."""
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}[{i}]", "exec"), namespace)


def test_unpack_counts_tensor_leaves_in_pytree_order():
    from torch.utils import _pytree as pytree
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from flex_surgery.hooks.unpack import unpack

    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    values = [
        (a, None, b),                       # flat tuple: fast path
        [None, a, b],
        {"x": a, "skip": 3, "y": (b, None, c)},
        ((a, b), "s", [c]),                 # nested tuple: pytree path
        BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=b),
    ]
    for value in values:
        tensors = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        for idx, expected in enumerate(tensors):
            found, repack = unpack(value, idx, "hook")
            assert found is expected
            replacement = torch.full_like(expected, -1.0)
            rebuilt = repack(replacement)
            assert type(rebuilt) is type(value)
            new = [x for x in pytree.tree_leaves(rebuilt) if isinstance(x, torch.Tensor)]
            assert new[idx] is replacement
            assert all(n is t for i, (n, t) in enumerate(zip(new, tensors)) if i != idx)
        with pytest.raises(UnpackError, match=f"holds {len(tensors)} tensor"):
            unpack(value, len(tensors), "hook")


def test_unpack_inputs_matches_pytree_order_of_args_then_kwargs():
    from torch.utils import _pytree as pytree

    from flex_surgery.hooks.unpack import unpack_inputs

    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    for args, kwargs in [((a,), {}), ((a, None, b), {"mask": c}), ((), {"h": a, "p": (b, c)}),
                         ((a, 3), {"x": b})]:
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        for idx, expected in enumerate(tensors):
            found, repack = unpack_inputs(args, kwargs, idx, "hook")
            assert found is expected
            new_args, new_kwargs = repack(c)
            rebuilt = [x for x in pytree.tree_leaves((new_args, new_kwargs))
                       if isinstance(x, torch.Tensor)]
            assert rebuilt[idx] is c and type(new_args) is tuple and type(new_kwargs) is dict
            assert all(r is t for i, (r, t) in enumerate(zip(rebuilt, tensors)) if i != idx)
        with pytest.raises(UnpackError):
            unpack_inputs(args, kwargs, len(tensors), "hook")


class _TakesKeyword(nn.Module):
    """A layer called as ``layer(hidden_states=x)``, as Megatron's TransformerLayer is."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.lin(hidden_states)


class _CallsByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = _TakesKeyword()

    def forward(self, x):
        return self.layer(hidden_states=x)


def test_full_backward_hook_of_a_layer_called_by_keyword_says_why_and_what_to_hook():
    """torch gives a full backward hook no gradient for keyword inputs: the hook raises an
    UnpackError that says so and names the hooks that see the gradient (before: 'holds no
    tensor'); the full_backward_pre hook of the same layer stores grad_output."""
    x = torch.randn(2, 4, requires_grad=True)
    stored: dict = {}
    with FlexModel(_CallsByKeyword(), stored) as flex:
        flex.register_full_backward_hook(HookFunction("layer"))
        with pytest.raises(UnpackError, match="keyword arguments.*full_backward_pre"):
            flex(x).sum().backward()
    stored = {}
    with FlexModel(_CallsByKeyword(), stored) as flex:
        flex.register_full_backward_pre_hook(HookFunction("layer"))
        flex(x).sum().backward()
    assert torch.equal(stored["layer"][0], torch.ones(2, 4))


# -- FlexModel 0.1.0's storage, keys and lifetime ------------------------------------------------


def _point_net():
    """Linear -> ReLU -> Linear with an input that requires grad, so every hook kind fires."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return net, torch.randn(2, 4, requires_grad=True)


def _raw_values_in_call_order(net, x, name):
    """What plain PyTorch hooks on ``net[name]`` and its weight see, in the order they fire."""
    module = net.get_submodule(name)
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a: seen.append(("pre", a[0].detach()))),
        module.register_forward_hook(lambda m, a, o: seen.append(("fwd", o.detach()))),
        module.register_full_backward_pre_hook(
            lambda m, go: seen.append(("bwd_pre", go[0].detach()))),
        module.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", gi[0].detach()))),
        module.weight.register_hook(lambda g: seen.append(("grad", g.detach()))),
    ]
    net(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    net.zero_grad(set_to_none=True)
    x.grad = None
    return seen


def _register_every_kind(flex, name):
    flex.register_forward_pre_hook(HookFunction(name))
    flex.register_forward_hook(HookFunction(name))
    flex.register_full_backward_pre_hook(HookFunction(name))
    flex.register_full_backward_hook(HookFunction(name))
    flex.register_hook(HookFunction(f"{name}.weight"))


def test_every_hook_kind_stores_under_the_registered_name_in_call_order():
    """As FlexModel 0.1.0: the key is the registered name whatever the hook kind, and kinds
    on one module share its list, one tensor per call in the order the hooks fire."""
    net, x = _point_net()
    raw = _raw_values_in_call_order(net, x, "2")
    output_dict: dict = {}
    flex = FlexModel(net, output_dict)
    _register_every_kind(flex, "2")
    flex(x).pow(2).sum().backward()
    flex.close()

    assert sorted(output_dict) == ["2", "2.weight"]
    module_calls = [t for kind, t in raw if kind != "grad"]
    assert len(output_dict["2"]) == len(module_calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(output_dict["2"], module_calls))
    assert [t.shape for t in output_dict["2"]] == [(2, 6), (2, 3), (2, 3), (2, 6)]
    (grad,) = [t for kind, t in raw if kind == "grad"]
    assert len(output_dict["2.weight"]) == 1 and torch.equal(output_dict["2.weight"][0], grad)


def test_key_by_hook_kind_gives_each_kind_its_own_key():
    net, x = _point_net()
    raw = dict(_raw_values_in_call_order(net, x, "2"))
    output_dict: dict = {}
    flex = FlexModel(net, output_dict, key_by_hook_kind=True)
    _register_every_kind(flex, "2")
    flex(x).pow(2).sum().backward()
    flex.close()

    keys = {"2:input": "pre", "2": "fwd", "2:grad_output": "bwd_pre", "2:grad_input": "bwd",
            "2.weight:grad": "grad"}
    assert sorted(output_dict) == sorted(keys)
    for key, kind in keys.items():
        assert len(output_dict[key]) == 1 and torch.equal(output_dict[key][0], raw[kind]), key


def test_a_hook_that_fires_twice_per_forward_appends_twice_and_keep_last_keeps_a_tensor():
    """A module called twice in one forward (weight sharing): FlexModel appends both calls;
    keep="last" keeps the latest call's tensor itself."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(2, 3)
    first = shared(x).detach()
    second = shared(torch.tanh(first)).detach()

    all_calls: dict = {}
    with FlexModel(net, all_calls) as flex:
        flex.register_forward_hook(HookFunction("0"))
        flex(x)
        flex(x)
    assert [torch.equal(t, e) for t, e in zip(all_calls["0"], [first, second] * 2)] == [True] * 4

    last: dict = {}
    with FlexModel(net, last, keep="last") as flex:
        flex.register_forward_hook(HookFunction("0"))
        flex.register_forward_hook(HookFunction("1"))
        flex(x)
    assert type(last["0"]) is torch.Tensor and torch.equal(last["0"], second)
    assert torch.equal(last["1"], torch.tanh(first))
    with pytest.raises(ValueError, match="keep must be one of"):
        FlexModel(net, {}, keep="first")


def test_keep_last_refuses_two_hook_kinds_on_one_key():
    """keep='last' holds one tensor per key: a backward hook sharing the forward hook's key would
    replace the stored activation with a gradient, so it is refused (nothing bound); with
    key_by_hook_kind=True both are kept, each its own tensor."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    x = torch.randn(2, 3, requires_grad=True)
    with FlexModel(net, {}, keep="last") as flex:
        flex.register_forward_hook(HookFunction("0"))
        backward = HookFunction("0")
        with pytest.raises(HookRegistrationError, match="key_by_hook_kind=True"):
            flex.register_full_backward_hook(backward)
        assert not backward.is_registered and len(flex.hook_functions) == 1
    stored: dict = {}
    with FlexModel(net, stored, keep="last", key_by_hook_kind=True) as flex:
        flex.register_forward_hook(HookFunction("0"))
        flex.register_full_backward_hook(HookFunction("0"))
        flex(x).sum().backward()
    assert torch.equal(stored["0"], net[0](x).detach())
    assert stored["0:grad_input"].shape == (2, 3)


@pytest.mark.parametrize("how", ["rebind", "del"])
def test_dropping_the_flexmodel_removes_its_hooks_without_gc(how):
    """``model = flex.module`` or ``del flex``: reference counting alone finalizes the
    FlexModel (nothing on the model keeps it alive), every hook goes, a plain forward is the
    plain model's, and its HookFunctions can be registered again."""
    import gc
    import weakref

    model, inputs = make("gpt2")
    points = POINTS["gpt2"]
    reference = run(lambda: model(**inputs), model, points["later"])
    hfs = [HookFunction(points["attn"], editing_function=lambda m, x, c, d: x * 2),
           HookFunction(points["mlp"]), HookFunction(points["param"])]
    gc.disable()
    try:
        flex = FlexModel(model, {})
        flex.register_forward_hook(hfs[0])
        flex.register_full_backward_hook(hfs[1])
        flex.register_hook(hfs[2])
        flex.create_hook_group("norms", "*.ln_?")
        alive = weakref.ref(flex)
        assert hooks_left(model)
        if how == "rebind":
            flex = flex.module
        else:
            del flex
        assert alive() is None
        assert hooks_left(model) == []
    finally:
        gc.enable()
    again = run(lambda: model(**inputs), model, points["later"])
    assert torch.equal(again[0], reference[0])
    assert all(torch.equal(again[2][n], reference[2][n]) for n in reference[2])
    assert not any(hf.is_registered for hf in hfs)
    FlexModel(model, {}).register_forward_hook(hfs[0])  # reusable


def test_close_and_with_block_remove_hooks_at_once():
    model, inputs = make("llama")
    closes = []
    with FlexModel(model, {}) as flex:
        flex.runtime.close = lambda: closes.append(1)  # the runtime frees what it created
        flex.register_full_backward_hook(HookFunction(MLP0))
        flex.register_hook(HookFunction(f"{MLP0}.up_proj.weight"))
        assert hooks_left(model)
    assert hooks_left(model) == [] and closes == [1]
    flex.close()  # idempotent
    assert closes == [1]
    with pytest.raises(RuntimeError, match="closed"):
        flex(**inputs)
    with pytest.raises(RuntimeError, match="closed"):
        with flex:
            pass

    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction(MLP0))
    with pytest.raises(KeyError):
        with flex:
            raise KeyError("the with block's exception propagates; hooks still go")
    assert hooks_left(model) == []


def test_a_registration_that_fails_part_way_leaves_no_hook_bound(monkeypatch):
    model, inputs = make("llama")
    flex = FlexModel(model, {})

    # The parameter hook fails after its HookFunction was bound.
    def broken(*args, **kwargs):
        raise RuntimeError("cannot hook this parameter")

    monkeypatch.setattr(flex.runtime, "register_parameter_hook", broken)
    hf = HookFunction(f"{MLP0}.up_proj.weight")
    with pytest.raises(RuntimeError, match="cannot hook"):
        flex.register_hook(hf)
    assert not hf.is_registered and hf.hook_type is None and flex.hook_functions == []
    monkeypatch.undo()

    # The module hook fails inside PyTorch's registration.
    mlp = model.get_submodule(MLP0)
    monkeypatch.setattr(mlp, "register_full_backward_hook", broken, raising=False)
    hf_module = HookFunction(MLP0)
    with pytest.raises(RuntimeError):
        flex.register_full_backward_hook(hf_module)
    assert not hf_module.is_registered and flex.hook_functions == []
    monkeypatch.undo()
    assert hooks_left(model) == []

    # A group fails on its second module: the first one is taken off again.
    calls = []
    original = type(mlp).register_forward_hook

    def second_fails(module, *args, **kwargs):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("second registration fails")
        return original(module, *args, **kwargs)

    monkeypatch.setattr(type(mlp), "register_forward_hook", second_fails)
    with pytest.raises(RuntimeError, match="second registration"):
        flex.create_hook_group("mlps", "*.mlp")
    monkeypatch.undo()
    assert len(calls) == 2 and flex.hook_functions == [] and hooks_left(model) == []

    # Afterwards the same HookFunctions register normally.
    flex.register_hook(hf)
    flex.register_full_backward_hook(hf_module)
    flex(**inputs).logits.sum().backward()
    assert set(flex.output_dict) == {MLP0, f"{MLP0}.up_proj.weight"}
    flex.close()
    assert hooks_left(model) == []


def test_flexmodel_0_1_0_attribute_names():
    """``output_ptr`` is FlexModel 0.1.0's name of the output dict; ``all_modules_names``
    lists wrapped then trainable module names (0.1.0's raises AttributeError)."""
    net = nn.Sequential(nn.Linear(2, 2))
    first, second = {}, {}
    flex = FlexModel(net, first)
    assert flex.output_ptr is first
    flex.output_ptr = second
    assert flex.output_dict is second
    flex.register_trainable_module("probe", nn.Linear(2, 2))
    assert flex.all_modules_names == ["", "0", "probe"]
    # private names FlexModel 0.1.0's code reads: views of the FlexModel's own objects
    hook = HookFunction("0")
    assert hook._shared_state is None
    flex.register_forward_hook(hook)
    assert hook._shared_state.output_ptr is flex.output_dict is second
    assert hook._shared_state.save_ctx is flex.save_ctx
    assert hook._shared_state.modules is flex.trainable_modules
    assert flex._hook_fn_group_manager.hook_fn_to_groups_map == {hook: {"all"}}
    flex.update_hook_groups(hook, "mine")
    assert flex._hook_fn_group_manager.hook_fn_to_groups_map == {hook: {"all", "mine"}}
    flex.close()


def test_a_failed_forward_completes_its_deferred_work_before_raising():
    """Nothing a failed call started (a host copy, an overlapped gather) crosses into the next."""
    from flex_surgery.parallel import runtime

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    completed = []

    def defer_then_fail(module, x, ctx, modules):
        runtime.defer(lambda: completed.append("copy"))
        raise RuntimeError("boom")

    flex = FlexModel(net, {}, overlap_retrieval=True)
    flex.register_forward_hook(HookFunction("1", editing_function=defer_then_fail))
    with pytest.raises(RuntimeError, match="boom"):
        flex(torch.ones(1, 2))
    assert completed == ["copy"] and runtime._PENDING == []
    flex.close()
