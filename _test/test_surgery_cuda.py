"""SurgicalTheater on a CUDA device (skipped without one): device memory is exactly the modified
bytes with ``backup="device"`` and zero with ``backup="cpu"``; restore is bit-exact in place."""

from __future__ import annotations

import pytest
import torch
from test_surgery_support import differing_bytes, raw_state, special_values

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgicalTheater

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backup", ["device", "cpu"])
@pytest.mark.parametrize("kind", ["scale", "noise", "disable"])
def test_cuda_memory_and_bit_exact_restore(dtype, backup, kind):
    model = tiny_hf_model("llama", dtype=dtype).cuda()
    special_values(model)
    x = {k: v.cuda() for k, v in example_inputs("llama").items()}
    before = raw_state(model)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with SurgicalTheater(model, modification_type=kind, seed=0, backup=backup) as theater:
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated() - base
        modified = theater.stats["modified_bytes"]
        model(**x)
    # The caching allocator rounds each block up to 512 bytes.
    expected = modified if backup == "device" else 0
    assert expected <= extra <= expected + 512 * theater.stats["modified_parameters"]
    assert differing_bytes(before, raw_state(model)) == 0


def test_cuda_noise_equals_cpu_noise():
    """Seeded noise is a function of (seed, name) only: it is drawn on CPU generators and copied
    to the device, so a CUDA model gets exactly the CPU model's noise."""
    cpu = tiny_hf_model("llama")
    gpu = tiny_hf_model("llama").cuda()
    with SurgicalTheater(cpu, layers="lm_head", modification_type="noise", seed=1):
        a = cpu.lm_head.weight.detach().clone()
    with SurgicalTheater(gpu, layers="lm_head", modification_type="noise", seed=1):
        b = gpu.lm_head.weight.detach().cpu()
    with SurgicalTheater(gpu, layers="lm_head", modification_type="noise", seed=1):
        assert torch.equal(gpu.lm_head.weight.cpu(), b)
    assert torch.equal(a, b)
