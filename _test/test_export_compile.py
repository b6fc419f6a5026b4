"""Compiled ExportedModels (torch.compile, AOTInductor) use injected weights without recompiling.

Inductor on CPU compiles C++ (~30 s per test on 2 cores), so these run only with
FLEX_SURGERY_SLOW=1.
"""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

from flex_surgery.export import ExportedModel
from flex_surgery.models import example_inputs, tiny_hf_model

pytestmark = pytest.mark.skipif(os.environ.get("FLEX_SURGERY_SLOW") != "1",
                                reason="torch.compile on CPU takes ~30 s; set FLEX_SURGERY_SLOW=1")


def test_compiled_program_uses_injected_weights_without_recompiling():
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    ids = example_inputs("gpt2")["input_ids"]
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids}).compile()
    with torch.no_grad():
        first = exported(input_ids=ids)
        torch.testing.assert_close(first, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            with exported.weights(other):
                swapped = exported(input_ids=ids)
            restored = exported(input_ids=ids)
        torch.testing.assert_close(swapped, other(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(swapped, first)
        assert torch.equal(restored, first)


def test_aot_inductor_package_reads_the_program_weights(tmp_path):
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    ids = example_inputs("gpt2")["input_ids"]
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids})
    exported.compile_aoti(tmp_path / "model.pt2")
    entries = zipfile.ZipFile(tmp_path / "model.pt2").namelist()
    assert not [e for e in entries if "weight" in e or "constant" in e]  # weights live outside
    with torch.no_grad():
        first = exported(input_ids=ids)
        torch.testing.assert_close(first, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with exported.weights(other):
            swapped = exported(input_ids=ids)
        torch.testing.assert_close(swapped, other(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(exported(input_ids=ids), first)
