"""FlexModel hooks behave exactly like the raw PyTorch hooks they stand for.

On every tiny architecture and for every hook kind, an editing HookFunction (x2) gives the same
outputs, later activations and parameter gradients (``torch.equal``) as the hand-written
PyTorch hook, and stores the value it saw before editing. Retrieval-only hooks change nothing
and store one tensor per call.
"""

from __future__ import annotations

import pytest
import torch
from flexmodel_helpers import (
    KIND_POINT,
    KINDS,
    POINTS,
    assert_runs_equal,
    make,
    raw_hook,
    register,
    run,
    runs_differ,
)

from flex_surgery.hooks import FlexModel, HookFunction, output_key
from flex_surgery.models import TINY_ARCHITECTURES


def double(module, tensor, save_ctx, modules):
    return tensor * 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_editing_hook_matches_raw_pytorch_hook(arch, kind):
    model, inputs = make(arch)
    points = POINTS[arch]
    name = points[KIND_POINT[kind]]

    baseline = run(lambda: model(**inputs), model, points["later"])

    raw_seen: list[torch.Tensor] = []
    handle = raw_hook(model, kind, name, lambda t: t * 2, raw_seen)
    raw = run(lambda: model(**inputs), model, points["later"])
    handle.remove()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    register(flex, kind)(HookFunction(name, editing_function=double))
    edited = run(lambda: flex(**inputs), model, points["later"])
    flex.restore()

    assert runs_differ(raw, baseline), "the x2 edit must change outputs or gradients"
    assert_runs_equal(edited, raw)
    stored = output_dict[output_key(name, kind)]
    assert len(stored) == len(raw_seen) == 1
    assert torch.equal(stored[0], raw_seen[0]), "stores the value before editing"


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_retrieval_hooks_change_nothing_and_store_one_tensor_per_call(arch):
    model, inputs = make(arch)
    points = POINTS[arch]

    baseline = run(lambda: model(**inputs), model, points["later"])

    raw_seen = {kind: [] for kind in KINDS}
    handles = [raw_hook(model, kind, points[KIND_POINT[kind]], None, raw_seen[kind])
               for kind in KINDS]
    run(lambda: model(**inputs), model, points["later"])
    for h in handles:
        h.remove()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict, key_by_hook_kind=True)  # three kinds hook one module
    for kind in KINDS:
        register(flex, kind)(HookFunction(points[KIND_POINT[kind]]))
    first = run(lambda: flex(**inputs), model, points["later"])
    second = run(lambda: flex(**inputs), model, points["later"])
    flex.restore()

    assert_runs_equal(first, baseline)
    assert_runs_equal(second, baseline)
    assert len(output_dict) == len(KINDS)
    for kind in KINDS:
        stored = output_dict[output_key(points[KIND_POINT[kind]], kind, by_hook_kind=True)]
        assert len(stored) == 2, kind
        for tensor in stored:
            assert tensor.device.type == "cpu" and not tensor.requires_grad
            assert torch.equal(tensor, raw_seen[kind][0]), kind


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hook_on_whole_model_edits_a_model_output_field(arch):
    """The root's HF ModelOutput round-trips through pytree; unpack_idx picks the field."""
    model, inputs = make(arch)
    reference = model(**inputs)
    index = 1 if arch == "bert" else 0  # bert: pooler_output; llama: logits
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("", editing_function=double, unpack_idx=index))
    out = flex(**inputs)
    flex.restore()

    assert type(out) is type(reference)
    assert list(out.keys()) == list(reference.keys())
    for i, key in enumerate(reference.keys()):
        expected = reference[key] * 2 if i == index else reference[key]
        assert torch.equal(out[key], expected), key


def test_forward_pre_hook_finds_tensors_passed_as_keywords():
    """Llama calls self_attn(hidden_states=...): the pre-hook still sees and edits it."""
    model, inputs = make("llama")
    name = POINTS["llama"]["attn"]

    def raw_pre(module, args, kwargs):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 2}

    handle = model.get_submodule(name).register_forward_pre_hook(raw_pre, with_kwargs=True)
    raw = run(lambda: model(**inputs), model, POINTS["llama"]["later"])
    handle.remove()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    flex.register_forward_pre_hook(HookFunction(name, editing_function=double))
    edited = run(lambda: flex(**inputs), model, POINTS["llama"]["later"])
    flex.restore()

    assert_runs_equal(edited, raw)
    assert output_dict[name][0].shape == (2, 8, 64)
