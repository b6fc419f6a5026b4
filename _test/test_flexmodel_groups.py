"""Hook groups: set semantics, per-call selection, complements, re-enabling, name patterns."""

from __future__ import annotations

import re

import pytest
import torch
from flexmodel_helpers import make
from hypothesis import given, settings
from hypothesis import strategies as st
from parallel_cases import H, plain_net

from flex_surgery.hooks import FlexModel, GroupError, HookFunction, UnknownGroupError
from flex_surgery.hooks import wrapper as wrapper_module
from flex_surgery.parallel.runtime import LocalRuntime


def llama_flex(output_dict):
    model, inputs = make("llama")
    return model, inputs, FlexModel(model, output_dict)


def test_create_hook_group_name_patterns():
    model, _, flex = llama_flex({})
    sub = flex.create_hook_group("sub", "mlp.up_proj")
    glob = flex.create_hook_group("glob", "*.mlp")
    regex = flex.create_hook_group("regex", "re:model\\.layers\\.1\\.self_attn\\.(q|k)_proj")
    compiled = flex.create_hook_group("compiled", re.compile(r"model\.layers\.\d"))
    grads = flex.create_hook_group("grads", "*.o_proj.weight", hook_type="tensor")

    assert [h.module_name for h in sub] == ["model.layers.0.mlp.up_proj",
                                            "model.layers.1.mlp.up_proj"]
    assert [h.module_name for h in glob] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [h.module_name for h in regex] == ["model.layers.1.self_attn.q_proj",
                                              "model.layers.1.self_attn.k_proj"]
    assert [h.module_name for h in compiled] == ["model.layers.0", "model.layers.1"]
    assert [h.module_name for h in grads] == ["model.layers.0.self_attn.o_proj.weight",
                                              "model.layers.1.self_attn.o_proj.weight"]
    assert all(h.hook_type == "tensor" for h in grads)
    assert flex.get_group_hook_functions("glob") == glob
    assert flex.get_hook_function_groups(glob[0]) == {"all", "glob"}
    assert len(flex.get_group_hook_functions("all")) == 10
    flex.restore()


def test_groups_and_complement_partition_the_activations_exactly():
    output_dict: dict = {}
    model, inputs, flex = llama_flex(output_dict)
    mlps = flex.create_hook_group("mlps", "*.mlp")
    attns = flex.create_hook_group("attns", "*.self_attn")
    norms = flex.create_hook_group("norms", "*layernorm")

    flex(**inputs)
    everything = {k: v[0] for k, v in output_dict.items()}
    assert len(everything) == len(mlps) + len(attns) + len(norms) == 8

    output_dict.clear()
    flex(**inputs, groups=["mlps", "attns"])
    chosen = dict(output_dict)
    output_dict.clear()
    flex(**inputs, groups=["mlps", "attns"], complement=True)
    rest = dict(output_dict)

    assert set(chosen) == {h.module_name for h in mlps + attns}
    assert set(rest) == {h.module_name for h in norms}
    assert set(chosen).isdisjoint(rest) and set(chosen) | set(rest) == set(everything)
    for key, stored in {**chosen, **rest}.items():
        assert len(stored) == 1 and torch.equal(stored[0], everything[key])

    output_dict.clear()
    flex(**inputs, groups="all", complement=True)
    assert output_dict == {}
    flex.restore()


def test_reenabling_a_group_after_a_call_that_disabled_it():
    output_dict: dict = {}
    model, inputs, flex = llama_flex(output_dict)
    baseline = model(**inputs).logits
    flex.create_hook_group("edit", "model.layers.0.mlp.down_proj",
                           editing_function=lambda m, x, ctx, mods: x * 0)
    flex.create_hook_group("read", "re:model.layers.1.mlp")  # whole name: not its children

    edited = flex(**inputs).logits
    assert not torch.equal(edited, baseline)
    off = flex(**inputs, groups="read").logits
    assert torch.equal(off, baseline)
    assert list(output_dict) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp"]
    assert len(output_dict["model.layers.0.mlp.down_proj"]) == 1  # not stored while disabled
    again = flex(**inputs, groups="edit").logits
    assert torch.equal(again, edited)
    assert len(output_dict["model.layers.0.mlp.down_proj"]) == 2
    assert len(output_dict["model.layers.1.mlp"]) == 2  # disabled in the last call
    assert torch.equal(flex(**inputs).logits, edited)
    flex.restore()


def test_update_and_remove_hook_groups():
    model, inputs, flex = llama_flex({})
    hooks = flex.create_hook_group("mlps", "*.mlp")
    single = HookFunction("model.norm")
    flex.register_forward_hook(single)
    assert flex.get_hook_function_groups(single) == {"all"}

    flex.update_hook_groups(single, "mine")
    flex.update_hook_groups(hooks, "mine")
    flex.update_hook_groups(hooks, "mine")  # set semantics: no duplicates
    assert flex.get_group_hook_functions("mine") == hooks + [single]
    flex.update_hook_groups("layers.1", "second")
    assert flex.get_group_hook_functions("second") == [hooks[1]]

    flex.remove_hook_groups("*.mlp", "mine")
    assert flex.get_group_hook_functions("mine") == [single]
    flex.remove_hook_groups([single], "mine")
    assert flex.get_group_hook_functions("mine") == []
    assert "mine" in flex.hook_groups  # an emptied group still exists and selects nothing
    output_dict = flex.output_dict
    flex(**inputs, groups="mine")
    assert output_dict == {}

    groups = flex.get_hook_function_groups()
    assert groups == {hooks[0]: {"all", "mlps"}, hooks[1]: {"all", "mlps", "second"},
                      single: {"all"}}
    flex.restore()


def test_group_errors():
    model, inputs, flex = llama_flex({})
    hooks = flex.create_hook_group("mlps", "*.mlp")
    with pytest.raises(UnknownGroupError, match="did you mean 'mlps'"):
        flex(**inputs, groups="mlp")
    with pytest.raises(UnknownGroupError):
        flex.get_group_hook_functions("nope")
    with pytest.raises(GroupError, match="cannot be removed"):
        flex.remove_hook_groups(hooks, "all")
    with pytest.raises(GroupError, match="not in group"):
        flex.update_hook_groups(hooks[0], "one")
        flex.remove_hook_groups(hooks[1], "one")
    with pytest.raises(GroupError, match="matches no registered hook"):
        flex.update_hook_groups("lm_head", "x")
    with pytest.raises(GroupError, match="not registered"):
        flex.update_hook_groups(HookFunction("model.norm"), "x")
    with pytest.raises(ValueError, match="empty name pattern"):
        flex.create_hook_group("x", "")
    flex.restore()


class CountingRuntime(LocalRuntime):
    """LocalRuntime that counts how often hooks ask it for work."""

    def __init__(self) -> None:
        self.calls = 0

    def retrieve(self, local, site, store):
        self.calls += 1
        return super().retrieve(local, site, store)

    def gather_for_edit(self, local, site, everywhere=False):
        self.calls += 1
        return super().gather_for_edit(local, site, everywhere)


def test_disabled_hooks_do_no_work(monkeypatch):
    runtime = CountingRuntime()
    monkeypatch.setattr(wrapper_module, "build_runtime", lambda *args, **kwargs: runtime)
    model, inputs = make("llama")
    edits = []
    flex = FlexModel(model, {})
    flex.create_hook_group("all_modules", "model.layers",
                           editing_function=lambda m, x, ctx, mods: edits.append(1) or x)
    flex.create_hook_group("grads", "*.weight", hook_type="tensor")
    flex(**inputs, groups="all", complement=True).logits.sum().backward()
    assert runtime.calls == 0 and edits == [] and flex.output_dict == {}
    flex(**inputs, groups="grads").logits.sum().backward()
    assert runtime.calls == len(flex.get_group_hook_functions("grads")) and edits == []
    flex.restore()


def test_selection_holds_for_the_backward_of_that_call():
    output_dict: dict = {}
    model, inputs = make("llama")
    flex = FlexModel(model, output_dict, key_by_hook_kind=True)  # tells the kinds apart
    flex.create_hook_group("bw", "*.mlp", hook_type="full_backward")
    flex.create_hook_group("fw", "*.mlp")
    flex(**inputs, groups="bw").logits.sum().backward()
    assert sorted(output_dict) == ["model.layers.0.mlp:grad_input",
                                   "model.layers.1.mlp:grad_input"]
    output_dict.clear()
    flex(**inputs, groups="fw").logits.sum().backward()
    assert sorted(output_dict) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    flex.restore()


def _linear_stack():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(5)])


GROUP_NAMES = ("a", "b", "c")


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove"]),
                              st.sets(st.integers(0, 4), min_size=1),
                              st.sampled_from(GROUP_NAMES)), max_size=12),
       chosen=st.sets(st.sampled_from(GROUP_NAMES + ("all",)), min_size=1),
       complement=st.booleans())
def test_groups_behave_like_sets(ops, chosen, complement):
    """Random adds/removes, then one call: exactly the reference set of hooks stores."""
    output_dict: dict = {}
    flex = FlexModel(_linear_stack(), output_dict)
    hooks = flex.create_hook_group("a", "re:\\d")
    reference = {i: {"all", "a"} for i in range(5)}
    for op, members, group in ops:
        selected = [hooks[i] for i in sorted(members)]
        if op == "add":
            flex.update_hook_groups(selected, group)
            for i in members:
                reference[i].add(group)
        elif all(group in reference[i] for i in members):
            flex.remove_hook_groups(selected, group)
            for i in members:
                reference[i].discard(group)
        else:
            with pytest.raises((GroupError, UnknownGroupError)):
                flex.remove_hook_groups(selected, group)
    for i, hf in enumerate(hooks):
        assert flex.get_hook_function_groups(hf) == reference[i]

    known = {"all", "a"} | {g for op, _, g in ops if op == "add"}  # emptied groups stay known
    if not chosen <= known:
        with pytest.raises(UnknownGroupError):
            flex(torch.ones(1, 3), groups=sorted(chosen), complement=complement)
        return
    flex(torch.ones(1, 3), groups=sorted(chosen), complement=complement)
    expected = {str(i) for i in range(5) if reference[i].isdisjoint(chosen) == complement}
    assert set(output_dict) == expected
    assert all(len(v) == 1 for v in output_dict.values())


def test_disabled_module_backward_hooks_leave_the_graph_alone_and_keep_their_order():
    model, inputs = make("llama")
    mlp = model.get_submodule("model.layers.0.mlp")

    def raw_grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = raw_grads()
    h1 = mlp.register_full_backward_hook(lambda m, gin, gout: (gin[0] * 2,))
    h2 = mlp.register_full_backward_hook(lambda m, gin, gout: (gin[0] + 1,))
    ordered = raw_grads()  # (g * 2) + 1, not (g + 1) * 2
    h1.remove()
    h2.remove()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    first = HookFunction("model.layers.0.mlp", editing_function=lambda m, g, c, d: g * 2)
    second = HookFunction("model.layers.0.mlp", editing_function=lambda m, g, c, d: g + 1)
    flex.register_full_backward_hook(first)
    flex.register_full_backward_hook(second)
    flex.update_hook_groups(second, "second")
    flex.create_hook_group("read", "re:model.norm")

    def flex_grads(groups):
        model.zero_grad(set_to_none=True)
        out = flex(**inputs, groups=groups).logits
        out.sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = flex_grads("read")
    assert not mlp._backward_hooks and not mlp._backward_pre_hooks
    assert all(torch.equal(grads[n], plain[n]) for n in plain)
    out, grads = flex_grads(["second", "read"])  # only `second`
    assert list(mlp._backward_hooks.values()) == [second.torch_hook()]
    out, grads = flex_grads("all")  # both again, in registration order
    assert all(torch.equal(grads[n], ordered[n]) for n in ordered)
    assert any(not torch.equal(ordered[n], plain[n]) for n in plain)
    flex.restore()
    assert not mlp._backward_hooks


@pytest.mark.parametrize("bad_name", ["", None, 3])
def test_create_hook_group_with_a_bad_group_name_registers_nothing(bad_name):
    """``create_hook_group`` "registers all of its hooks or none". Found: an invalid group
    name raised ValueError only after every hook was registered, so the hooks stayed, in
    group "all", and their editing function ran at every later forward."""
    torch.manual_seed(0)
    model = plain_net()
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        clean = model(x)
    stored = {}
    flex = FlexModel(model, stored)
    with pytest.raises(ValueError, match="group name"):
        flex.create_hook_group(bad_name, "blocks.0.up",
                               editing_function=lambda m, t, c, mods: t * 0)
    assert flex.hook_functions == []
    assert not model.blocks[0].up._forward_hooks
    with torch.no_grad():
        assert torch.equal(flex(x), clean)
    assert stored == {}
    flex.restore()
