"""The bad-input catalogue: every mistake is a clear error, on every rank, and leaves nothing
modified.

One table, run on two data-parallel ranks (a mesh FlexModel builds itself): each row does one
wrong thing and names the error it must raise. After each row the model has exactly the hooks
and weights it had before, no process group was left behind, and every rank reaches the same
all-reduce (a rank that raised alone would leave the other waiting there).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, plain_net
from rank_pool import distributed

from flex_surgery.hooks import (
    FlexModel,
    GroupError,
    HookFunction,
    HookRegistrationError,
    ShapeMismatchError,
    UnknownGroupError,
    UnknownNameError,
)
from flex_surgery.parallel.group_lifetime import free_dropped, live_group_count
from flex_surgery.parallel.layout import LayoutError
from flex_surgery.parallel.mesh import MeshSizeError
from flex_surgery.surgery import SurgeryError, SurgicalTheater


def _flex(model):
    return FlexModel(model, {}, data_parallel_size=2)


def _x():
    return torch.randn(2, 3, H)


def unknown_module(model):
    _flex(model).register_forward_hook(HookFunction("blocks.7.up"))


def unknown_group_constructor(model):
    _flex(model).create_hook_group("mlps", "no_such_module")


def parameter_given_to_a_module_hook(model):
    _flex(model).register_forward_hook(HookFunction("blocks.0.up.weight"))


def wrong_expected_shape(model):
    flex = _flex(model)
    flex.register_forward_hook(HookFunction("blocks.0", expected_shape=(5, 3, H)))
    flex(_x())


def expected_shape_of_the_wrong_rank(model):
    flex = _flex(model)
    flex.register_forward_hook(HookFunction("blocks.0", expected_shape=(None, H)))
    flex(_x())


def sizes_that_do_not_divide(model):
    FlexModel(model, {}, tensor_parallel_size=3)


def sizes_that_do_not_multiply_to_the_world(model):
    FlexModel(model, {}, tensor_parallel_size=2, data_parallel_size=2)


def unknown_group_in_a_call(model):
    flex = _flex(model)
    flex.create_hook_group("mlps", "*.up")
    flex(_x(), groups="mpls")


def removing_group_all(model):
    flex = _flex(model)
    flex.remove_hook_groups(flex.create_hook_group("mlps", "*.up"), "all")


def grouping_an_unregistered_hook(model):
    _flex(model).update_hook_groups(HookFunction("blocks.0.up"), "mlps")


def registering_a_hook_twice(model):
    flex = _flex(model)
    hf = HookFunction("blocks.0.up")
    flex.register_forward_hook(hf)
    flex.register_forward_pre_hook(hf)


def a_hook_of_another_flexmodel(model):
    other = FlexModel(plain_net(), {}, data_parallel_size=2)
    hf = HookFunction("blocks.0.up")
    other.register_forward_hook(hf)
    try:
        _flex(model).register_forward_hook(hf)
    finally:
        other.close()


def entering_an_active_theater_again(model):
    theater = SurgicalTheater(model, layers=["blocks.0.up"], modification_type="scale")
    with theater, theater:
        pass


def leaving_theaters_out_of_order(model):
    outer = SurgicalTheater(model, layers=["blocks.0.up"], modification_type="scale")
    inner = SurgicalTheater(model, layers=["blocks.1.up"], modification_type="disable")
    outer.__enter__()
    inner.__enter__()
    try:
        outer.__exit__(None, None, None)
    finally:
        inner.__exit__(None, None, None)
        outer.__exit__(None, None, None)


def a_second_flexmodel_on_a_wrapped_model(model):
    first = _flex(model)
    try:
        _flex(model)
    finally:
        first.close()


def wrapping_a_flexmodel(model):
    first = _flex(model)
    try:
        FlexModel(first, {})
    finally:
        first.close()


CATALOGUE: list[tuple[Callable, type[BaseException], str]] = [
    (unknown_module, UnknownNameError, r"no module named 'blocks.7.up'.*did you mean"),
    (unknown_group_constructor, UnknownNameError, r"matches no module name"),
    (parameter_given_to_a_module_hook, UnknownNameError, r"it is a parameter"),
    (wrong_expected_shape, ShapeMismatchError, r"\(4, 3, 8\) but expected_shape is \(5, 3, 8\)"),
    (expected_shape_of_the_wrong_rank, LayoutError, r"expected_shape \(None, 8\) has 2 dims"),
    (sizes_that_do_not_divide, MeshSizeError, r"tp=3 x pp=1 does not divide the 2 ranks"),
    (sizes_that_do_not_multiply_to_the_world, MeshSizeError, r"does not match the world size"),
    (unknown_group_in_a_call, UnknownGroupError, r"no hook group named 'mpls'.*did you mean"),
    (removing_group_all, GroupError, r"cannot be removed"),
    (grouping_an_unregistered_hook, GroupError, r"is not registered with this FlexModel"),
    (registering_a_hook_twice, HookRegistrationError, r"already registered with this"),
    (a_hook_of_another_flexmodel, HookRegistrationError, r"already registered with another"),
    (entering_an_active_theater_again, SurgeryError, r"already active"),
    (leaving_theaters_out_of_order, SurgeryError, r"out of order"),
    (a_second_flexmodel_on_a_wrapped_model, HookRegistrationError,
     r"already wrapped by a FlexModel"),
    (wrapping_a_flexmodel, HookRegistrationError, r"is a FlexModel"),
]


def _hooks(model: torch.nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(m._backward_pre_hooks) for m in model.modules()]


@pytest.mark.parametrize("case, error, message", CATALOGUE,
                         ids=[c[0].__name__ for c in CATALOGUE])
@distributed(world_size=2, timeout_s=60)
def test_bad_input_is_a_clear_error_and_leaves_nothing_modified(case, error, message):
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = plain_net()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    gc.collect()
    free_dropped(None)  # what earlier bodies dropped does not count here
    hooks, groups = _hooks(model), live_group_count()
    with pytest.raises(error, match=message):
        case(model)
    gc.collect()
    FlexModel(model, {}, data_parallel_size=2).close()  # frees what a failed case dropped
    assert _hooks(model) == hooks, "hooks were left on the model"
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), f"{name} was left modified"
    assert live_group_count() == groups, "a process group was left behind"
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2



@pytest.mark.parametrize("hooked", [False, True], ids=["wrapped", "hooked"])
@distributed(world_size=2, timeout_s=20)
def test_deepcopy_of_a_model_under_a_distributed_flexmodel_says_what_to_do(hooked):
    """copy.deepcopy of a DDP a FlexModel wraps reaches the FlexModel's process groups through
    its hooks: a TypeError that says to copy before wrapping or to close first (torch's own
    was "cannot pickle ProcessGroup"). After close() the copy is made and computes what the
    original does."""
    import copy

    from parallel_cases import actual_names
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(plain_net(0))
    flex = FlexModel(model, {})
    if hooked:
        flex.register_forward_hook(HookFunction(actual_names(model)["blocks.0.up"]))
    with pytest.raises(TypeError, match="Deep-copy the model before wrapping it"):
        copy.deepcopy(model)
    flex.close()
    twin = copy.deepcopy(model)
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(dist.get_rank()))
    out, twin_out = model(x), twin(x)
    assert torch.equal(out, twin_out)
    out.sum().backward()
    twin_out.sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
