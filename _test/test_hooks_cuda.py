"""FlexModel on a CUDA device (skipped without one): activations and gradients stored by hooks
are copied to the host without blocking, and are complete, exact copies once forward or
backward returns."""

from __future__ import annotations

import pytest
import torch

from flex_surgery import FlexModel, HookFunction
from flex_surgery.models import example_inputs, tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(device: str):
    model = tiny_hf_model("gpt2").to(device)
    stored: dict = {}
    flex = FlexModel(model, stored)
    for i in range(2):
        flex.register_forward_hook(HookFunction(f"transformer.h.{i}.mlp"))
        flex.register_full_backward_hook(HookFunction(f"transformer.h.{i}.attn"))
    flex.register_hook(HookFunction("transformer.h.0.mlp.c_fc.weight"))
    inputs = {k: v.to(device) for k, v in example_inputs("gpt2", batch=4, seq=32).items()}
    out = flex(**inputs).logits
    forward_copies = {k: [t.clone() for t in v] for k, v in stored.items()}
    # Overwrite the device activations' memory with more work before anyone reads the copies.
    out.float().pow(2).mean().backward()
    flex.restore()
    return stored, forward_copies


def test_cuda_stored_tensors_equal_a_cpu_run_and_are_complete_on_return():
    gpu_stored, gpu_forward = _run("cuda")
    cpu_stored, _ = _run("cpu")
    assert gpu_stored.keys() == cpu_stored.keys() and len(gpu_stored) == 5
    for key, values in gpu_stored.items():
        assert all(v.device.type == "cpu" for v in values)
        for got, want in zip(values, cpu_stored[key]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for key, values in gpu_forward.items():  # what forward's return showed is what stays
        for early, final in zip(values, gpu_stored[key]):
            assert torch.equal(early, final)


def test_cuda_stored_value_is_the_one_before_later_in_place_changes():
    """The host copy travels on a side stream while the compute stream goes on: an editing
    function that edits in place, and the model changing the tensor in place after the hook,
    must not reach the stored value."""
    lin = torch.nn.Linear(64, 64).cuda()
    stored: dict = {}
    flex = FlexModel(torch.nn.Sequential(lin), stored)

    def in_place(module, tensor, ctx, modules):
        return tensor.mul_(2)

    flex.register_forward_hook(HookFunction("0", editing_function=in_place))
    lin.register_forward_hook(lambda m, a, out: out.add_(1000.0))  # runs after FlexModel's
    x = torch.randn(512, 64, device="cuda")
    with torch.no_grad():
        want = lin.weight @ x.T
        out = flex(x)
    torch.testing.assert_close(stored["0"][0], (want.T + lin.bias).cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, (want.T + lin.bias) * 2 + 1000.0, rtol=1e-4, atol=1e-3)
    flex.restore()
