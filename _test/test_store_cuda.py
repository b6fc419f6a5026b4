"""DiskStore on a CUDA device (skipped without one): tensors copied to pinned host memory
without blocking are complete before the writer thread writes them, even when a buffer is
handed over in the middle of a forward (``buffer_bytes=1``)."""

from __future__ import annotations

import pytest
import torch

from flex_surgery import FlexModel, HookFunction
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.store import DiskStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_disk_store_of_a_cuda_model_equals_the_cpu_model(tmp_path):
    names = [f"transformer.h.{i}.mlp" for i in range(2)]
    inputs = example_inputs("gpt2", batch=4, seq=32)
    stored: dict = {}
    flex = FlexModel(tiny_hf_model("gpt2"), stored)
    for name in names:
        flex.register_forward_hook(HookFunction(name))
    flex(**inputs)
    flex.close()

    with DiskStore(tmp_path, buffer_bytes=1) as store:
        flex = FlexModel(tiny_hf_model("gpt2").cuda(), None, store=store)
        for name in names:
            flex.register_forward_hook(HookFunction(name))
        flex(**{k: v.cuda() for k, v in inputs.items()})
        flex.close()
    for name in names:
        torch.testing.assert_close(DiskStore(tmp_path).read(name, 0), stored[name][0],
                                   rtol=1e-4, atol=1e-5)
